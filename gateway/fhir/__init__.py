"""FHIR R4: the store, search, validation and the REST API."""

from gateway.compiled import prefer_fresh_sources

prefer_fresh_sources()
