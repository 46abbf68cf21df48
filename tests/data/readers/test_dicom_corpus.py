"""The sweep of benchmarks/dicom_corpus.py over pydicom's own test files that are on this
machine (nothing is downloaded): every DICOM file with pixel data is read with the pixels
pydicom decodes after the same LUTs, or refused with an error naming the file."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "dicom_corpus.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("dicom_corpus", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dicom_corpus", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    outcomes, _missing, _without = module.sweep()
    return module, outcomes


def test_no_mismatch_and_every_refusal_names_the_file(sweep):
    _, outcomes = sweep
    assert len(outcomes) >= 90, f"only {len(outcomes)} files with pixel data found in pydicom's test data"
    mismatches = [f"{o.file}: {o.detail}" for o in outcomes if o.outcome == "mismatch"]
    assert not mismatches, "\n".join(mismatches)  # classify() turns a refusal without the file name into one
    counts = Counter(o.outcome for o in outcomes)
    assert counts["read"] >= 80 and counts["multi"] >= 5, counts


def test_every_compressed_family_is_read(sweep):
    """The plugins in pyproject.toml decode each family the issue names (12-bit JPEG
    extended, the only JPEG Extended files here, with the jpeg12 extra)."""
    _, outcomes = sweep
    read = {o.syntax for o in outcomes if o.outcome == "read"}
    extended = ("JPEG Extended",) if importlib.util.find_spec("libjpeg") is not None else ()
    for family in ("JPEG Baseline", *extended, "JPEG Lossless", "JPEG-LS Lossless", "JPEG-LS Lossy",
                   "JPEG 2000 Image Compression (Lossless Only)", "RLE Lossless", "Deflated", "Big Endian"):
        assert any(s.startswith(family) or family in s for s in read), f"no {family} file read: {sorted(read)}"


def test_refusal_reasons_are_grouped(sweep):
    module, outcomes = sweep
    groups = {o.detail.split(":")[0] for o in outcomes if o.outcome == "refused"}
    assert "other" not in groups and "pixel data truncated" in groups, groups
    assert module.reason_group("unsupported transfer syntax 'MPEG2 ...'") == "unsupported transfer syntax"
