"""fhir-plugin: checks a patient's FHIR R4 record for the documentation an ICD-10-CM code needs,
and drafts a provisional Condition and a phased CarePlan for clinician review."""

__version__ = "0.1.0"
