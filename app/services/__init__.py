"""Orchestrators: combine storage, crypto, transfer and DICOM code. No HTTP here."""
