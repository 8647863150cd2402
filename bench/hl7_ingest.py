"""HL7v2 ingest benchmark: the whole pipeline over MLLP beside plain parsing of the same messages.

    python bench/hl7_ingest.py [--messages 20000] [--database sqlite|postgresql] [--memory 100000]
                               [--processes 0] [--slices 10] [--burst-seconds 1]

Phases, all in one run on this machine:
  baseline   python-hl7 parse-only and hl7apy parse-only rates of the same messages (python-hl7
             again after the throughput phases), and python-hl7's CPU time per message
  one        the in-scope corpus messages, repeated with unique control ids, over one MLLP connection:
             messages/s and resources/s end to end (each ACK is received after its commit), and the
             listener's CPU time per message
  four       the same over four connections at once
  new data   one connection, then four, of copies that name new records (every identifier that keys
             a resource made unique per copy): each message creates its resources, as a live feed
             of new patients, orders and results does, where the phases above mostly find them
             unchanged
  latency    p50/p99 ACK latency at a steady 100 messages/s
  memory     (with --memory N) resident memory of the listener every 10% of N messages

The listener is `gateway mllp [--processes N]` in its own process(es) on a fresh database (a
temporary SQLite file, or a gw_bench_<random> PostgreSQL database that is dropped afterwards).
Loopback only; every loop is bounded in count and time. Results are printed and written to
bench/results/hl7_ingest-<time>.json.

Each throughput phase runs in --slices parts, with a --burst-seconds burst of python-hl7 parsing
the same messages before each part and after the last; a part is set against the mean of the bursts
on either side of it. "vs parse" is the time python-hl7 took, at those speeds, to merely parse the
phase's messages, over the time the pipeline took for them end to end; "CPU ratio" the same with the
listener's CPU time against python-hl7's. On a machine other work shares, rates move with that work
by a third within minutes: a baseline taken only before and after the phases let the same code's
ratios swing with it. The listener idles during a burst (it may store its audit spool then, as it
does between phases).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fhir_api import tree_cpu  # noqa: E402

from gateway.cli import listener_processes  # noqa: E402
from gateway.hl7 import parse  # noqa: E402
from gateway.hl7.mllp import Deframer, frame  # noqa: E402
from gateway.hl7.translate import UnsupportedMessage, translate  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "hl7" / "fhir-converter"
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def in_scope_messages() -> list[tuple[str, int]]:
    """(normalised text, resources it translates to) for every corpus message the gateway maps."""
    out = []
    for path in sorted(CORPUS.glob("*.hl7")):
        text = parse.normalize(parse.decode(path.read_bytes()))
        try:
            translation = translate(parse.parse(text))
        except UnsupportedMessage:
            continue
        except Exception:
            continue
        out.append((text, len(translation.resources)))
    return out


def with_control_id(text: str, control: str) -> bytes:
    header = parse.read_header(text)
    sep = header.separators.field
    msh, rest = text.split("\r", 1)
    fields = msh.split(sep)
    fields[9] = control
    # Enhanced-mode flags (MSH-15/16) would change what comes back, or ask for nothing at all; the
    # benchmark wants one plain AA per message.
    for index in (14, 15):
        if len(fields) > index:
            fields[index] = ""
    return (sep.join(fields) + "\r" + rest).encode("utf-8")


# The identifiers the mappings key resources on (mappings/segments/*.yaml, "id:"): patient (PID-2,
# PID-3; MRG-1, MRG-4 for the record merged away), visit (PV1-19, PV1-50), order and report (ORC-2,
# ORC-3, OBR-2, OBR-3), appointment (SCH-1, SCH-2), document (TXA-12, TXA-16), next of kin (NK1-33).
# What is keyed on the patient or the report (results, relatives, notes) follows them.
RECORD_KEYS = {"PID": (2, 3), "MRG": (1, 4), "PV1": (19, 50), "ORC": (2, 3), "OBR": (2, 3), "SCH": (1, 2),
               "TXA": (12, 16), "NK1": (33,)}


def with_new_records(text: str, tag: str) -> str:
    """The message naming records of its own: `tag` appended to the first component of every
    repetition of the RECORD_KEYS fields, so that its resources are new ones."""
    seps = parse.read_header(text).separators
    segments = []
    for segment in text.split("\r"):
        fields = segment.split(seps.field)
        for number in RECORD_KEYS.get(fields[0], ()):
            if number < len(fields) and fields[number]:
                reps = []
                for rep in fields[number].split(seps.repetition):
                    first, *rest = rep.split(seps.component)
                    reps.append(seps.component.join([first + tag if first else first, *rest]))
                fields[number] = seps.repetition.join(reps)
        segments.append(seps.field.join(fields))
    return "\r".join(segments)


def shared_resources(texts: list[str]) -> list[str]:
    """Resources other than Practitioners that a new-records copy of a corpus message (with a control
    id of its own) would still share with the message itself: none expected, so that every copy
    creates them. Practitioners are the same people in every copy, as clinicians are in a live feed."""
    shared = []
    for text in texts:
        copy = with_control_id(with_new_records(text, "X1"), "X1").decode("utf-8")
        ids, copy_ids = ({(r["resourceType"], r["id"]) for r in translate(parse.parse(t)).resources
                          if r["resourceType"] != "Practitioner"} for t in (text, copy))
        shared += [f"{parse.read_header(text).control_id}: {rtype}/{rid}" for rtype, rid in sorted(ids & copy_ids)]
    return shared


def parse_cpu_ms(texts: list[str], seconds: float = 3.0) -> float:
    """CPU milliseconds python-hl7 spends parsing one message."""
    return parse_burst(texts, seconds)[1]


def parse_rates(texts: list[str], seconds: float = 5.0) -> dict[str, float]:
    """python-hl7's and hl7apy's parses a second of the messages (each parser's own "<name>_cpu_ms"
    a parse beside it; "<name>_refused": messages it refused, left out of its timing)."""
    import hl7
    from hl7apy.parser import parse_message

    rates: dict[str, float] = {}
    for name, fn in (("python-hl7", lambda t: hl7.parse(t)),
                     ("hl7apy", lambda t: parse_message(t, find_groups=False))):
        accepted = []
        for text in texts:
            try:
                fn(text)
                accepted.append(text)
            except Exception:  # hl7apy refuses segments its version tables lack (e.g. PRT)
                continue
        rates[f"{name}_refused"] = len(texts) - len(accepted)
        rates[name], rates[f"{name}_cpu_ms"] = _timed(fn, accepted, seconds)
    return rates


def create_database(kind: str, workdir: Path) -> tuple[str, str | None]:
    """A fresh, upgraded gateway database: a SQLite file in workdir, or a PostgreSQL database
    gw_bench_<random> (drop it with drop_database). Returns its URL and the PostgreSQL name."""
    pg_name = None
    if kind == "postgresql":
        import psycopg

        pg_name = f"gw_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + pg_name
    else:
        url = f"sqlite:///{workdir / 'hl7bench.sqlite'}"
    env = {**os.environ, "GATEWAY_DATABASE_URL": url, "GATEWAY_INSTANCE_PATH": str(workdir)}
    subprocess.run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    return url, pg_name


def drop_database(pg_name: str | None) -> None:
    """Drop a PostgreSQL database create_database made (nothing for SQLite: its file goes with workdir)."""
    if pg_name:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


class Listener:
    def __init__(self, database: str, workdir: Path, processes: int = 1) -> None:
        self.database = database
        self.workdir = workdir
        self.url, self.pg_name = create_database(database, workdir)
        self.port = _free_port()
        self.env = {**os.environ, "GATEWAY_DATABASE_URL": self.url, "GATEWAY_MLLP_PORT": str(self.port),
                    "GATEWAY_INSTANCE_PATH": str(workdir)}
        extra = ["--processes", str(processes)]
        self.process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "mllp", *extra], env=self.env,
                                        stdout=(workdir / "mllp.log").open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the MLLP listener did not start")

    def pids(self) -> list[int]:
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the listener, its worker processes and, on PostgreSQL,
        the server's backends serving the benchmark's database (they do the pipeline's SQL work)."""
        return tree_cpu(self.process.pid, self.pg_name or "")

    def rss_mb(self) -> float:
        """Resident memory of the listener and its worker processes together."""
        total = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        drop_database(self.pg_name)


