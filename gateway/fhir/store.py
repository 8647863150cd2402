"""The versioned FHIR resource store: one repository object that every surface writes through.

Each version's JSON is kept exactly as it will be served (id and meta set at write time), so reads
return stored text without building a model. Search-index rows and compartment rows describe the
current version only and are replaced in the same transaction as the write.

    store = FhirStore(engine, base_url)
    with store.writing() as repo:          # one database transaction
        result = repo.create(resource)
    with store.reading() as repo:
        stored = repo.read("Patient", "123")
"""

from __future__ import annotations

import enum
import functools
import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

import jsonpatch
import orjson
from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from gateway import db
from gateway.fhir import jsonio
from gateway.fhir.dates import instant_ms, now_instant
from gateway.fhir.indexer import compartment_patients, index_rows, index_tables_for
from gateway.fhir.outcome import FhirError, gone, not_found
from gateway.fhir.validate import ID_RE, is_resource_type, validate


@dataclass(frozen=True)
class Stored:
    """One version of a resource as stored; content is the JSON text served for it."""

    resource_type: str
    id: str
    version_id: int
    last_updated: str
    deleted: bool
    content: str | None
    pk: int = 0
    method: str = ""  # the interaction that made this version (history only)

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def resource(self) -> dict[str, Any]:
        if self.content is None:
            raise ValueError("a deleted version has no content")
        return jsonio.loads(self.content)


class _Unread(enum.Enum):
    UNREAD = "unread"


UNREAD = _Unread.UNREAD  # Repository.update: the caller has not read the current version


@dataclass(frozen=True)
class WriteResult:
    stored: Stored
    status: int  # 200 updated or matched, 201 created
    changed: bool = True


# Hook for code that must see every write (audit, provenance, the outbox): called inside the write's
# transaction with the action, the result and the repository (whose connection and origin it may use).
WriteListener = Callable[[str, WriteResult, "Repository"], None]


def parse_version(value: str | None) -> int | None:
    """If-Match / version ids: W/"3", "3" and 3 all mean version 3."""
    if value is None:
        return None
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    raw = raw.strip('"')
    if not raw.isdigit():
        raise FhirError(400, f"Not a version: {value!r}", code="invalid")
    return int(raw)


def _lock_key(text_value: str) -> int:
    return int.from_bytes(hashlib.sha256(text_value.encode()).digest()[:8], "big", signed=True)


# Read by id is the hottest path: statements built once, so no per-call construction and
# cache-key work (that was half of a read's time in the handler), and on SQLite run on the driver.
_CURRENT_QUERY = select(db.resource).where(
    db.resource.c.resource_type == bindparam("t"), db.resource.c.id == bindparam("i"))
_CURRENT = db.Prepared(_CURRENT_QUERY)
_CURRENT_FOR_UPDATE = db.Prepared(_CURRENT_QUERY.with_for_update())


class CurrentRow(NamedTuple):
    """A row of the resource table (its columns in order: RESOURCE_COLUMNS)."""

    pk: int
    resource_type: str
    id: str
    version_id: int
    last_updated: str
    deleted: bool
    content: str

    @classmethod
    def of(cls, values: tuple[Any, ...]) -> CurrentRow:
        """From a driver's row (SQLite gives `deleted` as 0 or 1)."""
        pk, resource_type, resource_id, version_id, last_updated, deleted, content = values
        return cls(pk, resource_type, resource_id, version_id, last_updated, bool(deleted), content)


RESOURCE_COLUMNS = ", ".join(column.name for column in db.resource.c)


