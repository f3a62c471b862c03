"""The Postgres writer in its own process, so translating and writing rows never holds the app's GIL.

``PostgresProcessSpanProcessor`` is what ``storage.postgres`` uses by default. ``on_end`` queues the
span (as ``PostgresSpanProcessor`` does); a feeder thread copies each queued span into a plain tuple and
sends batches, pickled, down a pipe to a child Python process (``python -m
roma_otel.exporters.postgres_process``) that runs a ``PostgresSpanProcessor`` on them: translation,
COPY, retries, the spool and its replay all happen there, on one thread, at a lower CPU priority. The
application process pays about 2.4 µs a span instead of the ~6.5 µs of Python the writer needs per row.

Nothing is lost when the child goes away: every batch stays in this process until the child reports
it disposed of (written, spooled or counted as dropped). If the child dies, the unreported batches and
everything after go to an in-process ``PostgresSpanProcessor`` instead; rows the child had written
already are refused by the unique span index and not duplicated.

Frames on the pipes: a 4-byte big-endian length, then a pickle. The parent sends the settings first,
then ``("spans", [tuple, ...])``, ``("flush", seq, timeout_s)`` and ``("stop", timeout_s)``; the child
answers ``("progress", disposed, written_rows)``, ``("flushed", seq, ok)``, ``("drop", n, reason)`` and
``("stopped",)``.
"""

from __future__ import annotations

import collections
import functools
import gc
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

from roma_otel.compat.otel import SDK_ROOT_ROW, SDK_ROW, bounded_attributes, bounded_dict, parent_field, public_row
from roma_otel.compat.otel import paths as otel_paths
from roma_otel.exporters.postgres import PostgresSpanProcessor, QueueingSpanProcessor
from roma_otel.storage.spanview import SpanRecord

__all__ = ["PostgresProcessSpanProcessor", "SpanRecord"]

logger = logging.getLogger("roma_otel")

_HEADER = struct.Struct(">II")  # the pickle's length, and how many spans it carries (0: any other message)
_FRAME_SPANS = 2000  # at most this many spans per frame to the child (or batch_size, if larger)
# Queued spans that wake the feeder: below the 512 at which the SDK's BatchSpanProcessor exports, so this
# queue does not keep spans alive longer than that one does (each surviving collection costs the
# collector later). Alternated with 1,000 twice: ~1 µs less per call (47.0 against 48.1 µs).
_WAKE_SPANS = 250
_PIPE_BYTES = 1 << 20  # the pipe to the child, where the system allows (see _widen_pipe)
_REPORT_INTERVAL = 0.05  # seconds between the child's progress reports while it works through a backlog


# --- what crosses the pipe: a snapshot() tuple, rebuilt as storage.spanview.SpanRecord -----------
def snapshot(span: Any) -> tuple[Any, ...]:
    """A finished span as plain values; ``SpanRecord(*snapshot(span))`` reads the same.

    The feeder does this for every span. On the SDK's span class it reads the fields behind the
    properties in one C call (``compat.otel.SDK_ROW``: 0.28 µs a span instead of 0.6), once a first span of that
    class with the SDK's attributes has shown that both ways give the same values; any other class is
    read through its public properties.
    """
    kind = type(span)
    if kind in _DIRECT_TYPES:
        return _direct_snapshot(span)
    public = public_row(span)
    if kind not in _PUBLIC_TYPES:
        _probe(kind, span, public)
    return public


def _direct_snapshot(span: Any) -> tuple[Any, ...]:
    try:
        return (SDK_ROW if parent_field(span) is not None else SDK_ROOT_ROW)(span)
    except AttributeError:  # a ReadableSpan built with a plain dict or None for its attributes
        return public_row(span)


# The whole snapshot in one C call, dotted paths included (compat.otel.SDK_ROW: 0.28 µs a span instead
# of 0.47 for reading the seven fields and then their parts in Python): one getter for a span with a
# parent, one for a root. Either fails with AttributeError on attributes that are not the SDK's.
_DIRECT_TYPES: set[type] = set()  # span classes whose fields snapshot() reads directly
_PUBLIC_TYPES: set[type] = set()  # span classes read through their properties


