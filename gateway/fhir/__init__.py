"""FHIR R4: the store, search, validation and the REST API."""

from gateway.compiled import prefer_fresh_source

prefer_fresh_source("gateway.fhir.indexer")
