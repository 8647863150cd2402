"""FHIR R4 REST API: HTTP in, a store call, stored JSON out.

Reads return the stored bytes untouched; search Bundles are assembled around stored JSON by string
concatenation. Only _summary, _elements and _pretty make the server parse what it serves.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import simplejson
from flask import Blueprint, Flask, Response, current_app, g, request
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from gateway import access, db, logs
from gateway.fhir import jsonio
from gateway.fhir.bundles import BundleProcessor
from gateway.fhir.capability import capability_statement
from gateway.fhir.outcome import FhirError, operation_outcome
from gateway.fhir.search import SearchResult, everything, search
from gateway.fhir.searchparams import patient_compartment
from gateway.fhir.store import FhirStore, Repository, Stored, WriteResult, known_type, parse_version
from gateway.fhir.summary import apply_view

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

FHIR_JSON = "application/fhir+json"
JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "json", "text/json"}
PATCH_TYPES = {"application/json-patch+json"}
# Seconds a client is asked to wait (Retry-After) when the database is down or its disk is full.
DATABASE_RETRY_AFTER = 5


def _store() -> FhirStore:
    return current_app.extensions["gateway"].store


def _settings() -> Any:
    return current_app.extensions["gateway"].settings


# --- negotiation, errors, audit ---

def _wants_pretty() -> bool:
    return request.args.get("_pretty", "").lower() == "true"


def fhir_response(body: str | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = body if isinstance(body, str) else jsonio.dumps(body)
    if _wants_pretty():
        text = jsonio.pretty(text)
    response = Response(text, status=status, content_type=FHIR_JSON + "; charset=utf-8")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def outcome_response(exc: FhirError) -> Response:
    return fhir_response(exc.outcome, exc.status, exc.headers)


@bp.before_request
def negotiate() -> None:
    if request.method == "OPTIONS":
        return  # a CORS preflight carries no credentials and reaches no data; Flask answers it
    fmt = request.args.get("_format")
    if fmt:
        # A literal '+' in a query string arrives as a space (application/fhir json).
        if fmt.split(";")[0].strip().replace(" ", "+") not in JSON_TYPES:
            raise FhirError(406, f"_format {fmt!r} is not supported; this server speaks JSON",
                            code="not-supported")
    else:
        accepted = [m.split(";")[0].strip() for m, _ in request.accept_mimetypes]
        if accepted and not any(
            m in JSON_TYPES or m in ("*/*", "application/*") for m in accepted
        ):
            raise FhirError(406, "This server answers in application/fhir+json", code="not-supported")
    if request.method in ("POST", "PUT", "PATCH") and request.content_length != 0:
        mimetype = request.mimetype
        allowed = PATCH_TYPES | JSON_TYPES if request.method == "PATCH" else JSON_TYPES
        form_search = request.path.endswith("/_search") and mimetype == "application/x-www-form-urlencoded"
        if mimetype not in allowed and not form_search:
            raise FhirError(415, f"Unsupported Content-Type {mimetype or '(none)'!r}", code="not-supported")
    if request.path.rstrip("/") not in ("/fhir/metadata",):
        g.principal = access.principal_from_request(request, _settings(), current_app.extensions["gateway"].smart)


def _audit(interaction: str, *, entities: tuple[str, ...] = (), contents: tuple[str, ...] = (),
           query: str | None = None, outcome: str = "0", description: str | None = None) -> None:
    principal: access.Principal | None = g.get("principal")
    current_app.extensions["gateway"].audit.record(
        interaction, principal.audit_name if principal else "anonymous",
        client_id=principal.client_id if principal else None, address=request.remote_addr,
        outcome=outcome, query=query, entities=entities, contents=contents, description=description,
    )


class AuditBehind(Exception):
    """The AuditEvent writer cannot take the records of more requests now (see gateway.audit)."""


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AuditBehind)
    def _audit_behind(_exc: AuditBehind) -> Response:
        # Nothing was read or written: refused before any query, so a client may simply try again.
        current_app.logger.warning("%s %s answered 503: the audit log is behind", request.method, logs.route())
        return _try_later(503, "transient", "the audit log cannot record more requests at the moment",
                          "The request was not carried out because {what}; nothing was read or changed.")

    @app.errorhandler(FhirError)
    def _fhir_error(exc: FhirError) -> Response:
        if request.path.startswith("/fhir") and exc.status in (401, 403):
            _audit(g.get("interaction", "read"), outcome="4", description=exc.diagnostics,
                   query=request.full_path)
        return outcome_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response | HTTPException:
        if not request.path.startswith("/fhir"):
            return _friendly(exc.code or 500, exc) or exc
        code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(exc.code or 500, "processing")
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"The request body is larger than the limit of {_settings().max_body_bytes} bytes"
        return fhir_response(operation_outcome("error", code, message), exc.code or 500)

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError) -> Response:
        reason = db.unavailable(exc)
        if reason is None:
            return _unexpected(exc)
        # The database is down or restarting, or its disk is full: a client may try again later,
        # and gets told so (no-store, the persistent store is unavailable) rather than a 500.
        status = 507 if reason == "full" else 503
        what = "the storage is full" if reason == "full" else "the database is unreachable"
        current_app.logger.warning("%s %s answered %d: %s (%s)", request.method, logs.route(), status, what,
                                   type(exc.orig).__name__)
        return _try_later(status, "no-store", what,
                          "The request could not be carried out because {what}; nothing was changed.")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        current_app.logger.exception("unhandled error on %s %s", request.method, logs.route())
        body = operation_outcome("fatal", "exception", "An internal error occurred; it has been logged")
        if request.path.startswith("/fhir"):
            return fhir_response(body, 500)
        return _friendly(500) or Response("Internal error; it has been logged.", 500, content_type="text/plain")


def _try_later(status: int, code: str, what: str, diagnostics: str) -> Response:
    """A passing refusal (the database or the audit log cannot take the request now) with
    Retry-After: an OperationOutcome on the API, a page or a line of text elsewhere."""
    headers = {"Retry-After": str(DATABASE_RETRY_AFTER)}
    if request.path.startswith("/fhir"):
        body = operation_outcome("error", code, diagnostics.format(what=what) + " Please try again later.")
        return fhir_response(body, status, headers)
    response = _friendly(status) or Response(f"Unavailable: {what}; please try again later.\n", status,
                                             content_type="text/plain; charset=utf-8")
    response.headers.update(headers)
    return response


def _friendly(status: int, error: Exception | None = None) -> Response | None:
    """A page instead of a bare error for a person's browser (outside the FHIR API)."""
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) != "text/html" or \
            request.accept_mimetypes["text/html"] < request.accept_mimetypes["application/json"]:
        return None
    from gateway.portal.web import friendly_error

    return friendly_error(status, error)


