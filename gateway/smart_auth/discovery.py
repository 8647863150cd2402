"""Discovery documents at the FHIR base: smart-configuration and openid-configuration."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from gateway.config import Settings

bp = Blueprint("smart_discovery", __name__)

SCOPES_SUPPORTED = [
    "openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access", "online_access",
    "patient/*.rs", "patient/*.cruds", "user/*.rs", "user/*.cruds", "system/*.rs", "system/*.cruds",
    "patient/*.read", "patient/*.write", "patient/*.*", "user/*.read", "user/*.write", "user/*.*",
    "system/*.read", "system/*.write", "system/*.*",
]
# Only what the server really does (SMART App Launch 2.x, section "Capabilities").
CAPABILITIES = [
    "launch-ehr", "launch-standalone", "authorize-post", "client-public", "client-confidential-symmetric",
    "client-confidential-asymmetric", "sso-openid-connect", "context-ehr-patient", "context-ehr-encounter",
    "context-standalone-patient", "context-banner", "context-style", "permission-offline", "permission-online",
    "permission-patient", "permission-user", "permission-v1", "permission-v2",
]


def endpoints(settings: Settings) -> dict[str, str]:
    base = settings.base_url + "/auth"
    return {"authorize": base + "/authorize", "token": base + "/token", "introspect": base + "/introspect",
            "revoke": base + "/revoke", "jwks": base + "/jwks"}


def smart_configuration(settings: Settings) -> dict[str, Any]:
    urls = endpoints(settings)
    return {
        "issuer": settings.fhir_base,
        "jwks_uri": urls["jwks"],
        "authorization_endpoint": urls["authorize"],
        "token_endpoint": urls["token"],
        "introspection_endpoint": urls["introspect"],
        "revocation_endpoint": urls["revoke"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": CAPABILITIES,
    }


def openid_configuration(settings: Settings) -> dict[str, Any]:
    urls = endpoints(settings)
    return {
        "issuer": settings.fhir_base,
        "authorization_endpoint": urls["authorize"],
        "token_endpoint": urls["token"],
        "jwks_uri": urls["jwks"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "profile"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "code_challenge_methods_supported": ["S256"],
    }


def security(settings: Settings) -> dict[str, Any]:
    """CapabilityStatement.rest.security: fhirclient finds the OAuth endpoints only here."""
    urls = endpoints(settings)
    return {
        "cors": True,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}], "text": "OAuth2 using SMART-on-FHIR profile"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": name, "valueUri": urls[name]} for name in ("authorize", "token", "introspect",
                                                                             "revoke")],
        }],
    }


def _settings() -> Settings:
    return current_app.extensions["gateway"].settings


@bp.get("/fhir/.well-known/smart-configuration")
def smart_configuration_view() -> Response:
    return jsonify(smart_configuration(_settings()))


@bp.get("/fhir/.well-known/openid-configuration")
def openid_configuration_view() -> Response:
    return jsonify(openid_configuration(_settings()))
