"""`gateway db upgrade` and `gateway import` through click's CliRunner on a fresh SQLite file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from gateway import db
from gateway.cli import main

SYSTEM = "urn:test:mrn"
PATIENT_URN = "urn:uuid:5d3c0b4e-0000-4000-8000-000000000001"
SUMMARY = re.compile(r"^imported (\d+) entries from (\d+) of (\d+) files in [\d.]+s: (\d+) created, "
                     r"(\d+) updated or unchanged, (\d+) failed$", re.MULTILINE)


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.sqlite'}"


@pytest.fixture
def gateway(database: str, tmp_path: Path) -> Iterator[Any]:
    """Invoke `gateway ...` against the fresh database (schema upgraded first)."""
    runner = CliRunner(env={"GATEWAY_DATABASE_URL": database, "GATEWAY_INSTANCE_PATH": str(tmp_path)})

    def invoke(*args: str) -> Result:
        return runner.invoke(main, list(args), catch_exceptions=False)

    upgraded = invoke("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert "schema at head" in upgraded.output
    yield invoke


@pytest.fixture
def engine(database: str) -> Iterator[Any]:
    engine = db.make_engine(database)
    yield engine
    engine.dispose()


def stored(engine: Any) -> dict[str, dict[str, Any]]:
    """Current resources by reference."""
    with engine.connect() as conn:
        rows = conn.execute(select(db.resource).where(db.resource.c.deleted.is_(False))).all()
    return {f"{r.resource_type}/{r.id}": json.loads(r.content) for r in rows}


def version_count(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(db.resource_version)).scalar_one()


def summary(result: Result) -> dict[str, int]:
    match = SUMMARY.search(result.output)
    assert match, result.output
    keys = ("entries", "files_ok", "files", "created", "updated", "failed")
    return dict(zip(keys, map(int, match.groups()), strict=True))


def patient(pid: str | None = None, mrn: str = "M1", **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": mrn}],
                                **fields}
    if pid:
        resource["id"] = pid
    return resource


def observation(oid: str | None, subject: str, **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                                "subject": {"reference": subject}, **fields}
    if oid:
        resource["id"] = oid
    return resource


def write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def write_ndjson(path: Path, resources: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), encoding="utf-8")
    return str(path)


def transaction_file(tmp_path: Path) -> str:
    return write_json(tmp_path / "transaction.json", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": PATIENT_URN, "resource": patient(mrn="TX"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYSTEM}|TX"}},
        {"resource": observation("tx-obs", PATIENT_URN),
         "request": {"method": "PUT", "url": "Observation/tx-obs"}},
    ]})


def put_transaction_file(tmp_path: Path) -> str:
    return write_json(tmp_path / "put-transaction.json", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": PATIENT_URN, "resource": patient(mrn="PX"), "request": {"method": "PUT", "url": "Patient/px"}},
        {"resource": observation(None, PATIENT_URN), "request": {"method": "PUT", "url": "Observation/px-obs"}},
    ]})


def ndjson_file(tmp_path: Path) -> str:
    return write_ndjson(tmp_path / "patients.ndjson", [
        patient("nd-1", "N1", gender="female"),
        patient("nd-2", "N2"),
        observation("nd-obs", "Patient/nd-1", valueQuantity={"value": 70, "unit": "kg"}),
    ])


def collection_file(tmp_path: Path) -> str:
    return write_json(tmp_path / "collection.json", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "http://example.org/fhir/Patient/col-1", "resource": patient("col-1", "C1")},
        {"fullUrl": "http://example.org/fhir/Observation/col-obs", "resource": observation("col-obs", "Patient/col-1")},
    ]})


# --- schema ---

def test_db_upgrade_is_repeatable(gateway: Any, engine: Any) -> None:
    again = gateway("db", "upgrade")
    assert again.exit_code == 0, again.output
    assert version_count(engine) == 0


# --- imports ---

def test_import_transaction_bundle(gateway: Any, engine: Any, tmp_path: Path) -> None:
    result = gateway("import", transaction_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert summary(result) == {"entries": 2, "files_ok": 1, "files": 1, "created": 2, "updated": 0, "failed": 0}
    resources = stored(engine)
    (patient_ref,) = [ref for ref in resources if ref.startswith("Patient/")]
    assert resources["Observation/tx-obs"]["subject"]["reference"] == patient_ref


def test_import_ndjson(gateway: Any, engine: Any, tmp_path: Path) -> None:
    result = gateway("import", ndjson_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert summary(result)["created"] == 3
    resources = stored(engine)
    assert set(resources) == {"Patient/nd-1", "Patient/nd-2", "Observation/nd-obs"}
    assert resources["Patient/nd-1"]["gender"] == "female"
    assert resources["Observation/nd-obs"]["meta"]["versionId"] == "1"


def test_import_collection_bundle(gateway: Any, engine: Any, tmp_path: Path) -> None:
    result = gateway("import", collection_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert summary(result)["created"] == 2
    assert set(stored(engine)) == {"Patient/col-1", "Observation/col-obs"}


def test_import_several_files_at_once(gateway: Any, engine: Any, tmp_path: Path) -> None:
    files = [transaction_file(tmp_path), ndjson_file(tmp_path), collection_file(tmp_path)]
    result = gateway("import", *files)
    assert result.exit_code == 0, result.output
    assert summary(result) == {"entries": 7, "files_ok": 3, "files": 3, "created": 7, "updated": 0, "failed": 0}
    for path in files:
        assert re.search(rf"^{re.escape(path)}: \d+ entries", result.output, re.MULTILINE)
    assert len(stored(engine)) == 7


def test_reimport_is_idempotent(gateway: Any, engine: Any, tmp_path: Path) -> None:
    files = [put_transaction_file(tmp_path), ndjson_file(tmp_path), collection_file(tmp_path)]
    assert gateway("import", *files).exit_code == 0
    before, versions = stored(engine), version_count(engine)
    assert before["Observation/px-obs"]["subject"]["reference"] == "Patient/px"
    again = gateway("import", *files)
    assert again.exit_code == 0, again.output
    assert summary(again) == {"entries": 7, "files_ok": 3, "files": 3, "created": 0, "updated": 7, "failed": 0}
    assert version_count(engine) == versions
    assert stored(engine) == before


def test_reimport_of_conditional_transaction_is_idempotent(gateway: Any, engine: Any, tmp_path: Path) -> None:
    path = transaction_file(tmp_path)
    assert gateway("import", path).exit_code == 0
    before, versions = stored(engine), version_count(engine)
    again = gateway("import", path)
    assert again.exit_code == 0, again.output
    assert summary(again)["created"] == 0
    assert version_count(engine) == versions
    assert stored(engine) == before


def test_import_updates_changed_resources(gateway: Any, engine: Any, tmp_path: Path) -> None:
    path = ndjson_file(tmp_path)
    gateway("import", path)
    write_ndjson(Path(path), [patient("nd-1", "N1", gender="male")])
    result = gateway("import", path)
    assert result.exit_code == 0, result.output
    current = stored(engine)["Patient/nd-1"]
    assert (current["gender"], current["meta"]["versionId"]) == ("male", "2")


# --- failures ---

INVALID = {"resourceType": "Patient", "id": "bad", "birthDate": "not-a-date"}


@pytest.mark.parametrize("kind", ["ndjson", "transaction", "collection"])
def test_file_with_invalid_resource_stores_nothing(gateway: Any, engine: Any, tmp_path: Path, kind: str) -> None:
    good = [patient("ok-1", "F1"), patient("ok-2", "F2")]
    if kind == "ndjson":
        path = write_ndjson(tmp_path / "bad.ndjson", [*good, INVALID])
    else:
        entries = [{"resource": r} for r in [*good, INVALID]]
        if kind == "transaction":
            for e in entries:
                e["request"] = {"method": "PUT", "url": f"Patient/{e['resource']['id']}"}
        path = write_json(tmp_path / "bad.json", {"resourceType": "Bundle", "type": kind, "entry": entries})
    result = gateway("import", path)
    assert result.exit_code != 0
    assert f"{path}: FAILED" in result.output
    assert "Patient.birthDate" in result.output
    assert "Traceback" not in result.output
    assert summary(result)["files_ok"] == 0
    assert version_count(engine) == 0


def test_failed_file_does_not_stop_the_others(gateway: Any, engine: Any, tmp_path: Path) -> None:
    bad = write_ndjson(tmp_path / "bad.ndjson", [patient("ok-1"), INVALID])
    good = ndjson_file(tmp_path)
    result = gateway("import", bad, good)
    assert result.exit_code != 0
    assert summary(result)["files_ok"] == 1
    assert set(stored(engine)) == {"Patient/nd-1", "Patient/nd-2", "Observation/nd-obs"}


def test_file_that_is_not_json_fails(gateway: Any, engine: Any, tmp_path: Path) -> None:
    path = tmp_path / "broken.ndjson"
    path.write_text(json.dumps(patient("ok-1")) + "\n{broken\n", encoding="utf-8")
    result = gateway("import", str(path))
    assert result.exit_code != 0
    assert "FAILED" in result.output
    assert version_count(engine) == 0


def test_large_file_with_invalid_resource_stores_nothing(gateway: Any, engine: Any, tmp_path: Path) -> None:
    resources = [{"resourceType": "Patient", "id": f"p{i}"} for i in range(500)]
    path = write_ndjson(tmp_path / "large.ndjson", [*resources, INVALID])
    result = gateway("import", path)
    assert result.exit_code != 0
    assert version_count(engine) == 0


def test_collection_bundle_urn_uuid_references_resolved(gateway: Any, engine: Any, tmp_path: Path) -> None:
    path = write_json(tmp_path / "document.json", {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": PATIENT_URN, "resource": patient(mrn="U1")},
        {"fullUrl": "urn:uuid:5d3c0b4e-0000-4000-8000-000000000002", "resource": observation(None, PATIENT_URN)},
    ]})
    result = gateway("import", path)
    assert result.exit_code == 0, result.output
    resources = stored(engine)
    (patient_ref,) = [ref for ref in resources if ref.startswith("Patient/")]
    (obs,) = [r for ref, r in resources.items() if ref.startswith("Observation/")]
    assert obs["subject"]["reference"] == patient_ref


def test_hl7_send_to_a_port_nobody_listens_on_says_so(gateway: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port

    message = tmp_path / "m.hl7"
    message.write_text("MSH|^~\\&|A|B|C|D|20261101||ADT^A04|1|P|2.5.1\rPID|1||9^^^H^MR\r")
    result = gateway("hl7", "send", str(message), "--port", str(free_port()), "--timeout", "2")
    assert result.exit_code == 1
    assert "Connection refused" in result.output and "Traceback" not in result.output


def test_hl7_send_counts_the_codes_of_acks_in_their_own_separators(gateway: Any, tmp_path: Path) -> None:
    """MSA-1 is read with the separator the ACK itself uses (the one after "MSA"), as the client's
    matching of replies reads MSA-2; an ACK without an MSA counts as ??."""
    from gateway.hl7 import mllp

    def answer(message: bytes) -> bytes:
        control = message.split(b"|")[9]
        if control == b"2":
            return b"MSH#^~\\&#GW#RIV#EHR#RIV#20261101083001##ACK#A2#P#2.5.1\rMSA#AE#2\rERR####E\r"
        if control == b"3":
            return b"MSH|^~\\&|GW|RIV|EHR|RIV|20261101083001||ACK|A3|P|2.5.1\r"
        return b"MSH|^~\\&|GW|RIV|EHR|RIV|20261101083001||ACK|A1|P|2.5.1\rMSA|AA|" + control + b"\r"

    files = []
    for n in (1, 2, 3):
        files.append(tmp_path / f"m{n}.hl7")
        files[-1].write_text(f"MSH|^~\\&|A|B|C|D|20261101||ADT^A04|{n}|P|2.5.1\rPID|1||9^^^H^MR\r")
    server = mllp.start_in_thread(answer)
    try:
        result = gateway("hl7", "send", *map(str, files), "--port", str(server.port), "--timeout", "5")
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert "m2.hl7: MSA#AE#2 ERR####E" in result.output
    assert result.output.strip().endswith("sent 3 messages: 1 ??, 1 AA, 1 AE")
    assert mllp.msa_fields(b"MSH#^~\\&#GW\nMSA#CA#X1") == ["MSA", "CA", "X1"]
    assert mllp.msa_fields(b"MSH|^~\\&|GW\r") is None


@pytest.mark.parametrize("command", [("db", "upgrade"), ("import", __file__), ("serve", "--port", "0"),
                                     ("mllp", "--port", "0"), ("hl7", "list")])
def test_sqlite_database_in_a_missing_folder_is_refused_in_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    """A mistyped SQLite path stops every command at once with what to fix, before anything starts
    (no gunicorn worker failing to boot, no background round logging a stack trace every second),
    and no folder or database is made at the mistyped place. A real process with a time limit: a
    command that started serving instead would otherwise never return."""
    missing = tmp_path / "no-such-folder"
    env = {**os.environ, "GATEWAY_DATABASE_URL": f"sqlite:///{missing / 'gateway.sqlite'}",
           "GATEWAY_INSTANCE_PATH": str(tmp_path), "GATEWAY_MLLP_PORT": "0"}
    try:
        done = subprocess.run([sys.executable, "-m", "gateway.cli", *command], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway {' '.join(command)} started instead of refusing the database path")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.strip() == (
        f"Error: the folder {missing} for the SQLite database {missing / 'gateway.sqlite'} does not exist: "
        "create it, or set GATEWAY_DATABASE_URL to a path in an existing folder")
    assert not missing.exists()


def test_database_url_check_leaves_other_databases_alone(tmp_path: Path) -> None:
    db.check_url(f"sqlite:///{tmp_path / 'new.sqlite'}")  # the folder exists: SQLite makes the file
    db.check_url("sqlite://")  # in memory
    db.check_url("postgresql://postgres@127.0.0.1:5432/no-such-folder/x")  # a server's name, not a path
    with pytest.raises(db.DatabaseSettingError):
        db.check_url(f"sqlite:///{tmp_path / 'missing' / 'new.sqlite'}")


@pytest.mark.parametrize("command", [("db", "upgrade"), ("import", "{bundle}"), ("hl7", "list")])
def test_an_unreachable_postgresql_is_said_in_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    """A one-off command against a PostgreSQL that does not answer ends with one line saying so,
    host and port included and the password left out; not a SQLAlchemy traceback. (serve and mllp
    keep running instead: they answer 503 and NAK 207 until the database is back.)"""
    from tests.conftest import free_port

    env = {**os.environ, "GATEWAY_DATABASE_URL": f"postgresql://gw:s3cret-pw@127.0.0.1:{free_port()}/gw",
           "GATEWAY_INSTANCE_PATH": str(tmp_path)}
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient/p1"}}]}))
    command = tuple(part.format(bundle=bundle) for part in command)
    done = subprocess.run([sys.executable, "-m", "gateway.cli", *command], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: the database did not answer: it cannot be reached (")
    assert "127.0.0.1" in lines[0] and "Connection refused" in lines[0]
    assert "s3cret-pw" not in done.stdout + done.stderr
