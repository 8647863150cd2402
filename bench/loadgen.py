"""Load generators for bench/fhir_api.py: wrk (preferred) or a Python thread pool (fallback).

Both run one fixed-duration, closed-loop phase against one URL pattern with N concurrent
keep-alive connections, and return a PhaseResult. "{id}" in the path or body is replaced on every
request by an id drawn at random from the phase's id list. Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk_phase.lua"


@dataclass
class PhaseSpec:
    name: str
    method: str
    path: str  # may hold "{id}"
    ids: list[str] = field(default_factory=list)
    body: str | None = None  # may hold "{id}"
    check_entries: bool = False  # count searchsets with no entry


@dataclass
class PhaseResult:
    name: str
    loadgen: str
    clients: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # non-2xx answers plus socket errors and timeouts
    statuses: dict[str, int]  # non-2xx status -> count
    socket_errors: dict[str, int]
    first_error: str
    checked: int = 0  # 2xx searchsets inspected
    empty: int = 0  # ... of which had no entry
    loadgen_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # CPU that processes other than the server and the load generator took meanwhile
    other_processes: list[dict[str, Any]] = field(default_factory=list)  # the biggest of them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_wrk(base_url: str, spec: PhaseSpec, clients: int, seconds: float, threads: int = 2) -> PhaseResult:
    """One phase with wrk; raises RuntimeError when wrk fails or prints no result."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="fhir-bench-wrk-") as tmp:
        ids_file = "-"
        if spec.ids:
            ids_file = os.path.join(tmp, "ids.txt")
            Path(ids_file).write_text("\n".join(spec.ids) + "\n")
        body_file = "-"
        if spec.body is not None:
            body_file = os.path.join(tmp, "body.json")
            Path(body_file).write_text(spec.body)
        command = [
            exe, f"-t{max(1, min(threads, clients))}", f"-c{clients}", f"-d{max(1, round(seconds))}s",
            "--timeout", "30s", "-s", str(LUA_SCRIPT), base_url,
            "--", spec.method, spec.path, ids_file, body_file, "1" if spec.check_entries else "0",
        ]
        cpu_before = _child_cpu()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=seconds + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cpu = _child_cpu() - cpu_before
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {err.strip() or out.strip()}")
    data = json.loads(line[len("WRK_RESULT "):])
    duration = data["duration_us"] / 1e6
    socket_errors = data["socket_errors"]
    return PhaseResult(
        name=spec.name, loadgen="wrk", clients=clients, seconds=duration, requests=data["requests"],
        rps=data["requests"] / duration if duration else 0.0,
        p50_ms=data["p50_us"] / 1000, p95_ms=data["p95_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=data["non2xx"] + sum(socket_errors.values()),
        statuses=data["statuses"], socket_errors=socket_errors, first_error=data["first_error"],
        checked=data["checked"], empty=data["empty"], loadgen_cpu_s=cpu,
    )


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def run_python(base_url: str, spec: PhaseSpec, clients: int, seconds: float) -> PhaseResult:
    """One phase with `clients` threads, each on its own keep-alive http.client connection."""
    host_port = base_url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    headers = {"Accept": "application/fhir+json"}
    if spec.body is not None:
        headers["Content-Type"] = "application/fhir+json"
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    tally = {"checked": 0, "empty": 0}
    first_error: list[str] = []
    start = time.monotonic()
    deadline = start + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        local: list[float] = []
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=30)
        while time.monotonic() < deadline:
            item = rng.choice(spec.ids) if spec.ids else ""
            path = spec.path.replace("{id}", item)
            body = spec.body.replace("{id}", item).encode() if spec.body is not None else None
            began = time.perf_counter()
            try:
                conn.request(spec.method, path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except TimeoutError:
                with lock:
                    socket_errors["timeout"] += 1
                conn.close()
                continue
            except OSError:
                with lock:
                    socket_errors["read"] += 1
                conn.close()
                continue
            local.append(time.perf_counter() - began)
            status = response.status
            if not 200 <= status <= 299:
                with lock:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if not first_error:
                        first_error.append(f"{status} {payload[:300].decode(errors='replace')}")
            elif spec.check_entries:
                with lock:
                    tally["checked"] += 1
                    if b'"entry":[]' in payload:
                        tally["empty"] += 1
        conn.close()
        with lock:
            latencies.extend(local)

    cpu_before = _self_cpu()
    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - start
    cpu = _self_cpu() - cpu_before
    latencies.sort()
    non2xx = sum(statuses.values())
    requests = len(latencies)
    return PhaseResult(
        name=spec.name, loadgen="python-threads", clients=clients, seconds=elapsed, requests=requests,
        rps=requests / elapsed if elapsed else 0.0,
        p50_ms=_percentile(latencies, 50) * 1000, p95_ms=_percentile(latencies, 95) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000, max_ms=(latencies[-1] * 1000) if latencies else 0.0,
        errors=non2xx + sum(socket_errors.values()), statuses=statuses, socket_errors=socket_errors,
        first_error=first_error[0] if first_error else "", checked=tally["checked"], empty=tally["empty"],
        loadgen_cpu_s=cpu,
    )
