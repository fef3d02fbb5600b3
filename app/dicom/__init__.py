"""Pure DICOM code: UIDs, media types, multipart, DICOM JSON, status codes. No web framework."""
