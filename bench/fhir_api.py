#!/usr/bin/env python3
"""Benchmark of the FHIR REST API as production serves it (gunicorn, 2 workers), on loopback only.

    python bench/fhir_api.py                      # 200,000 resources on SQLite, 16 clients, 20 s phases
    python bench/fhir_api.py --resources 20000 --seconds 5        # quick run
    python bench/fhir_api.py --database postgresql                # fresh gw_bench_* database, dropped after

Starts `gateway serve` on a free port, loads copies of the Synthea transaction Bundles in
/work/shared/corpus/fhir/synthea over HTTP, then measures a trivial endpoint, read, search and
create for a fixed time each, prints a summary with PASS/MISS against the targets and writes the
figures to bench/results/fhir_api-<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import PhaseResult, PhaseSpec, run_python, run_wrk, wrk_path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CORPUS = Path("/work/shared/corpus/fhir/synthea")
HOST = "127.0.0.1"
OTHER_CPU_WARNING = 0.10  # share of all cores that other processes may take before a phase is flagged
MARK = 20_000  # default store size at which the search p95 baseline is taken (--mark)
LAST_STRETCH = 0.1  # the share of the goal loaded last, whose import rate is set against the first stretch's
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SEARCH_SINCE = "2015-01-01"
SEARCH_PATH = f"/fhir/Observation?patient={{id}}&category=laboratory&date=ge{SEARCH_SINCE}"
NEW_OBSERVATION = json.dumps({
    "resourceType": "Observation",
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "laboratory", "display": "Laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}],
             "text": "Glucose"},
    "subject": {"reference": "Patient/{id}"},
    "effectiveDateTime": "2024-03-01T08:30:00Z",
    "valueQuantity": {"value": 95, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
}, separators=(",", ":"))

TARGETS = {
    "read_vs_trivial": (">=", 0.5),
    "search_p95_ms": ("<=", 50.0),
    "import_resources_per_s": (">=", 1000.0),
    "search_p95_ratio": ("<=", 1.5),
}


class Interrupted(Exception):
    """SIGTERM (or Ctrl-C) while the benchmark runs."""


def log(message: str) -> None:
    print(message, flush=True)


# --- processes: CPU of the server's process tree, from /proc ---

def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime in seconds) for every process."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return table


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def tree_cpu(root: int, database: str = "") -> float:
    """CPU seconds used so far by root and its live descendants, and by the PostgreSQL backends serving
    `database` when one is named (they work for the server, though not its children)."""
    table = _proc_table()
    pids = _descendants(table, root) | (_backends(table, database) if database else set())
    return sum(table[pid][1] for pid in pids if pid in table)


def _backends(table: dict[int, tuple[int, float]], database: str) -> set[int]:
    """PostgreSQL backends connected to `database` ("postgres: 15/main: user db host(port) state")."""
    found = set()
    for pid in table:
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        if words[:1] == [b"postgres:"] and len(words) > 3 and words[3] == database.encode():
            found.add(pid)
    return found


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:100] or "?"


class OtherProcesses:
    """Which processes outside the benchmark used CPU between start() and top()."""

    def __init__(self, exclude_root: int, database: str = "") -> None:
        self.exclude_root = exclude_root
        self.database = database
        self.before: dict[int, tuple[int, float]] = {}

    def start(self) -> None:
        self.before = _proc_table()

    def top(self, seconds: float, min_share: float = 0.05, limit: int = 3) -> list[dict[str, Any]]:
        after = _proc_table()
        mine = _descendants(after, self.exclude_root) | _descendants(after, os.getpid())
        if self.database:
            mine |= _backends(after, self.database)
        used = []
        for pid, (_, cpu) in after.items():
            if pid in mine:
                continue
            delta = cpu - self.before.get(pid, (0, 0.0))[1]
            if delta / max(seconds, 1e-9) >= min_share:
                used.append((delta, pid))
        used.sort(reverse=True)
        return [{"pid": pid, "cpu_s": round(delta, 2), "command": _command(pid)} for delta, pid in used[:limit]]


# --- the database ---

@dataclass
class Database:
    kind: str
    url: str
    describe: str
    cleanup: Callable[[], None]
    size: Callable[[], int]


def _loopback_only(url: str) -> None:
    host = re.sub(r"^[a-z+]+://([^@/]*@)?", "", url).split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a database that is not on loopback: {host!r}")


@contextlib.contextmanager
def database(kind: str, workdir: Path, keep: bool, admin_url: str) -> Iterator[Database]:
    if kind == "sqlite":
        path = workdir / "gateway.sqlite"

        def sqlite_size() -> int:
            return sum(p.stat().st_size for p in workdir.glob("gateway.sqlite*"))

        yield Database(kind, f"sqlite:///{path}", str(path), lambda: None, sqlite_size)
        return
    import psycopg

    _loopback_only(admin_url)
    name = f"gw_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    url = f"{base}/{name}"

    def pg_size() -> int:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
        return int(row[0]) if row else 0

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        yield Database(kind, url, f"PostgreSQL database {name}", drop, pg_size)
    finally:
        if keep:
            log(f"kept database {url}")
        else:
            drop()
            log(f"dropped database {name}")


# --- the server ---

_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """A free port not handed out before by this process (an HTTP and an MLLP port taken one after
    the other, before either server binds, must differ)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """`gateway serve` in its own process group; stop() ends it (TERM, then KILL)."""

    def __init__(self, env: dict[str, str], port: int, workers: int, log_path: Path,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.extra_args = extra_args
        self.port = port
        self.workers = workers
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://{HOST}:{port}"

    def start(self, ready_timeout: float = 90.0) -> None:
        exe = shutil.which("gateway") or "gateway"
        command = [exe, "serve", "--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
                   *self.extra_args]
        log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base_url + "/readyz", timeout=2)
                if status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {ready_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def database_name(self) -> str:
        """The PostgreSQL database it serves ("" on SQLite)."""
        url = self.env.get("GATEWAY_DATABASE_URL", "")
        return url.rsplit("/", 1)[1].split("?")[0] if url.startswith("postgresql") else ""

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid, self.database_name) if self.proc else 0.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def settle(self, idle_share: float = 0.05, window: float = 1.0, limit: float = 180.0) -> float:
        """Wait until the server is idle (audit writer drained); returns the seconds waited."""
        began = time.monotonic()
        while time.monotonic() - began < limit:
            before = self.cpu()
            time.sleep(window)
            if (self.cpu() - before) / window < idle_share:
                break
        return time.monotonic() - began