@functools.lru_cache(maxsize=128)
def _current_many_text(dialect: str, counts: tuple[int, ...], for_update: bool) -> str:
    """Current rows of several resources, as SQL for the driver (rows as CurrentRow):
    `type = ? AND id IN (?...)` for types with these numbers of ids. Not a row-value list
    `(type, id) IN (VALUES ...)`: SQLite reads the whole table for that (15 ms at 20,000 resources,
    growing with the store), while each of these is a search of the unique index. for_update
    (PostgreSQL): locked in pk order, so that two writers cannot deadlock on these rows."""
    mark = "?" if dialect == "sqlite" else "%s"
    where = " OR ".join(f"(resource_type = {mark} AND id IN ({', '.join([mark] * n)}))" for n in counts)
    lock = " ORDER BY pk FOR UPDATE" if for_update else ""
    return f"SELECT {RESOURCE_COLUMNS} FROM resource WHERE {where}{lock}"


# The write path's statements, built once, as _CURRENT is.
_INSERT_RESOURCE = db.Prepared(insert(db.resource).values(
    {c: bindparam(c) for c in ("resource_type", "id", "version_id", "last_updated", "deleted", "content")})
    .returning(db.resource.c.pk))
_UPDATE_RESOURCE = db.Prepared(
    update(db.resource)
    .where(db.resource.c.pk == bindparam("w_pk"), db.resource.c.version_id == bindparam("w_version"))
    .values(version_id=bindparam("version_id"), last_updated=bindparam("last_updated"),
            deleted=bindparam("deleted"), content=bindparam("content"))
)
# A resource's index rows, by the pk of the resource (run once per resource whose rows go).
_DELETE_INDEX = {
    table.name: db.Prepared(delete(table).where(table.c.resource_pk == bindparam("pk")))
    for table in db.ALL_INDEX_TABLES
}
_ROW_TABLES = {table.name: table for table in (*db.ALL_INDEX_TABLES, db.resource_version)}
_INSERT_ROWS: dict[tuple[str, tuple[str, ...]], db.Prepared] = {}  # by table and columns given


def insert_rows(conn: Connection, table: str, rows: list[dict[str, Any]], at_commit: bool = False) -> None:
    """Many rows into an index table or resource_version (all rows with the same keys), on the
    driver. On SQLite as tuples: SQLAlchemy's per-row parameter processing cost more than SQLite's
    own insert (11 against 7 µs a row), and a resource has 20 to 40 index rows. On PostgreSQL as
    psycopg's executemany, which sends them all before reading an answer (SQLAlchemy did the same,
    with its own cost per statement on top); with at_commit, together with the COMMIT."""
    keys = tuple(rows[0])
    if conn.dialect.name == "sqlite":
        sql = f"INSERT INTO {table} ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})"
        db.sqlite_execute(conn, sql, [tuple(row[k] for k in keys) for row in rows], many=True)
        return
    statement = _INSERT_ROWS.get((table, keys))
    if statement is None:
        statement = _INSERT_ROWS[(table, keys)] = db.Prepared(
            insert(_ROW_TABLES[table]).values({key: bindparam(key) for key in keys}))
    if at_commit:
        db.at_commit(conn, statement, rows)
    else:
        statement.execute(conn, rows)