def _probe(kind: type, span: Any, public: tuple[Any, ...]) -> None:
    if not otel_paths().row:  # the installed SDK's span fields are not as compat.otel verified them
        _PUBLIC_TYPES.add(kind)
        return
    try:
        attributes = bounded_attributes(span)
    except AttributeError:  # not built like the SDK's span
        _PUBLIC_TYPES.add(kind)
        return
    inner = bounded_dict(attributes)
    if type(inner) is not dict:
        return  # attributes that are not the SDK's: this span cannot tell, the next one may
    try:
        direct = _direct_snapshot(span)
    except Exception:  # not built like the SDK's span
        _PUBLIC_TYPES.add(kind)
        return
    agrees = direct == public and type(direct[-1]) is dict and direct[-1] is inner
    (_DIRECT_TYPES if agrees else _PUBLIC_TYPES).add(kind)


def _pickle(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _write_frame(stream: IO[bytes], message: Any) -> None:
    _write_pickled(stream, _pickle(message))


def _write_pickled(stream: IO[bytes], data: bytes, spans: int = 0) -> None:
    stream.write(_HEADER.pack(len(data), spans) + data)
    stream.flush()


def _widen_pipe(fd: int) -> None:
    """Let the pipe to the child hold up to ~1 MB (Linux; 64 KB by default): a few frames can wait there
    while the child is busy with a transaction, so the feeder does not block on each one."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsize is None:
        return
    try:
        fcntl.fcntl(fd, setsize, _PIPE_BYTES)
    except OSError:  # above /proc/sys/fs/pipe-max-size, or not allowed: the default size still works
        pass


def _child_environment() -> dict[str, str]:
    """The parent's environment, minus what would make the child instrument itself."""
    env = dict(os.environ)
    # opentelemetry-instrument works through a sitecustomize on PYTHONPATH; the writer must not run it
    # (it would start an SDK, and with storage.postgres on, another writer).
    here = str(Path(__file__).resolve().parents[2])  # the directory roma_otel is imported from
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not p.rstrip("/\\").endswith(
        "auto_instrumentation"
    )]  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([here, *entries])
    env["OTEL_SDK_DISABLED"] = "true"
    env["ROMA_OTEL_WRITER_PROCESS"] = "1"
    return env