# --- the corpus: transaction Bundles copied under fresh ids ---

@dataclass
class Template:
    name: str
    text: str  # the Bundle's JSON, PUT ids replaced by placeholders
    uuids: frozenset[str]  # the urn:uuid fullUrls' uuids, rewritten in every copy
    placeholders: list[str]
    patient_placeholder: str | None
    resources: int
    recent_labs: int  # laboratory Observations dated on or after SEARCH_SINCE


def _observation_date(resource: dict[str, Any]) -> str:
    if "effectiveDateTime" in resource:
        return str(resource["effectiveDateTime"])
    period = resource.get("effectivePeriod") or {}
    return str(period.get("end") or period.get("start") or resource.get("effectiveInstant") or "")


def _is_lab(resource: dict[str, Any]) -> bool:
    return any(coding.get("code") == "laboratory"
               for category in resource.get("category", []) for coding in category.get("coding", []))


def gateway_validator() -> Callable[[dict[str, Any]], str | None] | None:
    """The gateway's own write-path validation, to leave out entries it would reject; None if unavailable."""
    try:
        from gateway.fhir.outcome import FhirError
        from gateway.fhir.validate import validate
    except ImportError:
        return None

    def check(resource: dict[str, Any]) -> str | None:
        try:
            validate(resource)
        except FhirError as exc:
            return str(exc.diagnostics)
        return None

    return check


