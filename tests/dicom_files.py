"""Small DICOM files made with pydicom for the reader tests (no network, no shipped data)."""

from pathlib import Path

import numpy as np

# Values that identify a patient, distinctive enough that finding one in any text means it leaked.
PHI = {
    "PatientName": "Quaxley^Zorbelina",
    "PatientID": "PID-7781-XQZ",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "ACC-55193-QW",
}


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                syntax: str | None = None, **attrs) -> Path:
    """``pixels`` ((rows, cols) grey or (rows, cols, 3) colour; (frames, ...) for several
    frames) as a DICOM Part 10 file with the header attributes ``attrs``, stored
    uncompressed or compressed to transfer syntax ``syntax`` with pydicom's encoders."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        UID,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    bits = bits_stored or 8 * pixels.dtype.itemsize
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if syntax is not None and UID(syntax).is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
