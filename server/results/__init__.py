"""Encoding findings as DICOM result objects (highdicom), and writing them durably."""
