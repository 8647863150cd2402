#!/usr/bin/env python3
"""Mixed load test (issue #8): SMART apps, an HL7 feed and portal sessions at once, for ten minutes.

    python bench/load_mixed.py                          # 600 s on a fresh SQLite database
    python bench/load_mixed.py --seconds 60             # a short run
    python bench/load_mixed.py --database postgresql    # fresh gw_bench_* database, dropped after

Starts `gateway serve --workers 2` with its MLLP listener on a fresh database holding the demo
families, the two Synthea patients and the schedules, registers SMART clients and logins, gets real
access tokens through the authorization-code flow (login, TOTP, picker, consent; PKCE) and a
backend-services token (client_credentials with a signed assertion), signs portal users in through
the login form with TOTP, and then drives an open-loop mix at fixed rates on loopback:

  smart    FHIR reads and searches by several apps with their own tokens (default 20/s),
           refreshing their tokens now and then
  hl7      corpus messages with unique control ids over 2 MLLP connections (default 20/s), each
           ACK checked for AA
  portal   signed-in portal users, a page each every 2 s (default 10 users)
  healthz  GET /healthz at 2/s: the baseline every p95 is quoted against

Every 10 s it prints a progress line and samples the resident memory of the server's process tree.
At the end it prints a summary and writes bench/results/load_mixed-<time>.json and .md. Exit status
0 when there was no error and memory stayed flat; 1 otherwise; 2 when setup or the server failed;
130 when interrupted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO_DIR))

import requests  # noqa: E402
from fhir_api import (  # noqa: E402
    HOST,
    Interrupted,
    Server,
    _descendants,
    _proc_table,
    database,
    free_port,
    git_state,
    machine_busy,
    self_cpu,
)
from hl7_ingest import in_scope_messages, with_control_id  # noqa: E402
from signin import sign_in  # noqa: E402

from gateway.hl7.mllp import Deframer, frame  # noqa: E402
from tests.smart_auth.conftest import (  # noqa: E402
    PASSWORD,
    TOTP_SECRET,
    RequestsHttp,
    World,
    authorize_params,
    exchange,
    run_launch,
)

RESULTS_DIR = BENCH_DIR / "results"
FIXTURES = REPO_DIR / "fixtures" / "fhir"
TIMEOUT = 30.0
SAMPLE_SECONDS = 10.0
MAX_BEHIND = 1.0  # seconds a lane may fall behind its schedule before it skips ticks
FLAT_GROWTH = 0.10  # memory is flat when the last window's RSS is less than 10% above the first window's
TARGETS = {  # class -> (percentile, ms): the earlier issues' targets
    "smart_search": ("p95_ms", 50.0),  # issue #2
    "hl7": ("p99_ms", 50.0),  # issue #3
    "portal": ("p95_ms", 150.0),  # issue #5
}
CLASSES = ("healthz", "smart_read", "smart_search", "smart_token", "hl7", "portal")
# The SMART apps: client, login, patient in context (the picker's choice when the login acts for
# several people). The clients and the first four logins are the SMART tests' World
# (tests/smart_auth/conftest.py); the Synthea logins are added here.
APPS = (
    ("public-app", "maria", "Patient/maria-garcia", None),
    ("other-app", "robert", "Patient/robert-chen", None),  # robert has TOTP
    ("secret-app", "linda", "Patient/linda-chen", "s3cret-value"),
    ("public-app", "syn355", "Patient/syn355-patient", None),
)
APP_SCOPE = "launch/patient patient/*.rs openid fhirUser offline_access"
BACKEND_SCOPE = "system/*.rs"
PORTAL_PATIENTS = ("maria-garcia", "robert-chen", "linda-chen", "daniel-garcia", "syn85-patient", "syn355-patient")
PORTAL_PAGES = ("home", "results", "result", "medications", "appointments", "messages")


def log(message: str) -> None:
    print(message, flush=True)


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (as bench/loadgen.py)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# --- what each class of traffic saw ---

class Stats:
    """Latencies and errors of one class, counted only inside the measured window."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.by_kind: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []
        self.lags: list[float] = []
        self.missed = 0  # ticks skipped because the lane was more than MAX_BEHIND behind
        self.window: tuple[float, float] = (0.0, float("inf"))  # monotonic start and end of measuring

    def counting(self, scheduled: float) -> bool:
        return self.window[0] <= scheduled < self.window[1]

    def record(self, scheduled: float, lag_ms: float, ms: float, kind: str = "",
               error: str | None = None, detail: str = "") -> None:
        if not self.counting(scheduled):
            return
        with self.lock:
            self.latencies.append(ms)
            self.lags.append(lag_ms)
            if kind:
                self.by_kind.setdefault(kind, []).append(ms)
            if error is not None:
                self.errors[error] += 1
                if len(self.samples) < 5:
                    self.samples.append(detail[:400])

    def skipped(self, scheduled: float) -> None:
        if self.counting(scheduled):
            with self.lock:
                self.missed += 1

    def count(self) -> tuple[int, int]:
        with self.lock:
            return len(self.latencies), sum(self.errors.values())

    def figures(self, seconds: float) -> dict[str, Any]:
        with self.lock:
            ordered, lags = sorted(self.latencies), sorted(self.lags)
            kinds = {k: sorted(v) for k, v in self.by_kind.items()}
            errors, samples, missed = dict(self.errors), list(self.samples), self.missed

        def summary(values: list[float]) -> dict[str, Any]:
            return {"count": len(values), "rate_per_s": round(len(values) / seconds, 2),
                    "p50_ms": round(percentile(values, 50), 2), "p95_ms": round(percentile(values, 95), 2),
                    "p99_ms": round(percentile(values, 99), 2), "max_ms": round(values[-1] if values else 0.0, 2)}

        out = summary(ordered)
        out.update({"errors": sum(errors.values()), "error_kinds": errors, "first_errors": samples,
                    "late_p99_ms": round(percentile(lags, 99), 1),
                    "late_over_100ms": sum(1 for lag in lags if lag > 100), "missed": missed,
                    "by_kind": {k: summary(v) for k, v in sorted(kinds.items())}})
        return out


