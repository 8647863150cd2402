"""MLLP (HL7 minimal lower layer protocol) over asyncio: server, blocking client, framing.

A frame is 0x0B, the message, 0x1C 0x0D. python-hl7's hl7.mllp streams are not used: they read with
StreamReader.readuntil, whose limit is the largest message (64 KiB by default; raising it to 16 MiB
lets one frame buffer twice that), they refuse a block with bytes before the start character instead
of dropping them, and they have no read timeout. The framer here is a small state machine fed with
whatever each read returns, so memory per connection stays at one message plus one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 60.0
READ_CHUNK = 64 * 1024

# A handler answers a message with one reply, several (sent in order), none (an empty list), or None
# to close the connection.
Handler = Callable[[bytes], bytes | list[bytes] | None]
# The same for a message over the maximum size, given its first max_message_bytes and its whole length.
OversizedHandler = Callable[[bytes, int], bytes | list[bytes] | None]


class FrameTooLarge(Exception):
    """A frame grew past the configured maximum before its end block arrived."""


class Oversized(NamedTuple):
    """A frame longer than the maximum, delivered by a Deframer that keeps heads: its first
    max_size bytes (the rest was dropped as it arrived) and how long the whole frame was."""

    head: bytes
    size: int


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


class Deframer:
    """Turns a byte stream into MLLP frames, fed in pieces of any size.

    Bytes outside a frame are dropped (counted in `discarded`). A start block inside a frame means
    the sender gave up on that frame and began a new one, so the unfinished one is dropped too.

    A frame longer than max_size raises FrameTooLarge, or, with keep_heads, is delivered as an
    Oversized: its first max_size bytes are kept, the rest is dropped as it arrives while the end
    block is looked for, so memory stays at one message plus one read however long it goes on, and
    the frames after it are delivered as usual.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_BYTES, keep_heads: bool = False) -> None:
        self.max_size = max_size
        self.keep_heads = keep_heads
        self.discarded = 0
        self._buffer = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of the buffer already searched for an end block
        self._head: bytes | None = None  # the start of the current frame, once it is too long
        self._dropped = 0  # bytes of the current (too long) frame no longer in the buffer

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived: a stall now is a stall mid-frame."""
        return self._in_frame

    @property
    def pending(self) -> int:
        """Bytes of the unfinished frame received so far."""
        return self._dropped + len(self._buffer) if self._in_frame else 0

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        """Add received bytes; returns the frames they complete, in order (an Oversized for a frame
        over max_size with keep_heads). Raises FrameTooLarge without keep_heads."""
        self._buffer += data
        frames: list[bytes | Oversized] = []
        while True:
            if not self._in_frame and not self._enter_frame():
                return frames
            end = self._buffer.find(END_BLOCK, self._scanned)
            restart = self._buffer.find(START_BLOCK, self._scanned, end if end >= 0 else len(self._buffer))
            if restart >= 0:
                self.discarded += self._dropped + restart
                del self._buffer[:restart + 1]
                self._restart_frame()
                continue
            if end < 0:
                self._scanned = max(len(self._buffer) - 1, 0)  # an end block may straddle two reads
                # the frame's bytes so far: all received, but a last 0x1C that may begin the end block
                received = len(self._buffer) - (self._buffer[-1:] == END_BLOCK[:1])
                if self._dropped + received > self.max_size:
                    self._drop_scanned()
                return frames
            size = self._dropped + end
            if size > self.max_size:
                self._drop_scanned(end)  # the end block is now at the start of the buffer
                frames.append(Oversized(self._head or b"", size))
                end = 0
            else:
                frames.append(bytes(self._buffer[:end]))
            del self._buffer[:end + len(END_BLOCK)]
            self._in_frame = False

    def _enter_frame(self) -> bool:
        start = self._buffer.find(START_BLOCK)
        if start < 0:
            self.discarded += len(self._buffer)
            self._buffer.clear()
            return False
        self.discarded += start
        del self._buffer[:start + 1]
        self._in_frame = True
        self._restart_frame()
        return True

    def _restart_frame(self) -> None:
        self._scanned = 0
        self._head = None
        self._dropped = 0

    def _drop_scanned(self, upto: int | None = None) -> None:
        """The current frame is over max_size: keep its head (the first time), drop what of it has been
        searched (up to `upto`, the end block, when found), or raise without keep_heads."""
        if not self.keep_heads:
            raise FrameTooLarge(f"frame exceeds the maximum of {self.max_size} bytes")
        if self._head is None:
            self._head = bytes(self._buffer[:self.max_size])
        drop = self._scanned if upto is None else upto
        del self._buffer[:drop]
        self._dropped += drop
        self._scanned -= min(drop, self._scanned)


class _Connection:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.busy = False  # a message is being handled or its ACK written: shutdown waits for it


class _Worker:
    """The listener's side of a channel to a worker process: connections go over it as file
    descriptors (SCM_RIGHTS), and the worker sends a byte back for each one it has closed."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.open = 0
        self.alive = True

    def hand_over(self, connection: socket.socket) -> bool:
        if not self.alive:
            return False
        try:
            socket.send_fds(self.channel, [b"c"], [connection.fileno()])
        except OSError as exc:  # the worker is gone: this process keeps its connections
            log.warning("MLLP worker process unreachable (%s); serving its share here", exc)
            self.alive = False
            self.open = 1 << 30
            return False
        self.open += 1
        return True

    def closed_connections(self) -> None:
        try:
            data = self.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.alive = False
            self.open = 1 << 30
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
            return
        self.open = max(self.open - data.count(b"-"), 0)