class Repository:
    """Store operations on one open connection (one transaction)."""

    def __init__(self, store: FhirStore, conn: Connection, origin: str | None = None) -> None:
        self.store = store
        self.conn = conn
        # Who the writes come from when it is not a local user: "hl7" (the EHR's feeds), "upstream"
        # (the EHR's FHIR API). Listeners use it, e.g. the outbox sends nothing back to the EHR it
        # came from.
        self.origin = origin
        self.base_url = store.base_url
        # Index rows, the index rows they replace and version rows wait here and go to the database
        # in one statement per table: before any search or history read in this transaction (flush)
        # and before commit.
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._stale: dict[str, set[int]] = {}
        self._versions: list[dict[str, Any]] = []
        # What write listeners worked out in this transaction and would otherwise ask again for each
        # resource written (who hears of a patient's new results), under keys of their own (memoized).
        self._memo: dict[Any, Any] = {}

    def memoized(self, key: Any, work_out: Callable[[], Any]) -> Any:
        """What work_out() gives, worked out once in this transaction for `key`."""
        if key not in self._memo:
            self._memo[key] = work_out()
        return self._memo[key]

    # --- reads ---

    def _current_row(self, resource_type: str, resource_id: str, for_update: bool = False) -> CurrentRow | None:
        query = _CURRENT_FOR_UPDATE if for_update and db.is_postgres(self.conn) else _CURRENT
        row = query.first(self.conn, {"t": resource_type, "i": resource_id})
        return None if row is None else CurrentRow.of(row)

    @staticmethod
    def _stored(row: Any) -> Stored:
        return Stored(row.resource_type, row.id, row.version_id, row.last_updated, row.deleted,
                      None if row.deleted else row.content, row.pk)

    def read(self, resource_type: str, resource_id: str) -> Stored:
        row = self._current_row(resource_type, resource_id)
        if row is None:
            raise not_found(resource_type, resource_id)
        if row.deleted:
            raise gone(resource_type, resource_id)
        return self._stored(row)

    def find(self, resource_type: str, resource_id: str, for_update: bool = False) -> Stored | None:
        """The current version, or None when absent or deleted. for_update: on PostgreSQL, wait for
        any other transaction writing it and lock it until this one ends, so that a decision taken on
        what was read (unchanged, older) still holds when this transaction writes."""
        row = self._current_row(resource_type, resource_id, for_update)
        return None if row is None or row.deleted else self._stored(row)

    def find_many(self, keys: list[tuple[str, str]], for_update: bool = False,
                  deleted: bool = False) -> dict[tuple[str, str], Stored]:
        """The current versions of several resources in one statement, keyed by (type, id); absent
        ones are left out, and deleted ones too unless `deleted` (as find() gives None for them).
        for_update as in find()."""
        return self.send_find_many(keys, for_update, deleted)()

    def send_find_many(self, keys: list[tuple[str, str]], for_update: bool = False,
                       deleted: bool = False) -> Callable[[], dict[tuple[str, str], Stored]]:
        """find_many in two steps: the statement is sent now, and what this returns reads its answer;
        call it after the db.pipeline block that sends the statement with others (PostgreSQL: one
        round trip for all of them)."""
        if not keys:
            return dict
        by_type: dict[str, list[str]] = {}
        for resource_type, resource_id in dict.fromkeys(keys):
            by_type.setdefault(resource_type, []).append(resource_id)
        # every HL7 message asks this: straight to the driver (see db.Prepared)
        sql = _current_many_text(self.conn.dialect.name, tuple(len(ids) for ids in by_type.values()),
                                 for_update and db.is_postgres(self.conn))
        args = tuple(value for resource_type, ids in by_type.items() for value in (resource_type, *ids))
        cursor = db.driver_execute(self.conn, sql, args)

        def found() -> dict[tuple[str, str], Stored]:
            rows = [CurrentRow.of(r) for r in cursor.fetchall()]
            return {(r.resource_type, r.id): self._stored(r) for r in rows if deleted or not r.deleted}

        return found

    def vread(self, resource_type: str, resource_id: str, version_id: int) -> Stored:
        self.flush()
        v = db.resource_version.c
        row = self.conn.execute(
            select(db.resource_version).where(
                v.resource_type == resource_type, v.id == resource_id, v.version_id == version_id
            )
        ).first()
        if row is None:
            raise FhirError(404, f"{resource_type}/{resource_id} has no version {version_id}", code="not-found")
        if row.deleted:
            raise FhirError(410, f"{resource_type}/{resource_id} version {version_id} is a deletion",
                            code="deleted")
        return Stored(row.resource_type, row.id, row.version_id, row.last_updated, row.deleted,
                      row.content, row.resource_pk)

    def read_many(self, pks: list[int]) -> list[Stored]:
        if not pks:
            return []
        rows = self.conn.execute(select(db.resource).where(db.resource.c.pk.in_(pks))).all()
        by_pk = {r.pk: self._stored(r) for r in rows}
        return [by_pk[pk] for pk in pks if pk in by_pk]

    # --- writes ---

    def _prepare(self, resource: dict[str, Any], resource_id: str, version_id: int,
                 check: bool) -> tuple[dict[str, Any], str]:
        if check:
            validate(resource)
        return _with_meta(resource, resource_id, version_id)

    def _write_index(self, pk: int, body: dict[str, Any], new: bool) -> None:
        if not new:
            self._drop_index(pk, body["resourceType"])
        self._add_index(pk, body["resourceType"], index_rows(body, self.base_url),
                        compartment_patients(body, self.base_url))

    def _add_index(self, pk: int, resource_type: str, rows_by_type: dict[str, list[dict[str, Any]]],
                   patients: set[str]) -> None:
        for param_type, rows in rows_by_type.items():
            table = db.INDEX_TABLES[param_type].name
            self._pending.setdefault(table, []).extend({**row, "resource_pk": pk} for row in rows)
        self._pending.setdefault(db.compartment.name, []).extend(
            {"resource_pk": pk, "resource_type": resource_type, "patient_id": p} for p in sorted(patients)
        )

    def _drop_index(self, pk: int, resource_type: str) -> None:
        """Forget the index rows of a resource's previous version: pending ones now, stored ones at
        flush (one DELETE per table for the whole transaction)."""
        for name, rows in self._pending.items():
            if any(row["resource_pk"] == pk for row in rows):
                self._pending[name] = [row for row in rows if row["resource_pk"] != pk]
        for name in index_tables_for(resource_type):
            self._stale.setdefault(name, set()).add(pk)

    def flush(self, at_commit: bool = False) -> None:
        """Write what this transaction has buffered; searches and history reads call it first. On
        PostgreSQL the statements go to the server together (one round trip), and with at_commit
        (the end of the transaction) with the COMMIT: nothing reads them before it."""
        if not (self._versions or any(self._stale.values()) or any(self._pending.values())):
            return  # on PostgreSQL an empty pipeline still costs a round trip
        later = at_commit and db.is_postgres(self.conn)
        with db.pipeline(self.conn) if not later else nullcontext():
            for name, pks in self._stale.items():
                if pks:
                    deletes = [{"pk": pk} for pk in sorted(pks)]
                    if later:
                        db.at_commit(self.conn, _DELETE_INDEX[name], deletes)
                    else:
                        _DELETE_INDEX[name].execute(self.conn, deletes)
            self._stale = {}
            for name, rows in self._pending.items():
                if rows:
                    insert_rows(self.conn, name, rows, at_commit=later)
            self._pending = {}
            if self._versions:
                insert_rows(self.conn, db.resource_version.name, self._versions, at_commit=later)
                self._versions = []

    def _insert_version(self, pk: int, body: dict[str, Any] | None, resource_type: str, resource_id: str,
                        version_id: int, last_updated: str, method: str, content: str | None) -> None:
        self._versions.append({
            "resource_pk": pk, "resource_type": resource_type, "id": resource_id, "version_id": version_id,
            "last_updated": last_updated, "last_updated_ms": instant_ms(last_updated), "method": method,
            "deleted": body is None, "content": content,
        })

    def create_many(self, resources: list[dict[str, Any]]) -> list[Stored]:
        """Create trusted resources in bulk (server-made records such as AuditEvents): new ids, no
        validation, one multi-row INSERT per table. Listeners are not told; nothing else uses it."""
        return self.insert_new(new_resources(resources, self.base_url))

    def insert_new(self, new: list[NewResource]) -> list[Stored]:
        """create_many for resources new_resources() made (before this transaction)."""
        if not new:
            return []
        rows = [{"resource_type": n.body["resourceType"], "id": n.body["id"], "version_id": 1,
                 "last_updated": n.last_updated, "deleted": False, "content": n.content} for n in new]
        pks = self.conn.execute(
            insert(db.resource).returning(db.resource.c.pk, sort_by_parameter_order=True), rows
        ).scalars().all()
        stored = []
        for pk, n in zip(pks, new, strict=True):
            rtype, rid = n.body["resourceType"], n.body["id"]
            self._insert_version(pk, n.body, rtype, rid, 1, n.last_updated, "POST", n.content)
            self._add_index(pk, rtype, n.index, n.patients)
            stored.append(Stored(rtype, rid, 1, n.last_updated, False, n.content, pk))
        return stored

    def lock(self, key: str) -> None:
        """Serialise writers that decide on the same key (conditional writes), until commit."""
        if db.is_postgres(self.conn):
            self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(key)})
        # SQLite: the write transaction already holds the database's single write lock.

    def match(self, resource_type: str, criteria: str) -> list[Stored]:
        from gateway.fhir.search import conditional_matches

        return conditional_matches(self, resource_type, criteria)

    def create(self, resource: dict[str, Any], if_none_exist: str | None = None,
               check: bool = True, resource_id: str | None = None) -> WriteResult:
        if check:
            validate(resource)
        resource_type = resource["resourceType"]
        if if_none_exist:
            self.lock(f"{resource_type}?{if_none_exist}")
            matches = self.match(resource_type, if_none_exist)
            if len(matches) == 1:
                return WriteResult(matches[0], 200, changed=False)
            if len(matches) > 1:
                raise FhirError(412, f"If-None-Exist matched {len(matches)} resources", code="duplicate")
        return self._write([self._plan_new(resource, resource_id or str(uuid.uuid4()), "POST", check=False)])[0]

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any],
               if_match: str | None = None, check: bool = True, method: str = "PUT",
               current: Stored | _Unread | None = UNREAD) -> WriteResult:
        """Create or update a resource. `current`: its current version (deleted or not; None when
        there is none), when the caller read it in this transaction with find_many(for_update=True,
        deleted=True), so that it is not read again (the HL7 feed reads every resource of a message
        at once)."""
        planned = self._plan(resource_type, resource_id, resource, if_match, check, method, current)
        return planned if isinstance(planned, WriteResult) else self._write([planned])[0]

    def update_many(self, writes: list[tuple[dict[str, Any], Stored | None]], method: str = "PUT") -> list[WriteResult]:
        """update() of several resources, each with its current version as update() takes it
        (read with find_many(for_update=True, deleted=True)), written together: on PostgreSQL the
        new rows and the changed ones go to the server in one round trip, not one each."""
        planned = [self._plan(body["resourceType"], body["id"], body, None, True, method, current)
                   for body, current in writes]
        written = iter(self._write([p for p in planned if isinstance(p, _Planned)]))
        return [p if isinstance(p, WriteResult) else next(written) for p in planned]

    def _plan(self, resource_type: str, resource_id: str, resource: dict[str, Any], if_match: str | None,
              check: bool, method: str, current: Stored | _Unread | None) -> _Planned | WriteResult:
        """What an update will write (validated, with its meta and JSON text), or its result when it
        writes nothing (the content is unchanged)."""
        if not isinstance(resource, dict):
            validate(resource)  # the OperationOutcome for a body that is not a resource
        if resource.get("resourceType") != resource_type:
            raise FhirError(400, f"resourceType {resource.get('resourceType')!r} does not match the URL "
                                 f"({resource_type})", code="invalid", expression=["resourceType"])
        if resource.get("id") != resource_id:
            raise FhirError(400, f"The body's id {resource.get('id')!r} does not match the URL id "
                                 f"{resource_id!r}", code="invalid", expression=[f"{resource_type}.id"])
        if not ID_RE.match(resource_id):
            raise FhirError(400, f"Invalid id {resource_id!r}", code="invalid")
        expected = parse_version(if_match)
        if current is UNREAD:
            row: CurrentRow | Stored | None = self._current_row(resource_type, resource_id, for_update=True)
        elif current is not None and (current.resource_type, current.id) != (resource_type, resource_id):
            raise ValueError(f"the current version given is of {current.reference}, not {resource_type}/{resource_id}")
        else:
            row = current
        if row is None:
            if expected is not None:
                raise FhirError(412, f"{resource_type}/{resource_id} does not exist (If-Match {if_match})",
                                code="conflict")
            return self._plan_new(resource, resource_id, method, check)
        if expected is not None and expected != row.version_id:
            raise FhirError(412, f"Version conflict: {resource_type}/{resource_id} is at version "
                                 f"{row.version_id}, If-Match gave {expected}", code="conflict")
        if not row.deleted and same_content(jsonio.loads(row.content), resource):
            # Stored content was valid when it was written, so an identical body needs no validation.
            return WriteResult(self._stored(row), 200, changed=False)
        body, last_updated = self._prepare(resource, resource_id, row.version_id + 1, check)
        return _Planned(body, last_updated, jsonio.dumps(body), method, row.pk, row.version_id, row.deleted)

    def _plan_new(self, resource: dict[str, Any], resource_id: str, method: str, check: bool) -> _Planned:
        body, last_updated = self._prepare(resource, resource_id, 1, check)
        return _Planned(body, last_updated, jsonio.dumps(body), method)

    def _write(self, planned: list[_Planned]) -> list[WriteResult]:
        """Write planned versions: the resource rows first (PostgreSQL: all in one round trip), then
        their history and index rows (buffered until flush) and the listeners told, in order."""
        if not planned:
            return []  # an empty pipeline would still cost a round trip
        with db.pipeline(self.conn):
            sent = [_INSERT_RESOURCE.send(self.conn, p.row()) if p.pk is None else
                    _UPDATE_RESOURCE.send(self.conn, {**p.row(), "w_pk": p.pk, "w_version": p.current_version})
                    for p in planned]
        results = []
        for p, cursor in zip(planned, sent, strict=True):
            rtype, rid = p.body["resourceType"], p.body["id"]
            if p.pk is None:
                pk = cursor.fetchone()[0]
            elif cursor.rowcount != 1:
                raise FhirError(412, f"{rtype}/{rid} changed while updating", code="conflict")
            else:
                pk = p.pk
            self._insert_version(pk, p.body, rtype, rid, p.version_id, p.last_updated, p.method, p.content)
            self._write_index(pk, p.body, new=p.pk is None)
            stored = Stored(rtype, rid, p.version_id, p.last_updated, False, p.content, pk)
            result = WriteResult(stored, 201 if p.pk is None or p.was_deleted else 200)
            self.store.notify("create" if p.pk is None else "update", result, self)
            results.append(result)
        return results

    def conditional_update(self, resource_type: str, criteria: str, resource: dict[str, Any],
                           if_match: str | None = None) -> WriteResult:
        self.lock(f"{resource_type}?{criteria}")
        matches = self.match(resource_type, criteria)
        if len(matches) > 1:
            raise FhirError(412, f"The criteria matched {len(matches)} resources", code="multiple-matches")
        if matches:
            target = matches[0]
            if resource.get("id") not in (None, target.id):
                raise FhirError(400, "The body's id does not match the resource the criteria found",
                                code="invalid")
            return self.update(resource_type, target.id, {**resource, "id": target.id}, if_match)
        if resource.get("id"):
            return self.update(resource_type, resource["id"], resource, if_match)
        return self.create(resource)

    def patch(self, resource_type: str, resource_id: str, operations: Any,
              if_match: str | None = None) -> WriteResult:
        current = self.read(resource_type, resource_id)
        try:
            patched = jsonpatch.apply_patch(current.resource(), operations)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
            raise FhirError(422, f"The JSON Patch cannot be applied: {exc}", code="processing") from None
        return self.update(resource_type, resource_id, patched,
                           if_match=if_match or str(current.version_id), method="PATCH")

    def delete(self, resource_type: str, resource_id: str) -> Stored | None:
        """Soft delete: a deletion version, no index rows. Deleting the absent is not an error.

        The returned Stored is the deletion (deleted=True) carrying the content of the version it
        ended, so that the audit trail can say whose record it was."""
        row = self._current_row(resource_type, resource_id, for_update=True)
        if row is None or row.deleted:
            return None
        version_id = row.version_id + 1
        last_updated = now_instant()
        _UPDATE_RESOURCE.execute(self.conn, {
            "w_pk": row.pk, "w_version": row.version_id, "version_id": version_id,
            "last_updated": last_updated, "deleted": True, "content": row.content,
        })
        self._insert_version(row.pk, None, resource_type, resource_id, version_id, last_updated, "DELETE", None)
        self._drop_index(row.pk, resource_type)
        stored = Stored(resource_type, resource_id, version_id, last_updated, True, row.content, row.pk)
        self.store.notify("delete", WriteResult(stored, 200), self)
        return stored

    def conditional_delete(self, resource_type: str, criteria: str) -> list[Stored]:
        matches = self.match(resource_type, criteria)
        if len(matches) > 1:
            raise FhirError(412, f"The criteria matched {len(matches)} resources", code="multiple-matches")
        return [d for m in matches if (d := self.delete(resource_type, m.id))]

    # --- history ---

    def history(self, resource_type: str | None = None, resource_id: str | None = None,
                since_ms: int | None = None, before_seq: int | None = None,
                count: int = 50) -> tuple[list[Stored], int | None]:
        """Versions newest first; returns (page, cursor for the next page or None)."""
        self.flush()
        v = db.resource_version.c
        conditions = []
        if resource_type:
            conditions.append(v.resource_type == resource_type)
        if resource_id:
            if self._current_row(resource_type or "", resource_id) is None:
                raise not_found(resource_type or "", resource_id)
            conditions.append(v.id == resource_id)
        if since_ms is not None:
            conditions.append(v.last_updated_ms >= since_ms)
        if before_seq is not None:
            conditions.append(v.seq < before_seq)
        rows = self.conn.execute(
            select(db.resource_version).where(*conditions).order_by(v.seq.desc()).limit(count + 1)
        ).all()
        page = [Stored(r.resource_type, r.id, r.version_id, r.last_updated, r.deleted, r.content, r.resource_pk,
                       r.method) for r in rows[:count]]
        return page, (rows[count - 1].seq if len(rows) > count else None)


