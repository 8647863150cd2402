"""Transaction and batch Bundles, and loading files of resources.

A transaction runs every entry in one database transaction (all or nothing) in the order the spec
gives (DELETE, POST, PUT/PATCH, GET). Before anything is written, each POST is given its id (or
resolved to the existing resource by ifNoneExist) so that urn:uuid references anywhere in the
Bundle can be rewritten to the resources they name.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.fhir import jsonio
from gateway.fhir.outcome import FhirError
from gateway.fhir.store import FhirStore, Repository, Stored, WriteResult
from gateway.fhir.validate import is_resource_type, validate

# MATCHED: a POST whose ifNoneExist found the resource; it runs where the POST would have.
METHOD_ORDER = {"DELETE": 0, "POST": 1, "MATCHED": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}

# Reads and searches inside a Bundle are answered by the API layer, which owns access checks.
GetHandler = Callable[[Repository, str], dict[str, Any]]


@dataclass
class EntryPlan:
    index: int
    method: str
    url: str
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None = None
    if_match: str | None = None
    resource_type: str = ""
    resource_id: str | None = None
    criteria: str | None = None


def _split_url(url: str) -> tuple[str, str | None, str | None]:
    """'Patient/1' -> (Patient, 1, None); 'Patient?x=y' -> (Patient, None, 'x=y')."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    segments = path.split("/") if path else []
    resource_type = segments[0] if segments else ""
    resource_id = segments[1] if len(segments) > 1 else None
    return resource_type, resource_id, parts.query or None


def _plan(bundle: dict[str, Any]) -> list[EntryPlan]:
    plans = []
    for i, entry in enumerate(bundle.get("entry") or []):
        request = entry.get("request") or {}
        method = str(request.get("method", "")).upper()
        url = request.get("url")
        if method not in METHOD_ORDER or not isinstance(url, str):
            raise FhirError(400, f"Bundle.entry[{i}].request needs a method and url", code="invalid",
                            expression=[f"Bundle.entry[{i}].request"])
        resource = entry.get("resource")
        if method in ("POST", "PUT") and not isinstance(resource, dict):
            raise FhirError(400, f"Bundle.entry[{i}] has no resource to {method}", code="invalid",
                            expression=[f"Bundle.entry[{i}].resource"])
        plan = EntryPlan(i, method, url, resource, entry.get("fullUrl"),
                         request.get("ifNoneExist"), request.get("ifMatch"))
        plan.resource_type, plan.resource_id, plan.criteria = _split_url(url)
        if method != "GET" and not is_resource_type(plan.resource_type):
            raise FhirError(400, f"Bundle.entry[{i}]: unknown resource type in {url!r}", code="invalid")
        plans.append(plan)
    return plans