def http_call(stats: Stats, scheduled: float, lag_ms: float, session: requests.Session, method: str, url: str,
              kind: str, headers: dict[str, str] | None = None, data: dict[str, str] | None = None,
              expect: bytes | None = None) -> requests.Response | None:
    """One request, timed from send to the whole answer read; anything but a 2xx (with `expect` in its
    body when given) is an error, with its status and body kept among the first errors."""
    began = time.perf_counter()
    try:
        reply = session.request(method, url, headers=headers, data=data, timeout=TIMEOUT, allow_redirects=False)
        body = reply.content
    except requests.Timeout as exc:
        stats.record(scheduled, lag_ms, (time.perf_counter() - began) * 1000, kind, "timeout",
                     f"{kind} {method} {_path(url)}: timeout {exc}")
        return None
    except requests.RequestException as exc:
        text = str(exc)
        # A reset or close by the server as the request went out on a kept-alive connection is the
        # keep-alive race with gunicorn's idle timeout (2 s): counted, but named apart.
        error = "socket: reset/closed by the server" if ("reset by peer" in text or "RemoteDisconnected" in text
                                                        or "Connection aborted" in text) else "socket"
        stats.record(scheduled, lag_ms, (time.perf_counter() - began) * 1000, kind, error,
                     f"{kind} {method} {_path(url)}: {type(exc).__name__} {exc}")
        return None
    ms = (time.perf_counter() - began) * 1000
    if not 200 <= reply.status_code < 300:
        stats.record(scheduled, lag_ms, ms, kind, f"status {reply.status_code}",
                     f"{kind} {method} {_path(url)}: {reply.status_code} {reply.headers.get('Location', '')} "
                     f"{body[:300].decode(errors='replace')}")
        return reply
    if expect is not None and expect not in body:
        stats.record(scheduled, lag_ms, ms, kind, "unexpected body",
                     f"{kind} {method} {_path(url)}: {reply.status_code} without {expect!r}: "
                     f"{body[:300].decode(errors='replace')}")
        return reply
    stats.record(scheduled, lag_ms, ms, kind)
    return reply


def _path(url: str) -> str:
    return re.sub(r"^https?://[^/]+", "", url)


def paced(interval: Callable[[], float], offset: float, stop: threading.Event, stats: Stats,
          tick: Callable[[float, float], None]) -> None:
    """Call tick(scheduled, lag_ms) on a schedule made in advance (open loop): the next time is the last
    scheduled time plus interval(), whenever the answer came. A tick that comes late (the previous
    answer took longer than the interval) goes at once and its lateness is recorded; a lane more than
    MAX_BEHIND seconds behind skips the ticks it missed and counts them (the concurrency bound was
    reached: the server did not keep up with the rate), so a slow server cannot make a backlog that
    outlives the run."""
    next_at = time.monotonic() + offset
    while not stop.is_set():
        delay = next_at - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        while time.monotonic() - next_at > MAX_BEHIND:
            stats.skipped(next_at)
            next_at += interval()
        tick(next_at, max(0.0, (time.monotonic() - next_at) * 1000))
        next_at += interval()


# --- setup: data, logins, clients, tokens ---

@dataclass
class App:
    client_id: str
    username: str
    patient: str  # id, no "Patient/"
    secret: str | None
    token: dict[str, Any] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)
    observations: list[str] = field(default_factory=list)
    refreshed_at: float = 0.0


