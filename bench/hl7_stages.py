"""Where an HL7 message's CPU goes, in process: the pipeline by stage, and its floor.

    python bench/hl7_stages.py [--messages 2000] [--warm-up 300] [--database sqlite|postgresql]

`hl7_ingest.py` measures the pipeline end to end over MLLP; this measures `Ingestor.handle` in the
benchmark's own process (no listener, no socket), for the same corpus messages, repeated with unique
control ids ("repeated": their resources mostly found unchanged or older) and as copies that name
new records ("new data": every resource created; see hl7_ingest.with_new_records). Per kind:

  translation    parse (hl7lw) + translate, alone: CPU ms a message
  validation     validating every translated resource against the R4B models, alone, as a message
                 whose resources are all new or changed does
  pipeline       Ingestor.handle, durable commits: CPU ms a message
  translated     the same with each message's translation made beforehand, outside the timing:
                 what the store path and the rest (receipt, duplicate check, ACK, audit, provenance,
                 commit) cost without translating
  floor          the same again with validation skipped too: the store path alone (an experiment:
                 no resource may go unvalidated in the gateway)

Each pipeline run has a fresh database. Every figure is set against python-hl7's CPU time per parse
of the same messages, measured before and after in the same run (the mean): "x parse" is that time
over the stage's, so 1.0x is the issue's one-connection target for the whole pipeline. CPU time is
the process's, background threads included, and on PostgreSQL also that of the server's backends
serving the run's database (the stages alone run no SQL: time.process_time). Loopback only; nothing is kept
but bench/results/hl7_stages-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fhir_api import tree_cpu  # noqa: E402
from hl7_ingest import (  # noqa: E402
    create_database,
    drop_database,
    in_scope_messages,
    parse_cpu_ms,
    with_control_id,
    with_new_records,
    write_results,
)

from gateway.hl7 import parse  # noqa: E402
from gateway.hl7.translate import Translation, translate  # noqa: E402


def cpu_ms_each(work: Callable[[Any], Any], items: list[Any]) -> float:
    """CPU milliseconds per item of work(item) over the items."""
    started = time.process_time()
    for item in items:
        work(item)
    return (time.process_time() - started) * 1000 / len(items)


@contextmanager
def fresh_database(kind: str) -> Iterator[tuple[dict[str, str], str]]:
    """The environment of a fresh, upgraded gateway database (hl7_ingest.create_database), dropped
    afterwards, and the PostgreSQL database's name ("" for SQLite)."""
    with tempfile.TemporaryDirectory(prefix="hl7-stages-") as tmp:
        url, pg_name = create_database(kind, Path(tmp))
        try:
            yield {"GATEWAY_DATABASE_URL": url, "GATEWAY_INSTANCE_PATH": tmp}, pg_name or ""
        finally:
            drop_database(pg_name)


def run_pipeline(database: str, payloads: list[bytes], warm_up: int, translated: bool = False,
                 validated: bool = True) -> float:
    """CPU ms a message of Ingestor.handle over payloads[warm_up:] on a fresh database (with the
    PostgreSQL server's work for it); `translated`: translations made beforehand; validated=False:
    the store validates nothing."""
    from gateway import build_services
    from gateway.config import Settings
    from gateway.fhir import store
    from gateway.hl7 import ingest

    made: dict[str, Translation] = {}
    if translated:  # each message's own translation, made here and used once
        for payload in payloads:
            text = parse.normalize(parse.decode(payload))
            made[parse.read_header(text).control_id] = translate(parse.parse(text))

    def given(message: parse.Message) -> Translation:
        return made.pop(parse.get(message, "MSH-10") or "")

    with fresh_database(database) as (env, pg_name):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        patches = [(ingest, "translate", given)] if translated else []
        if not validated:
            patches.append((store, "validate", lambda resource: None))
        originals = [(module, attribute, getattr(module, attribute)) for module, attribute, _ in patches]
        services = build_services(Settings.from_env())
        try:
            for module, attribute, replacement in patches:
                setattr(module, attribute, replacement)
            for payload in payloads[:warm_up]:
                services.hl7.handle(payload)
            # the process's CPU and, on PostgreSQL, the server's backends serving this database
            before = tree_cpu(os.getpid(), pg_name)
            for payload in payloads[warm_up:]:
                services.hl7.handle(payload)
            cost = (tree_cpu(os.getpid(), pg_name) - before) * 1000 / (len(payloads) - warm_up)
        finally:
            for module, attribute, original in originals:
                setattr(module, attribute, original)
            services.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="timed messages per pipeline run")
    parser.add_argument("--warm-up", type=int, default=300, help="messages before the timing of each run")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    from gateway.fhir.validate import validate

    corpus = in_scope_messages()
    texts = [t for t, _ in corpus]
    print(f"{len(corpus)} in-scope corpus messages; {args.database}; {args.messages} timed messages a run "
          f"after {args.warm_up}", flush=True)
    from gateway.compiled import summary

    print(f"modules: {summary()}", flush=True)
    parse_before = parse_cpu_ms(texts)
    print(f"python-hl7: {parse_before:.2f} ms CPU a parse", flush=True)
    run_id = uuid.uuid4().hex[:6]
    count = args.warm_up + args.messages
    results: dict[str, Any] = {"database": args.database, "messages": args.messages, "warm_up": args.warm_up}
    rows: list[tuple[str, str, float]] = []
    for kind in ("repeated", "new data"):
        def text(i: int, kind: str = kind) -> str:
            original = texts[i % len(texts)]
            return with_new_records(original, f"N{run_id}x{i}") if kind == "new data" else original

        payloads = [with_control_id(text(i), f"{run_id}{kind[0]}{i}") for i in range(count)]
        timed = [parse.normalize(parse.decode(p)) for p in payloads[args.warm_up:]]
        for t in timed[:len(texts)]:  # warm: the mappings compiled, the models of each type loaded
            for resource in translate(parse.parse(t)).resources:
                validate(resource)
        translation = cpu_ms_each(lambda t: translate(parse.parse(t)), timed)
        resources = [r for t in timed for r in translate(parse.parse(t)).resources]
        validation = cpu_ms_each(validate, resources) * len(resources) / len(timed)
        print(f"{kind}: translation {translation:.2f} ms, validation {validation:.2f} ms a message", flush=True)
        rows += [(kind, "translation", translation), (kind, "validation", validation)]
        for stage, translated, validated in (("pipeline", False, True), ("translated", True, True),
                                             ("floor", True, False)):
            cost = run_pipeline(args.database, payloads, args.warm_up, translated, validated)
            print(f"{kind}: {stage} {cost:.2f} ms a message", flush=True)
            rows.append((kind, stage, cost))
    parse_after = parse_cpu_ms(texts)
    parse_cpu = (parse_before + parse_after) / 2
    print()
    print(f"python-hl7: {parse_before:.2f} ms CPU a parse before, {parse_after:.2f} after (mean {parse_cpu:.2f})")
    print(f"{'kind':<10}{'stage':<13}{'CPU ms/msg':>11}{'x parse':>9}")
    for kind, stage, cost in rows:
        print(f"{kind:<10}{stage:<13}{cost:>11.2f}{parse_cpu / cost:>8.2f}x")
        results.setdefault(kind, {})[stage] = {"cpu_ms": round(cost, 3), "x_parse": round(parse_cpu / cost, 2)}
    results["python_hl7_cpu_ms"] = {"before": round(parse_before, 3), "after": round(parse_after, 3)}
    write_results("hl7_stages", results)


if __name__ == "__main__":
    main()