class MLLPServer:
    """Receives MLLP frames on many persistent connections and answers each with the handler's ACK.

    The handler is synchronous (it does blocking database work) and runs in a pool of max_workers
    threads (None: the thread pool's default), so that at most that many messages are handled at
    once; each connection's messages are handled one after another, in order. The handler returns
    the ACK bytes, or None to have the connection closed.

    With max_workers=1 the handler runs on the event loop's own thread instead: messages are
    handled one at a time either way, and handing each to a pool thread and its answer back costs
    two thread wake-ups a message (bench/mllp_transport.py: about 0.19 against 0.08 ms of CPU a
    message). The loop then reads, accepts and times out between messages, not during one, and a
    shutdown waits for the message in hand however long it takes (with a pool, a connection still
    busy after the grace period is closed and its handler left to finish).

    A sender that stalls mid-frame for read_timeout seconds, or that does not read its ACK for
    write_timeout seconds, is disconnected; so is one that sends a frame over max_message_bytes,
    unless an `oversized` handler is given: such a frame's first max_message_bytes are then kept (the
    rest dropped as it arrives, so a connection holds at most that much), and the handler answers it
    when its end block comes, as `handler` answers the others. idle_timeout (None: never) closes
    connections quiet between messages.
    """

    def __init__(self, handler: Handler, *, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, write_timeout: float | None = None,
                 idle_timeout: float | None = None, max_workers: int | None = None,
                 workers: list[socket.socket] | None = None, handoff: socket.socket | None = None,
                 oversized: OversizedHandler | None = None) -> None:
        """workers: channels to listener processes that accepted connections may be handed to (each
        goes where the fewest are open, so that the processes share the CPUs); handoff: this process
        is such a worker, and takes its connections from that channel instead of listening."""
        self.handler = handler
        self.oversized = oversized
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout if write_timeout is not None else read_timeout
        self.idle_timeout = idle_timeout
        self.max_message_bytes = max_message_bytes
        self.port: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mllp-handler")
        self._inline = max_workers == 1  # see the class's doc
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._stopped: asyncio.Event | None = None
        self._workers = [_Worker(channel) for channel in workers or []]
        self._handoff = handoff
        self._listening: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._adopting = 0  # connections this process accepted and has not yet started serving
        self._adoptions: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen; port 0 picks a free port, readable from .port afterwards."""
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self._handoff is not None:
            self._handoff.setblocking(False)
            loop.add_reader(self._handoff.fileno(), self._receive_handoff)
            log.info("MLLP worker process taking connections from its listener")
            return
        if not self._workers:
            self._server = await asyncio.start_server(self._accept, host, port)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("MLLP listening on %s:%s", host, self.port)
            return
        # Connections are accepted here and handed over before a byte is read from them (a stream
        # server would start reading at once).
        self._listening = socket.create_server((host, port), reuse_port=False)
        self._listening.setblocking(False)
        self.port = self._listening.getsockname()[1]
        for worker in self._workers:
            worker.channel.setblocking(False)
            loop.add_reader(worker.channel.fileno(), worker.closed_connections)
        self._accepting = asyncio.create_task(self._accept_loop(self._listening))
        log.info("MLLP listening on %s:%s (%d worker processes)", host, self.port, len(self._workers))

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            connection, _ = await loop.sock_accept(listening)
            here = len(self._connections) + self._adopting
            worker = min(self._workers, key=lambda w: w.open)
            if worker.open < here and worker.hand_over(connection):
                connection.close()  # the worker holds its own descriptor of it now
                continue
            self._adopting += 1
            self._track(asyncio.create_task(self._adopt(connection)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, connection: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=connection)
        except OSError:
            connection.close()
            return
        finally:
            if self._handoff is None:
                self._adopting -= 1
        await self._accept(reader, writer)
        if self._handoff is not None:
            with contextlib.suppress(OSError):
                self._handoff.send(b"-")  # the listener counts this process's open connections

    def _receive_handoff(self) -> None:
        assert self._handoff is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._handoff, 64, 16)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            connection = socket.socket(fileno=fd)
            if self._closing:
                connection.close()
                continue
            connection.setblocking(False)
            self._track(asyncio.get_running_loop().create_task(self._adopt(connection)))
        if not data:  # the listener is gone: serve what is open, take nothing new
            asyncio.get_running_loop().remove_reader(self._handoff.fileno())

    async def serve_forever(self) -> None:
        """Wait until shutdown() has finished."""
        if self._stopped is None:
            raise RuntimeError("start() the server first")
        await self._stopped.wait()

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; messages being handled get their ACK (within the grace period); then close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listening is not None:
            self._listening.close()
        loop = asyncio.get_running_loop()
        for channel in [w.channel for w in self._workers] + ([self._handoff] if self._handoff else []):
            loop.remove_reader(channel.fileno())
        for connection in list(self._connections):
            if not connection.busy:
                connection.task.cancel()  # waiting for bytes: nothing in flight to finish
        tasks = [connection.task for connection in self._connections]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in late:
                log.warning("MLLP connection still busy after %.1f s of grace; closing it", grace_seconds)
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._stopped is not None:
            self._stopped.set()
        log.info("MLLP listener on port %s stopped", self.port)

    # --- one connection ---

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        connection = _Connection(asyncio.current_task())  # type: ignore[arg-type]
        self._connections.add(connection)
        peer = _peer_name(writer)
        try:
            await self._serve(connection, reader, writer, peer)
        except asyncio.CancelledError:
            log.debug("MLLP connection from %s closed by shutdown", peer)
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s lost: %s", peer, exc)
        except Exception:  # a bug here must cost one connection, never the listener
            log.exception("MLLP connection from %s failed", peer)
        finally:
            self._connections.discard(connection)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close after the last ACK has left; a peer that blocks that for write_timeout is cut off."""
        writer.close()
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _serve(self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        deframer = Deframer(self.max_message_bytes, keep_heads=self.oversized is not None)
        try:
            await self._exchange(connection, reader, writer, peer, deframer)
        finally:
            if deframer.discarded:
                log.info("dropped %d bytes outside MLLP frames from %s", deframer.discarded, peer)

    async def _exchange(self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        peer: str, deframer: Deframer) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            chunk = await self._read(reader, deframer, peer)
            if chunk is None:
                return
            try:
                messages = deframer.feed(chunk)
            except FrameTooLarge as exc:
                log.warning("closing MLLP connection from %s: %s", peer, exc)
                return
            for message in messages:
                connection.busy = True
                if isinstance(message, Oversized):
                    log.warning("a message of %d bytes from %s exceeds the maximum of %d bytes; answering it "
                                "from its first %d", message.size, peer, self.max_message_bytes, len(message.head))
                if self._inline:
                    reply = self._handle(message, peer)
                else:
                    reply = await loop.run_in_executor(self._executor, self._handle, message, peer)
                if reply is None:
                    log.info("closing MLLP connection from %s: the message was not acknowledged", peer)
                    return
                replies = [reply] if isinstance(reply, bytes) else reply
                if replies and not await self._write(writer, b"".join(frame(r) for r in replies), peer):
                    return
                connection.busy = False
                if self._closing:
                    return  # later frames of this read were not handled: the sender will resend them

    async def _read(self, reader: asyncio.StreamReader, deframer: Deframer, peer: str) -> bytes | None:
        """The next bytes, or None when the connection is to end (EOF, or a stall mid-frame)."""
        timeout = self.read_timeout if deframer.in_frame else self.idle_timeout
        try:
            async with asyncio.timeout(timeout):
                chunk = await reader.read(READ_CHUNK)
        except TimeoutError:
            if deframer.in_frame:
                log.warning("closing MLLP connection from %s: no bytes for %.1f s in the middle of a frame "
                            "(%d bytes received)", peer, timeout, deframer.pending)
            else:
                log.info("closing idle MLLP connection from %s after %.1f s", peer, timeout)
            return None
        if not chunk:
            if deframer.in_frame:
                log.warning("MLLP connection from %s closed mid-frame; %d bytes of an unfinished message dropped",
                            peer, deframer.pending)
            else:
                log.debug("MLLP connection from %s closed by the sender", peer)
            return None
        return chunk

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, peer: str) -> bool:
        writer.write(data)
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
        except TimeoutError:
            log.warning("closing MLLP connection from %s: it has not read its ACK for %.1f s", peer,
                        self.write_timeout)
            writer.transport.abort()  # a graceful close would wait for the unread ACK forever
            return False
        return True

    def _handle(self, message: bytes | Oversized, peer: str) -> bytes | list[bytes] | None:
        try:
            if isinstance(message, Oversized):  # only a Deframer that keeps heads delivers one
                assert self.oversized is not None
                return self.oversized(message.head, message.size)
            return self.handler(message)
        except Exception:  # the sender gets no ACK and will resend; the cause is in the log
            log.exception("MLLP handler failed on a message from %s", peer)
            return None


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