def write_results(name: str, results: dict[str, Any]) -> None:
    """Write a run's results to bench/results/<name>-<time>.json and say where."""
    out = ROOT / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out.relative_to(ROOT)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_stream(port: int, payloads: list[bytes], latencies: list[float] | None = None,
                pace: float | None = None, deadline: float | None = None) -> tuple[int, int]:
    """Send one after another on one connection; returns (ACKed, not AA)."""
    acked = bad = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        deframer = Deframer()
        next_at = time.perf_counter()
        for payload in payloads:
            if deadline and time.perf_counter() > deadline:
                break
            if pace:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_at += pace
            sent = time.perf_counter()
            sock.sendall(frame(payload))
            acks: list[bytes] = []
            while not acks:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("listener closed the connection")
                acks = deframer.feed(data)
            if latencies is not None:
                latencies.append((time.perf_counter() - sent) * 1000)
            acked += 1
            if b"|AA|" not in acks[0] and b"|CA|" not in acks[0]:
                bad += 1
    return acked, bad


def run_connections(port: int, batches: list[list[bytes]], max_seconds: float,
                    listener: Listener | None = None) -> dict[str, Any]:
    results: list[tuple[int, int]] = [(0, 0)] * len(batches)
    cpu_before = listener.cpu_seconds() if listener else 0.0
    deadline = time.perf_counter() + max_seconds

    def worker(i: int) -> None:
        results[i] = send_stream(port, batches[i], deadline=deadline)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    acked = sum(r[0] for r in results)
    phase = {"messages": acked, "not_aa": sum(r[1] for r in results), "seconds": round(elapsed, 2),
             "messages_per_s": round(acked / elapsed, 1)}
    if listener and acked:
        phase["listener_cpu_ms_per_message"] = round((listener.cpu_seconds() - cpu_before) * 1000 / acked, 2)
    return phase


