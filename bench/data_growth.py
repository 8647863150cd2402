#!/usr/bin/env python3
"""Data growth: the same search and ingest on a small and a large store, measured side by side.

    python bench/fhir_api.py --database postgresql --resources 100000 --keep      # the small store
    python bench/fhir_api.py --database postgresql --resources 1000000 --mark 100000 --keep
    python bench/data_growth.py --small postgresql://postgres@127.0.0.1:5432/gw_bench_aaaa \\
                                --large postgresql://postgres@127.0.0.1:5432/gw_bench_bbbb

bench/fhir_api.py takes its baseline while loading, minutes before the measurement at full size, so
whatever else the machine does meanwhile lands on one side only. This script serves the two kept
stores in turn, several rounds alternating small and large, with the same phases each time:

- trivial: GET /healthz (the server stack, the per-round baseline);
- search: GET /fhir/Observation?patient=&category=laboratory&date=ge2015-01-01 over patients that
  have such results (found through the API, by the same search without a patient);
- ingest: copies of the Synthea transaction Bundles POSTed under fresh ids (--ingest resources a round).

It prints each round and a summary: per store the median over rounds of search p95 and of ingest
resources/s, and the ratios large/small (issue #8's target: search p95 at 1M at most 1.5x the p95 at
100k). Results in bench/results/data_growth-<timestamp>.json. Loopback only; the databases are left
as they are, but for the few thousand resources each ingest round adds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_api import (
    DEFAULT_CORPUS,
    HOST,
    RESULTS_DIR,
    SEARCH_PATH,
    SEARCH_SINCE,
    Importer,
    Runner,
    Server,
    _loopback_only,
    free_port,
    gateway_validator,
    http_get,
    load_templates,
    log,
)
from loadgen import PhaseSpec, wrk_path

TARGET_RATIO = 1.5


def store_size(url: str) -> int:
    from sqlalchemy import func, select

    from gateway import db

    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(db.resource)).scalar_one())
    finally:
        engine.dispose()


def search_patients(server: Server, limit: int) -> list[str]:
    """Patients with laboratory results since SEARCH_SINCE, found by the API itself."""
    found: list[str] = []
    url = (f"{server.base_url}/fhir/Observation?category=laboratory&date=ge{SEARCH_SINCE}"
           f"&_elements=subject&_count=1000")
    while url and len(found) < limit:
        status, body = http_get(url, timeout=60)
        if status != 200:
            raise RuntimeError(f"finding patients answered {status}: {body[:300]!r}")
        bundle = json.loads(body)
        for entry in bundle.get("entry", []):
            ref = entry.get("resource", {}).get("subject", {}).get("reference", "")
            pid = ref.split("/", 1)[1] if ref.startswith("Patient/") else ""
            if pid and pid not in found:
                found.append(pid)
        url = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), "")
    if not found:
        raise RuntimeError("no patient has laboratory results to search; was the store loaded by bench/fhir_api.py?")
    return found[:limit]


def one_round(name: str, url: str, args: argparse.Namespace, templates: list[Any], workdir: Path,
              stamp: str, loadgen: str, patients: dict[str, list[str]]) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ)
    env.update({"GATEWAY_OPEN_ACCESS": "1", "GATEWAY_DATABASE_URL": url,
                "GATEWAY_BASE_URL": f"http://{HOST}:{port}", "GATEWAY_INSTANCE_PATH": str(workdir / name)})
    server = Server(env, port, args.workers, RESULTS_DIR / f"data_growth-{stamp}-{name}-server.log")
    try:
        server.start()
        if name not in patients:
            patients[name] = search_patients(server, args.patients)
            log(f"  {name}: {len(patients[name])} patients with laboratory results to search")
        runner = Runner(server, args.clients, args.seconds, loadgen)
        trivial = runner.phase(PhaseSpec("trivial", "GET", "/healthz"))
        search = runner.phase(PhaseSpec("search", "GET", SEARCH_PATH, patients[name], check_entries=True))
        importer = Importer(server, templates, args.import_clients, args.ingest, max_seconds=600)
        importer.run_until(args.ingest)
        stats = importer.stats
        rate = stats.resources / stats.seconds if stats.seconds else 0.0
        log(f"  ingest   {rate:9.1f} resources/s  {stats.resources:,} resources, {stats.failed_bundles} failed")
        return {"store": name, "trivial": trivial.as_dict(), "search": search.as_dict(),
                "ingest": {"resources": stats.resources, "seconds": round(stats.seconds, 2),
                           "resources_per_s": round(rate, 1), "failed_bundles": stats.failed_bundles}}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--small", required=True, help="database URL of the small store (e.g. 100,000 resources)")
    parser.add_argument("--large", required=True, help="database URL of the large store (e.g. 1,000,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ingest", type=int, default=5000, help="resources ingested per round and store")
    parser.add_argument("--import-clients", type=int, default=4)
    parser.add_argument("--patients", type=int, default=500, help="patients to spread the searches over")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args(argv)
    for url in (args.small, args.large):
        if not url.startswith("sqlite"):
            _loopback_only(url)
    loadgen = "wrk" if wrk_path() else "python"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    templates, _notes = load_templates(args.corpus, gateway_validator())
    sizes = {"small": store_size(args.small), "large": store_size(args.large)}
    log(f"data growth: small store {sizes['small']:,} resources, large store {sizes['large']:,}; "
        f"{args.rounds} rounds, {args.seconds:g}s phases, {args.clients} clients, load generator {loadgen}")
    workdir = Path(tempfile.mkdtemp(prefix="data-growth-"))
    rounds: list[dict[str, Any]] = []
    patients: dict[str, list[str]] = {}
    began = time.monotonic()
    try:
        for number in range(args.rounds):
            order = [("small", args.small), ("large", args.large)]
            if number % 2:
                order.reverse()  # neither store always goes first
            for name, url in order:
                log(f"\nround {number + 1}/{args.rounds}, {name} store ({time.monotonic() - began:.0f}s):")
                rounds.append({"round": number + 1, **one_round(name, url, args, templates, workdir, stamp,
                                                                loadgen, patients)})
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"\nFAILED: {exc}")
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(store: str, pick: Any) -> float:
        return statistics.median(pick(r) for r in rounds if r["store"] == store)

    summary: dict[str, Any] = {"sizes": sizes}
    for store in ("small", "large"):
        summary[store] = {
            "search_p95_ms": median(store, lambda r: r["search"]["p95_ms"]),
            "search_p50_ms": median(store, lambda r: r["search"]["p50_ms"]),
            "search_rps": median(store, lambda r: r["search"]["rps"]),
            "trivial_p95_ms": median(store, lambda r: r["trivial"]["p95_ms"]),
            "ingest_resources_per_s": median(store, lambda r: r["ingest"]["resources_per_s"]),
        }
    search_ratio = summary["large"]["search_p95_ms"] / summary["small"]["search_p95_ms"]
    ingest_ratio = summary["large"]["ingest_resources_per_s"] / summary["small"]["ingest_resources_per_s"]
    summary["search_p95_ratio"] = round(search_ratio, 3)
    summary["ingest_rate_ratio"] = round(ingest_ratio, 3)
    summary["verdict"] = "PASS" if search_ratio <= TARGET_RATIO else "MISS"
    errors = sum(r["search"]["errors"] + r["trivial"]["errors"] + r["ingest"]["failed_bundles"] for r in rounds)
    results_file = RESULTS_DIR / f"data_growth-{stamp}.json"
    results_file.write_text(json.dumps({"benchmark": "data_growth", "timestamp": stamp, "options": {
        k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "summary": summary, "errors": errors},
        indent=2) + "\n")

    log("\n" + "=" * 96)
    log(f"data growth: {sizes['small']:,} vs {sizes['large']:,} resources, median of {args.rounds} rounds each")
    log("=" * 96)
    log(f"{'store':<8} {'resources':>11} {'search p50':>11} {'search p95':>11} {'search req/s':>13} "
        f"{'/healthz p95':>13} {'ingest res/s':>13}")
    for store in ("small", "large"):
        s = summary[store]
        log(f"{store:<8} {sizes[store]:>11,} {s['search_p50_ms']:>9.1f}ms {s['search_p95_ms']:>9.1f}ms "
            f"{s['search_rps']:>13.1f} {s['trivial_p95_ms']:>11.1f}ms {s['ingest_resources_per_s']:>13.1f}")
    log(f"\nsearch p95 large/small: {search_ratio:.2f} (target <= {TARGET_RATIO}) {summary['verdict']}")
    log(f"ingest rate large/small: {ingest_ratio:.2f}")
    log(f"errors: {errors}; results: {results_file}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