def _with_meta(resource: dict[str, Any], resource_id: str, version_id: int) -> tuple[dict[str, Any], str]:
    """The resource as stored: its id, meta.versionId and meta.lastUpdated set (now)."""
    body = dict(resource)
    body["id"] = resource_id
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = now_instant()
    body["meta"] = meta
    return body, meta["lastUpdated"]


@dataclass(frozen=True, slots=True)
class _Planned:
    """A version Repository._plan has made ready to write: of a new resource (pk None), or the next
    version of the resource row `pk`, now at `current_version` (deleted, if was_deleted)."""

    body: dict[str, Any]
    last_updated: str
    content: str
    method: str
    pk: int | None = None
    current_version: int = 0
    was_deleted: bool = False

    @property
    def version_id(self) -> int:
        return self.current_version + 1

    def row(self) -> dict[str, Any]:
        """The values of its row in the resource table."""
        return {"resource_type": self.body["resourceType"], "id": self.body["id"], "version_id": self.version_id,
                "last_updated": self.last_updated, "deleted": False, "content": self.content}


@dataclass(frozen=True)
class NewResource:
    """A resource for create_many with the work done that needs no database (see new_resources)."""

    body: dict[str, Any]
    last_updated: str
    content: str
    index: dict[str, list[dict[str, Any]]]
    patients: set[str]


