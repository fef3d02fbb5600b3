"""Failure reasons for STOW-RS, keyed to the standard.

The codes are the DIMSE C-STORE status codes of PS3.7 Annex C and PS3.4 §B.2.3, which
PS3.18 §10.5.3 (Store Instances Response) uses for Failure Reason (0008,1197). Every place
that fails a part names one of these; nothing else invents a number.
"""

from __future__ import annotations

from enum import IntEnum


class FailureReason(IntEnum):
    #: PS3.7 C.4 "Processing failure": the server could not store an object it understood.
    PROCESSING_FAILURE = 0x0110
    #: PS3.7 C.4 "Duplicate SOP Instance": a different object already holds this SOP Instance UID.
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: PS3.4 B.2.3 "Refused: Out of Resources": the object exceeds the configured size limit.
    OUT_OF_RESOURCES = 0xA700
    #: PS3.4 B.2.3 "Error: Data Set does not match SOP Class": required attributes missing or
    #: invalid, or the Study Instance UID differs from the one in the request URL.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.4 B.2.3 "Error: Cannot understand": the part is not a parseable DICOM object.
    CANNOT_UNDERSTAND = 0xC000
    #: PS3.18 §10.5.3: the part's media type is not one the server accepts.
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


DESCRIPTIONS: dict[FailureReason, str] = {
    FailureReason.PROCESSING_FAILURE: "Processing failure",
    FailureReason.DUPLICATE_SOP_INSTANCE: "Duplicate SOP Instance",
    FailureReason.OUT_OF_RESOURCES: "Refused: Out of Resources",
    FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    FailureReason.CANNOT_UNDERSTAND: "Error: Cannot understand",
    FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED: "Referenced Transfer Syntax not supported",
}