def load_templates(corpus: Path, validator: Callable[[dict[str, Any]], str | None] | None = None,
                   ) -> tuple[list[Template], list[str]]:
    """The corpus's transaction Bundles as templates, and notes on the entries left out.

    An entry the gateway rejects would fail its whole transaction (all or nothing) in every copy, so it
    is left out of the copies when nothing else in its Bundle refers to it, and reported.
    """
    templates, notes = [], []
    for path in sorted(corpus.glob("*.json")):
        bundle = json.loads(path.read_text())
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            continue
        if validator is not None:
            kept = []
            for n, entry in enumerate(bundle.get("entry", [])):
                resource = entry.get("resource")
                problem = validator(resource) if isinstance(resource, dict) else None
                full_url = entry.get("fullUrl")
                referenced = bool(problem) and bool(full_url) and any(
                    full_url in json.dumps(other) for other in bundle["entry"] if other is not entry)
                if problem and not referenced:
                    notes.append(f"{path.name} entry[{n}] ({resource.get('resourceType')}) left out, the gateway "
                                 f"rejects it: {problem}")
                    continue
                kept.append(entry)
            bundle["entry"] = kept
        uuids, placeholders, patient = set(), [], None
        text_replacements: dict[str, str] = {}
        recent = 0
        for n, entry in enumerate(bundle.get("entry", [])):
            full_url = entry.get("fullUrl", "")
            if full_url.startswith("urn:uuid:"):
                uuids.add(full_url[len("urn:uuid:"):])
            request, resource = entry.get("request", {}), entry.get("resource", {})
            if request.get("method") == "PUT" and "?" not in request.get("url", ""):
                rtype, _, rid = request["url"].partition("/")
                placeholder = f"__BENCH_ID_{n}__"
                placeholders.append(placeholder)
                text_replacements[f'"{rtype}/{rid}"'] = f'"{rtype}/{placeholder}"'
                request["url"] = f"{rtype}/{rid}"
                resource["id"] = placeholder
                if rtype == "Patient" and patient is None:
                    patient = placeholder
            if resource.get("resourceType") == "Observation" and _is_lab(resource) \
                    and _observation_date(resource)[:10] >= SEARCH_SINCE:
                recent += 1
        text = json.dumps(bundle, separators=(",", ":"))
        for old, new in text_replacements.items():
            text = text.replace(old, new)
        templates.append(Template(path.name, text, frozenset(uuids), placeholders, patient,
                                  len(bundle.get("entry", [])), recent))
    if not templates:
        raise SystemExit(f"no transaction Bundles in {corpus}")
    return templates, notes


def make_copy(template: Template) -> tuple[str | None, str]:
    """(the copy's Patient id, the copy's Bundle JSON) with fresh uuids everywhere."""
    mapping: dict[str, str] = {}

    def fresh(match: re.Match[str]) -> str:
        old = match.group(0)
        if old not in template.uuids:
            return old
        new = mapping.get(old)
        if new is None:
            new = mapping[old] = str(uuid.uuid4())
        return new

    text = UUID_RE.sub(fresh, template.text)
    patient_id = None
    for placeholder in template.placeholders:
        new_id = str(uuid.uuid4())
        text = text.replace(placeholder, new_id)
        if placeholder == template.patient_placeholder:
            patient_id = new_id
    return patient_id, text


# --- import over HTTP ---

@dataclass
class ImportStats:
    resources: int = 0
    bundles: int = 0
    failed_bundles: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    time_limited: bool = False  # stopped by --max-import-seconds before the goal
    server_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0  # this process: copying Bundles, HTTP
    other_cpu_s: float = 0.0


