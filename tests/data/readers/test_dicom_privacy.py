"""Nothing from a DICOM header that identifies a patient leaves a site: not in the error
texts, not in the site summary, not in a run's files (sites.json, report, logs)."""

import json

import numpy as np
import pytest
from dicom_files import PHI, write_dicom

from medfed.config import parse_job
from medfed.core.errors import DataError
from medfed.data.sites import build_sites, describe_sites

BAD = ("no_pixels", "pixels_cut", "unsupported")


def _leaks(text: str) -> list[str]:
    return [v for v in PHI.values() if v in text]


def _site_files(folder, n=16):
    """n readable 16x16 DICOM files carrying PHI, two classes, and three unreadable ones."""
    import pydicom
    from pydicom import uid
    from pydicom.encaps import encapsulate

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 2048 + 2048 * (i % 2), (16, 16)).astype(np.uint16)
        write_dicom(folder / f"im{i}.dcm", pixels, bits_stored=12, **PHI)
        rows.append((f"im{i}.dcm", i % 2))
    for j, case in enumerate(BAD):
        path = write_dicom(folder / f"{case}.dcm", np.zeros((16, 16), np.uint16), bits_stored=12, **PHI)
        ds = pydicom.dcmread(path)
        if case == "no_pixels":
            del ds.PixelData
        elif case == "unsupported":
            ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
            ds.PixelData = encapsulate([b"\0" * 64])
            ds["PixelData"].VR = "OB"
        ds.save_as(path)
        if case == "pixels_cut":
            path.write_bytes(path.read_bytes()[:-50])
        rows.append((path.name, j % 2))
    return rows


def _job(tmp_path, on_bad_file="skip", **extra):
    img = tmp_path / "img"
    rows = _site_files(img)
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{f},{y}\n" for f, y in rows))
    body = {
        "name": "phi", "seed": 1, "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
        "data": {"source": "folder", "label_columns": ["label"], "on_bad_file": on_bad_file, "split": {"val": 0.25, "test": 0.25},
                 "sites": [{"name": "h1", "images": str(img), "csv": str(tmp_path / "labels.csv")}]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
        "train": {"batch_size": 4}, "compare": [],
    }
    body.update(extra)
    return parse_job(body)


def test_error_of_a_site_names_the_file_not_the_patient(tmp_path):
    with pytest.raises(DataError) as e:
        build_sites(_job(tmp_path, on_bad_file="error"))
    text = str(e.value)
    assert "site 'h1'" in text and ".dcm'" in text and not _leaks(text), text


def test_site_summary_lists_skipped_files_without_the_patient(tmp_path):
    job = _job(tmp_path)
    (site,) = build_sites(job)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in site.skipped) == sorted(f"{c}.dcm" for c in BAD)
    (summary,) = describe_sites([site], job.task)
    text = json.dumps(summary.model_dump(mode="json"))
    assert summary.skipped == 3 and "pixel data" in text and "transfer syntax" in text, text
    assert not _leaks(text), text


def test_run_folder_holds_no_patient_value(tmp_path):
    from medfed.server.runner import run_job

    run = run_job(_job(tmp_path)).run_dir
    sites = json.loads((run / "sites.json").read_text())["sites"]
    assert sites[0]["skipped"] == 3, sites
    checked = 0
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [v for v in PHI.values() if v.encode() in data or v.encode("utf-16-le") in data]
            assert not leaked, f"{path} holds {leaked}"
            checked += 1
    for name in ("sites.json", "report.html", "run.log"):  # the refusals reach them, the patient does not
        assert "pixel data" in (run / name).read_text(), name
    assert checked >= 5
