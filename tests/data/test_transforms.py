import random

import numpy as np
import pytest
import torch

from medfed.config import (
    ContrastStep,
    CropOrPadStep,
    FlipStep,
    IntensityStep,
    NoiseStep,
    NormalizeStep,
    ResizeStep,
    Rotate90Step,
    RotateStep,
    SpacingStep,
    WindowStep,
    ZoomStep,
)
from medfed.core.errors import DataError
from medfed.data.base import Record
from medfed.data.transforms import build_augment, build_preprocess

# --------------------------------------------------------------------------- preprocessing


def _record(shape, mask_classes=3, spacing=None, name="case_1.nii.gz", seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    mask = rng.integers(0, mask_classes, size=shape).astype(np.int64)
    return Record(name=name, image=image, target=mask, spacing=spacing)


def test_window_preset_clips_and_scales_to_unit_range():
    lo, hi = WindowStep(name="window", preset="ct_brain").bounds  # (0, 80)
    assert (lo, hi) == (0.0, 80.0)
    image = np.array([[[-1000.0, 0.0, 20.0], [40.0, 80.0, 3000.0]]], dtype=np.float32)
    rec = Record("ct.nii", image, np.zeros((2, 3), np.int64), spacing=(1.0, 1.0))
    out = build_preprocess([WindowStep(name="window", preset="ct_brain")], 2, True)(rec)
    np.testing.assert_allclose(out.image, [[[0.0, 0.0, 0.25], [0.5, 1.0, 1.0]]], atol=1e-6)
    assert out.image.dtype == np.float32 and out.target.dtype == np.int64
    out = build_preprocess([WindowStep(name="window", min=-100, max=100)], 2, True)(rec)
    np.testing.assert_allclose(out.image, [[[0.0, 0.5, 0.6], [0.7, 0.9, 1.0]]], atol=1e-6)


def test_zscore_is_per_channel_and_nonzero_leaves_background():
    rng = np.random.default_rng(1)
    image = np.stack([rng.normal(5, 3, (16, 16)), rng.normal(-2, 0.5, (16, 16))]).astype(np.float32)
    rec = Record("a.png", image, np.array(1, np.int64))
    out = build_preprocess([NormalizeStep(name="normalize")], 2, False)(rec)
    np.testing.assert_allclose(out.image.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.image.std(axis=(1, 2)), 1, atol=1e-3)
    assert out.target is rec.target  # a classification label is left alone

    image = np.zeros((1, 16, 16), np.float32)
    image[0, 4:12, 4:12] = rng.normal(100, 10, (8, 8))
    out = build_preprocess([NormalizeStep(name="normalize", nonzero=True)], 2, False)(Record("b.png", image, rec.target))
    assert np.all(out.image[0][image[0] == 0] == 0)
    inside = out.image[0, 4:12, 4:12]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3


def test_minmax_scales_the_image_to_unit_range():
    image = np.array([[[2.0, 4.0], [6.0, 10.0]]], np.float32)
    out = build_preprocess([NormalizeStep(name="normalize", mode="minmax")], 2, False)(
        Record("c.png", image, np.array(0, np.int64))
    )
    np.testing.assert_allclose(out.image, [[[0.0, 0.25], [0.5, 1.0]]], atol=1e-6)


def test_spacing_resamples_image_and_mask_and_sets_the_spacing():
    rec = _record((4, 5, 6), mask_classes=3, spacing=(2.0, 2.0, 2.0))
    out = build_preprocess([SpacingStep(name="spacing", pixdim=[1, 1, 1])], 3, True)(rec)
    assert out.image.shape == (1, 8, 10, 12) and out.image.dtype == np.float32
    assert out.target.shape == (8, 10, 12) and out.target.dtype == np.int64
    assert set(np.unique(out.target)) == set(np.unique(rec.target))
    assert out.spacing == (1.0, 1.0, 1.0)
    assert out.name == rec.name
    # upsampling by 2 with nearest: each voxel becomes a 2x2x2 block
    np.testing.assert_array_equal(out.target[::2, ::2, ::2], rec.target)


def test_spacing_anisotropic_in_2d():
    rec = _record((6, 4), spacing=(1.0, 3.0), name="slice.dcm")
    out = build_preprocess([SpacingStep(name="spacing", pixdim=[2.0, 1.5])], 2, True)(rec)
    assert out.image.shape == (1, 3, 8) and out.target.shape == (3, 8)
    assert out.spacing == (2.0, 1.5)


def test_missing_spacing_is_an_error_naming_the_record():
    rec = _record((4, 4, 4), spacing=None, name="patient_042.png")
    pre = build_preprocess([SpacingStep(name="spacing", pixdim=[1, 1, 1])], 3, True)
    with pytest.raises(DataError, match=r"patient_042\.png.*no voxel spacing.*records none"):
        pre(rec)


@pytest.mark.parametrize("dims", [2, 3])
def test_crop_or_pad_and_resize_shapes(dims):
    shape = (10, 7) if dims == 2 else (10, 7, 5)
    size = [8, 9] if dims == 2 else [8, 9, 4]
    rec = _record(shape, spacing=(1.0,) * dims)
    out = build_preprocess([CropOrPadStep(name="crop_or_pad", size=size)], dims, True)(rec)
    assert out.image.shape == (1, *size) and out.target.shape == tuple(size)
    assert out.target.dtype == np.int64 and set(np.unique(out.target)) <= {0, 1, 2}
    assert out.spacing == rec.spacing

    out = build_preprocess([ResizeStep(name="resize", size=[s * 2 for s in size])], dims, True)(rec)
    assert out.image.shape == (1, *[s * 2 for s in size]) and out.target.shape == tuple(s * 2 for s in size)
    assert out.image.dtype == np.float32 and out.target.dtype == np.int64
    assert set(np.unique(out.target)) == set(np.unique(rec.target))
    # the field of view is kept, so the spacing scales
    np.testing.assert_allclose(out.spacing, [o / (2 * s) for o, s in zip(shape, size)])

    cls = Record("x.png", rec.image, np.array(2, np.int64))
    out = build_preprocess([ResizeStep(name="resize", size=size)], dims, False)(cls)
    assert out.image.shape == (1, *size) and out.target is cls.target and out.spacing is None


def test_steps_apply_in_order():
    rec = _record((8, 8), spacing=(0.5, 0.5))
    steps = [
        ResizeStep(name="resize", size=[4, 4]),
        CropOrPadStep(name="crop_or_pad", size=[6, 6]),
        NormalizeStep(name="normalize", mode="minmax"),
    ]
    out = build_preprocess(steps, 2, True)(rec)
    assert out.image.shape == (1, 6, 6) and out.image.min() == 0 and out.image.max() == 1
    assert out.spacing == (1.0, 1.0)


def test_sizes_that_do_not_match_dims_are_errors():
    with pytest.raises(DataError, match=r"preprocess\[1\].*3 sizes for 3D"):
        build_preprocess([NormalizeStep(name="normalize"), ResizeStep(name="resize", size=[4, 4])], 3, True)
    with pytest.raises(DataError, match="2 sizes"):
        build_preprocess([SpacingStep(name="spacing", pixdim=[1, 1, 1])], 2, True)
    with pytest.raises(DataError, match="patch"):
        build_augment([], [8, 8, 8], 2, True)
    with pytest.raises(DataError, match="flip"):
        build_augment([FlipStep(name="flip", axes=[2])], None, 2, True)


def test_a_record_of_the_wrong_rank_is_an_error_naming_it():
    rec = _record((4, 4), name="flat.png")
    with pytest.raises(DataError, match="flat.png"):
        build_preprocess([CropOrPadStep(name="crop_or_pad", size=[2, 2, 2])], 3, True)(rec)


# --------------------------------------------------------------------------- augmentation

FLIP = FlipStep(name="flip", axes=[0, 1], prob=0.5)
ROT90 = Rotate90Step(name="rotate90", prob=0.75)
ALL = [
    FLIP, ROT90, RotateStep(name="rotate", degrees=20, prob=0.5), ZoomStep(name="zoom", prob=0.5),
    IntensityStep(name="intensity", prob=0.5), NoiseStep(name="noise", prob=0.5), ContrastStep(name="contrast", prob=0.5),
]


def _batch(b=6, shape=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, *shape, generator=g)
    return x, (x[:, 0] > 0.5).to(torch.int64)


def test_same_seed_same_output_other_seed_differs():
    aug = build_augment(ALL, [12, 12], 2, True)
    x, y = _batch()
    x0, y0 = x.clone(), y.clone()
    a1, m1 = aug(x, y, 7)
    a2, m2 = aug(x, y, 7)
    a3, m3 = aug(x, y, 8)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    a4, m4 = build_augment(ALL, [12, 12], 2, True)(x, y, 7)  # a fresh augmenter agrees
    assert torch.equal(a1, a4) and torch.equal(m1, m4)
    assert not torch.equal(a1, a3)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert a1.dtype == torch.float32 and m1.dtype == torch.int64
    assert a1.shape == (6, 1, 12, 12) and m1.shape == (6, 12, 12)
    assert type(a1) is torch.Tensor and type(m1) is torch.Tensor


def test_examples_of_a_batch_are_augmented_independently():
    aug = build_augment([RotateStep(name="rotate", degrees=30, prob=1.0)], None, 2, True)
    x = torch.rand(1, 1, 16, 16).repeat(4, 1, 1, 1)
    out, _ = aug(x, (x[:, 0] > 0.5).long(), 3)
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 4))


