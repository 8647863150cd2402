"""The price of metrics on the hot paths: FHIR reads with the request counting of gateway.metrics
against the same reads without it, and the cost of one HL7 message's count beside the ingest of one.

In one process, on one SQLite file with the demo family: `GET /fhir/Observation/{id}` through the
Flask test client under open access, alternating rounds with the counting middleware in place (as
create_app puts it) and rounds with it taken out. Same ids, same order. CPU time of this process per
read is the figure to trust on a shared machine (wall time is printed too). Then the instrumentation
calls alone (timeit) and HL7 messages through Ingestor.receive with and without their count.

    python bench/metrics_overhead.py [--reads 3000] [--rounds 6] [--messages 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Request  # noqa: E402

from gateway import create_app, db, metrics  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.fhir.bundles import BundleProcessor, import_file  # noqa: E402

ADT = ("MSH|^~\\&|EPIC|RIVERSIDE|GATEWAY|RIVERSIDE|20261101083000-0500||ADT^A01^ADT_A01|{control}|P|2.5.1\r"
       "EVN|A01|20261101083000-0500\rPID|1||{mrn}^^^RIVERSIDE^MR||Lopez^Ana^Maria||19860412|F\r"
       "PV1|1|I|4W^401^A^RIVERSIDE\r")


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=3000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each kind, alternating")
    parser.add_argument("--messages", type=int, default=300, help="HL7 messages per kind, alternating by 50")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.sqlite"
        db.upgrade(db.make_engine(url))
        settings = Settings.from_env(environ={}, database_url=url, open_access=True, base_url="http://localhost",
                                     instance_path=tmp, metrics_flush_seconds=2.0)
        app = create_app(settings)
        services = app.extensions["gateway"]
        processor = BundleProcessor(services.store)
        for name in ("00-organization.json", "10-garcia-family.json"):
            import_file(processor, str(ROOT / "fixtures" / "fhir" / name))
        with services.store.reading() as repo:
            ids = [row.id for row in repo.conn.execute(db.resource.select().where(
                db.resource.c.resource_type == "Observation"))]
        rng = random.Random(7)
        order = [rng.choice(ids) for _ in range(args.reads)]
        client = app.test_client()
        counted_app, bare_app = app.wsgi_app, app.wsgi_app.wsgi_app  # type: ignore[attr-defined]

        def hooks(on: bool) -> None:
            """The request counting of gateway.metrics in (as create_app puts it) or out."""
            app.wsgi_app = counted_app if on else bare_app  # type: ignore[method-assign]
            app.request_class = metrics.CountedRequest if on else Request

        for rid in order[:200]:  # warm up both ways
            client.get(f"/fhir/Observation/{rid}")
        wall: dict[str, list[float]] = {"with": [], "without": []}
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.rounds):
            for kind in ("without", "with"):
                hooks(kind == "with")
                started, cpu_started = time.perf_counter(), time.process_time()
                for rid in order:
                    if client.get(f"/fhir/Observation/{rid}").status_code != 200:
                        raise SystemExit(f"read of {rid} failed")
                wall[kind].append((time.perf_counter() - started) / args.reads * 1e6)
                cpu[kind].append((time.process_time() - cpu_started) / args.reads * 1e6)
        hooks(True)
        services.audit.flush()
        print(f"FHIR read through the app, per read (median of {args.rounds} rounds of {args.reads}):")
        for kind in ("without", "with"):
            print(f"  {kind:<8} metrics: CPU {median(cpu[kind]):7.1f} us (rounds {min(cpu[kind]):.0f}-"
                  f"{max(cpu[kind]):.0f}), wall {median(wall[kind]):7.1f} us")
        cpu_cost = median(cpu["with"]) - median(cpu["without"])
        print(f"  overhead: CPU {cpu_cost:+.1f} us per read "
              f"({cpu_cost / median(cpu['without']) * 100:+.1f}%), wall "
              f"{(median(wall['with']) / median(wall['without']) - 1) * 100:+.1f}%")

        n = 20_000
        per_call = {
            "http_request()": min(timeit.repeat(lambda: metrics.http_request(
                "GET", "/fhir/<rtype>/<rid>", "fhir", 200, 0.001), number=n, repeat=5)) / n * 1e6,
            "hl7_message()": min(timeit.repeat(lambda: metrics.hl7_message("processed", "mllp", 0.004),
                                               number=n, repeat=5)) / n * 1e6,
            "outbox_delivery()": min(timeit.repeat(lambda: metrics.outbox_delivery("delivered", "message", "hl7"),
                                                   number=n, repeat=5)) / n * 1e6,
        }
        environ: dict[str, Any] = {"REQUEST_METHOD": "GET"}
        routed = SimpleNamespace(url_rule=SimpleNamespace(rule="/fhir/<rtype>/<rid>", endpoint="fhir.read"))

        def respond(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            environ[metrics.ROUTED] = routed
            start_response("200 OK", [])
            return [b"{}"]

        counter = metrics.RequestCounter(respond)
        per_call["RequestCounter"] = (min(timeit.repeat(lambda: counter(environ, lambda *a: None), number=n,
                                                        repeat=5))
                                      - min(timeit.repeat(lambda: respond(environ, lambda *a: None), number=n,
                                                          repeat=5))) / n * 1e6
        print("one instrumentation call (best of 5 x 20,000):")
        for name, micros in per_call.items():
            print(f"  {name:<18} {micros:5.2f} us")
        print(f"  counting a request is {per_call['RequestCounter'] / median(cpu['without']) * 100:.2f}% of a "
              "read's CPU time")

        ingest = services.hl7
        hl7_cpu: dict[str, list[float]] = {"with": [], "without": []}
        counted = metrics.hl7_message
        sent = 0
        for _ in range(max(args.messages // 50, 1)):
            for kind in ("without", "with"):
                metrics.hl7_message = counted if kind == "with" else (lambda *_args: None)  # type: ignore[assignment]
                cpu_started = time.process_time()
                for _ in range(50):
                    sent += 1
                    ingest.receive(ADT.format(control=f"B{sent}", mrn=f"M{sent}"), "mllp", None)
                hl7_cpu[kind].append((time.process_time() - cpu_started) / 50 * 1e6)
        metrics.hl7_message = counted  # type: ignore[assignment]
        services.audit.flush()
        metrics.flush()
        print(f"HL7 ADT^A01 through Ingestor.receive, CPU per message (median of {len(hl7_cpu['with'])} "
              "batches of 50):")
        for kind in ("without", "with"):
            print(f"  {kind:<8} the count: {median(hl7_cpu[kind]):8.0f} us")
        print(f"  the count itself: {per_call['hl7_message()']:.2f} us "
              f"({per_call['hl7_message()'] / median(hl7_cpu['without']) * 100:.3f}% of a message)")


if __name__ == "__main__":
    main()
