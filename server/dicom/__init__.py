"""The DICOM network edge and DICOM file handling. DICOM statuses live here only."""
