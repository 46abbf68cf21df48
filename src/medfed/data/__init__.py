"""Data: readers (synthetic, MedMNIST), partitioners, and the in-memory site data type."""
