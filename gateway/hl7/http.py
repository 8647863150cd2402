"""HL7v2 over HTTP: POST /hl7/v2 runs the same pipeline as MLLP and answers with the ACK.

Senders authenticate with a bearer token: a SMART backend-services token with system/*.c, or the
configured shared secret (GATEWAY_HL7_HTTP_SECRET). A request with neither is refused, unless the
whole gateway runs with open access and the request carries no Authorization header (demo and tests).
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, g, request

from gateway import access
from gateway.fhir import jsonio
from gateway.fhir.outcome import FhirError
from gateway.hl7.ingest import message_trace

bp = Blueprint("hl7", __name__, url_prefix="/hl7")

ER7_TYPES = {"application/hl7-v2", "x-application/hl7-v2+er7", "text/plain"}


def _gateway():  # type: ignore[no-untyped-def]
    return current_app.extensions["gateway"]


def _check_sender() -> None:
    settings = _gateway().settings
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if settings.hl7_http_secret and token and hmac.compare_digest(token, settings.hl7_http_secret):
        return
    if token:
        # A SMART backend-services token whose system/ scopes allow creating anything (system/*.c).
        principal = _gateway().smart.principal_for(token)
        if principal is not None and principal.kind == "backend" and access.allowed(principal, "create", None):
            g.principal = principal
            return
    if settings.open_access and not header:
        return
    raise FhirError(401, "An HL7 sender must present its bearer token", code="login",
                    headers={"WWW-Authenticate": 'Bearer realm="hl7"'})


@bp.post("/v2")
def receive() -> Response:
    _check_sender()
    if request.mimetype not in ER7_TYPES:
        return Response(f"Content-Type must be one of {', '.join(sorted(ER7_TYPES))}\n", 415,
                        content_type="text/plain; charset=utf-8")
    raw, size = _body()
    answer = _gateway().hl7.answer(raw, channel="http", peer=request.remote_addr, size=size)
    if answer is None:
        return Response("No MSH segment could be read; the message was not stored.\n", 400 if size is None else 413,
                        content_type="text/plain; charset=utf-8")
    # The database is down or full: nothing was stored. 503 with Retry-After tells an HTTP sender
    # to send it again, as the AE 207 in the body tells one that reads only the ACK. A message over
    # the size limit: 413, and its AE 104 in the body.
    status, headers = (503, {"Retry-After": "5"}) if answer.unavailable else (200 if size is None else 413, {})
    if not answer.acks:
        return Response(status=204 if status == 200 else status, headers=headers)  # no ACK asked for
    # One body: the application ACK when the sender asked for one, else the commit ACK.
    mimetype = request.mimetype if request.mimetype != "text/plain" else "application/hl7-v2"
    return Response(answer.acks[-1], status, headers=headers, content_type=f"{mimetype}; charset=utf-8")


def _body() -> tuple[bytes, int | None]:
    """The request body, and None; or, for a body over the size limit (GATEWAY_MAX_BODY_BYTES), its
    first limit bytes and its length, read without holding more than that (the HL7 pipeline stores
    such a message by its start and answers it; see Ingestor.answer)."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    length = request.content_length
    if limit is None or (length is not None and length <= limit):
        return request.get_data(cache=False), None
    # This view reads the body itself, keeping at most `limit` bytes of it. A body sent without a
    # length (chunked) is read to its end to learn its length, up to MAX_COUNTED bytes.
    request.max_content_length = length if length is not None else MAX_COUNTED
    stream = request.stream
    head = bytearray()
    while len(head) < limit and (chunk := stream.read(min(CHUNK, limit - len(head)))):
        head += chunk
    if length is None:
        size = len(head)
        while size < MAX_COUNTED and (chunk := stream.read(min(CHUNK, MAX_COUNTED - size))):
            size += len(chunk)
        return bytes(head), (size if size > limit else None)
    return bytes(head), length


CHUNK = 1024 * 1024
MAX_COUNTED = 1 << 30  # a chunked body longer than this is said to be this long, and not read further


@bp.get("/messages/<int:message_id>")
def trace(message_id: int) -> Response:
    """The provenance trail of a message: raw text, ACK, error, and every resource it wrote."""
    g.principal = access.principal_from_request(request, _gateway().settings, _gateway().smart)
    access.authorize(g.principal, "read", "Hl7Message")
    found = message_trace(_gateway().store, message_id)
    if found is None:
        raise FhirError(404, f"No HL7 message {message_id}", code="not-found")
    patient = (f"Patient/{found['patient_id']}",) if found.get("patient_id") else ()
    _gateway().audit.record("read", g.principal.audit_name, client_id=g.principal.client_id,
                            address=request.remote_addr, entities=patient,
                            description=f"HL7 message {message_id}")
    return Response(jsonio.dumps(found, pretty=True), 200, content_type="application/json; charset=utf-8")