class Importer:
    """POSTs Bundle copies as transactions from `clients` threads until a resource count is reached."""

    def __init__(self, server: Server, templates: list[Template], clients: int, total_goal: int,
                 max_seconds: float) -> None:
        self.server = server
        self.max_seconds = max_seconds
        self._deadline = 0.0
        self.templates = templates
        self.clients = clients
        self.total_goal = total_goal
        self.stats = ImportStats()
        self.observation_ids: list[str] = []
        self.patients: list[str] = []
        self.search_patients: list[str] = []  # patients whose copy has recent laboratory results
        self._next = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next_report = max(1, total_goal // 20)

    def _take(self, goal: int) -> Template | None:
        with self._lock:
            if self._stop.is_set() or self.stats.resources + self._in_flight >= goal:
                return None
            if time.monotonic() >= self._deadline:
                self.stats.time_limited = True
                return None
            template = self.templates[self._next % len(self.templates)]
            self._next += 1
            self._in_flight += template.resources
            return template

    def _worker(self, goal: int, began: float, base_seconds: float) -> None:
        conn = http.client.HTTPConnection(HOST, self.server.port, timeout=600)
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        try:
            while (template := self._take(goal)) is not None:
                patient_id, text = make_copy(template)
                try:
                    conn.request("POST", "/fhir", body=text.encode(), headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    status = response.status
                except OSError as exc:
                    conn.close()
                    status, payload = 0, f"{type(exc).__name__}: {exc}".encode()
                self._record(template, patient_id, status, payload, began, base_seconds)
        finally:
            conn.close()

    def _record(self, template: Template, patient_id: str | None, status: int, payload: bytes,
                began: float, base_seconds: float) -> None:
        ok = 200 <= status <= 299
        observations: list[str] = []
        if ok:
            for entry in json.loads(payload).get("entry", []):
                location = entry.get("response", {}).get("location", "")
                if location.startswith("Observation/"):
                    observations.append(location.split("/")[1])
        with self._lock:
            self._in_flight -= template.resources
            if not ok:
                self.stats.failed_bundles += 1
                self.stats.statuses[str(status)] = self.stats.statuses.get(str(status), 0) + 1
                if not self.stats.first_error:
                    self.stats.first_error = f"{status} {payload[:500].decode(errors='replace')}"
                log(f"  import ERROR: transaction of a {template.name} copy answered {status}: "
                    f"{payload[:200].decode(errors='replace')}")
                return
            self.stats.bundles += 1
            self.stats.resources += template.resources
            self.observation_ids.extend(observations)
            if patient_id:
                self.patients.append(patient_id)
                if template.recent_labs:
                    self.search_patients.append(patient_id)
            done = self.stats.resources
            if done >= self._next_report:
                elapsed = base_seconds + time.monotonic() - began
                log(f"  import: {done:>8,} / {self.total_goal:,} resources ({100 * done / self.total_goal:5.1f}%)"
                    f"  {elapsed:7.1f}s  {done / max(elapsed, 1e-9):7.0f} resources/s")
                step = max(1, self.total_goal // 20)
                self._next_report = (done // step + 1) * step

    def run_until(self, goal: int) -> None:
        start_resources = self.stats.resources
        began = time.monotonic()
        base = self.stats.seconds
        self._deadline = began + self.max_seconds - base
        cpu_before, busy_before, self_before = self.server.cpu(), machine_busy(), self_cpu()
        threads = [threading.Thread(target=self._worker, args=(goal, began, base), daemon=True)
                   for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
                    if not self.server.alive():
                        raise RuntimeError(f"the server died during import:\n{self.server.log_tail()}")
        except BaseException:
            self._stop.set()
            raise
        elapsed = time.monotonic() - began
        server_cpu, bench_cpu = self.server.cpu() - cpu_before, self_cpu() - self_before
        other_cpu = max(0.0, machine_busy() - busy_before - server_cpu - bench_cpu)
        self.stats.seconds += elapsed
        self.stats.server_cpu_s += server_cpu
        self.stats.bench_cpu_s += bench_cpu
        self.stats.other_cpu_s += other_cpu
        added = self.stats.resources - start_resources
        cores = os.cpu_count() or 1
        share = 100 / max(elapsed, 1e-9) / cores
        self.stats.stages.append({
            "from": start_resources, "to": self.stats.resources, "seconds": round(elapsed, 2),
            "resources_per_s": round(added / elapsed, 1) if elapsed else 0.0,
            "cpu_percent_of_all_cores": {"server": round(server_cpu * share, 1), "bench": round(bench_cpu * share, 1),
                                         "other": round(other_cpu * share, 1)},
        })


# --- phases ---

class Runner:
    def __init__(self, server: Server, clients: int, seconds: float, loadgen: str) -> None:
        self.server = server
        self.clients = clients
        self.seconds = seconds
        self.loadgen = loadgen

    def phase(self, spec: PhaseSpec, seconds: float | None = None, warmup: bool = True) -> PhaseResult:
        duration = seconds or self.seconds
        if warmup:
            run_python(self.server.base_url, spec, min(4, self.clients), 1.0)
        waited = self.server.settle()
        if waited > 2:
            log(f"  (waited {waited:.0f}s for the server to go idle first)")
        others = OtherProcesses(self.server.proc.pid if self.server.proc else 0, self.server.database_name)
        others.start()
        cpu_before, busy_before = self.server.cpu(), machine_busy()
        if self.loadgen == "wrk":
            result = run_wrk(self.server.base_url, spec, self.clients, duration)
        else:
            result = run_python(self.server.base_url, spec, self.clients, duration)
        result.server_cpu_s = self.server.cpu() - cpu_before
        result.other_cpu_s = max(0.0, machine_busy() - busy_before - result.server_cpu_s - result.loadgen_cpu_s)
        result.other_processes = others.top(result.seconds)
        self._print(result)
        if not self.server.alive():
            raise RuntimeError(f"the server died during {spec.name}:\n{self.server.log_tail()}")
        return result

    @staticmethod
    def _print(r: PhaseResult) -> None:
        cores = os.cpu_count() or 1
        log(f"  {r.name:<8} {r.rps:9.1f} req/s  p50 {r.p50_ms:7.2f} ms  p95 {r.p95_ms:7.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms  {r.requests:,} requests, {r.errors} errors  "
            f"(CPU: server {100 * r.server_cpu_s / r.seconds / cores:.0f}%, "
            f"{r.loadgen} {100 * r.loadgen_cpu_s / r.seconds / cores:.0f}%, "
            f"other processes {100 * r.other_cpu_s / r.seconds / cores:.0f}% of {cores} cores)")
        if r.other_cpu_s / r.seconds / cores > OTHER_CPU_WARNING:
            log("    WARNING: other processes on this machine took CPU during this phase; the figures are low")
            for other in r.other_processes:
                log(f"      pid {other['pid']}: {other['cpu_s']:.1f} CPU s  {other['command']}")
        if r.errors:
            log(f"    ERRORS: statuses {r.statuses}, socket errors {r.socket_errors}")
            if r.first_error:
                log(f"    first error: {r.first_error[:300]}")
        if r.checked:
            log(f"    searchsets checked: {r.checked:,}, empty: {r.empty:,} "
                f"({100 * r.empty / r.checked:.1f}%)")


# --- report ---

def _verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return "PASS" if ok else "MISS"


def summary(results: dict[str, Any]) -> str:
    phases: dict[str, Any] = results["phases"]
    trivial = phases["trivial"]["rps"] or 1.0
    lines = ["", "=" * 100, "FHIR API benchmark: " + results["description"], "=" * 100, ""]
    cores = results["cores"]
    lines.append(f"{'phase':<54} {'req/s':>8} {'vs trivial':>10} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}"
                 f"  CPU% server/loadgen/other")
    for key, label in (("trivial", "trivial  GET /healthz"),
                       ("read", "read     GET /fhir/Observation/{id}"),
                       ("search", "search   GET /fhir/Observation?patient&category&date"),
                       ("create", "create   POST /fhir/Observation")):
        p = phases[key]
        cpu = "/".join(f"{100 * p[k] / p['seconds'] / cores:.0f}" for k in ("server_cpu_s", "loadgen_cpu_s",
                                                                              "other_cpu_s"))
        lines.append(f"{label:<54} {p['rps']:8.1f} {p['rps'] / trivial:10.2f} {p['p50_ms']:8.2f} "
                     f"{p['p95_ms']:8.2f} {p['errors']:6d}  {cpu}")
    imp = results["import"]
    lines.append(f"{'import   POST /fhir transaction Bundles':<54} "
                 f"{imp['resources_per_s']:9.1f} resources/s, {imp['resources']:,} resources in "
                 f"{imp['seconds']:.0f}s, {imp['failed_bundles']} failed Bundles")
    stages = imp["stages"]
    if len(stages) > 1 and results["ratios"].get("import_last_vs_first") is not None:
        first, last = stages[0], stages[-1]
        lines.append(f"{'  import rate as the store grows':<54} {first['resources_per_s']:.0f}/s from "
                     f"{first['from']:,} to {first['to']:,}, {last['resources_per_s']:.0f}/s from {last['from']:,} "
                     f"to {last['to']:,}: {results['ratios']['import_last_vs_first']:.2f}x")
    lines.append("")
    ratios = results["ratios"]
    p95_mark = results["search_p95_at_mark_ms"]
    mark = results.get("mark", MARK)
    rows = [
        ("read / trivial throughput", ratios["read_vs_trivial"], f"{ratios['read_vs_trivial']:.2f}",
         ">= 0.5", "read_vs_trivial"),
        ("search p95", phases["search"]["p95_ms"], f"{phases['search']['p95_ms']:.1f} ms", "<= 50 ms",
         "search_p95_ms"),
        ("import rate", imp["resources_per_s"], f"{imp['resources_per_s']:.0f} resources/s", ">= 1000/s",
         "import_resources_per_s"),
        (f"search p95 at {results['resources']:,} / at {mark:,}", ratios["search_p95_ratio"],
         "n/a" if ratios["search_p95_ratio"] is None else
         f"{ratios['search_p95_ratio']:.2f} ({phases['search']['p95_ms']:.1f} / {p95_mark:.1f} ms)",
         "<= 1.5", "search_p95_ratio"),
    ]
    lines.append(f"{'target':<40} {'measured':<34} {'target':<11} result")
    for label, value, shown, target, key in rows:
        lines.append(f"{label:<40} {shown:<34} {target:<11} {_verdict(key, value)}")
    lines.append("")
    search = phases["search"]
    if search["checked"]:
        lines.append(f"search answers with at least one entry: {100 * (1 - search['empty'] / search['checked']):.1f}% "
                     f"of {search['checked']:,}")
    lines.append(f"load generator: {results['loadgen']}, run from this process on the same {cores} cores as the "
                 f"server, so it takes CPU from it. CPU% is of all {cores} cores; 'other' is what processes outside")
    lines.append("this benchmark took meanwhile: when it is large, the machine was shared and the figures are low.")
    lines.append(f"results: {results['results_file']}")
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    digest = hashlib.sha256()
    for path in sorted((REPO_DIR / "gateway").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_DIR)).encode() + b"\0" + path.read_bytes())
    # Others may edit the working tree: the hash names the gateway code that was actually measured.
    return {"commit": run("rev-parse", "HEAD"), "gateway_dirty": bool(run("status", "--porcelain", "--", "gateway")),
            "gateway_sources_sha256": digest.hexdigest()}


# --- main ---

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=int, default=200_000,
                        help="load copies of the corpus until at least this many resources (default 200000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients per phase (default 16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each phase (default 20)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the database (and the SQLite temp dir)")
    parser.add_argument("--import-clients", type=int, default=4,
                        help="concurrent transaction clients while loading (default 4)")
    parser.add_argument("--max-import-seconds", type=float, default=1800.0,
                        help="stop loading after this long and measure at the size reached (default 1800)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when installed, else Python threads")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="directory of transaction Bundles")
    parser.add_argument("--mark", type=int, default=MARK,
                        help="store size at which loading pauses for the baseline search phase (default 20000; "
                             "issue #8's data-growth figure uses 100000 with --resources 1000000)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"),
                        help="loopback PostgreSQL to create the gw_bench_* database on")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.resources < 1 or args.import_clients < 1:
        parser.error("--clients, --seconds, --resources and --import-clients must be positive")
    return args


