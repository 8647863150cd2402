"""MLLP over real TCP sockets on 127.0.0.1: framing, persistence, concurrency, limits, bad clients."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.hl7 import mllp
from gateway.hl7.mllp import Deframer, FrameTooLarge, Oversized, frame

MiB = 1024 * 1024
ServerFactory = Callable[..., mllp.ServerThread]


def echo(message: bytes) -> bytes:
    return b"ACK:" + message[:40]


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    started: list[mllp.ServerThread] = []

    def start(handler: mllp.Handler = echo, **options: float | int | None) -> mllp.ServerThread:
        server = mllp.start_in_thread(handler, "127.0.0.1", 0, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace_seconds=2)


def connect(server: mllp.ServerThread, timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_frames(sock: socket.socket, count: int, deframer: Deframer | None = None) -> list[bytes]:
    deframer = deframer or Deframer()
    frames: list[bytes] = []
    while len(frames) < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        frames += deframer.feed(chunk)
    return frames


def wait_closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes the connection (EOF or reset)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - started


def still_serving(server: mllp.ServerThread) -> bool:
    return mllp.send_messages("127.0.0.1", server.port, [b"MSH|ping"], timeout=5) == [[b"ACK:MSH|ping"]]


# --- the happy paths ---


def test_echo_and_the_client(start_server: ServerFactory) -> None:
    server = start_server()
    assert server.port > 0
    assert mllp.send_messages("127.0.0.1", server.port, [b"MSH|1", b"MSH|2"], timeout=5) == [[b"ACK:MSH|1"],
                                                                                             [b"ACK:MSH|2"]]


def test_one_persistent_connection_carries_100_messages_in_order(start_server: ServerFactory) -> None:
    server = start_server()
    with connect(server) as sock:
        deframer = Deframer()
        for n in range(100):
            sock.sendall(frame(b"MSH|%d" % n))
            assert read_frames(sock, 1, deframer) == [b"ACK:MSH|%d" % n]
    messages = [b"MSH|%d" % n for n in range(100)]
    assert mllp.send_messages("127.0.0.1", server.port, messages, timeout=5) == [[b"ACK:" + m] for m in messages]


def test_four_connections_are_served_at_once(start_server: ServerFactory) -> None:
    def slow_echo(message: bytes) -> bytes:
        time.sleep(0.05)
        return echo(message)

    server = start_server(slow_echo)
    results: dict[int, list[list[bytes]]] = {}

    def client(number: int) -> None:
        messages = [b"MSH|%d-%d" % (number, n) for n in range(10)]
        results[number] = mllp.send_messages("127.0.0.1", server.port, messages, timeout=10)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert {n: len(acks) for n, acks in results.items()} == {0: 10, 1: 10, 2: 10, 3: 10}
    assert results[2][9] == [b"ACK:MSH|2-9"]
    assert elapsed < 1.6, f"4 x 10 messages of 50 ms took {elapsed:.2f} s: connections were not concurrent"


@pytest.mark.parametrize("handlers", [1, 3])
def test_max_workers_is_how_many_messages_are_handled_at_once(start_server: ServerFactory, handlers: int) -> None:
    """`GATEWAY_MLLP_HANDLERS`: with one, a process's connections take turns (the processes are what
    run in parallel); every connection is still read and answered, in its order."""
    lock = threading.Lock()
    busy = [0]
    most = [0]

    def counting(message: bytes) -> bytes:
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1
        return echo(message)

    server = start_server(counting, max_workers=handlers)
    results: dict[int, list[list[bytes]]] = {}

    def client(number: int) -> None:
        results[number] = mllp.send_messages("127.0.0.1", server.port, [b"MSH|%d-%d" % (number, n) for n in range(8)])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {n: [ack for (ack,) in acks] for n, acks in results.items()} == {
        n: [b"ACK:MSH|%d-%d" % (n, m) for m in range(8)] for n in range(3)}
    assert most[0] == handlers


@pytest.mark.parametrize("handlers", [1, 3])
def test_one_handler_runs_on_the_event_loop_and_several_on_handler_threads(start_server: ServerFactory,
                                                                           handlers: int) -> None:
    """One handler a process (SQLite's default) needs no hand-over to a thread and back: the listener
    then handles each message on its event loop's thread."""
    threads: set[str] = set()

    def where(message: bytes) -> bytes:
        threads.add(threading.current_thread().name)
        return echo(message)

    server = start_server(where, max_workers=handlers)
    assert len(mllp.send_messages("127.0.0.1", server.port, [b"MSH|%d" % n for n in range(5)])) == 5
    assert len(threads) == 1
    assert threads.pop().startswith("mllp-handler") == (handlers > 1)


def test_handlers_per_listener_process_follow_the_database() -> None:
    from sqlalchemy import create_engine

    from gateway.cli import listener_handlers

    sqlite, postgres = create_engine("sqlite://"), create_engine("postgresql+psycopg://u@127.0.0.1:1/none")
    assert (listener_handlers(0, sqlite), listener_handlers(0, postgres)) == (1, 4)
    assert (listener_handlers(3, sqlite), listener_handlers(2, postgres)) == (3, 2)


def test_bytes_before_the_start_block_are_dropped(start_server: ServerFactory) -> None:
    server = start_server()
    with connect(server) as sock:
        sock.sendall(b"noise\r\n\x1c\r\x00" + frame(b"MSH|1") + b"between" + frame(b"MSH|2"))
        assert read_frames(sock, 2) == [b"ACK:MSH|1", b"ACK:MSH|2"]


def test_a_message_split_over_many_writes_and_many_messages_in_one_write(start_server: ServerFactory) -> None:
    server = start_server()
    with connect(server) as sock:
        data = frame(b"MSH|" + b"x" * 30)
        for offset in range(0, len(data), 3):
            sock.sendall(data[offset:offset + 3])
            time.sleep(0.002)
        assert read_frames(sock, 1) == [b"ACK:MSH|" + b"x" * 30]
        sock.sendall(b"".join(frame(b"MSH|%d" % n) for n in range(5)))
        assert read_frames(sock, 5) == [b"ACK:MSH|%d" % n for n in range(5)]


def test_a_20_mb_message_is_accepted_under_a_32_mb_limit(start_server: ServerFactory) -> None:
    server = start_server(lambda message: b"%d" % len(message), max_message_bytes=32 * MiB)
    message = b"MSH|" + b"A" * (20 * MiB)
    assert mllp.send_messages("127.0.0.1", server.port, [message], timeout=20) == [[b"%d" % len(message)]]


# --- bad clients ---


def test_a_50_mb_frame_over_a_16_mb_limit_closes_that_connection_only(
        start_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.hl7.mllp")
    server = start_server(max_message_bytes=16 * MiB)
    other = connect(server)
    with connect(server) as sock:
        chunk = b"B" * MiB
        sent = 0
        with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            sock.sendall(b"\x0bMSH|")
            while sent < 50 * MiB:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\x1c\r")
            read_frames(sock, 1)
        assert sent < 40 * MiB
    assert "frame exceeds the maximum of 16777216 bytes" in caplog.text
    other.sendall(frame(b"MSH|other"))
    assert read_frames(other, 1) == [b"ACK:MSH|other"]
    other.close()
    assert still_serving(server)


def test_with_an_oversized_handler_a_50_mb_frame_is_answered_from_its_head_and_the_connection_goes_on(
        start_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.hl7.mllp")
    seen: list[tuple[bytes, int]] = []

    def oversized(head: bytes, size: int) -> bytes:
        seen.append((head[:20], len(head)))
        return b"TOO LARGE:%d" % size

    server = start_server(oversized=oversized, max_message_bytes=16 * MiB)
    with connect(server, timeout=30) as sock:
        sock.sendall(frame(b"MSH|before"))
        assert read_frames(sock, 1) == [b"ACK:MSH|before"]
        sock.sendall(b"\x0bMSH|big|")
        for _ in range(50):
            sock.sendall(b"B" * MiB)
        sock.sendall(b"\x1c\r" + frame(b"MSH|after"))
        size = len(b"MSH|big|") + 50 * MiB
        assert read_frames(sock, 2) == [b"TOO LARGE:%d" % size, b"ACK:MSH|after"]
    assert seen == [(b"MSH|big|" + b"B" * 12, 16 * MiB)]
    assert f"a message of {size} bytes from 127.0.0.1" in caplog.text
    assert still_serving(server)


@pytest.mark.parametrize("handlers", [None, 1])  # a pool of handler threads; the handler on the loop
def test_a_sender_stalling_mid_frame_is_disconnected_after_the_read_timeout(
        start_server: ServerFactory, caplog: pytest.LogCaptureFixture, handlers: int | None) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.hl7.mllp")
    server = start_server(read_timeout=0.3, max_workers=handlers)
    with connect(server) as sock:
        sock.sendall(frame(b"MSH|complete"))
        assert read_frames(sock, 1) == [b"ACK:MSH|complete"]
        time.sleep(0.5)  # idle between messages is not a stall
        sock.sendall(b"\x0bMSH|half a mess")
        assert 0.2 < wait_closed_by_server(sock, 5) < 3
    assert "no bytes for 0.3 s in the middle of a frame" in caplog.text
    assert still_serving(server)


def test_a_client_disconnecting_mid_frame(start_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.hl7.mllp")
    handled: list[bytes] = []
    server = start_server(lambda message: handled.append(message) or echo(message))
    with connect(server) as sock:
        sock.sendall(b"\x0bMSH|truncated")
    deadline = time.monotonic() + 3
    while "closed mid-frame" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "closed mid-frame" in caplog.text
    assert handled == []
    assert still_serving(server)


def test_garbage_and_a_handler_that_refuses_close_the_connection(start_server: ServerFactory) -> None:
    server = start_server(lambda message: echo(message) if message.startswith(b"MSH") else None, read_timeout=0.3)
    with connect(server) as sock:
        sock.sendall(bytes(range(256)) * 8 + frame(bytes(range(256)).replace(b"\x0b", b"")))
        assert wait_closed_by_server(sock, 5) < 3  # a frame of garbage: the handler refuses it
    with connect(server) as sock:
        sock.sendall(bytes(range(256)) * 8)  # start blocks but never an end block
        assert wait_closed_by_server(sock, 5) < 3  # a stall mid-frame
    with pytest.raises(ConnectionError):
        mllp.send_messages("127.0.0.1", server.port, [b"not hl7"], timeout=5)
    assert still_serving(server)


@pytest.mark.parametrize("handlers", [None, 1])
def test_a_handler_that_raises_costs_only_its_connection(start_server: ServerFactory, handlers: int | None) -> None:
    def fragile(message: bytes) -> bytes:
        if message == b"boom":
            raise RuntimeError("handler bug")
        return echo(message)

    server = start_server(fragile, max_workers=handlers)
    with pytest.raises(ConnectionError):
        mllp.send_messages("127.0.0.1", server.port, [b"boom"], timeout=5)
    assert still_serving(server)


def test_a_client_that_never_reads_its_acks_is_cut_off(
        start_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.hl7.mllp")
    server = start_server(lambda message: b"A" * MiB if message == b"MSH|flood" else echo(message),
                          write_timeout=0.3)
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for _ in range(200):
                sock.sendall(frame(b"MSH|flood"))
        except OSError:
            pass  # the server may already have cut us off
        deadline = time.monotonic() + 5
        while "has not read its ACK" not in caplog.text and time.monotonic() < deadline:
            assert still_serving(server)
            time.sleep(0.05)
    assert "has not read its ACK" in caplog.text
    assert still_serving(server)


def test_the_client_reports_a_missing_ack_as_a_timeout(start_server: ServerFactory) -> None:
    server = start_server(lambda message: time.sleep(1) or b"late")
    with pytest.raises(TimeoutError):
        mllp.send_messages("127.0.0.1", server.port, [b"MSH|1"], timeout=0.2)


def test_a_reply_coming_after_its_grace_goes_to_its_own_message_not_the_next(start_server: ServerFactory) -> None:
    """MSH-16 ER leaves a reply optional: the client waits `grace` for it, then sends the next message.
    When the reply comes later (a loaded receiver), its MSA-2 says whose it is."""

    def header(control: str, modes: str = "") -> bytes:
        return f"MSH|^~\\&|EHR|RIV|GW|RIV|20261101083000||ADT^A01|{control}|P|2.5.1{modes}\r".encode()

    def answer(message: bytes) -> bytes:
        control = message.split(b"|")[9]
        if control == b"SLOW":
            time.sleep(0.6)  # past the client's grace: the next message is sent meanwhile
            return b"MSH|^~\\&|GW|RIV|EHR|RIV|20261101083001||ACK|A1|P|2.5.1\rMSA|AR|SLOW\r"
        return b"MSH|^~\\&|GW|RIV|EHR|RIV|20261101083001||ACK|A2|P|2.5.1\rMSA|AA|" + control + b"\r"

    server = start_server(answer)
    messages = [header("SLOW", "|||NE|ER"), header("NEXT"), header("LAST")]
    replies = mllp.send_messages("127.0.0.1", server.port, messages, timeout=5, grace=0.1)
    assert [[mllp.acknowledged_id(r) for r in mine] for mine in replies] == [["SLOW"], ["NEXT"], ["LAST"]]
    assert mllp.expected_replies(messages[0]) == (0, 1, "SLOW")
    assert mllp.acknowledged_id(b"MSH|^~\\&|GW\nMSA|AA|X1") == "X1" and mllp.acknowledged_id(b"ACK:MSH|1") is None


# --- shutdown ---


@pytest.mark.parametrize("handlers", [None, 1])
def test_graceful_shutdown_finishes_the_message_in_flight(start_server: ServerFactory, handlers: int | None) -> None:
    handling = threading.Event()

    def slow(message: bytes) -> bytes:
        handling.set()
        time.sleep(0.5)
        return b"ACK:" + message

    server = start_server(slow, max_workers=handlers)
    idle = connect(server)
    acks: list[bytes] = []
    client = threading.Thread(target=lambda: acks.extend(
        ack for (ack,) in mllp.send_messages("127.0.0.1", server.port, [b"MSH|slow"], timeout=5)))
    client.start()
    assert handling.wait(5)
    started = time.monotonic()
    server.stop(grace_seconds=5)
    client.join(5)
    assert acks == [b"ACK:MSH|slow"]
    assert time.monotonic() - started < 2
    assert wait_closed_by_server(idle, 2) < 2  # an idle connection is simply closed
    idle.close()
    with pytest.raises(OSError):
        mllp.send_messages("127.0.0.1", server.port, [b"MSH|late"], timeout=1)


def test_shutdown_waits_no_longer_than_the_grace_period(start_server: ServerFactory) -> None:
    handling = threading.Event()
    server = start_server(lambda message: handling.set() or time.sleep(2) or b"too late")
    client = threading.Thread(target=_send_ignoring_errors, args=(server.port,))
    client.start()
    assert handling.wait(5)
    started = time.monotonic()
    server.stop(grace_seconds=0.2)
    assert time.monotonic() - started < 1.5
    client.join(5)


def _send_ignoring_errors(port: int) -> None:
    with contextlib.suppress(OSError):
        mllp.send_messages("127.0.0.1", port, [b"MSH|slow"], timeout=5)


def test_a_taken_port_is_reported(start_server: ServerFactory) -> None:
    server = start_server()
    with pytest.raises(OSError):
        mllp.start_in_thread(echo, "127.0.0.1", server.port)


# --- the deframer ---


def test_deframer_limits_what_it_buffers() -> None:
    deframer = Deframer(max_size=1000)
    deframer.feed(b"\x0b" + b"x" * 1000)
    with pytest.raises(FrameTooLarge):
        deframer.feed(b"x")
    ok = Deframer(max_size=1000)
    assert ok.feed(frame(b"y" * 1000)) == [b"y" * 1000]
    with pytest.raises(FrameTooLarge):
        Deframer(max_size=1000).feed(frame(b"y" * 1001))


def test_a_frame_of_exactly_the_maximum_is_delivered_when_its_end_block_straddles_two_reads() -> None:
    deframer = Deframer(max_size=10)
    assert deframer.feed(b"\x0b" + b"x" * 10 + b"\x1c") == []
    assert deframer.feed(b"\r") == [b"x" * 10]
    with pytest.raises(FrameTooLarge):
        Deframer(max_size=10).feed(b"\x0b" + b"x" * 10 + b"\x1cx")  # a 0x1C that was frame content


def test_a_deframer_keeping_heads_delivers_an_oversized_frame_and_holds_at_most_the_maximum_plus_a_read() -> None:
    deframer = Deframer(max_size=1000, keep_heads=True)
    assert deframer.feed(b"\x0bMSH|" + b"x" * 2000) == []
    for _ in range(100):
        assert deframer.feed(b"y" * 4096) == []
        assert len(deframer._buffer) <= 4096  # the head is kept apart; the rest is dropped as it comes
    assert deframer.pending == 4 + 2000 + 100 * 4096
    assert deframer.feed(b"z\x1c\r" + frame(b"MSH|next")) == [
        Oversized(b"MSH|" + b"x" * 996, 4 + 2000 + 100 * 4096 + 1), b"MSH|next"]
    assert not deframer.in_frame and deframer.discarded == 0


def test_deframer_restarts_on_a_new_start_block_and_counts_what_it_drops() -> None:
    deframer = Deframer()
    assert deframer.feed(b"junk\x0babandoned\x0bMSH|1\x1c") == []
    assert deframer.in_frame and deframer.pending == 6
    assert deframer.feed(b"\rtail") == [b"MSH|1"]
    assert deframer.discarded == len(b"junk") + len(b"abandoned") + len(b"tail")
    assert not deframer.in_frame


def _reference_frames(stream: bytes) -> list[bytes]:
    """What a correct deframer yields: each 0x0B, then the shortest run without 0x0B up to 0x1C 0x0D."""
    return re.findall(rb"\x0b([^\x0b]*?)\x1c\r", stream, flags=re.DOTALL)


def _chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


_BYTES_NEAR_FRAMING = st.binary(max_size=400) | st.lists(
    st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\x1c\r", b"MSH|", b"x", b"\x00"]), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=1000)
@given(_BYTES_NEAR_FRAMING, st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_deframer_never_fails_and_matches_the_reference_in_any_chunking(stream: bytes, cuts: list[int]) -> None:
    deframer = Deframer()
    frames = [f for piece in _chunked(stream, cuts) for f in deframer.feed(piece)]
    assert frames == _reference_frames(stream)


_PAYLOAD = st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c\r", b"\x1c"))
_NOISE = st.binary(max_size=50).map(lambda b: b.replace(b"\x0b", b""))


@settings(max_examples=300, deadline=1000)
@given(st.lists(st.tuples(_NOISE, _PAYLOAD), max_size=10), st.lists(st.integers(0, 3000), max_size=30))
def test_every_complete_frame_is_delivered_exactly_once(pairs: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(noise + frame(payload) for noise, payload in pairs) + b"\x0bunfinished"
    deframer = Deframer()
    frames = [f for piece in _chunked(stream, cuts) for f in deframer.feed(piece)]
    assert frames == [payload for _, payload in pairs]
    assert deframer.in_frame and deframer.pending == len(b"unfinished")


@settings(max_examples=200, deadline=1000)
@given(st.lists(st.integers(0, 300), max_size=8), st.integers(1, 200))
def test_deframer_size_limit_is_exact(sizes: list[int], limit: int) -> None:
    deframer = Deframer(max_size=limit)
    delivered: list[bytes] = []
    for size in sizes:
        try:
            delivered += deframer.feed(frame(b"z" * size))
        except FrameTooLarge:
            assert size > limit
            return
        assert size <= limit
    assert [len(f) for f in delivered] == sizes


@settings(max_examples=300, deadline=1000)
@given(st.lists(st.tuples(_NOISE, _PAYLOAD), max_size=8), st.integers(0, 120),
       st.lists(st.integers(0, 2000), max_size=30))
def test_a_deframer_keeping_heads_yields_what_an_unlimited_one_does_with_long_frames_cut_to_their_heads(
        pairs: list[tuple[bytes, bytes]], limit: int, cuts: list[int]) -> None:
    stream = b"".join(noise + frame(payload) for noise, payload in pairs) + b"\x0bunfinished\x1c"
    kept, unlimited = Deframer(max_size=limit, keep_heads=True), Deframer(max_size=1 << 30)
    pieces = _chunked(stream, cuts)
    frames = [f for piece in pieces for f in kept.feed(piece)]
    assert frames == [f if len(f) <= limit else Oversized(f[:limit], len(f))
                      for piece in pieces for f in unlimited.feed(piece)]
    assert (kept.in_frame, kept.pending, kept.discarded) == (unlimited.in_frame, unlimited.pending,
                                                            unlimited.discarded)


def test_connections_are_spread_over_worker_processes_and_each_keeps_its_order(
        start_server: ServerFactory) -> None:
    """`gateway mllp --processes N`: the listener hands accepted connections (as descriptors, before
    reading a byte) to the worker with the fewest open; here the worker is a second server in this
    process, reached over the same kind of channel."""
    ours, theirs = socket.socketpair()
    start_server(lambda m: b"worker:" + m[:40], handoff=theirs)
    listener = start_server(lambda m: b"listener:" + m[:40], workers=[ours])
    socks = [connect(listener) for _ in range(4)]
    time.sleep(0.3)
    served_by: list[str] = []
    for round_ in range(5):
        for number, sock in enumerate(socks):
            sock.sendall(frame(f"MSH|{number}-{round_}".encode()))
        for number, sock in enumerate(socks):
            (reply,) = read_frames(sock, 1)
            who, _, echoed = reply.partition(b":")
            assert echoed == f"MSH|{number}-{round_}".encode()
            if round_ == 0:
                served_by.append(who.decode())
    assert sorted(served_by) == ["listener", "listener", "worker", "worker"]
    for sock in socks:
        sock.close()
    # closed connections are counted back: the next two go one to each again
    time.sleep(0.3)
    later = [connect(listener) for _ in range(2)]
    time.sleep(0.3)
    for sock in later:
        sock.sendall(frame(b"MSH|again"))
    assert sorted(read_frames(sock, 1)[0].split(b":")[0].decode() for sock in later) == ["listener", "worker"]
    for sock in later:
        sock.close()
