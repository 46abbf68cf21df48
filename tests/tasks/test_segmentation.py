import pytest
import torch
from torch import nn

from medfed.config import ModelConfig, SegmentationTaskConfig
from medfed.models import build_model
from medfed.tasks.segmentation import SegmentationTask


def _task(k=2, hd95=True, patch=None):
    return SegmentationTask(SegmentationTaskConfig(kind="segmentation", num_classes=k, hd95=hd95), patch=patch)


def _logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    """Logits whose argmax is ``pred`` (B, *sp)."""
    return torch.nn.functional.one_hot(pred, k).movedim(-1, 1).float() * 5


def _square(size=24, top=5, left=5, side=10, value=1, base=None):
    m = torch.zeros(size, size, dtype=torch.long) if base is None else base.clone()
    m[top : top + side, left : left + side] = value
    return m


# --------------------------------------------------------------------------- loss


def test_loss_decreases_on_a_tiny_unet():
    torch.manual_seed(0)
    masks = torch.stack([_square(16, t, t, 6) for t in (1, 3, 5, 7)])
    images = masks[:, None].float() + 0.1 * torch.randn(4, 1, 16, 16)
    task = _task(2)
    model = build_model(ModelConfig(name="unet", width=4), task.cfg, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = task.loss(model(images), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert loss.ndim == 0
    assert losses[-1] < 0.8 * losses[0]


def test_loss_of_half_precision_logits_is_float32_and_finite():
    task = _task(3)
    masks = torch.randint(0, 3, (2, 8, 8))
    logits = (torch.randn(2, 3, 8, 8) * 30).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.loss(logits, masks)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(task.loss(logits.float(), masks)), rel=1e-5)


def test_probabilities_are_a_softmax_over_classes():
    p = _task(3).probabilities(torch.randn(2, 3, 5, 5))
    assert torch.allclose(p.sum(1), torch.ones(2, 5, 5))


# --------------------------------------------------------------------------- metrics


def test_perfect_prediction_has_dice_1_and_hd95_0():
    gt = torch.stack([_square(), _square(top=2, left=9, side=6)])
    ev = _task(2).evaluator()
    ev.add(_logits(gt, 2), gt)
    r = ev.result()
    assert r["dice"] == pytest.approx(1.0) and r["dice_class_1"] == pytest.approx(1.0)
    assert r["hd95"] == pytest.approx(0.0) and r["hd95_class_1"] == pytest.approx(0.0)


def test_shifted_square_dice_and_hd95_in_pixels_and_mm():
    gt = _square()[None]
    pred = _square(left=8)[None]  # the 10x10 square moved 3 pixels along the columns
    # overlap 10 x 7 = 70 -> Dice 140 / 200; the boundaries are 3 columns apart on more
    # than 5 % of their pixels -> HD95 = 3 pixels, 6 mm with 2 mm per column
    for spacing, hd in ((None, 3.0), ((1.0, 2.0), 6.0)):
        ev = _task(2).evaluator(spacing=spacing)
        ev.add(_logits(pred, 2), gt)
        r = ev.result()
        assert r["dice"] == pytest.approx(0.7)
        assert r["hd95"] == pytest.approx(hd)


def test_class_absent_from_both_is_excluded_and_false_positive_on_empty_is_zero():
    task = _task(3)
    gt = torch.stack([_square(), _square()])  # class 2 is in neither ground truth
    pred = torch.stack([_square(), _square(base=_square(), top=0, left=0, side=2, value=2)])
    ev = task.evaluator()
    ev.add(_logits(pred[:1], 3), gt[:1])  # class 2 absent from gt and prediction
    r = ev.result()
    assert r["dice_class_1"] == pytest.approx(1.0)
    assert r["dice_class_2"] is None and r["hd95_class_2"] is None
    assert r["dice"] == pytest.approx(1.0) and r["hd95"] == pytest.approx(0.0)

    ev.add(_logits(pred[1:], 3), gt[1:])  # a false positive of class 2 on an empty mask
    r = ev.result()
    assert r["dice_class_2"] == pytest.approx(0.0)  # defined on the second image only
    assert r["dice"] == pytest.approx(0.5)  # mean of class 1 (1.0) and class 2 (0.0)
    assert r["hd95_class_2"] is None  # no ground-truth boundary: undefined


def test_per_class_mean_over_images_and_streaming_batches():
    gt = torch.stack([_square(), _square()])
    pred = torch.stack([_square(), _square(left=8)])  # Dice 1 and 0.7
    one = _task(2).evaluator()
    one.add(_logits(pred, 2), gt)
    two = _task(2).evaluator()
    two.add(_logits(pred[:1], 2), gt[:1])
    two.add(_logits(pred[1:], 2), gt[1:])
    assert one.result() == pytest.approx(two.result())
    assert one.result()["dice"] == pytest.approx(0.85)
    assert one.result()["hd95"] == pytest.approx(1.5)


def test_nothing_defined_gives_none_and_hd95_off_leaves_no_keys():
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    ev = _task(2, hd95=False).evaluator()
    assert ev.result() == {"dice": None, "dice_class_1": None}
    ev.add(_logits(empty, 2), empty)
    assert ev.result() == {"dice": None, "dice_class_1": None}


def test_3d_metrics():
    gt = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    gt[0, 2:8, 2:8, 2:8] = 1
    ev = _task(2).evaluator()
    ev.add(_logits(gt, 2), gt)
    assert ev.result()["dice"] == pytest.approx(1.0) and ev.result()["hd95"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- inference


class _Recorder(nn.Module):
    """A per-pixel model (1x1 convolution) that records the shapes it is called with: a
    sliding window over it must give exactly the whole-image result."""

    def __init__(self, dims: int, k: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, k, 1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[2:]))
        return self.conv(x)


@pytest.mark.parametrize(
    "patch,size",
    [((16, 16), (40, 24)), ((16, 16), (40, 12)), ((8, 8, 8), (20, 12, 8)), ((8, 8, 8), (12, 6, 10))],
)
def test_infer_slides_a_window_of_the_patch_size_and_returns_the_full_size(patch, size):
    model = _Recorder(len(patch)).eval()
    images = torch.rand((2, 1) + size)
    with torch.no_grad():
        out = _task(3, patch=patch).infer(model, images)
        whole = model.conv(images)
    assert out.shape == (2, 3) + size
    assert set(model.calls) == {patch}  # every window has the patch's size (padded if needed)
    assert torch.allclose(out, whole, atol=1e-5)


def test_infer_without_patch_or_at_patch_size_calls_the_model_once():
    images = torch.rand(2, 1, 16, 16)
    for patch in (None, (16, 16)):
        model = _Recorder(2).eval()
        with torch.no_grad():
            out = _task(3, patch=patch).infer(model, images)
        assert model.calls == [(16, 16)] and out.shape == (2, 3, 16, 16)


def test_infer_smaller_image_than_patch_with_a_unet():
    model = build_model(ModelConfig(name="unet", width=4), _task(2).cfg, 1, 3).eval()
    with torch.no_grad():
        out = _task(2, patch=(16, 16, 16)).infer(model, torch.rand(1, 1, 12, 20, 16))
    assert out.shape == (1, 2, 12, 20, 16)