@dataclass
class Run:
    args: argparse.Namespace
    server: Server
    db: Database
    templates: list[Template]
    loadgen: str
    stamp: str
    description: str
    results_file: Path
    corpus_notes: list[str]
    git: dict[str, Any]


def run(ctx: Run) -> int:
    """Import, then the four phases; writes the results file and prints the summary."""
    args, server = ctx.args, ctx.server
    began = time.monotonic()
    server.start()
    log(f"server: {server.base_url} ready in {time.monotonic() - began:.1f}s (log {server.log_path})")
    runner = Runner(server, args.clients, args.seconds, ctx.loadgen)
    importer = Importer(server, ctx.templates, args.import_clients, args.resources, args.max_import_seconds)
    mark_result: PhaseResult | None = None

    log(f"\nimport: transaction Bundles over HTTP, {args.import_clients} concurrent clients")
    mark = args.mark
    if args.resources >= mark:
        importer.run_until(mark)
        log(f"\nsearch at the {mark:,} mark ({importer.stats.resources:,} resources, "
            f"{len(importer.search_patients)} patients with recent laboratory results):")
        mark_result = runner.phase(
            PhaseSpec(f"search@{mark:,}", "GET", SEARCH_PATH, importer.search_patients or importer.patients,
                      check_entries=True),
            seconds=max(5.0, min(args.seconds, 10.0)))
        if args.resources > importer.stats.resources:
            log("")
    # The last stretch is loaded on its own so that its rate, at the full size, can be set against the
    # first stretch's (up to the mark): does ingest slow down as the store grows?
    last_from = int(args.resources * (1 - LAST_STRETCH))
    for goal in ((last_from, args.resources) if last_from > importer.stats.resources else (args.resources,)):
        if not importer.stats.time_limited:
            importer.run_until(goal)
    imp = importer.stats
    import_rate = imp.resources / imp.seconds if imp.seconds else 0.0
    cores = os.cpu_count() or 1
    share = 100 / max(imp.seconds, 1e-9) / cores
    log(f"import: {imp.resources:,} resources in {imp.bundles:,} transactions over {imp.seconds:.1f}s "
        f"= {import_rate:.0f} resources/s, {imp.failed_bundles} failed transactions "
        f"(CPU: server {imp.server_cpu_s * share:.0f}%, this process {imp.bench_cpu_s * share:.0f}%, "
        f"other processes {imp.other_cpu_s * share:.0f}% of {cores} cores)")
    if imp.time_limited:
        log(f"NOTE: --max-import-seconds {args.max_import_seconds:g} reached: measuring at {imp.resources:,} "
            f"resources instead of {args.resources:,}")
    if not importer.observation_ids or not importer.patients:
        raise RuntimeError("nothing was imported; see the errors above")

    log(f"\nphases: {args.clients} clients, {args.seconds:g}s each, load generator {ctx.loadgen}")
    search_ids = importer.search_patients or importer.patients
    phases = {
        "trivial": runner.phase(PhaseSpec("trivial", "GET", "/healthz")),
        "read": runner.phase(PhaseSpec("read", "GET", "/fhir/Observation/{id}", importer.observation_ids)),
        "search": runner.phase(PhaseSpec("search", "GET", SEARCH_PATH, search_ids, check_entries=True)),
        "create": runner.phase(PhaseSpec("create", "POST", "/fhir/Observation", importer.patients,
                                         body=NEW_OBSERVATION)),
    }
    search = phases["search"]
    if search.checked and search.empty / search.checked > 0.2:
        log(f"WARNING: {100 * search.empty / search.checked:.0f}% of searches found nothing")
    trivial_rps = phases["trivial"].rps or 1.0
    p95_mark = mark_result.p95_ms if mark_result else None
    ratios: dict[str, float | None] = {f"{k}_vs_trivial": round(v.rps / trivial_rps, 4) for k, v in phases.items()}
    ratios["search_p95_ratio"] = round(search.p95_ms / p95_mark, 4) if p95_mark else None
    first_rate, last_rate = imp.stages[0]["resources_per_s"], imp.stages[-1]["resources_per_s"]
    ratios["import_last_vs_first"] = (round(last_rate / first_rate, 4)
                                      if len(imp.stages) > 1 and first_rate else None)
    results: dict[str, Any] = {
        "benchmark": "fhir_api",
        "timestamp": ctx.stamp,
        "description": ctx.description,
        "resources": imp.resources,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "pg_admin_url"},
        "loadgen": ctx.loadgen,
        "cores": os.cpu_count() or 1,
        "python": platform.python_version(),
        "git": ctx.git,
        "database": {"kind": ctx.db.kind, "bytes_at_end": ctx.db.size()},
        "import": {
            "resources": imp.resources, "bundles": imp.bundles, "failed_bundles": imp.failed_bundles,
            "seconds": round(imp.seconds, 2), "resources_per_s": round(import_rate, 1),
            "clients": args.import_clients, "statuses": imp.statuses, "first_error": imp.first_error,
            "stages": imp.stages, "time_limited": imp.time_limited,
            "cpu_seconds": {"server": round(imp.server_cpu_s, 1), "bench": round(imp.bench_cpu_s, 1),
                            "other": round(imp.other_cpu_s, 1)},
        },
        "patients": len(importer.patients),
        "search_patients": len(search_ids),
        "corpus": [{"file": t.name, "resources": t.resources, "recent_labs": t.recent_labs} for t in ctx.templates],
        "corpus_notes": ctx.corpus_notes,
        "observations": len(importer.observation_ids),
        "phases": {k: v.as_dict() for k, v in phases.items()},
        "mark": mark,
        "search_at_mark": mark_result.as_dict() if mark_result else None,
        "search_p95_at_mark_ms": p95_mark,
        "ratios": ratios,
        "targets": {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()},
        "results_file": str(ctx.results_file.relative_to(REPO_DIR)),
        "server_log": str(server.log_path.relative_to(REPO_DIR)),
    }
    results["verdicts"] = {
        "read_vs_trivial": _verdict("read_vs_trivial", ratios["read_vs_trivial"]),
        "search_p95_ms": _verdict("search_p95_ms", search.p95_ms),
        "import_resources_per_s": _verdict("import_resources_per_s", import_rate),
        "search_p95_ratio": _verdict("search_p95_ratio", ratios["search_p95_ratio"]),
    }
    ctx.results_file.write_text(json.dumps(results, indent=2) + "\n")
    server.stop()
    log(summary(results))
    return 0 if all(p.errors == 0 for p in phases.values()) and imp.failed_bundles == 0 else 1


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if wrk_path() else "python"
    elif loadgen == "wrk" and not wrk_path():
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    git = git_state()  # before the run: the gateway code it measures
    templates, notes = load_templates(args.corpus, gateway_validator())
    description = (f"{args.resources:,} resources on {args.database}, {args.clients} clients, "
                   f"{args.seconds:g}s phases, {args.workers} gunicorn workers, load generator {loadgen}")
    log(f"FHIR API benchmark: {description}")
    log(f"corpus: {', '.join(f'{t.name} ({t.resources})' for t in templates)}")
    for note in notes:
        log(f"  NOTE: {note}")
    if loadgen == "python":
        log("NOTE: wrk is not installed; the Python thread client is slower and may itself limit the figures.")
    workdir = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    try:
        with database(args.database, workdir, args.keep, args.pg_admin_url) as db:
            port = free_port()
            env = dict(os.environ)
            env.update({
                "GATEWAY_OPEN_ACCESS": "1",
                "GATEWAY_DATABASE_URL": db.url,
                "GATEWAY_BASE_URL": f"http://{HOST}:{port}",
                "GATEWAY_INSTANCE_PATH": str(workdir / "instance"),
            })
            log(f"database: {db.describe}")
            subprocess.run([shutil.which("gateway") or "gateway", "db", "upgrade"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            server = Server(env, port, args.workers, RESULTS_DIR / f"fhir_api-{stamp}-server.log")
            try:
                return run(Run(args, server, db, templates, loadgen, stamp, description,
                               RESULTS_DIR / f"fhir_api-{stamp}.json", notes, git))
            finally:
                server.stop()  # always, and before the database is dropped
    except (KeyboardInterrupt, Interrupted):
        log("\ninterrupted; the server was stopped")
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"\nFAILED: {exc}")
        return 2
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