def _rewrite_references(value: Any, mapping: dict[str, str], resolve: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            if key == "reference" and isinstance(child, str):
                if child in mapping:
                    child = mapping[child]
                elif "?" in child and not child.startswith(("http:", "https:", "urn:")):
                    child = resolve(child)
                out[key] = child
            else:
                out[key] = _rewrite_references(child, mapping, resolve)
        return out
    if isinstance(value, list):
        return [_rewrite_references(v, mapping, resolve) for v in value]
    return value


def _response(result: WriteResult | Stored | None, status: int, base: str) -> dict[str, Any]:
    response: dict[str, Any] = {"status": STATUS_TEXT.get(status, str(status))}
    stored = result.stored if isinstance(result, WriteResult) else result
    if stored is not None:
        response["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
        response["etag"] = stored.etag
        response["lastModified"] = stored.last_updated
    return {"response": response}


class BundleProcessor:
    def __init__(self, store: FhirStore, get_handler: GetHandler | None = None, origin: str | None = None) -> None:
        self.store = store
        self.get_handler = get_handler
        self.origin = origin  # who writes (Repository.origin): store listeners may care

    def process(self, bundle: Any, validated: bool = False) -> dict[str, Any]:
        """validated: every resource in it was validated already (import_file checks a whole file
        before writing any of it), so it is not done twice."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise FhirError(400, "POST to the base takes a Bundle", code="invalid")
        kind = bundle.get("type")
        if kind == "transaction":
            return self.transaction(bundle, validated)
        if kind == "batch":
            return self.batch(bundle, validated)
        raise FhirError(400, f"Bundle.type must be transaction or batch, not {kind!r}", code="invalid",
                        expression=["Bundle.type"])

    # --- transaction: all or nothing ---

    def transaction(self, bundle: dict[str, Any], validated: bool = False) -> dict[str, Any]:
        plans = _plan(bundle)
        for plan in plans:
            if not validated and plan.resource is not None and plan.method in ("POST", "PUT"):
                try:
                    validate(plan.resource)
                except FhirError as exc:
                    exc.outcome["issue"][0]["diagnostics"] = f"Bundle.entry[{plan.index}]: {exc.diagnostics}"
                    raise
        responses: dict[int, dict[str, Any]] = {}

        def run(repo: Repository) -> None:
            responses.clear()
            mapping = self._assign_ids(repo, plans)

            def resolve(conditional: str) -> str:
                rtype, _, criteria = _split_url(conditional)
                matches = repo.match(rtype, criteria or "")
                if len(matches) != 1:
                    raise FhirError(412, f"Conditional reference {conditional!r} matched {len(matches)} "
                                         "resources", code="invalid")
                return matches[0].reference

            for plan in sorted(plans, key=lambda p: (METHOD_ORDER[p.method], p.index)):
                try:
                    if plan.resource is not None:
                        plan.resource = _rewrite_references(plan.resource, mapping, resolve)
                    responses[plan.index] = self._execute(repo, plan)
                except FhirError as exc:
                    exc.outcome["issue"][0]["diagnostics"] = f"Bundle.entry[{plan.index}]: {exc.diagnostics}"
                    raise

        self.store.write(run, origin=self.origin)
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [responses[p.index] for p in plans],
        }

    def _assign_ids(self, repo: Repository, plans: list[EntryPlan]) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for plan in plans:
            if plan.method == "POST" and plan.resource is not None:
                existing: Stored | None = None
                if plan.if_none_exist:
                    repo.lock(f"{plan.resource_type}?{plan.if_none_exist}")
                    matches = repo.match(plan.resource_type, plan.if_none_exist)
                    if len(matches) > 1:
                        raise FhirError(412, f"Bundle.entry[{plan.index}]: ifNoneExist matched "
                                             f"{len(matches)} resources", code="duplicate")
                    existing = matches[0] if matches else None
                plan.resource_id = existing.id if existing else str(uuid.uuid4())
                if existing:
                    plan.method = "MATCHED"
                target = f"{plan.resource_type}/{plan.resource_id}"
            elif plan.method == "PUT" and plan.criteria and plan.resource_id is None:
                repo.lock(f"{plan.resource_type}?{plan.criteria}")
                matches = repo.match(plan.resource_type, plan.criteria)
                if len(matches) > 1:
                    raise FhirError(412, f"Bundle.entry[{plan.index}]: criteria matched {len(matches)}",
                                    code="multiple-matches")
                plan.resource_id = matches[0].id if matches else (plan.resource or {}).get("id") \
                    or str(uuid.uuid4())
                target = f"{plan.resource_type}/{plan.resource_id}"
            elif plan.method == "PUT":
                target = f"{plan.resource_type}/{plan.resource_id}"
            else:
                continue
            if plan.full_url:
                mapping[plan.full_url] = target
        return mapping

    def _execute(self, repo: Repository, plan: EntryPlan) -> dict[str, Any]:
        base = self.store.base_url
        if plan.method == "MATCHED":
            return _response(repo.read(plan.resource_type, plan.resource_id or ""), 200, base)
        if plan.method == "POST":
            assert plan.resource is not None
            result = repo.create(plan.resource, check=False, resource_id=plan.resource_id)
            return _response(result, 201, base)
        if plan.method == "PUT":
            assert plan.resource is not None
            body = {**plan.resource, "id": plan.resource_id}
            result = repo.update(plan.resource_type, plan.resource_id or "", body, plan.if_match, check=False)
            return _response(result, result.status, base)
        if plan.method == "PATCH":
            operations = _patch_body(plan)
            result = repo.patch(plan.resource_type, plan.resource_id or "", operations, plan.if_match)
            return _response(result, 200, base)
        if plan.method == "DELETE":
            if plan.resource_id:
                repo.delete(plan.resource_type, plan.resource_id)
            else:
                repo.conditional_delete(plan.resource_type, plan.criteria or "")
            return {"response": {"status": "204 No Content"}}
        if self.get_handler is None:
            raise FhirError(400, "GET entries are not supported here", code="not-supported")
        return {"resource": self.get_handler(repo, plan.url), "response": {"status": "200 OK"}}

    # --- batch: every entry on its own ---

    def batch(self, bundle: dict[str, Any], validated: bool = False) -> dict[str, Any]:
        plans = _plan(bundle)
        entries = []
        for plan in plans:
            try:
                if not validated and plan.resource is not None and plan.method in ("POST", "PUT"):
                    validate(plan.resource)

                def run(repo: Repository, plan: EntryPlan = plan) -> dict[str, Any]:
                    self._assign_ids(repo, [plan])
                    return self._execute(repo, plan)

                entries.append(self.store.write(run, origin=self.origin))
            except FhirError as exc:
                entries.append({"response": {"status": str(exc.status), "outcome": exc.outcome}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}


def _patch_body(plan: EntryPlan) -> Any:
    resource = plan.resource
    if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
        import base64

        return jsonio.loads(base64.b64decode(resource.get("data", "")))
    raise FhirError(400, f"Bundle.entry[{plan.index}]: PATCH needs a Binary with a JSON Patch",
                    code="invalid")


# --- files: `gateway import` and the demo loader ---

def iter_file_resources(path: str) -> Iterator[tuple[str, Any]]:
    """('bundle', Bundle) for a JSON Bundle file, ('resource', resource) for NDJSON or a resource."""
    with open(path, encoding="utf-8-sig") as fh:
        head = fh.read(1)
        fh.seek(0)
        if path.endswith(".ndjson") or (head != "{" and head != "["):
            yield from _ndjson(fh, path)
            return
        text = fh.read()
    try:
        data = jsonio.loads(text)
    except ValueError:
        # Not one JSON document: NDJSON without the .ndjson name.
        yield from _ndjson(text.splitlines(), path)
        return
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        yield "bundle", data
    else:
        yield "resource", data


def _ndjson(lines: Iterable[str], path: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield "resource", jsonio.loads(line)
            except ValueError as exc:
                raise FhirError(400, f"{path}:{n}: not JSON ({exc})", code="structure") from None


def as_transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Bundle entries (resource, optional fullUrl) as a transaction: resources with ids are PUT
    (idempotent re-import), the rest POSTed; fullUrls are kept so urn:uuid references resolve."""
    out = []
    for entry in entries:
        resource = entry["resource"]
        if resource.get("id"):
            request = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
        else:
            request = {"method": "POST", "url": resource.get("resourceType", "")}
        item: dict[str, Any] = {"resource": resource, "request": request}
        if entry.get("fullUrl"):
            item["fullUrl"] = entry["fullUrl"]
        out.append(item)
    return {"resourceType": "Bundle", "type": "transaction", "entry": out}


def _validate_all(path: str) -> None:
    """Check every resource of a file before anything is written, so a bad one stores nothing."""
    for kind, data in iter_file_resources(path):
        if kind == "bundle":
            for i, entry in enumerate(data.get("entry") or []):
                if isinstance(entry.get("resource"), dict) and \
                        (entry.get("request") or {}).get("method", "PUT") in ("POST", "PUT"):
                    try:
                        validate(entry["resource"])
                    except FhirError as exc:
                        raise FhirError(exc.status, f"Bundle.entry[{i}]: {exc.diagnostics}",
                                        outcome=exc.outcome) from None
        else:
            validate(data)


def import_file(processor: BundleProcessor, path: str, chunk: int = 500,
                progress: Callable[[int], None] | None = None,
                adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, int]:
    """Load a Bundle (transaction, batch, collection, searchset) or NDJSON; returns counts.
    adjust: applied to each Bundle read before it is stored (the demo world's calendar moves by
    whole weeks with it: demo_calendar); it must keep valid resources valid."""
    counts = {"entries": 0, "created": 0, "updated": 0, "failed": 0}

    def tally(response_bundle: dict[str, Any]) -> None:
        for entry in response_bundle.get("entry", []):
            status = entry["response"]["status"]
            counts["entries"] += 1
            if status.startswith("201"):
                counts["created"] += 1
            elif status.startswith("2"):
                counts["updated"] += 1
            else:
                counts["failed"] += 1
        if progress:
            progress(counts["entries"])

    _validate_all(path)
    try:
        _load(processor, path, chunk, tally, adjust)
    except FhirError as exc:
        exc.stored = counts["entries"]  # type: ignore[attr-defined]
        raise
    return counts


def _load(processor: BundleProcessor, path: str, chunk: int, tally: Callable[[dict[str, Any]], None],
          adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    pending: list[dict[str, Any]] = []
    for kind, data in iter_file_resources(path):
        if kind == "bundle":
            data = adjust(data) if adjust else data
            # _validate_all has checked every resource of the file: the transactions do not again
            if data.get("type") in ("transaction", "batch"):
                tally(processor.process(data, validated=True))
            else:
                # One transaction: entries may reference each other by fullUrl.
                tally(processor.transaction(as_transaction([e for e in data.get("entry", []) if "resource" in e]),
                                            validated=True))
            continue
        pending.append({"resource": data})
        if len(pending) >= chunk:
            tally(processor.transaction(as_transaction(pending), validated=True))
            pending = []
    if pending:
        tally(processor.transaction(as_transaction(pending), validated=True))


def criteria_params(criteria: str) -> list[tuple[str, str]]:
    return parse_qsl(criteria, keep_blank_values=True)