def new_resources(resources: list[dict[str, Any]], base_url: str) -> list[NewResource]:
    """What create_many does for each resource before it writes (a new id, meta, the JSON text, index
    rows and compartments), so that a caller can do it before its transaction: on SQLite the
    transaction holds the only write lock, and this is most of the cost."""
    out = []
    for resource in resources:
        body, last_updated = _with_meta(resource, str(uuid.uuid4()), 1)
        out.append(NewResource(body, last_updated, jsonio.dumps(body), index_rows(body, base_url),
                               compartment_patients(body, base_url)))
    return out


def same_content(current: dict[str, Any], incoming: dict[str, Any],
                 ignore_meta: tuple[str, ...] = ("versionId", "lastUpdated")) -> bool:
    """True when the two differ at most in the meta elements named (by default: an update would
    change nothing but meta.versionId and meta.lastUpdated).

    Compared as canonical JSON text, not as values: Decimal("1.5") == Decimal("1.50"), but a
    change of precision is a change of the record.
    """
    def without_ignored(body: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in ignore_meta}
        rest = {k: v for k, v in body.items() if k != "meta"}
        return {**rest, "meta": meta} if meta else rest

    first, second = without_ignored(current), without_ignored(incoming)
    try:
        # orjson, several times faster; decimals written as jsonio writes them (see _decimal_text)
        return _canonical(first) == _canonical(second)
    except TypeError:  # a value orjson cannot write (an integer beyond 64 bits): the reference way
        return jsonio.dumps(first, sort_keys=True) == jsonio.dumps(second, sort_keys=True)