def prepare_data(db_url: str, base_url: str, instance: Path, portal_users: int) -> World:
    """The demo data and every login and client, written in this process before the server starts."""
    from gateway import build_services
    from gateway import db as gwdb
    from gateway.config import Settings
    from gateway.fhir.bundles import BundleProcessor, import_file
    from gateway.smart_auth import admin, people

    gwdb.upgrade(gwdb.make_engine(db_url))
    settings = Settings.from_env(environ={}, database_url=db_url, base_url=base_url, instance_path=str(instance))
    services = build_services(settings)
    try:
        world = World(services.smart, services.store).setup()  # families, SMART logins and clients
        processor = BundleProcessor(services.store)
        for name in ("05-schedules.json", "30-synthea-85.json", "31-synthea-355.json"):
            import_file(processor, str(FIXTURES / name))
        people.add_user(services.engine, "syn355", PASSWORD, "Patient/syn355-patient", totp_secret=TOTP_SECRET)
        for n in range(portal_users):
            patient = PORTAL_PATIENTS[n % len(PORTAL_PATIENTS)]
            people.add_user(services.engine, f"portal{n:02d}", PASSWORD, f"Patient/{patient}",
                            totp_secret=TOTP_SECRET)
            if patient == "maria-garcia":
                admin.grant_proxy(services.engine, services.store, f"portal{n:02d}", "Patient/sofia-garcia", "MTH")
    finally:
        services.audit.close()
        services.engine.dispose()
    return world


def launch_app(base: str, app: App) -> None:
    """A standalone launch through the real pages (login, TOTP when enrolled, picker, consent) and the
    code exchange with PKCE: the app's first access and refresh tokens."""
    http = RequestsHttp(base)
    params, verifier = authorize_params(f"{base}/fhir", client_id=app.client_id, scope=APP_SCOPE)
    launch = run_launch(http, params, verifier, app.username, patient=f"Patient/{app.patient}")
    if "code" not in launch.params:
        raise RuntimeError(f"{app.client_id}/{app.username}: the launch ended at {launch.location}")
    extra = {"client_secret": app.secret} if app.secret else {}
    reply = exchange(http, launch, client_id=app.client_id, **extra)
    if reply.status != 200:
        raise RuntimeError(f"{app.client_id}/{app.username}: token exchange {reply.status} {reply.text[:300]}")
    app.token = reply.json()
    if app.token.get("patient") != app.patient or not app.token.get("refresh_token"):
        raise RuntimeError(f"{app.client_id}/{app.username}: unexpected token answer {sorted(app.token)}")
    app.refreshed_at = time.monotonic()