# --- the application side ----------------------------------------------------------------------------
class PostgresProcessSpanProcessor(QueueingSpanProcessor):
    """Persists roma-otel spans through a child writer process; same settings and guarantees as
    ``PostgresSpanProcessor`` (bounded queue, spool, replay, drops counted), with the row work elsewhere.
    """

    def __init__(self, dsn: str, **settings: Any) -> None:
        super().__init__(dsn, **settings)
        # The feeder wakes for _WAKE_SPANS queued spans (or flush_interval), not for every batch_size: each
        # wake-up takes the GIL from the application, and the child writes batch_size per transaction
        # whatever the frame size. Never later than half the queue's bound, so it cannot overflow.
        self._wake_at = min(max(self.batch_size, _WAKE_SPANS), max(1, self.max_queue_size // 2))
        # Batches sent and not yet reported disposed of by the child: (cumulative count at the end, the
        # pickled frame). Kept as bytes, which the garbage collector does not track.
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self._sent = 0
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._state = threading.Condition(threading.Lock())  # progress and flush replies
        self._flushed: dict[int, bool] = {}
        self._flush_seq = 0
        self._sending = 0
        self._stopped = False
        self._snapshot_error_logged = False
        self._fallback: PostgresSpanProcessor | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        try:
            self._start_child()
        except Exception as exc:
            self._use_fallback(f"cannot start the writer process: {exc!r}")
        self._feeder = threading.Thread(target=self._feed, name="roma-otel-postgres-feeder", daemon=True)
        self._feeder.start()
        os.register_at_fork(after_in_child=self._after_fork)

    @property
    def uses_process(self) -> bool:
        return self._fallback is None

    def _start_child(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "roma_otel.exporters.postgres_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_environment(),
            close_fds=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        _widen_pipe(proc.stdin.fileno())
        _write_frame(proc.stdin, {"dsn": self.dsn, **self._engine_settings()})
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc,), name="roma-otel-postgres-replies", daemon=True)
        self._reader.start()

    def _after_fork(self) -> None:
        # A forked child of the application must not share this process's pipe: it gets its own writer,
        # in-process, and none of the parent's queued spans (the parent writes those).
        if self._shutdown:
            return
        self._queue = collections.deque()
        self._unacked = collections.deque()
        self._new_locks()
        self._send_lock = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._sending = 0  # a send in progress at the fork happened in the parent
        self._proc = None
        self._fallback = self._new_fallback(connect_early=False)
        self._feeder = threading.Thread(target=self._feed, name="roma-otel-postgres-feeder", daemon=True)
        self._feeder.start()

    def _engine_settings(self) -> dict[str, Any]:
        """Settings for the engine doing the writing (the child's or the fallback)."""
        return {**self.settings(), "async_persist": True}  # synchronous flushes are driven from here

    def _new_fallback(self, connect_early: bool = True) -> PostgresSpanProcessor:
        return PostgresSpanProcessor(
            self.dsn, on_drop=self._on_drop, connect_early=connect_early, **self._engine_settings()
        )

    def _take_unacked(self) -> list[SpanRecord]:
        """Everything sent that the child has not reported done, as records (call with ``_lock`` held)."""
        records = [SpanRecord(*t) for _, frame in self._unacked for t in pickle.loads(frame)[1]]
        self._unacked.clear()
        return records

    # --- SpanProcessor --------------------------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until everything queued so far is written (or spooled); True when done in time."""
        if self._shutdown:  # shutdown wrote or spooled everything; nothing is queued after it
            return True
        deadline = time.monotonic() + timeout_millis / 1000.0
        if not self._drain_queue(deadline):
            return False
        fallback = self._fallback
        if fallback is not None:
            return fallback.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))
        with self._state:
            self._flush_seq += 1
            seq = self._flush_seq
        if not self._send(("flush", seq, max(0.0, deadline - time.monotonic()))):
            return self.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))  # it died: fallback
        with self._state:
            while seq not in self._flushed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._fallback is not None:
                    break
                self._state.wait(min(remaining, 0.1))
            ok = self._flushed.pop(seq, None)
        if ok is None and self._fallback is not None:
            return self.force_flush(max(0, int((deadline - time.monotonic()) * 1000)))
        return bool(ok)

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self.force_flush(int(self.flush_timeout * 1000))
        self._shutdown = True
        self._wake.set()
        self._feeder.join(self.flush_timeout)
        proc = self._proc
        if proc is not None and self._fallback is None:
            self._send(("stop", self.flush_timeout))
            try:
                proc.wait(self.flush_timeout + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if self._reader is not None:
                self._reader.join(5)  # its last progress report says what the child disposed of
        # Whatever the child did not report done (it died, or ran out of time) and whatever is still
        # queued here goes through an in-process writer, whose shutdown spools what it cannot write.
        with self._lock:
            leftover = self._take_unacked()
            # Taken one by one: on_end appends without the lock, and a span ending now must not fall
            # between a copy of the queue and its clearing.
            queued = [self._queue.popleft() for _ in range(len(self._queue))]
        if leftover or queued:
            if self._fallback is None:
                self._fallback = self._new_fallback()
            self._fallback.enqueue(leftover + [SpanRecord(*snapshot(s)) for s in queued])
        if self._fallback is not None:
            self._fallback.shutdown()
            with self._counts:
                self.dropped += self._fallback.dropped
            self.written_rows += self._fallback.written_rows
        for stream in (proc.stdin, proc.stdout) if proc is not None else ():
            try:
                stream.close()  # type: ignore[union-attr]
            except Exception:
                pass

    # --- feeding the child ----------------------------------------------------------------------------
    def _feed(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self._send_queued()
            except Exception as exc:  # never let the feeder die
                logger.warning("roma-otel: postgres feeder error: %r", exc, exc_info=exc)
            if self._shutdown and not self._queue:
                return

    def _send_queued(self) -> None:
        # Everything queued goes in one frame (up to a bound): each frame is a pipe write, and every
        # system call hands the GIL to the application's thread, which keeps it for up to the switch
        # interval (5 ms) before this thread gets it back. The child still writes batch_size per transaction.
        most = max(self.batch_size, _FRAME_SPANS)
        while True:
            with self._lock:
                n = min(most, len(self._queue))
                if not n:
                    return
                self._sending += n  # before they leave the queue: see PostgresSpanProcessor._take
                spans = [self._queue.popleft() for _ in range(n)]
            try:
                records = self._snapshots(spans) if self._fallback is None else []
                frame = _pickle(("spans", records)) if records else None
                with self._lock:
                    fallback = self._fallback
                    if fallback is None and frame is not None:
                        self._sent += len(records)
                        self._unacked.append((self._sent, frame))
                if fallback is not None:
                    fallback.enqueue(spans)
                    continue
                if frame is not None:
                    # On a broken pipe, _use_fallback hands this frame to the in-process writer with the others.
                    self._send_pickled(frame, len(records))
            finally:
                with self._state:
                    self._sending -= n
                    self._state.notify_all()

    def _snapshots(self, spans: list[Any]) -> list[tuple[Any, ...]]:
        """The spans as plain tuples; one that cannot be read is counted as dropped, not the whole frame."""
        records = []
        direct = _DIRECT_TYPES
        for span in spans:
            try:
                # snapshot(span), its type check inline: this runs for every span
                record = _direct_snapshot(span) if type(span) in direct else snapshot(span)
            except Exception as exc:
                self._count_drop(1, "unreadable span")
                if not self._snapshot_error_logged:
                    self._snapshot_error_logged = True
                    logger.warning("roma-otel: cannot copy a span for the writer process: %r", exc, exc_info=exc)
                continue
            records.append(record)
        return records

    def _drain_queue(self, deadline: float) -> bool:
        """Wait until the feeder has handed everything queued to the child (or the fallback)."""
        return self._wait_until_idle(self._state, lambda: self._sending > 0, deadline)

    def _send(self, message: Any) -> bool:
        return self._send_pickled(_pickle(message))

    def _send_pickled(self, data: bytes, spans: int = 0) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None:
            self._use_fallback("no writer process")
            return False
        try:
            with self._send_lock:
                _write_pickled(proc.stdin, data, spans)
            return True
        except (OSError, ValueError) as exc:  # broken pipe: the child is gone
            self._use_fallback(f"the writer process went away ({exc!r})")
            return False

    # --- the child's replies --------------------------------------------------------------------------
    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for message in _FrameReader(proc.stdout.fileno()).messages():
            kind = message[0]
            if kind == "progress":
                _, disposed, written = message
                with self._lock:
                    self.written_rows = written
                    while self._unacked and self._unacked[0][0] <= disposed:
                        self._unacked.popleft()
            elif kind == "flushed":
                with self._state:
                    self._flushed[message[1]] = message[2]
                    self._state.notify_all()
            elif kind == "drop":
                self._count_drop(message[1], message[2])
            elif kind == "stopped":
                self._stopped = True
        if not self._stopped:
            self._use_fallback(f"the writer process exited (code {proc.poll()})")
        with self._state:
            self._state.notify_all()

    def _use_fallback(self, why: str) -> None:
        with self._lock:
            if self._fallback is not None:
                return
            logger.warning("roma-otel: %s; writing rows from this process instead", why)
            self._fallback = self._new_fallback()
            # Everything the child had not reported done goes again; the unique span index refuses
            # whatever it did write before dying.
            records = self._take_unacked()
        if records:
            self._fallback.enqueue(records)
        with self._state:
            self._state.notify_all()


# --- the child ----------------------------------------------------------------------------------------
class _FrameReader:
    """Frames from a pipe without blocking: whatever has arrived, split into frames, the rest kept for later."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False

    def messages(self) -> Iterator[Any]:
        """Every message until the pipe closes (or carries something unreadable), blocking for each."""
        while not self.closed:
            try:
                batch = [pickle.loads(frame) for _, frame in self.poll(None)]
            except Exception:
                return
            yield from batch

    def poll(self, timeout: float | None) -> list[tuple[int, bytes]]:
        """The frames that arrived, as (spans carried, pickled message), waiting up to ``timeout`` seconds
        (None: for ever) for the first bytes."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        while ready and not self.closed:
            data = os.read(self.fd, 1 << 20)
            if not data:
                self.closed = True
                break
            self.buffer += data
            ready, _, _ = select.select([self.fd], [], [], 0)
        frames = []
        buffer, at = self.buffer, 0
        while len(buffer) - at >= _HEADER.size:
            size, spans = _HEADER.unpack_from(buffer, at)
            end = at + _HEADER.size + size
            if len(buffer) < end:
                break
            frames.append((spans, bytes(memoryview(buffer)[at + _HEADER.size : end])))
            at = end
        del buffer[:at]
        return frames


class _Inbox:
    """The child's messages from the application, in order. Frames of spans stay pickled until they are
    needed (their headers say how many spans each carries, so the backlog is known without decoding);
    any other message is small and decoded on arrival, so a stop waiting behind spans is seen at once."""

    def __init__(self, reader: _FrameReader) -> None:
        self.reader = reader
        self.frames: collections.deque[tuple[int, Any]] = collections.deque()  # (spans, pickle or message)
        self.decoded: Any = None  # the next message, once head() has decoded it
        self.spans = 0  # spans in frames not decoded yet
        self.stops = 0  # "stop" messages not handled yet

    def receive(self, timeout: float | None) -> None:
        for spans, data in self.reader.poll(timeout):
            if spans:
                self.frames.append((spans, data))
                self.spans += spans
            else:
                message = pickle.loads(data)
                self.frames.append((0, message))
                self.stops += isinstance(message, tuple) and message[0] == "stop"

    def head(self) -> Any:
        """The next message, decoded; None when nothing more has arrived."""
        if self.decoded is None and self.frames:
            spans, data = self.frames.popleft()
            self.spans -= spans
            self.decoded = pickle.loads(data) if spans else data
        return self.decoded

    def pop(self) -> Any:
        message, self.decoded = self.head(), None
        if isinstance(message, tuple) and message[0] == "stop":
            self.stops -= 1
        return message


def _child_main() -> int:
    # This process is ours alone, so it may be tuned for its job: it yields the CPU to the application
    # whenever both want it (the rows can wait; the application's calls cannot).
    try:
        os.nice(10)
    except OSError:
        pass
    # The records passing through are acyclic and short-lived, yet each one is four GC-tracked objects:
    # with the default thresholds a backlog of them set off collection after collection (building a
    # record cost 10 µs instead of 0.5). Everything imported so far is frozen out of the collector's
    # sight, and young collections run every 50,000 allocations instead of 700.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # Frames go out on a private copy of stdout; anything else printing goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    reader = _FrameReader(sys.stdin.fileno())
    inbox = _Inbox(reader)
    while inbox.head() is None and not reader.closed:
        inbox.receive(5.0)
    settings = inbox.pop() if inbox.head() is not None else None
    if not isinstance(settings, dict):
        return 1

    def send(message: Any) -> None:
        _write_frame(out, message)

    # One thread does everything: it reads the pipe between transactions (and while Postgres finishes
    # each COPY), so no GIL is handed back and forth inside this process.
    writer = PostgresSpanProcessor(
        settings.pop("dsn"), threaded=False, on_drop=lambda n, reason: send(("drop", n, reason)), **settings
    )
    writer.connect()
    reported = (-1, -1)
    reported_at = 0.0

    def report(force: bool = True) -> None:
        nonlocal reported, reported_at
        now = (writer.disposed, writer.written_rows)
        if now != reported:
            clock = time.monotonic()
            # Between transactions of a backlog, at most one report per interval: each wakes a thread of
            # the application (and takes its GIL) only so that it can free sent frames a little sooner.
            if not force and clock - reported_at < _REPORT_INTERVAL:
                return
            reported, reported_at = now, clock
            send(("progress", *now))

    # Spans are decoded as the writer needs them: enough for its next two transactions (this runs while
    # Postgres finishes a COPY, and decoding a burst of thousands in one go would keep Postgres waiting),
    # all of them before a stop that waits behind them (so that its timeout bounds the shutdown, which
    # spools what it cannot write), and never more left undecoded than the writer's queue may hold
    # (enqueue drops the oldest past max_queue_size, and counts them).
    wanted = 2 * writer.batch_size

    def take_arrived() -> None:
        inbox.receive(0)
        queue = writer._queue
        while len(queue) < wanted or inbox.stops or len(queue) + inbox.spans > writer.max_queue_size:
            message = inbox.head()
            if message is None or message[0] != "spans":
                return
            inbox.pop()
            writer.enqueue([SpanRecord(*t) for t in message[1]])

    writer.before_prefetch = take_arrived
    writer.after_transaction = functools.partial(report, False)
    last_write = time.monotonic()
    while True:
        if inbox.head() is None:  # wait for more, but no longer than the queued spans may wait to be written
            due = writer.flush_interval - (time.monotonic() - last_write)
            timeout = max(0.0, due) if writer._queue else 1.0
            if (writer.disposed, writer.written_rows) != reported:  # a throttled report is still to go out
                timeout = min(timeout, _REPORT_INTERVAL)
            inbox.receive(timeout)
            report(False)
        take_arrived()
        message = inbox.head()
        if message is not None and message[0] != "spans":  # a control message, after the spans before it
            inbox.pop()
            if message[0] == "flush":
                ok = writer.force_flush(int(message[2] * 1000))
                report()
                send(("flushed", message[1], ok))
            elif message[0] == "stop":
                writer.flush_timeout = float(message[1])
                writer.shutdown()
                report()
                send(("stopped",))
                return 0
        if reader.closed and inbox.head() is None:  # the application is gone: write what we have, spool the rest
            writer.shutdown()
            return 0
        now = time.monotonic()
        if writer._queue and (len(writer._queue) >= writer.batch_size or now - last_write >= writer.flush_interval):
            writer.drain()
            last_write = time.monotonic()
            report(False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="roma-otel writer: %(message)s")
    raise SystemExit(_child_main())
