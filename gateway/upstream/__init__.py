"""The EHR connection: its FHIR R4 API (client, sync) and the outbox of writes back to it."""