def parse_burst(texts: list[str], seconds: float) -> tuple[float, float]:
    """python-hl7 parsing the messages for `seconds`: (parses a second, CPU milliseconds a parse)."""
    import hl7

    return _timed(hl7.parse, texts, seconds)


def _timed(work: Callable[[str], Any], texts: list[str], seconds: float) -> tuple[float, float]:
    """`work` run over the messages, round and round, for `seconds`: (runs a second, CPU
    milliseconds a run)."""
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        work(texts[done % len(texts)])
        done += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return done / elapsed, cpu * 1000 / done


def run_sliced(port: int, batches: list[list[bytes]], max_seconds: float, listener: Listener,
               texts: list[str], slices: int, burst_seconds: float) -> dict[str, Any]:
    """run_connections in `slices` parts, with a python-hl7 parse burst before each part and after
    the last: each part is set against the parse speed measured on either side of it, so that the
    machine's speed, which other work moves by a third within minutes, is the same on both sides of
    a ratio. vs_python_hl7_parse is the time python-hl7 took (at those speeds) to merely parse the
    phase's messages over the time the pipeline took for them; cpu_vs_python_hl7_parse the same
    with CPU time. The listener idles during a burst; the pauses are not counted."""
    slices = max(1, min(slices, min(len(b) for b in batches)))
    bursts = [parse_burst(texts, burst_seconds)]
    parts: list[dict[str, Any]] = []
    deadline = time.perf_counter() + max_seconds
    for k in range(slices):
        share = [b[len(b) * k // slices:len(b) * (k + 1) // slices] for b in batches]
        parts.append(run_connections(port, share, max(deadline - time.perf_counter(), 0.0), listener))
        bursts.append(parse_burst(texts, burst_seconds))
    acked = sum(p["messages"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    parse_seconds = parse_cpu = listener_cpu = 0.0
    for k, part in enumerate(parts):
        (rate_before, cpu_before), (rate_after, cpu_after) = bursts[k], bursts[k + 1]
        parse_seconds += part["messages"] / ((rate_before + rate_after) / 2)
        parse_cpu += part["messages"] * (cpu_before + cpu_after) / 2
        listener_cpu += part.get("listener_cpu_ms_per_message", 0.0) * part["messages"]
    phase: dict[str, Any] = {
        "messages": acked, "not_aa": sum(p["not_aa"] for p in parts), "seconds": round(seconds, 2),
        "messages_per_s": round(acked / seconds, 1) if seconds else 0.0, "slices": slices,
        "python_hl7_parses_per_s": [round(rate, 1) for rate, _ in bursts],
        "vs_python_hl7_parse": round(parse_seconds / seconds, 2) if seconds else 0.0}
    if acked:
        phase["listener_cpu_ms_per_message"] = round(listener_cpu / acked, 2)
        phase["python_hl7_cpu_ms"] = round(parse_cpu / acked, 2)
        phase["cpu_vs_python_hl7_parse"] = round(parse_cpu / listener_cpu, 2) if listener_cpu else 0.0
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="messages per throughput phase")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--memory", type=int, default=0, help="messages for the memory phase (e.g. 100000)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="cap per phase")
    parser.add_argument("--slices", type=int, default=10,
                        help="parts of each throughput phase; python-hl7 parses before each and after the last")
    parser.add_argument("--burst-seconds", type=float, default=1.0, help="length of each parse burst")
    parser.add_argument("--processes", type=int, default=0,
                        help="listener processes (gateway mllp --processes): connections are spread over them; "
                             "0, as the gateway's default, one per CPU")
    args = parser.parse_args()

    corpus = in_scope_messages()
    texts = [t for t, _ in corpus]
    resources_per_message = sum(n for _, n in corpus) / len(corpus)
    print(f"{len(corpus)} in-scope corpus messages, {resources_per_message:.1f} resources each on average")
    from gateway.compiled import summary

    print(f"modules: {summary()}", flush=True)
    print("baseline: parsing the same messages ...", flush=True)
    baseline = parse_rates(texts)
    parse_cpu = baseline["python-hl7_cpu_ms"]
    for name in ("python-hl7", "hl7apy"):
        refused = int(baseline[f"{name}_refused"])
        note = f", refused {refused} of {len(texts)}" if refused else ""
        print(f"  {name:<11} {baseline[name]:9.1f} messages/s (parse only{note})")

    run_id = uuid.uuid4().hex[:8]

    def payloads(prefix: str, count: int, new_records: bool = False) -> list[bytes]:
        def text(i: int) -> str:
            original = texts[i % len(texts)]
            return with_new_records(original, "N" + prefix.replace("-", "x") + str(i)) if new_records else original

        return [with_control_id(text(i), f"{run_id}{prefix}{i}") for i in range(count)]

    shared = shared_resources(texts)
    if shared:
        print(f"WARNING: new-data copies still share {len(shared)} resources with the corpus, e.g. {shared[0]}")

    args.processes = listener_processes(args.processes)
    results: dict[str, Any] = {"database": args.database, "processes": args.processes, "corpus_messages": len(corpus),
                               "resources_per_message": round(resources_per_message, 2),
                               "parse_only": {k: round(v, 1) for k, v in baseline.items()}}
    with tempfile.TemporaryDirectory(prefix="hl7-bench-") as tmp:
        listener = Listener(args.database, Path(tmp), args.processes)
        try:
            # warm-up: imports, compiled maps; four connections so that every listener process warms
            run_connections(listener.port, [payloads(f"w{c}-", 20) for c in range(4)], args.max_seconds)
            print(f"one connection: {args.messages} messages ...", flush=True)
            def phase(batches: list[list[bytes]]) -> dict[str, Any]:
                return run_sliced(listener.port, batches, args.max_seconds, listener, texts, args.slices,
                                  args.burst_seconds)

            one = phase([payloads("a", args.messages)])
            print(f"four connections: {args.messages} messages ...", flush=True)
            per = args.messages // 4
            four = phase([payloads(f"b{c}-", per) for c in range(4)])
            print(f"new data, one connection: {args.messages} messages ...", flush=True)
            one_new = phase([payloads("c", args.messages, True)])
            print(f"new data, four connections: {args.messages} messages ...", flush=True)
            four_new = phase([payloads(f"d{c}-", per, True) for c in range(4)])
            print("baseline again ...", flush=True)
            after = parse_rates(texts, seconds=3.0)
            baseline["python-hl7_before"], baseline["python-hl7_after"] = baseline["python-hl7"], after["python-hl7"]
            baseline["python-hl7"] = (baseline["python-hl7"] + after["python-hl7"]) / 2
            results["parse_only"] = {k: round(v, 2) for k, v in baseline.items()}
            for done in (one, four, one_new, four_new):
                done["resources_per_s"] = round(done["messages_per_s"] * resources_per_message, 1)
            print(f"steady 100 messages/s for {args.latency_seconds:.0f}s ...", flush=True)
            latencies: list[float] = []
            send_stream(listener.port, payloads("l", int(args.latency_seconds * 100)), latencies, pace=0.01)
            latencies.sort()
            latency = {"messages": len(latencies), "p50_ms": round(statistics.median(latencies), 2),
                       "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2)}
            memory: list[dict[str, float]] = []
            if args.memory:
                step = max(args.memory // 10, 1)
                print(f"memory over {args.memory} messages ...", flush=True)
                for k in range(10):
                    send_stream(listener.port, payloads(f"m{k}-", step))
                    memory.append({"messages": (k + 1) * step, "rss_mb": round(listener.rss_mb(), 1)})
                    print(f"  {(k + 1) * step:>7} messages: {memory[-1]['rss_mb']} MB", flush=True)
        except BaseException:
            log = Path(tmp) / "mllp.log"
            if log.exists():  # the listener's side of what went wrong, before the temp dir goes
                print("listener log (last 40 lines):", *log.read_text(errors="replace").splitlines()[-40:],
                      sep="\n", file=sys.stderr)
            raise
        finally:
            listener.close()
    results.update({"one_connection": one, "four_connections": four, "one_connection_new_data": one_new,
                    "four_connections_new_data": four_new, "latency_at_100_per_s": latency,
                    "memory": memory})
    print()
    print(f"python-hl7 parse: {baseline['python-hl7_before']:.1f}/s before, {baseline['python-hl7_after']:.1f}/s after "
          f"the throughput phases; {parse_cpu:.2f} ms CPU per message")
    print("each phase is set against python-hl7 parsing between its slices (the range of its parses/s):")
    print(f"{'phase':<22}{'msg/s':>10}{'res/s':>10}{'python-hl7/s':>16}{'vs parse':>10}{'CPU ms/msg':>12}"
          f"{'parse ms':>10}{'CPU ratio':>11}")
    for name, done in (("one connection", one), ("four connections", four), ("new data, one", one_new),
                       ("new data, four", four_new)):
        rates = done["python_hl7_parses_per_s"]
        print(f"{name:<22}{done['messages_per_s']:>10}{done['resources_per_s']:>10}"
              f"{f'{min(rates):.0f}-{max(rates):.0f}':>16}{done['vs_python_hl7_parse']:>9}x"
              f"{done.get('listener_cpu_ms_per_message', 0):>12}{done.get('python_hl7_cpu_ms', 0):>10}"
              f"{done.get('cpu_vs_python_hl7_parse', 0):>10}x   (not AA: {done['not_aa']})")
    print(f"ACK latency at 100/s: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    if memory:
        print(f"RSS: {memory[0]['rss_mb']} MB after {memory[0]['messages']}, "
              f"{memory[-1]['rss_mb']} MB after {memory[-1]['messages']}")
    targets = {
        "one connection >= 1.0x python-hl7 parse": one["vs_python_hl7_parse"] >= 1.0,
        "four connections >= 2.0x python-hl7 parse": four["vs_python_hl7_parse"] >= 2.0,
        "p99 ACK latency <= 50 ms": latency["p99_ms"] <= 50,
    }
    for label, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {label}")
    results["targets"] = {k: ("PASS" if v else "MISS") for k, v in targets.items()}
    write_results("hl7_ingest", results)


if __name__ == "__main__":
    main()