# --- helpers ---

def _origin() -> str | None:
    """Who is writing, for the store's listeners: a backend-services client (an EHR pushing its
    data) is not a patient whose actions go back to the EHR."""
    principal: access.Principal | None = g.get("principal")
    return "backend" if principal is not None and principal.kind == "backend" else None


def _grant(interaction: str, resource_type: str | None) -> access.Grant:
    g.interaction = interaction
    return access.authorize(g.principal, interaction, resource_type)


def _body() -> Any:
    raw = request.get_data(cache=False)
    if not raw:
        raise FhirError(400, "The request has no body", code="invalid")
    limit = _settings().max_body_bytes
    if request.content_length is None and len(raw) >= limit:
        # A chunked body has no Content-Length to refuse up front; werkzeug cuts it at the limit.
        raise FhirError(413, f"The request body is larger than the limit of {limit} bytes", code="too-costly")
    try:
        return jsonio.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(400, f"The body is not valid JSON: {exc}", code="structure") from None


def _http_date(instant: str) -> str:
    return email.utils.format_datetime(datetime.fromisoformat(instant.replace("Z", "+00:00")), usegmt=True)


def _resource_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": _http_date(stored.last_updated)}


def _location(stored: Stored) -> str:
    return f"{_fhir_base()}/{stored.resource_type}/{stored.id}/_history/{stored.version_id}"


def _fhir_base() -> str:
    return _settings().fhir_base


