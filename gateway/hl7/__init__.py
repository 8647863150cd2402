"""HL7v2 in and out: MLLP transport, tolerant ER7 parsing, ACKs, translation to FHIR, ingest."""

from gateway.compiled import prefer_fresh_sources

prefer_fresh_sources()
