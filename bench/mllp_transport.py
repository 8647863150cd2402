"""What the MLLP listener's transport costs a message, apart from handling it.

    python bench/mllp_transport.py [--messages 20000] [--rounds 3]

The gateway's listener (gateway.hl7.mllp.MLLPServer: asyncio reads and writes, each message handed
to a handler thread so that the event loop goes on serving other connections) runs in a child
process with a handler that returns a prepared ACK at once. The benchmark sends the in-scope corpus
messages, each with a unique control id, over one connection, each after the previous ACK came
back, and reads the child's CPU time per message. Beside it, in alternate rounds, the least a
listener can do in Python: a thread per connection with blocking reads, the same Deframer, and the
same ACK written back. Both are set against python-hl7's CPU time per parse of the same messages,
measured between the rounds. hl7_ingest.py's listener CPU a message holds the first of these.
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
    if kind == "asyncio":
        start_in_thread(_answer, "127.0.0.1", port)
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
    parser.add_argument("--serve", choices=["asyncio", "threads"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    texts = [text for text, _ in in_scope_messages()]
    payloads = [with_control_id(texts[i % len(texts)], f"T{i}") for i in range(args.messages)]
    figures: dict[str, list[float]] = {"asyncio": [], "threads": [], "parse": []}
    for k in range(args.rounds):
        figures["parse"].append(parse_cpu_ms(texts, 2.0))
        for kind in ("asyncio", "threads"):
            figures[kind].append(listener_cpu_ms(kind, payloads))
        print(f"round {k + 1}/{args.rounds}: gateway listener {figures['asyncio'][-1]:.3f} ms, thread per "
              f"connection {figures['threads'][-1]:.3f} ms, python-hl7 parse {figures['parse'][-1]:.2f} ms "
              "of CPU a message", flush=True)
    asyncio_ms, threads_ms, parse_ms = (statistics.median(figures[k]) for k in ("asyncio", "threads", "parse"))
    print(f"\nmedians over {args.rounds} rounds of {args.messages} messages on one connection:")
    print(f"  gateway listener (asyncio, handler threads)  {asyncio_ms:.3f} ms CPU a message "
          f"({asyncio_ms / parse_ms:.1%} of a python-hl7 parse)")
    print(f"  thread per connection, blocking reads        {threads_ms:.3f} ms ({threads_ms / parse_ms:.1%})")
    print(f"  python-hl7 parse                             {parse_ms:.2f} ms")


if __name__ == "__main__":
    main()
