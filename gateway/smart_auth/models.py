"""Tables of the SMART authorization server (migration 0003_smart_auth), in the store's metadata.

Secrets are never stored as given: client secrets and passwords as argon2 hashes, authorization
codes, access and refresh tokens as SHA-256 digests (they are long random strings, so a fast hash is
enough and lets a token be found by its digest).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, String, Table, Text, UniqueConstraint

from gateway.db import PK, metadata

oauth_client = Table(
    "oauth_client",
    metadata,
    Column("client_id", String(255), primary_key=True),
    # public | confidential-symmetric | confidential-asymmetric
    Column("client_type", String(32), nullable=False),
    Column("secret_hash", String(255), nullable=True),
    Column("redirect_uris", Text, nullable=False),  # JSON list
    Column("scope", Text, nullable=False),
    Column("jwks_url", String(1024), nullable=True),
    Column("jwks", Text, nullable=True),  # inline JWKS (public keys)
    Column("launch_url", String(1024), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("name", String(255), nullable=True),  # shown to staff and on the consent page
    Column("disabled_ms", BigInteger, nullable=True),  # set: the client gets no tokens and its tokens stop
)

auth_user = Table(
    "auth_user",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("username", String(255), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("fhir_user", String(128), nullable=False),  # Patient/ID: the user's own record
    Column("totp_secret", String(64), nullable=True),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until_ms", BigInteger, nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    # Raised by "sign out everywhere": sessions started under an older epoch are over.
    Column("session_epoch", Integer, nullable=False, default=0, server_default="0"),
)

# A login's right to act for another patient. valid_until is inclusive (a date); a minor's parent
# gets the day before the 18th birthday.
proxy_grant = Table(
    "proxy_grant",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("relationship", String(32), nullable=False),
    # The patient's birth date, copied at grant time: it decides the 12-17 confidentiality rule
    # on every request without reading the Patient resource.
    Column("birth_date", String(10), nullable=True),
    # The FHIR record of the relationship: the proxy as a RelatedPerson, the grant as a Consent.
    Column("related_person", String(64), nullable=True),
    Column("consent_id", String(64), nullable=True),
    Column("valid_from", String(10), nullable=False),
    Column("valid_until", String(10), nullable=True),
    Column("revoked_ms", BigInteger, nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Index("ix_proxy_grant_user", "user_id"),
)

launch_context = Table(
    "launch_context",
    metadata,
    Column("launch_id", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("encounter_id", String(64), nullable=True),
    Column("user_id", BigInteger, nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)

auth_code = Table(
    "auth_code",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("redirect_uri", String(1024), nullable=True),
    Column("scope", Text, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("encounter_id", String(64), nullable=True),
    Column("fhir_user", String(128), nullable=True),
    Column("code_challenge", String(128), nullable=False),
    Column("code_challenge_method", String(8), nullable=False),
    Column("nonce", String(255), nullable=True),
    Column("expires_ms", BigInteger, nullable=False),
    Column("used", Boolean, nullable=False, default=False),
    Column("grant_id", String(64), nullable=False),
)

# One authorization: every access and refresh token issued from one code (or one client
# credentials request) shares it, so reuse of a rotated refresh token can revoke them all.
oauth_grant = Table(
    "oauth_grant",
    metadata,
    Column("grant_id", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("user_id", BigInteger, nullable=True),
    Column("scope", Text, nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("encounter_id", String(64), nullable=True),
    Column("fhir_user", String(128), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger, nullable=True),
    Index("ix_oauth_grant_user", "user_id"),
)

oauth_token = Table(
    "oauth_token",
    metadata,
    Column("id", PK, primary_key=True, autoincrement=True),
    Column("grant_id", String(64), nullable=False),
    Column("client_id", String(255), nullable=False),
    Column("access_hash", String(64), nullable=False),
    Column("refresh_hash", String(64), nullable=True),
    Column("scope", Text, nullable=False),
    Column("issued_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("refresh_expires_ms", BigInteger, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("refresh_used", Boolean, nullable=False, default=False),
    UniqueConstraint("access_hash", name="uq_oauth_token_access"),
    UniqueConstraint("refresh_hash", name="uq_oauth_token_refresh"),
    Index("ix_oauth_token_grant", "grant_id"),
)

# jti values of client assertions already accepted, kept until the assertion would expire anyway.
client_assertion_jti = Table(
    "client_assertion_jti",
    metadata,
    Column("client_id", String(255), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires_ms", BigInteger, nullable=False),
)

# Keys that sign id_tokens; the newest active one signs, every unretired one is published.
signing_key = Table(
    "signing_key",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("private_jwk", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("retired_ms", BigInteger, nullable=True),
)

# Sign-up codes: one patient each, single use, 45 days.
activation_code = Table(
    "activation_code",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("used_ms", BigInteger, nullable=True),
    Column("user_id", BigInteger, nullable=True),
)

# Password reset links: single use, one hour.
password_reset = Table(
    "password_reset",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("used_ms", BigInteger, nullable=True),
)

# One row (id 1): a counter bumped in the same transaction as every change that takes access away
# (a revoked grant or token, an ended proxy relationship). A process reuses a token it has cached
# only while the counter is unchanged, so a revocation reaches every process on its next request.
revocation_generation = Table(
    "revocation_generation",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
)
