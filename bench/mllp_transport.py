"""What the MLLP listener's transport costs a message, apart from handling it.

    python bench/mllp_transport.py [--messages 20000] [--rounds 3]

The gateway's listener (gateway.hl7.mllp.MLLPServer: asyncio reads and writes) runs in a child
process with a handler that returns a prepared ACK at once, in both of its ways: with one handler
(SQLite's default), the handler runs on the event loop's thread; with several (PostgreSQL's four),
each message is handed to a handler thread so that the event loop goes on serving other
connections. The benchmark sends the in-scope corpus
messages, each with a unique control id, over one connection, each after the previous ACK came
back, and reads the child's CPU time per message. Beside them, in each round, the least a
listener can do in Python: a thread per connection with blocking reads, the same Deframer, and the
same ACK written back. All are set against python-hl7's CPU time per parse of the same messages,
measured between the rounds. hl7_ingest.py's listener CPU a message holds the gateway's figure for
its database.
Loopback only; nothing is kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hl7_ingest import _free_port, in_scope_messages, parse_cpu_ms, send_stream, with_control_id  # noqa: E402

from gateway.hl7.mllp import Deframer, frame, start_in_thread  # noqa: E402

ACK = b"MSH|^~\\&|GATEWAY|HOSPITAL|EHR|HOSPITAL|20261203120000||ACK^A01^ACK|1|P|2.5\rMSA|AA|1\r"


# The gateway listener's two ways, by handlers a process (MLLPServer's max_workers).
KINDS = {"asyncio-one": 1, "asyncio-pool": 4}
LABELS = {"asyncio-one": "gateway listener, one handler (on the event loop)",
          "asyncio-pool": "gateway listener, four handlers (handler threads)",
          "threads": "thread per connection, blocking reads"}


def _answer(message: bytes) -> list[bytes]:
    return [ACK]


def _serve_threads(port: int) -> None:
    """A thread per connection: blocking reads, the gateway's Deframer, the ACK written back."""
    listening = socket.create_server(("127.0.0.1", port))

    def serve(connection: socket.socket) -> None:
        deframer = Deframer()
        with connection:
            while data := connection.recv(65536):
                for message in deframer.feed(data):
                    connection.sendall(b"".join(frame(reply) for reply in _answer(message)))  # type: ignore[arg-type]

    def accept() -> None:
        while True:
            connection, _ = listening.accept()
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def serve(kind: str, port: int) -> None:
    """The child: listen, say so, print its CPU seconds so far at each SIGUSR1; SIGTERM ends it."""
    if kind.startswith("asyncio"):
        start_in_thread(_answer, "127.0.0.1", port, max_workers=KINDS[kind])
    else:
        _serve_threads(port)
    signal.signal(signal.SIGUSR1, lambda *_: print(f"{sum(os.times()[:2]):.4f}", flush=True))
    print("ready", flush=True)
    while True:
        time.sleep(1)


def listener_cpu_ms(kind: str, payloads: list[bytes], warm_up: int = 500) -> float:
    """CPU milliseconds a message of a `kind` listener serving `payloads` over one connection, after
    `warm_up` of them."""
    port = _free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} listener did not start")

        def cpu_seconds() -> float:
            child.send_signal(signal.SIGUSR1)
            return float(child.stdout.readline())  # type: ignore[union-attr]

        send_stream(port, payloads[:warm_up])
        before = cpu_seconds()
        send_stream(port, payloads[warm_up:])
        return (cpu_seconds() - before) * 1000 / (len(payloads) - warm_up)
    finally:
        child.terminate()
        child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    texts = [text for text, _ in in_scope_messages()]
    payloads = [with_control_id(texts[i % len(texts)], f"T{i}") for i in range(args.messages)]
    kinds = list(LABELS)
    figures: dict[str, list[float]] = {kind: [] for kind in [*kinds, "parse"]}
    for k in range(args.rounds):
        figures["parse"].append(parse_cpu_ms(texts, 2.0))
        for kind in kinds:
            figures[kind].append(listener_cpu_ms(kind, payloads))
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(f"{kind} {figures[kind][-1]:.3f} ms" for kind in kinds)
              + f", python-hl7 parse {figures['parse'][-1]:.2f} ms of CPU a message", flush=True)
    medians = {kind: statistics.median(values) for kind, values in figures.items()}
    print(f"\nmedians over {args.rounds} rounds of {args.messages} messages on one connection:")
    for kind in kinds:
        print(f"  {LABELS[kind]:<52} {medians[kind]:.3f} ms CPU a message "
              f"({medians[kind] / medians['parse']:.1%} of a python-hl7 parse)")
    print(f"  {'python-hl7 parse':<52} {medians['parse']:.2f} ms")


if __name__ == "__main__":
    main()