@pytest.mark.parametrize("patch", [None, [10, 12]])
def test_mask_follows_the_image_through_flips_rotations_and_crops(patch):
    aug = build_augment([FlipStep(name="flip", axes=[0, 1], prob=0.5), Rotate90Step(name="rotate90", prob=0.9)], patch, 2, True)
    x, y = _batch(b=8)
    changed = False
    for seed in range(3):
        out, mask = aug(x, y, seed)
        assert torch.equal(mask, (out[:, 0] > 0.5).to(torch.int64))
        changed |= not torch.equal(out[:, :, :10, :10], x[:, :, :10, :10])
    assert changed


def test_rotate_and_zoom_keep_masks_integer_and_aligned():
    x = torch.zeros(4, 1, 24, 24)
    x[:, :, 6:18, 8:16] = 1.0
    y = x[:, 0].to(torch.int64) * 2
    aug = build_augment([RotateStep(name="rotate", degrees=30, prob=1), ZoomStep(name="zoom", min=0.8, max=1.2, prob=1)],
                        None, 2, True)
    out, mask = aug(x, y, 0)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 2}
    inside = (mask == 2)
    assert out[:, 0][inside].mean() > 0.7 and out[:, 0][~inside].mean() < 0.3


def test_patch_crop_shapes_and_padding_of_small_images():
    aug = build_augment([], [8, 20], 2, True)
    assert not aug.is_identity
    x, y = _batch(b=3, shape=(16, 16))
    out, mask = aug(x, y, 0)
    assert out.shape == (3, 1, 8, 20) and mask.shape == (3, 8, 20)
    assert torch.equal(mask, (out[:, 0] > 0.5).long())  # padding is 0 in both

    x3 = torch.rand(2, 1, 10, 12, 14)
    aug3 = build_augment([FLIP, RotateStep(name="rotate", prob=1)], [8, 8, 8], 3, True)
    out, mask = aug3(x3, (x3[:, 0] > 0.5).long(), 1)
    assert out.shape == (2, 1, 8, 8, 8) and mask.shape == (2, 8, 8, 8)


