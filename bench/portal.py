#!/usr/bin/env python3
"""Benchmark of the patient portal's home and results pages under concurrent signed-in users.

    python bench/portal.py                       # 20 users, 60 s, think time 0.5-1.5 s, SQLite
    python bench/portal.py --users 20 --seconds 30 --think 0      # closed loop: no think time
    python bench/portal.py --database-url postgresql://postgres@127.0.0.1:5432/gw_bench_x

Starts `gateway serve --demo` (gunicorn, 2 workers) on a free loopback port, adds one portal login
per simulated user (round robin over the demo patients, parents included, so some users act for a
child), signs each in through the real login form (CSRF token and all), and then every user loops:
home page, think, results page, think. The same users also fetch /healthz in a phase of its own,
the baseline the page latencies are quoted against. Prints p50/p95/p99 per page and PASS/MISS
against the target (p95 <= 150 ms for home and results) and writes bench/results/portal-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_api import HOST, Server, free_port, machine_busy
from signin import sign_in

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PASSWORD = "bench-password-1"
PATIENTS = ("maria-garcia", "robert-chen", "linda-chen", "daniel-garcia", "syn85-patient", "syn355-patient")
PAGES = {"home": "/", "results": "/results"}
TARGET_P95_MS = 150.0


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run_phase(base: str, sessions: list[requests.Session], paths: dict[str, str], seconds: float,
              think: tuple[float, float]) -> dict[str, Any]:
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    errors: dict[str, int] = {name: 0 for name in paths}
    first_error: list[str] = []
    deadline = time.monotonic() + seconds

    def user(n: int, session: requests.Session) -> None:
        rng = random.Random(n)
        time.sleep(rng.uniform(0, max(think[1], 0.05)))  # users do not all start in the same instant
        while time.monotonic() < deadline:
            for name, path in paths.items():
                began = time.perf_counter()
                try:
                    reply = session.get(base + path, timeout=30, allow_redirects=False)
                    ok = reply.status_code == 200
                    detail = f"{path}: {reply.status_code}"
                except requests.RequestException as exc:
                    ok, detail = False, f"{path}: {exc}"
                elapsed = time.perf_counter() - began
                with lock:
                    latencies[name].append(elapsed * 1000)
                    if not ok:
                        errors[name] += 1
                        if not first_error:
                            first_error.append(detail)
                if think[1] > 0:
                    time.sleep(rng.uniform(*think))
                if time.monotonic() >= deadline:
                    break

    threads = [threading.Thread(target=user, args=(n, s), daemon=True) for n, s in enumerate(sessions)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    out: dict[str, Any] = {}
    for name, values in latencies.items():
        out[name] = {"requests": len(values), "rps": round(len(values) / elapsed, 1), "errors": errors[name],
                     "p50_ms": round(percentile(values, 50), 1), "p95_ms": round(percentile(values, 95), 1),
                     "p99_ms": round(percentile(values, 99), 1), "max_ms": round(max(values, default=0), 1)}
    if first_error:
        out["first_error"] = first_error[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean think time in seconds between pages (uniform +-50%%); 0 for a closed loop")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file in a temporary folder")
    args = parser.parse_args(argv)
    think = (args.think * 0.5, args.think * 1.5) if args.think > 0 else (0.0, 0.0)

    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-portal-"))
    env = dict(os.environ, GATEWAY_INSTANCE_PATH=str(workdir), GATEWAY_SECRET_KEY="bench-portal-secret",
               GATEWAY_AUDIT_ENABLED="true")
    if args.database_url:
        env["GATEWAY_DATABASE_URL"] = args.database_url
    port = free_port()
    env["GATEWAY_BASE_URL"] = f"http://{HOST}:{port}"
    exe = shutil.which("gateway") or "gateway"
    server = Server(env, port, args.workers, workdir / "server.log", extra_args=("--demo",))
    results: dict[str, Any] = {"when": datetime.now().isoformat(timespec="seconds"), "users": args.users,
                               "seconds": args.seconds, "think_s": args.think, "workers": args.workers,
                               "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite"}
    try:
        log("starting gateway serve --demo ...")
        command_env = dict(env)
        server.start(ready_timeout=180)
        log(f"server up at {server.base_url}; adding {args.users} portal logins")
        for n in range(args.users):
            subprocess.run([exe, "user", "add", "--username", f"bench{n:02d}", "--password", PASSWORD,
                            "--fhir-user", f"Patient/{PATIENTS[n % len(PATIENTS)]}"],
                           env=command_env, check=True, capture_output=True)
            if PATIENTS[n % len(PATIENTS)] == "maria-garcia":
                subprocess.run([exe, "proxy", "grant", "--username", f"bench{n:02d}", "--patient",
                                "Patient/sofia-garcia", "--relationship", "MTH"], env=command_env, check=True,
                               capture_output=True)
        sessions = [sign_in(server.base_url, f"bench{n:02d}", PASSWORD) for n in range(args.users)]
        log(f"{len(sessions)} users signed in; warming up")
        run_phase(server.base_url, sessions, PAGES, min(5.0, args.seconds), (0.0, 0.0))
        server.settle()
        busy = machine_busy()
        log(f"baseline: /healthz for {args.seconds:.0f} s ({args.users} users)")
        results["baseline"] = run_phase(server.base_url, sessions, {"healthz": "/healthz"}, args.seconds, think)
        server.settle()
        log(f"pages: home and results for {args.seconds:.0f} s ({args.users} users)")
        results["pages"] = run_phase(server.base_url, sessions, PAGES, args.seconds, think)
        results["machine_busy_before"] = round(busy, 2)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = results["baseline"]["healthz"]
    print()
    print(f"portal pages, {args.users} signed-in users, think {args.think:g} s, {args.workers} workers, "
          f"{results['database']}")
    header = f"  {'page':<9} {'req':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
    print(header + "  p95 vs /healthz")
    for name, figures in [("healthz", base), *[(n, results["pages"][n]) for n in PAGES]]:
        ratio = figures["p95_ms"] / base["p95_ms"] if base["p95_ms"] else 0.0
        print(f"  {name:<9} {figures['requests']:>6} {figures['rps']:>7} {figures['p50_ms']:>8} "
              f"{figures['p95_ms']:>8} {figures['p99_ms']:>8} {figures['errors']:>7}  {ratio:.1f}x")
    verdicts = {}
    for name in PAGES:
        figures = results["pages"][name]
        ok = figures["p95_ms"] <= TARGET_P95_MS and figures["errors"] == 0
        verdicts[name] = "PASS" if ok else "MISS"
        print(f"  target {name}: p95 <= {TARGET_P95_MS:.0f} ms and no errors: {verdicts[name]}")
    if "first_error" in results["pages"]:
        print(f"  first error: {results['pages']['first_error']}")
    results["verdicts"] = verdicts
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"portal-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"  written to {out}")
    return 0 if all(v == "PASS" for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