# --- running in a thread ---


class ServerThread:
    """An MLLPServer on its own event loop in a background thread (tests, the web server process)."""

    def __init__(self, server: MLLPServer, host: str, port: int) -> None:
        self.server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._grace = 10.0
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(host, port),),
                                        name=f"mllp-{host}:{port}", daemon=True)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Graceful shutdown (see MLLPServer.shutdown); returns when the thread has ended."""
        if self._loop is None or self._stop_requested is None or not self._thread.is_alive():
            return
        self._grace = grace_seconds
        self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join()

    async def _main(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            await self.server.start(host, port)
        except Exception as exc:  # e.g. the port is taken: reported to the thread that asked
            self._error = exc
            return
        finally:
            self._ready.set()
        await self._stop_requested.wait()
        await self.server.shutdown(self._grace)


def start_in_thread(handler: Handler, host: str = "127.0.0.1", port: int = 0, **options: Any) -> ServerThread:
    """Start an MLLPServer (options as its keyword arguments) in a daemon thread; returns once it listens."""
    return ServerThread(MLLPServer(handler, **options), host, port).start()  # type: ignore[arg-type]


# --- client ---


def send_messages(host: str, port: int, messages: Iterable[bytes], timeout: float = 30.0,
                  max_ack_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, grace: float = 0.2) -> list[list[bytes]]:
    """Send each message over one persistent connection; returns the replies (unframed) to each.

    A message in original mode gets one ACK. In enhanced mode MSH-15 and MSH-16 say what comes back:
    the replies that AL promises are waited for, and those that ER or SU leave open are collected for
    `grace` seconds more. A reply goes to the message its MSA-2 names (that message's MSH-10), so
    that an optional reply coming after its grace is still counted as its own message's, never as
    the next one's; a reply naming no message sent (a batch ACK, say) goes to the message waited on.
    timeout applies to connecting and to each awaited reply. Raises ConnectionError when the server
    closes the connection before acknowledging a message, TimeoutError when a promised reply does
    not come.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        inbox = _Inbox(sock, Deframer(max_ack_bytes))
        for number, message in enumerate(messages, start=1):
            sock.sendall(frame(message))
            inbox.wait(number, expected_replies(message), timeout, grace)
    return inbox.replies


class Expected(NamedTuple):
    """The replies a message may get, from its MSH-15 and MSH-16, and the MSA-2 they carry."""

    promised: int
    possible: int
    control_id: str | None  # None: a batch, or no readable MSH (its replies are matched by order)


def expected_replies(message: bytes) -> Expected:
    """(promised, possible) numbers of replies to a message, and their MSA-2."""
    from gateway.hl7.parse import ParseError, decode, is_batch, normalize, read_header

    try:
        text = normalize(decode(message))
        header = read_header(text)
    except ParseError:
        return Expected(1, 1, None)  # whatever the server makes of it, it answers or closes
    if is_batch(text):
        return Expected(1, 1, None)
    accept, application = header.accept_ack_type.upper(), header.app_ack_type.upper()
    if not (accept or application):
        return Expected(1, 1, header.control_id)
    accept = accept or "AL"
    promised = (accept == "AL") + (application == "AL")
    possible = (accept in ("AL", "ER", "SU")) + (application in ("AL", "ER", "SU"))
    return Expected(promised, possible, header.control_id)


def msa_fields(reply: bytes) -> list[str] | None:
    """The fields of an acknowledgement's MSA segment, its name first (so MSA-n is [n]), split at
    the separator that follows the name; None when it has no MSA."""
    for segment in reply.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA") and len(segment) > 3:
            return segment.decode("utf-8", "replace").split(chr(segment[3]))
    return None


def acknowledged_id(reply: bytes) -> str | None:
    """MSA-2 of an acknowledgement: the control id of the message it answers (None without an MSA)."""
    fields = msa_fields(reply)
    if fields is None:
        return None
    return fields[2] if len(fields) > 2 else ""


class _Inbox:
    """The client's side of one connection: replies read, each given to the message it answers."""

    def __init__(self, sock: socket.socket, deframer: Deframer) -> None:
        self.sock = sock
        self.deframer = deframer
        self.replies: list[list[bytes]] = []
        self._expected: list[Expected] = []
        self._first_open = 0  # replies come in the order of their messages: none to those before

    def wait(self, number: int, expected: Expected, timeout: float, grace: float) -> None:
        """Read until message `number` (the last one sent) has its promised replies, then for up to
        `grace` seconds more while it may get others."""
        self.replies.append([])
        self._expected.append(expected)
        mine = self.replies[-1]
        deadline = time.monotonic() + timeout
        grace_ends: float | None = None
        while len(mine) < expected.possible:
            waiting_for_promised = len(mine) < expected.promised
            if not waiting_for_promised and grace_ends is None:
                grace_ends = min(deadline, time.monotonic() + grace)
            remaining = (deadline if waiting_for_promised else grace_ends or deadline) - time.monotonic()
            if remaining <= 0:
                if waiting_for_promised:
                    raise TimeoutError(f"no ACK for message {number} within {timeout} s")
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(READ_CHUNK)
            except TimeoutError:
                if waiting_for_promised:
                    raise TimeoutError(f"no ACK for message {number} within {timeout} s") from None
                break
            if not chunk:
                if waiting_for_promised:
                    raise ConnectionError(f"the server closed the connection before acknowledging message {number}")
                break
            before = len(mine)
            for reply in self.deframer.feed(chunk):
                self._place(reply)  # type: ignore[arg-type]  # no keep_heads: frames only
            if not waiting_for_promised and len(mine) > before:
                break  # the replies to one message come together: once some came after the promised, stop

    def _place(self, reply: bytes) -> None:
        current = len(self.replies) - 1
        target = current
        answered = acknowledged_id(reply)
        if answered is not None:
            # The newest open message it names (a control id sent twice: the later copy is the likelier).
            for index in range(current, self._first_open - 1, -1):
                expected = self._expected[index]
                if expected.control_id == answered and len(self.replies[index]) < expected.possible:
                    target = index
                    break
        if len(self.replies[target]) >= self._expected[target].possible:
            # a server answers each message at most as asked; an extra frame is not ours
            log.warning("the server sent an extra frame for message %d; it is left out", target + 1)
            return
        if target < current:
            log.info("a late reply to message %d (MSA-2 %s) came while message %d was waited on",
                     target + 1, answered, current + 1)
        self.replies[target].append(reply)
        self._first_open = target