def test_rotate90_turns_the_last_two_axes_in_3d():
    x = torch.rand(3, 1, 4, 6, 6)
    aug = build_augment([Rotate90Step(name="rotate90", prob=1.0)], None, 3, True)
    out, mask = aug(x, (x[:, 0] > 0.5).long(), 2)
    assert out.shape == x.shape
    for b in range(3):
        for d in range(4):  # each slice along axis 0 keeps its values
            assert torch.equal(out[b, 0, d].flatten().sort().values, x[b, 0, d].flatten().sort().values)
    assert not torch.equal(out, x)


def test_rotate90_of_non_square_images_keeps_the_batch_shape():
    aug = build_augment([Rotate90Step(name="rotate90", prob=1.0)], None, 2, True)
    x, y = _batch(b=4, shape=(8, 12))
    out, mask = aug(x, y, 0)
    assert out.shape == x.shape and torch.equal(out, torch.flip(x, dims=(2, 3)))
    assert torch.equal(mask, (out[:, 0] > 0.5).long())


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 1]), torch.tensor([[0.0, 1.0], [1, 1], [0, 0], [1, 0]])])
def test_classification_labels_are_untouched(labels):
    aug = build_augment(ALL, None, 2, False)
    x = torch.rand(4, 3, 16, 16)
    out, lab = aug(x, labels, 5)
    assert lab is labels
    assert out.shape == x.shape and out.dtype == torch.float32


def test_identity_and_prob_zero_steps():
    assert build_augment([], None, 2, True).is_identity
    assert build_augment([FlipStep(name="flip", prob=0.0)], None, 2, True).is_identity
    assert not build_augment([FLIP], None, 2, True).is_identity
    x, y = _batch(b=2)
    out, mask = build_augment([], None, 2, True)(x, y, 0)
    assert torch.equal(out, x) and torch.equal(mask, y)


def test_global_random_states_are_left_alone():
    aug = build_augment(ALL, [12, 12], 2, True)
    x, y = _batch()
    torch.manual_seed(123)
    np.random.seed(4)
    random.seed(5)
    t, n, p = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    aug(x, y, 9)
    assert torch.equal(torch.random.get_rng_state(), t)
    assert np.array_equal(np.random.get_state()[1], n) and random.getstate() == p


def test_intensity_steps_change_only_the_image():
    steps = [IntensityStep(name="intensity", prob=1.0), NoiseStep(name="noise", prob=1.0),
             ContrastStep(name="contrast", prob=1.0)]
    x, y = _batch(b=4)
    out, mask = build_augment(steps, None, 2, True)(x, y, 0)
    assert torch.equal(mask, y) and not torch.allclose(out, x)


def test_bad_batch_shapes_are_errors():
    aug = build_augment([FLIP], None, 2, True)
    with pytest.raises(DataError, match="masks of shape"):
        aug(torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 9, dtype=torch.int64), 0)
    with pytest.raises(DataError, match="expected images"):
        aug(torch.rand(2, 1, 8, 8, 8), torch.zeros(2, 8, 8, 8, dtype=torch.int64), 0)
