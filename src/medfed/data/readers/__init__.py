"""Readers of the formats hospitals hold: MedMNIST arrays, image folders with a CSV, image/mask pairs, NIfTI and DICOM."""