def _write_response(stored: Stored, status: int) -> Response:
    headers = _resource_headers(stored)
    headers["Location"] = _location(stored)
    prefer = request.headers.get("Prefer", "")
    if "return=minimal" in prefer:
        response = Response(status=status, headers=headers)
        return response
    if "return=OperationOutcome" in prefer:
        return fhir_response(operation_outcome("information", "informational", f"{stored.reference} saved"),
                             status, headers)
    return fhir_response(stored.content or "", status, headers)


def _strict() -> bool:
    return "handling=strict" in request.headers.get("Prefer", "")


# --- bundles assembled around stored JSON ---

def _entry(stored: Stored, mode: str | None, view: Callable[[str], str] | None = None) -> str:
    content = stored.content or ""
    if view is not None:
        content = view(content)
    full_url = simplejson.dumps(f"{_fhir_base()}/{stored.resource_type}/{stored.id}")
    search = f',"search":{{"mode":"{mode}"}}' if mode else ""
    return f'{{"fullUrl":{full_url},"resource":{content}{search}}}'


def _bundle(kind: str, entries: list[str], total: int | None, links: dict[str, str]) -> str:
    parts = [f'"resourceType":"Bundle","type":"{kind}"']
    if total is not None:
        parts.append(f'"total":{total}')
    if links:
        parts.append('"link":' + simplejson.dumps([{"relation": r, "url": u} for r, u in links.items()]))
    parts.append('"entry":[' + ",".join(entries) + "]")
    return "{" + ",".join(parts) + "}"


def _page_url(path: str, params: list[tuple[str, str]], cursor: str | None) -> str:
    kept = [(k, v) for k, v in params if k != "_cursor"]
    if cursor:
        kept.append(("_cursor", cursor))
    query = urlencode(kept)
    return f"{_settings().base_url}{path}" + (f"?{query}" if query else "")


def _search_params() -> list[tuple[str, str]]:
    params = list(parse_qsl(urlsplit(request.full_path).query, keep_blank_values=True))
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        params += list(request.form.items(multi=True))
    return params


def _searchset(result: SearchResult, params: list[tuple[str, str]], summary: str | None,
               elements: list[str] | None, path: str) -> str:
    view = None
    if summary not in (None, "false") or elements:
        def view(content: str) -> str:
            return apply_view(content, summary, elements)
    entries = [_entry(s, "match", view) for s in result.matches]
    entries += [_entry(s, "include", view) for s in result.includes]
    if result.warnings:
        outcome = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "not-supported", "diagnostics": w} for w in result.warnings]}
        entries.append(f'{{"resource":{jsonio.dumps(outcome)},"search":{{"mode":"outcome"}}}}')
    current = next((v for k, v in params if k == "_cursor"), None)
    links = {"self": _page_url(path, params, current)}
    if result.next_cursor:
        links["next"] = _page_url(path, params, result.next_cursor)
    return _bundle("searchset", entries, result.total, links)


def run_search(repo: Repository, resource_type: str, params: list[tuple[str, str]], path: str,
               compartment: str | None = None, strict: bool = False) -> str:
    known_type(resource_type)
    grant = _grant("search", resource_type)
    settings = _settings()
    query, result = search(repo, resource_type, params, restrict=grant.restrict, compartment=compartment,
                           strict=strict, default_count=settings.default_page_size,
                           max_count=settings.max_page_size)
    _audit("search", query=f"{path}?{urlencode(params)}",
           contents=tuple(s.content or "" for s in result.matches + result.includes),
           entities=(f"Patient/{compartment}",) if compartment else ())
    return _searchset(result, params, query.summary, query.elements, path)


# --- routes ---

@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability_statement(_settings()))


@bp.route("", methods=["POST"])
@bp.route("/", methods=["POST"])
def transaction() -> Response:
    bundle = _body()
    kind = bundle.get("type") if isinstance(bundle, dict) else None
    _grant("create", None)
    _grant("update", None)
    processor = BundleProcessor(_store(), get_handler=_bundle_get, origin=_origin())
    result = processor.process(bundle)
    _audit("transaction" if kind == "transaction" else "batch",
           entities=tuple(e["response"].get("location", "").split("/_history")[0]
                          for e in result["entry"] if e["response"].get("location")))
    return fhir_response(result)