def backend_token(base: str, world: World, session: requests.Session) -> dict[str, Any]:
    token_url = f"{base}/auth/token"
    reply = session.post(token_url, data={
        "grant_type": "client_credentials", "scope": BACKEND_SCOPE,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": world.assertion("backend", token_url)}, timeout=TIMEOUT)
    if reply.status_code != 200:
        raise RuntimeError(f"backend services token: {reply.status_code} {reply.text[:300]}")
    token: dict[str, Any] = reply.json()
    return token


def observation_ids(base: str, session: requests.Session, token: str, patient: str) -> list[str]:
    reply = session.get(f"{base}/fhir/Observation", params={"patient": patient, "_count": "100"},
                        headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
    if reply.status_code != 200:
        raise RuntimeError(f"Observation search for {patient}: {reply.status_code} {reply.text[:300]}")
    return [e["resource"]["id"] for e in reply.json().get("entry", []) if e.get("search", {}).get("mode") != "include"]


def result_ids(base: str, session: requests.Session) -> list[str]:
    """The result pages a portal user can open, from the results list."""
    page = session.get(f"{base}/results", timeout=TIMEOUT)
    return sorted(set(re.findall(r'href="/results/([A-Za-z0-9.\-]+)"', page.text)))


# --- the server's memory ---

def tree_rss(root: int) -> dict[int, tuple[float, str]]:
    """pid -> (RSS MB, role) for the server and its live descendants (from /proc; psutil is not
    needed)."""
    out: dict[int, tuple[float, str]] = {}
    for pid in _descendants(_proc_table(), root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            out[pid] = (int(match.group(1)) / 1024, "gunicorn arbiter" if pid == root else _role(command))
    return out


def memory_figures(samples: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """First window vs last window, and the least-squares slope after the first window."""
    window = min(60.0, seconds / 3)
    first = [s["rss_mb"] for s in samples if s["t"] <= window]
    last = [s["rss_mb"] for s in samples if s["t"] >= seconds - window]
    after = [(s["t"] / 60, s["rss_mb"]) for s in samples if s["t"] >= window]
    slope = 0.0
    if len(after) >= 2:
        mx = sum(x for x, _ in after) / len(after)
        my = sum(y for _, y in after) / len(after)
        sxx = sum((x - mx) ** 2 for x, _ in after)
        slope = sum((x - mx) * (y - my) for x, y in after) / sxx if sxx else 0.0
    first_mb = sum(first) / len(first) if first else 0.0
    last_mb = sum(last) / len(last) if last else 0.0
    growth = (last_mb / first_mb - 1) if first_mb else 0.0
    processes = []
    if samples:  # each process of the tree, first sample against last: which one grew
        begin, end = samples[0]["processes"], samples[-1]["processes"]
        for pid, (mb, command) in end.items():
            processes.append({"pid": int(pid), "role": command, "first_mb": begin.get(pid, [None])[0],
                              "last_mb": mb})
    return {"window_s": round(window, 1), "first_window_mb": round(first_mb, 1), "last_window_mb": round(last_mb, 1),
            "growth": round(growth, 4), "slope_mb_per_min": round(slope, 3),
            "slope_over_run_mb": round(slope * seconds / 60, 1), "flat": growth < FLAT_GROWTH,
            "samples": len(samples), "processes": processes}


def _role(command: str) -> str:
    if " mllp" in command:
        return "MLLP listener"
    if " worker" in command:
        return "outbox worker"
    return "web worker"  # forked by the arbiter: the same command line


# --- the load ---

@dataclass
class Load:
    base: str
    mllp_port: int
    args: argparse.Namespace
    apps: list[App]
    backend: App
    world: World
    portal: list[tuple[str, requests.Session, list[str]]]
    messages: list[str]
    stats: dict[str, Stats] = field(default_factory=lambda: {name: Stats(name) for name in CLASSES})
    stop: threading.Event = field(default_factory=threading.Event)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    feeds: list[Feed] = field(default_factory=list)

    def lanes(self) -> list[threading.Thread]:
        args, threads = self.args, []

        def add(name: str, stats: str, interval: float | Callable[[], float], offset: float,
                tick: Callable[[float, float], None]) -> None:
            period = interval if callable(interval) else (lambda: float(interval))  # type: ignore[misc]
            threads.append(threading.Thread(target=paced, args=(period, offset, self.stop, self.stats[stats], tick),
                                            name=name, daemon=True))

        healthz = requests.Session()

        def baseline(at: float, lag: float) -> None:
            http_call(self.stats["healthz"], at, lag, healthz, "GET", f"{self.base}/healthz", "healthz")

        add("healthz", "healthz", 1 / args.healthz_rate, 0.0, baseline)
        apps = [*self.apps, self.backend]
        per_app = args.smart_rate / len(apps)
        for n, app in enumerate(apps):
            rng = random.Random(n)
            app.refreshed_at -= rng.uniform(0, args.refresh_seconds)  # the apps' refreshes spread out
            add(f"smart-{app.username}", "smart_search", 1 / per_app, n / args.smart_rate,
                lambda at, lag, app=app, rng=rng: self.smart_tick(app, rng, at, lag))
        per_connection = args.hl7_rate / args.hl7_connections
        for c in range(args.hl7_connections):
            feed = Feed(self, c)
            self.feeds.append(feed)
            add(f"hl7-{c}", "hl7", 1 / per_connection, c / args.hl7_rate, feed.tick)
        for n, (username, session, results) in enumerate(self.portal):
            rng = random.Random(100 + n)
            pages = Pages(self, session, results, rng)
            # People do not click like a clock: each pause is drawn uniformly from 0.5x to 1.5x the mean.
            add(f"portal-{username}", "portal", lambda rng=rng: args.portal_interval * rng.uniform(0.5, 1.5),
                n * args.portal_interval / len(self.portal), pages.tick)
        return threads

    def smart_tick(self, app: App, rng: random.Random, at: float, lag: float) -> None:
        now = time.monotonic()
        if app is self.backend:
            if now - app.refreshed_at > max(30.0, float(app.token.get("expires_in", 300)) - 60):
                self.backend_refresh(at, lag)
            patient = rng.choice(self.all_patients)
        else:
            if now - app.refreshed_at > self.args.refresh_seconds:
                self.refresh(app, at, lag)
            patient = app.patient
        bearer = {"Authorization": f"Bearer {app.token['access_token']}", "Accept": "application/fhir+json"}
        fhir = f"{self.base}/fhir"
        roll = rng.random()
        if roll < 0.2:
            http_call(self.stats["smart_read"], at, lag, app.session, "GET", f"{fhir}/Patient/{patient}",
                      "Patient/{id}", bearer)
        elif roll < 0.4:
            ids = app.observations if app is not self.backend else self.all_observations
            http_call(self.stats["smart_read"], at, lag, app.session, "GET", f"{fhir}/Observation/{rng.choice(ids)}",
                      "Observation/{id}", bearer)
        elif roll < 0.7:
            http_call(self.stats["smart_search"], at, lag, app.session, "GET",
                      f"{fhir}/Observation?patient={patient}&category=laboratory", "Observation?patient&category",
                      bearer, expect=b'"searchset"')
        elif roll < 0.85:
            http_call(self.stats["smart_search"], at, lag, app.session, "GET",
                      f"{fhir}/MedicationRequest?patient={patient}", "MedicationRequest?patient", bearer,
                      expect=b'"searchset"')
        else:
            http_call(self.stats["smart_search"], at, lag, app.session, "GET",
                      f"{fhir}/Appointment?patient={patient}", "Appointment?patient", bearer, expect=b'"searchset"')

    def refresh(self, app: App, at: float, lag: float) -> None:
        data = {"grant_type": "refresh_token", "refresh_token": app.token["refresh_token"], "client_id": app.client_id}
        if app.secret:
            data["client_secret"] = app.secret
        reply = http_call(self.stats["smart_token"], at, lag, app.session, "POST", f"{self.base}/auth/token",
                          "refresh_token", data=data, expect=b'"access_token"')
        app.refreshed_at = time.monotonic()  # a failed refresh is not retried at once: the old token goes on
        if reply is not None and reply.status_code == 200 and b'"access_token"' in reply.content:
            app.token = reply.json()

    def backend_refresh(self, at: float, lag: float) -> None:
        token_url = f"{self.base}/auth/token"
        reply = http_call(self.stats["smart_token"], at, lag, self.backend.session, "POST", token_url,
                          "client_credentials", data={
                              "grant_type": "client_credentials", "scope": BACKEND_SCOPE,
                              "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                              "client_assertion": self.world.assertion("backend", token_url)},
                          expect=b'"access_token"')
        self.backend.refreshed_at = time.monotonic()
        if reply is not None and reply.status_code == 200 and b'"access_token"' in reply.content:
            self.backend.token = reply.json()

    @property
    def all_patients(self) -> list[str]:
        return [app.patient for app in self.apps]

    @property
    def all_observations(self) -> list[str]:
        return [oid for app in self.apps for oid in app.observations]


class Feed:
    """One persistent MLLP connection sending corpus messages with unique control ids."""

    def __init__(self, load: Load, lane: int) -> None:
        self.load, self.lane, self.sent = load, lane, 0
        self.sock: socket.socket | None = None
        self.deframer = Deframer()

    def tick(self, at: float, lag: float) -> None:
        load, stats = self.load, self.load.stats["hl7"]
        text = load.messages[(self.sent * load.args.hl7_connections + self.lane) % len(load.messages)]
        control = f"{load.run_id}-{self.lane}-{self.sent}"
        self.sent += 1
        payload = with_control_id(text, control)
        kind = "^".join(text.split("\r", 1)[0].split(text[3])[8].split(text[4])[:2])  # MSH-9, e.g. ADT^A01
        began = time.perf_counter()
        try:
            if self.sock is None:
                self.sock = socket.create_connection((HOST, load.mllp_port), timeout=TIMEOUT)
                self.deframer = Deframer()
            self.sock.sendall(frame(payload))
            acks: list[bytes] = []
            while not acks:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the listener closed the connection")
                acks = self.deframer.feed(data)
        except (OSError, ConnectionError) as exc:
            with contextlib.suppress(OSError):
                if self.sock is not None:
                    self.sock.close()
            self.sock = None
            error = "timeout" if isinstance(exc, TimeoutError | socket.timeout) else "socket"
            stats.record(at, lag, (time.perf_counter() - began) * 1000, kind, error, f"{kind} {control}: {exc!r}")
            return
        ms = (time.perf_counter() - began) * 1000
        ack = acks[0].decode(errors="replace")
        msa = next((seg for seg in ack.split("\r") if seg.startswith("MSA")), "")
        code = msa.split(ack[3])[1] if len(msa) > 4 else "?"
        if code != "AA" or f"{ack[3]}{control}" not in msa:
            stats.record(at, lag, ms, kind, f"NAK {code}", f"{kind} {control}: {ack[:400]!r}")
        else:
            stats.record(at, lag, ms, kind)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()


class Pages:
    """One signed-in portal user going round the pages, one page per tick."""

    def __init__(self, load: Load, session: requests.Session, results: list[str], rng: random.Random) -> None:
        self.load, self.session, self.results, self.rng = load, session, results, rng
        self.pages = [p for p in PORTAL_PAGES if p != "result" or results]
        self.turn = rng.randrange(len(self.pages))

    def tick(self, at: float, lag: float) -> None:
        page = self.pages[self.turn % len(self.pages)]
        self.turn += 1
        path = {"home": "/", "result": f"/results/{self.rng.choice(self.results) if self.results else ''}"}.get(
            page, f"/{page}")
        # A page that is not a signed-in page (a redirect to the login, an error page) is an error.
        http_call(self.load.stats["portal"], at, lag, self.session, "GET", self.load.base + path, page,
                  expect=b'id="whose-record"')


# --- the run ---

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="measured duration (default 600)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of the same load before measuring starts, not counted (default 10)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the database (and the SQLite temp dir)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"),
                        help="loopback PostgreSQL to create the gw_bench_* database on")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--smart-rate", type=float, default=20.0, help="SMART app requests/s in all (default 20)")
    parser.add_argument("--refresh-seconds", type=float, default=60.0,
                        help="each patient app refreshes its token this often (default 60)")
    parser.add_argument("--hl7-rate", type=float, default=20.0, help="HL7 messages/s in all (default 20)")
    parser.add_argument("--hl7-connections", type=int, default=2, help="persistent MLLP connections (default 2)")
    parser.add_argument("--portal-users", type=int, default=10, help="signed-in portal users (default 10)")
    parser.add_argument("--portal-interval", type=float, default=2.0,
                        help="seconds between one user's pages (default 2)")
    parser.add_argument("--healthz-rate", type=float, default=2.0, help="GET /healthz per second (default 2)")
    args = parser.parse_args(argv)
    if min(args.seconds, args.smart_rate, args.hl7_rate, args.healthz_rate, args.portal_interval) <= 0 \
            or args.hl7_connections < 1 or args.portal_users < 1 or args.warmup < 0:
        parser.error("durations, rates and counts must be positive")
    return args


def progress(load: Load, elapsed: float, rss: float) -> str:
    parts = []
    for name in CLASSES:
        count, errors = load.stats[name].count()
        parts.append(f"{name} {count}" + (f" ({errors} err)" if errors else ""))
    return f"[{elapsed:5.0f}s] " + ", ".join(parts) + f" | server RSS {rss:.1f} MB"


def drive(load: Load, server: Server) -> dict[str, Any]:
    """Run the lanes for warm-up + seconds; returns the measured figures."""
    args = load.args
    threads = load.lanes()
    started = time.monotonic()
    measure_from = started + args.warmup
    measure_to = measure_from + args.seconds
    for stats in load.stats.values():
        stats.window = (measure_from, measure_to)
    for thread in threads:
        thread.start()
    log(f"load: {len(threads)} lanes; warm-up {args.warmup:g}s, then {args.seconds:g}s measured")
    samples: list[dict[str, Any]] = []
    cpu0: tuple[float, float, float] | None = None
    next_sample = measure_from
    try:
        while True:
            now = time.monotonic()
            if not server.alive():
                raise RuntimeError(f"the server died during the run:\n{server.log_tail()}")
            if now >= next_sample or now >= measure_to:
                if cpu0 is None:
                    cpu0 = (server.cpu(), self_cpu(), machine_busy())
                procs = tree_rss(server.proc.pid if server.proc else 0)
                rss = sum(mb for mb, _ in procs.values())
                t = now - measure_from
                samples.append({"t": round(t, 1), "rss_mb": round(rss, 1),
                                "processes": {str(pid): [round(mb, 1), cmd] for pid, (mb, cmd) in procs.items()}})
                log(progress(load, t, rss))
                if now >= measure_to - 0.5:
                    break
                next_sample += SAMPLE_SECONDS
            time.sleep(max(0.05, min(next_sample, measure_to) - time.monotonic()))
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT + 5)
        for feed in load.feeds:
            feed.close()
    cpu1 = (server.cpu(), self_cpu(), machine_busy())
    elapsed = time.monotonic() - measure_from
    if cpu0 is None:
        cpu0 = cpu1
    server_cpu, loadgen_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    other_cpu = max(0.0, (cpu1[2] - cpu0[2]) - server_cpu - loadgen_cpu)
    cores = os.cpu_count() or 1
    seconds = args.seconds
    classes = {name: load.stats[name].figures(seconds) for name in CLASSES}
    return {"classes": classes, "memory": memory_figures(samples, seconds), "rss_samples": samples,
            "cpu": {"seconds": round(elapsed, 1), "cores": cores, "server_cpu_s": round(server_cpu, 1),
                    "loadgen_cpu_s": round(loadgen_cpu, 1), "other_cpu_s": round(other_cpu, 1),
                    "server_share": round(server_cpu / elapsed / cores, 3),
                    "loadgen_share": round(loadgen_cpu / elapsed / cores, 3),
                    "other_share": round(other_cpu / elapsed / cores, 3)}}


def judge(results: dict[str, Any]) -> None:
    classes = results["classes"]
    base = classes["healthz"]["p95_ms"] or 1.0
    for figures in classes.values():
        figures["p95_vs_healthz"] = round(figures["p95_ms"] / base, 2) if figures["count"] else None
    verdicts = {}
    for name, (key, limit) in TARGETS.items():
        value = classes[name][key]
        verdicts[f"{name} {key[:3]} <= {limit:g} ms"] = "PASS" if classes[name]["count"] and value <= limit else "MISS"
    errors = sum(c["errors"] for c in classes.values())
    verdicts["no errors"] = "PASS" if errors == 0 else "MISS"
    memory = results["memory"]
    verdicts[f"memory flat (growth < {FLAT_GROWTH:.0%})"] = "PASS" if memory["flat"] else "MISS"
    results["verdicts"] = verdicts
    results["errors"] = errors


def report(results: dict[str, Any]) -> str:
    """The summary as Markdown (printed too)."""
    opts, classes, memory, cpu = results["options"], results["classes"], results["memory"], results["cpu"]
    targets = {"healthz": opts["healthz_rate"], "smart_read": None, "smart_search": None,
               "smart_token": None, "hl7": opts["hl7_rate"], "portal": opts["portal_users"] / opts["portal_interval"]}
    lines = [f"# Mixed load: {results['description']}", "",
             f"{results['timestamp']}, commit {results['git']['commit'][:10]}"
             f"{' (gateway/ modified)' if results['git']['gateway_dirty'] else ''}, {cpu['cores']} cores, "
             f"load average before {results['loadavg_before']}", "",
             "| class | count | rate/s (target) | p50 ms | p95 ms | p99 ms | max ms | errors | p95 vs /healthz |"
             " late >100ms | missed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in CLASSES:
        c = classes[name]
        target = targets[name]
        rate = f"{c['rate_per_s']:.2f}" + (f" ({target:g})" if target else "")
        if name == "smart_search":
            smart = (c["count"] + classes["smart_read"]["count"]) / opts["seconds"]
            rate += f" (reads+searches {smart:.2f}, target {opts['smart_rate']:g})"
        ratio = "n/a" if c["p95_vs_healthz"] is None else f"{c['p95_vs_healthz']:.1f}x"
        lines.append(f"| {name} | {c['count']} | {rate} | {c['p50_ms']} | {c['p95_ms']} | {c['p99_ms']} | "
                     f"{c['max_ms']} | {c['errors']} | {ratio} | {c['late_over_100ms']} | {c['missed']} |")
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    measured = {
        "smart_search": f"{classes['smart_search']['p95_ms']} ms", "hl7": f"{classes['hl7']['p99_ms']} ms",
        "portal": f"{classes['portal']['p95_ms']} ms"}
    for (label, verdict), value in zip(results["verdicts"].items(),
                                       [*measured.values(), str(results["errors"]),
                                        f"{memory['growth']:+.1%}"], strict=True):
        lines.append(f"| {label} | {value} | {verdict} |")
    lines += ["", f"Server RSS (whole process tree, summed): first {memory['window_s']:g}s "
                  f"{memory['first_window_mb']} MB, last {memory['window_s']:g}s {memory['last_window_mb']} MB "
                  f"({memory['growth']:+.1%}); slope after the first window {memory['slope_mb_per_min']:+.2f} MB/min "
                  f"({memory['slope_over_run_mb']:+.1f} MB over the run); {memory['samples']} samples. By process, "
                  f"first sample to last: " + ", ".join(f"{p['role']} {p['first_mb']} -> {p['last_mb']} MB"
                                                       for p in memory["processes"]) + ".",
              f"CPU over the measured {cpu['seconds']:g}s, share of all {cpu['cores']} cores: server "
              f"{cpu['server_share']:.0%}, load generator {cpu['loadgen_share']:.0%}, other processes "
              f"{cpu['other_share']:.0%}."]
    per_kind = []
    for name in CLASSES:
        for kind, k in classes[name]["by_kind"].items():
            if kind != name:
                per_kind.append(f"| {name} | {kind} | {k['count']} | {k['p50_ms']} | {k['p95_ms']} | {k['p99_ms']} |")
    if per_kind:
        lines += ["", "| class | request | count | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|", *per_kind]
    firsts = [(name, e) for name in CLASSES for e in classes[name]["first_errors"]]
    if firsts:
        lines += ["", "First errors:", ""]
        lines += [f"- {name}: {json.dumps(e)[1:-1]}" for name, e in firsts]
        lines += ["", "Error kinds: " + "; ".join(f"{name} {classes[name]['error_kinds']}" for name in CLASSES
                                                   if classes[name]["error_kinds"])]
    lines += ["", f"Exit status {results['exit_status']}: " + (
        "no errors and memory flat." if results["exit_status"] == 0 else "errors or memory growth (see above).")]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, db: Any, stamp: str, git: dict[str, Any], description: str, messages: list[str],
        workdir: Path, servers: list[Server]) -> int:
    """Setup, the load, the figures; the server it starts is put in `servers` for the caller to stop."""
    port, mllp_port = free_port(), free_port()
    base = f"http://{HOST}:{port}"
    instance = workdir / "instance"
    log(f"database: {db.describe}; loading the demo data, logins and clients")
    world = prepare_data(db.url, base, instance, args.portal_users)
    env = dict(os.environ)
    env.update({"GATEWAY_DATABASE_URL": db.url, "GATEWAY_BASE_URL": base,
                "GATEWAY_INSTANCE_PATH": str(instance), "GATEWAY_SECRET_KEY": uuid.uuid4().hex,
                "GATEWAY_OPEN_ACCESS": "0", "GATEWAY_AUDIT_ENABLED": "1"})
    log_path = RESULTS_DIR / f"load_mixed-{stamp}-server.log"
    server = Server(env, port, args.workers, log_path, extra_args=("--mllp-port", str(mllp_port)))
    servers.append(server)
    began = time.monotonic()
    server.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((HOST, mllp_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MLLP listener did not start:\n{server.log_tail()}") from None
            time.sleep(0.2)
    log(f"server: {base}, MLLP {HOST}:{mllp_port}, ready in {time.monotonic() - began:.1f}s (log {log_path})")

    apps = [App(client, user, patient.removeprefix("Patient/"), secret)
            for client, user, patient, secret in APPS]
    for app in apps:
        launch_app(base, app)
        app.observations = observation_ids(base, app.session, app.token["access_token"], app.patient)
        if not app.observations:
            raise RuntimeError(f"{app.username}: no Observation for {app.patient}")
    backend = App("backend", "backend", "", None)
    backend.token = backend_token(base, world, backend.session)
    backend.refreshed_at = time.monotonic()
    log(f"SMART: {len(apps)} patient apps launched through the login/consent pages "
        f"({', '.join(f'{a.client_id}/{a.username}' for a in apps)}), backend services token "
        f"({backend.token.get('scope')}, {backend.token.get('expires_in')}s)")
    portal = []
    for n in range(args.portal_users):
        username = f"portal{n:02d}"
        session = sign_in(base, username, PASSWORD, totp_secret=TOTP_SECRET)
        portal.append((username, session, result_ids(base, session)))
    log(f"portal: {len(portal)} users signed in with TOTP; "
        f"{sum(1 for _, _, r in portal if r)} of them have results to open")
    load = Load(base, mllp_port, args, apps, backend, world, portal, messages)
    loadavg = os.getloadavg()
    figures = drive(load, server)
    server.stop()
    results: dict[str, Any] = {
        "benchmark": "load_mixed", "timestamp": stamp, "description": description,
        "options": {k: v for k, v in vars(args).items() if k != "pg_admin_url"},
        "python": platform.python_version(), "git": git,
        "loadavg_before": " ".join(f"{v:.2f}" for v in loadavg),
        "database": {"kind": db.kind, "bytes_at_end": db.size()},
        "targets": {name: f"{key} <= {limit:g} ms" for name, (key, limit) in TARGETS.items()},
        "server_log": str(log_path.relative_to(REPO_DIR)), **figures}
    judge(results)
    results["exit_status"] = 0 if results["errors"] == 0 and results["memory"]["flat"] else 1
    out = RESULTS_DIR / f"load_mixed-{stamp}"
    results["results_files"] = [f"{out.relative_to(REPO_DIR)}.json", f"{out.relative_to(REPO_DIR)}.md"]
    text = report(results)
    Path(f"{out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{out}.md").write_text(text)
    log("\n" + text)
    log(f"written: {', '.join(results['results_files'])}")
    return int(results["exit_status"])


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    git = git_state()
    description = (f"{args.seconds:g}s on {args.database}, {args.workers} workers; SMART {args.smart_rate:g}/s "
                   f"({len(APPS)} patient apps + 1 backend), HL7 {args.hl7_rate:g}/s over {args.hl7_connections} "
                   f"MLLP connections, {args.portal_users} portal users a page each ~{args.portal_interval:g}s, "
                   f"/healthz {args.healthz_rate:g}/s")
    log(f"mixed load: {description}")
    corpus = in_scope_messages()
    messages = [text for text, _ in corpus]
    log(f"HL7: {len(messages)} in-scope corpus messages")
    workdir = Path(tempfile.mkdtemp(prefix="load-mixed-"))
    servers: list[Server] = []
    try:
        with database(args.database, workdir, args.keep, args.pg_admin_url) as db:
            try:
                return run(args, db, stamp, git, description, messages, workdir, servers)
            finally:
                for server in servers:
                    server.stop()  # always, and before the database is dropped
    except (KeyboardInterrupt, Interrupted):
        log("\ninterrupted; the server was stopped")
        return 130
    except (RuntimeError, subprocess.CalledProcessError, requests.RequestException) as exc:
        log(f"\nFAILED: {exc}")
        return 2
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