def _canonical(body: dict[str, Any]) -> bytes:
    """Sorted compact JSON (orjson) that tells the same values apart as jsonio's text does: an
    integral Decimal without exponent is written as the integer it equals ("1" is read back as the
    int 1), any other Decimal as its exact digits behind a NUL in a string. FHIR strings hold no NUL;
    should one anyway, the count of NULs gives it away and the caller falls back (TypeError)."""
    markers = 0

    def decimal_text(value: Any) -> Any:
        nonlocal markers
        if isinstance(value, Decimal):
            if value.is_finite() and value == value.to_integral_value() and str(value) == str(int(value)):
                return int(value)
            markers += 1
            return "\u0000" + str(value)
        raise TypeError(f"{type(value).__name__} is not JSON")

    text = orjson.dumps(body, default=decimal_text, option=orjson.OPT_SORT_KEYS)
    if text.count(b"\\u0000") != markers:
        raise TypeError("a string holds a NUL character")
    return text


class FhirStore:
    def __init__(self, engine: Engine, fhir_base: str = "") -> None:
        self.engine = engine
        # Absolute references on this base are indexed as local ones.
        self.base_url = fhir_base.rstrip("/")
        self.listeners: list[WriteListener] = []
        # Stores the AuditEvents captured but not yet stored (gateway.audit sets it): searches of
        # AuditEvent call it first, so that they find every event captured before them.
        self.audit_catch_up: Callable[[], Any] | None = None

    def settle_audit(self) -> None:
        if self.audit_catch_up is not None:
            self.audit_catch_up()

    def notify(self, action: str, result: WriteResult, repo: Repository) -> None:
        for listener in self.listeners:
            listener(action, result, repo)

    @contextmanager
    def writing(self, durable: bool = True, origin: str | None = None) -> Iterator[Repository]:
        with db.write_tx(self.engine, durable) as conn:
            repo = Repository(self, conn, origin)
            yield repo
            repo.flush(at_commit=True)

    @contextmanager
    def reading(self) -> Iterator[Repository]:
        with db.read_tx(self.engine) as conn:
            yield Repository(self, conn)

    def write(self, operation: Callable[[Repository], Any], attempts: int = 3, origin: str | None = None) -> Any:
        """Run a write in its own transaction, retrying when a concurrent insert of the same id won."""
        for attempt in range(attempts):
            try:
                with self.writing(origin=origin) as repo:
                    return operation(repo)
            except IntegrityError:
                if attempt == attempts - 1:
                    raise FhirError(409, "A concurrent write to the same resource won; retry",
                                    code="conflict") from None
        raise AssertionError("unreachable")


def known_type(resource_type: str) -> None:
    if not is_resource_type(resource_type):
        raise FhirError(404, f"Unknown resource type {resource_type!r}", code="not-supported")