def _bundle_get(repo: Repository, url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    segments = [s for s in parts.path.strip("/").split("/") if s]
    if len(segments) == 2:
        known_type(segments[0])
        _grant("read", segments[0])
        return repo.read(segments[0], segments[1]).resource()
    if len(segments) == 1:
        params = parse_qsl(parts.query, keep_blank_values=True)
        return jsonio.loads(run_search(repo, segments[0], params, f"/fhir/{segments[0]}"))
    raise FhirError(400, f"Unsupported GET in a Bundle: {url!r}", code="not-supported")


@bp.get("/_history")
def system_history() -> Response:
    return _history(None, None)


@bp.get("/<rtype>/_history")
def type_history(rtype: str) -> Response:
    return _history(rtype, None)


@bp.route("/<rtype>", methods=["GET", "POST", "PUT", "DELETE"])
def type_level(rtype: str) -> Response:
    known_type(rtype)
    store = _store()
    if request.method == "GET":
        with store.reading() as repo:
            return fhir_response(run_search(repo, rtype, _search_params(), request.path, strict=_strict()))
    if request.method == "POST":
        resource = _body()
        _check_type(resource, rtype)
        access.check_write(_grant("create", rtype), resource, _compartment_of)
        if_none_exist = request.headers.get("If-None-Exist")
        result = store.write(lambda repo: repo.create(resource, if_none_exist=if_none_exist), origin=_origin())
        _audit("create", entities=(result.stored.reference,), contents=(result.stored.content or "",))
        return _write_response(result.stored, result.status)
    criteria = urlsplit(request.full_path).query
    if not criteria:
        raise FhirError(405, f"{request.method} on /{rtype} needs search criteria", code="not-supported")
    if request.method == "PUT":
        return _put(rtype, lambda repo, resource, if_match: repo.conditional_update(rtype, criteria, resource,
                                                                                     if_match), conditional=True)
    _refuse_restricted(_grant("delete", rtype), "Conditional delete")
    deleted = store.write(lambda repo: repo.conditional_delete(rtype, criteria), origin=_origin())
    _audit("delete", entities=tuple(d.reference for d in deleted), contents=tuple(d.content or "" for d in deleted))
    return Response(status=204)


@bp.post("/<rtype>/_search")
def type_search(rtype: str) -> Response:
    with _store().reading() as repo:
        return fhir_response(run_search(repo, rtype, _search_params(), f"/fhir/{rtype}", strict=_strict()))


def _put(rtype: str, write: Callable[[Repository, dict[str, Any], str | None], WriteResult],
         rid: str | None = None, conditional: bool = False) -> Response:
    """PUT by id or by criteria: body checks, the grant, one write, its audit record."""
    resource = _body()
    _check_type(resource, rtype)
    grant = _grant("update", rtype)
    if conditional:
        _refuse_restricted(grant, "Conditional update")
    access.check_write(grant, resource, _compartment_of)
    if rid is not None:
        _check_existing(grant, rtype, rid)
    if_match = request.headers.get("If-Match")
    result = _store().write(lambda repo: write(repo, resource, if_match), origin=_origin())
    _audit("update", entities=(result.stored.reference,), contents=(result.stored.content or "",))
    return _write_response(result.stored, result.status)


def _check_type(resource: Any, rtype: str) -> None:
    if not isinstance(resource, dict):
        raise FhirError(400, "The body is not a JSON object", code="structure")
    if resource.get("resourceType") != rtype:
        raise FhirError(400, f"resourceType {resource.get('resourceType')!r} does not match the URL ({rtype})",
                        code="invalid", expression=["resourceType"])


@bp.route("/<rtype>/<rid>", methods=["GET", "PUT", "PATCH", "DELETE"])
def instance(rtype: str, rid: str) -> Response:
    known_type(rtype)
    store = _store()
    if request.method == "GET":
        grant = _grant("read", rtype)
        with store.reading() as repo:
            stored = repo.read(rtype, rid)
        _check_visible(grant, stored)
        _audit("read", entities=(stored.reference,), contents=(stored.content or "",))
        return _conditional_get(stored)
    if request.method == "PUT":
        return _put(rtype, lambda repo, resource, if_match: repo.update(rtype, rid, resource, if_match), rid=rid)
    if request.method == "PATCH":
        if request.mimetype not in PATCH_TYPES:
            raise FhirError(415, "PATCH takes application/json-patch+json", code="not-supported")
        operations = _body()
        # The patched resource is only known inside the write, so a token confined to some patients
        # cannot be checked against it beforehand: refused rather than checked afterwards.
        _refuse_restricted(_grant("patch", rtype), "PATCH")
        if_match = request.headers.get("If-Match")
        result = store.write(lambda repo: repo.patch(rtype, rid, operations, if_match), origin=_origin())
        _audit("patch", entities=(result.stored.reference,), contents=(result.stored.content or "",))
        return _write_response(result.stored, result.status)
    _check_existing(_grant("delete", rtype), rtype, rid)
    deleted = store.write(lambda repo: repo.delete(rtype, rid), origin=_origin())
    _audit("delete", entities=(f"{rtype}/{rid}",), contents=(deleted.content or "",) if deleted else ())
    return Response(status=204)


def _compartment_of(resource: dict[str, Any]) -> set[str]:
    from gateway.fhir.indexer import compartment_patients

    return compartment_patients(resource, _fhir_base())


def _refuse_restricted(grant: access.Grant, what: str) -> None:
    if grant.restrict is not None:
        raise FhirError(403, f"{what} is not available to a token confined to some patients or records",
                        code="forbidden")


def _check_existing(grant: access.Grant, rtype: str, rid: str, missing_ok: bool = True) -> None:
    """An update, delete or history by id must not touch a resource the grant cannot reach."""
    if grant.restrict is None:
        return
    with _store().reading() as repo:
        try:
            stored = repo.read(rtype, rid)
        except FhirError as exc:
            if exc.status == 404 and missing_ok:
                return  # update-as-create: check_write already judged the new content
            raise FhirError(403, "Access denied", code="forbidden") from None
    _check_visible(grant, stored)


def _check_visible(grant: access.Grant, stored: Stored) -> None:
    if not access.visible(grant, stored.resource_type, stored.id, stored.content or "{}", _fhir_base()):
        raise FhirError(403, "Access denied", code="forbidden")


def _conditional_get(stored: Stored) -> Response:
    headers = _resource_headers(stored)
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match:
        try:
            if parse_version(if_none_match) == stored.version_id:
                return Response(status=304, headers=headers)
        except FhirError:
            pass
    if_modified_since = request.if_modified_since
    if if_modified_since and not if_none_match:
        modified = datetime.fromisoformat(stored.last_updated.replace("Z", "+00:00")).replace(microsecond=0)
        if modified <= if_modified_since:
            return Response(status=304, headers=headers)
    summary = request.args.get("_summary")
    elements = request.args.get("_elements")
    content = stored.content or ""
    if summary or elements:
        content = apply_view(content, summary, elements.split(",") if elements else None)
    return fhir_response(content, 200, headers)


@bp.route("/<rtype>/<rid>/<path:rest>", methods=["GET", "POST"])
def instance_sub(rtype: str, rid: str, rest: str) -> Response:
    known_type(rtype)
    segments = rest.split("/")
    if segments[0] == "_history":
        if len(segments) == 1:
            return _history(rtype, rid)
        if len(segments) == 2:
            grant = _grant("vread", rtype)
            try:
                version = int(segments[1])
            except ValueError:
                raise FhirError(404, f"No version {segments[1]!r}", code="not-found") from None
            with _store().reading() as repo:
                stored = repo.vread(rtype, rid, version)
            _check_visible(grant, stored)
            _audit("vread", entities=(stored.reference,), contents=(stored.content or "",))
            return fhir_response(stored.content or "", 200, _resource_headers(stored))
    if rtype == "Patient" and segments == ["$everything"]:
        return _everything(rid)
    if rtype == "Patient" and len(segments) == 1 and request.method == "GET":
        ctype = segments[0]
        known_type(ctype)
        if ctype != "Patient" and ctype not in patient_compartment():
            raise FhirError(400, f"{ctype} is not in the Patient compartment", code="invalid")
        with _store().reading() as repo:
            repo.read("Patient", rid)
            return fhir_response(run_search(repo, ctype, _search_params(), request.path, compartment=rid,
                                            strict=_strict()))
    raise FhirError(404, f"Unknown path /fhir/{rtype}/{rid}/{rest}", code="not-found")


def _history(rtype: str | None, rid: str | None) -> Response:
    if rtype:
        known_type(rtype)
    grant = _grant("history", rtype)
    if grant.restrict is not None:
        # Type and system history are not filtered by compartment: confined tokens get instance history only.
        if rid is None or rtype is None:
            raise FhirError(403, "History across resources is not available to this token", code="forbidden")
        _check_existing(grant, rtype, rid, missing_ok=False)
    since = request.args.get("_since")
    since_ms = None
    if since:
        from gateway.fhir.dates import instant_ms

        try:
            since_ms = instant_ms(since)
        except ValueError:
            raise FhirError(400, f"Invalid _since {since!r}", code="invalid") from None
    count_raw = request.args.get("_count", "50")
    if not count_raw.isdigit():
        raise FhirError(400, "_count must be a non-negative integer", code="invalid")
    count = min(int(count_raw), _settings().max_page_size)
    cursor_raw = request.args.get("_cursor")
    before = int(cursor_raw) if cursor_raw and cursor_raw.isdigit() else None
    if count == 0:
        page, next_cursor = [], None
    else:
        with _store().reading() as repo:
            page, next_cursor = repo.history(rtype, rid, since_ms, before, count)
    entries = []
    for stored in page:
        url = f"{stored.resource_type}/{stored.id}"
        full_url = simplejson.dumps(f"{_fhir_base()}/{url}")
        if stored.deleted:
            entries.append(f'{{"fullUrl":{full_url},"request":{{"method":"DELETE","url":"{url}"}},'
                           f'"response":{{"status":"410 Gone","lastModified":"{stored.last_updated}"}}}}')
            continue
        method = stored.method or ("POST" if stored.version_id == 1 else "PUT")
        request_url = stored.resource_type if method == "POST" else url
        status = 201 if stored.version_id == 1 else 200
        entries.append(
            f'{{"fullUrl":{full_url},"resource":{stored.content},'
            f'"request":{{"method":"{method}","url":"{request_url}"}},'
            f'"response":{{"status":"{status}","etag":"W/\\"{stored.version_id}\\"",'
            f'"lastModified":"{stored.last_updated}"}}}}'
        )
    params = list(request.args.items(multi=True))
    links = {"self": _page_url(request.path, params, None)}
    if next_cursor is not None:
        links["next"] = _page_url(request.path, params, str(next_cursor))
    _audit("history", entities=(f"{rtype}/{rid}",) if rid else (),
           contents=tuple(s.content or "" for s in page))
    return fhir_response(_bundle("history", entries, None, links))


def _everything(patient_id: str) -> Response:
    grant = _grant("everything", "Patient")
    access.check_patient(grant, patient_id)
    types = ",".join(request.args.getlist("_type"))
    count_raw = request.args.get("_count", "50")
    if not count_raw.isdigit() or int(count_raw) == 0:
        raise FhirError(400, "_count must be a positive integer", code="invalid")
    with _store().reading() as repo:
        page, included, next_cursor = everything(
            repo, patient_id, since=request.args.get("_since"),
            types=[t.strip() for t in types.split(",")] if types else None,
            count=min(int(count_raw), _settings().max_page_size), cursor=request.args.get("_cursor"),
            restrict=grant.restrict)
    entries = [_entry(s, "match") for s in page] + [_entry(s, "include") for s in included]
    params = list(request.args.items(multi=True))
    links = {"self": _page_url(request.path, params, None)}
    if next_cursor:
        links["next"] = _page_url(request.path, params, next_cursor)
    _audit("everything", entities=(f"Patient/{patient_id}",),
           contents=tuple(s.content or "" for s in page))
    return fhir_response(_bundle("searchset", entries, None, links))
