"""Tamper-evident audit log: append-only JSON lines, each carrying the SHA-256 of the line before.

One record per line, ASCII JSON without spaces, keys in this order::

    {"seq":7,"ts":"2026-01-01T12:00:00.000000Z","event":"model.version_loaded",
     "fields":{...},"prev":"<sha256 hex of line 6's bytes, newline included>"}

The first record of a file has ``prev`` = GENESIS. Editing, deleting, inserting or reordering a
line breaks the chain at that point; ``verify_file`` (``forseti audit verify``) names the first
broken line. A chain without a secret cannot stop someone who rewrites *every* line after their
edit, nor reveal removed lines at the very end: record the head that verify prints (``SEQ:HASH``)
somewhere the insider cannot write, and pass it back with ``--head`` to detect both.

Writes are one ``os.write`` of the whole line on an O_APPEND descriptor, then fsync, under a
lock; an exclusive flock keeps a second process off the same file. A writer killed mid-line
leaves a torn last line (no newline): the next writer ends it with a newline and starts its
segment with an ``audit.torn_tail`` record naming the fragment's length and SHA-256, so the
chain still verifies and the tear stays visible.

Public API for other components (the trainer sidecar records its operations this way)::

    audit = AuditLog.open(path, component="sidecar")
    audit.record("train.run_start", run="r1", spec_sha256="...")
    await audit.arecord(...)   # from async code: the fsync runs off the event loop
    audit.close()

Field values may only be str, int, float, bool, None, and lists/dicts of those (dict keys are
names). Bytes, arrays, tensors and long lists are refused, so observations and weights cannot
slip in; long strings are cut; names that suggest secrets (``token``, ``secret``, ...) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from forseti.core.durable import fsync_dir

logger = logging.getLogger(__name__)

AUDIT_FORMAT = "forseti-audit/1"
GENESIS = hashlib.sha256(b"forseti-audit/1 genesis").hexdigest()
OPEN_EVENT = "audit.open"
TORN_EVENT = "audit.torn_tail"

MAX_STRING_CHARS = 2048
MAX_LIST_ITEMS = 64
MAX_DICT_ITEMS = 64
MAX_DEPTH = 4
MAX_LINE_BYTES = 64 * 1024
# Field names whose values are secrets by their very name; the caller must not log them at all.
FORBIDDEN_NAMES = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passphrase",
        "private_key",
        "key_material",
        "authorization",
        "bearer",
    }
)
_EVENT_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = ("seq", "ts", "event", "fields", "prev")
_TAIL_BLOCK = 8192


class AuditError(Exception):
    """The audit log cannot be opened, written or read; the message says what to do."""


class AuditFieldError(AuditError, ValueError):
    """A record's fields hold something an audit line must never hold."""


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one line's exact bytes, newline included: what the next ``prev`` holds."""
    return hashlib.sha256(line).hexdigest()


def _clean(value: object, where: str, depth: int) -> object:
    """Validate one field value; return it with over-long strings cut."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditFieldError(f"{where}: {value} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            return value[:MAX_STRING_CHARS] + f"...(+{len(value) - MAX_STRING_CHARS} chars)"
        return value
    if depth >= MAX_DEPTH and isinstance(value, list | tuple | dict):
        raise AuditFieldError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_ITEMS:
            raise AuditFieldError(
                f"{where}: list of {len(value)} items (limit {MAX_LIST_ITEMS}); audit lines "
                "hold summaries, never observations or tensors"
            )
        return [_clean(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if len(value) > MAX_DICT_ITEMS:
            raise AuditFieldError(f"{where}: {len(value)} keys (limit {MAX_DICT_ITEMS})")
        return {
            _check_name(k, where): _clean(v, f"{where}.{k}", depth + 1) for k, v in value.items()
        }
    raise AuditFieldError(
        f"{where}: {type(value).__name__} is not allowed in an audit line "
        "(only str, int, float, bool, None and lists/dicts of those)"
    )


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or len(name) > 64 or not _NAME_RE.fullmatch(name):
        raise AuditFieldError(f"{where}: field name {str(name)[:64]!r} is not a plain name")
    if name.lower() in FORBIDDEN_NAMES:
        raise AuditFieldError(f"{where}: field {name!r} would hold a secret; never audit secrets")
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_record(seq: int, event: str, fields: dict[str, object], prev: str, ts: str) -> bytes:
    """The exact bytes of one audit line (newline included)."""
    doc = {"seq": seq, "ts": ts, "event": event, "fields": fields, "prev": prev}
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\n"


def _parse_record(line: bytes) -> dict | None:
    """A line's record when it has the record shape, else None."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or tuple(doc) != _RECORD_KEYS:
        return None
    seq, ts, event, fields, prev = (doc[k] for k in _RECORD_KEYS)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None
    if not (isinstance(ts, str) and isinstance(event, str) and isinstance(fields, dict)):
        return None
    if not (isinstance(prev, str) and _HEX64_RE.fullmatch(prev)):
        return None
    return doc


def _read_tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """(last complete line, torn fragment after it) of a file of ``size`` bytes."""
    end = size
    buf = b""
    while True:
        start = max(0, end - _TAIL_BLOCK)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        last_nl = buf.rfind(b"\n")
        if last_nl >= 0:
            previous_nl = buf.rfind(b"\n", 0, last_nl)
            if previous_nl >= 0 or start == 0:
                return buf[previous_nl + 1 : last_nl + 1], buf[last_nl + 1 :]
        elif start == 0:
            return b"", buf
        if len(buf) > 2 * MAX_LINE_BYTES + _TAIL_BLOCK:
            raise AuditError("last line is longer than any audit record")


@dataclass
class AuditLog:
    """An open, exclusively held audit log; ``record`` is safe from any thread."""

    path: Path
    _fd: int = field(repr=False)
    _seq: int = field(repr=False)
    _prev: str = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, component: str = "server") -> AuditLog:
        """Open (or create, mode 0600) the log at ``path``, continue its chain, and record
        an ``audit.open`` line naming ``component`` and this process."""
        path = Path(path)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(
                    f"audit log {path} is held by another process; give each process its own "
                    "audit file"
                ) from None
            log = cls._continue(path, fd)
        except BaseException:
            os.close(fd)
            raise
        from forseti import __version__

        log.record(
            OPEN_EVENT,
            format=AUDIT_FORMAT,
            component=component,
            pid=os.getpid(),
            forseti=__version__,
        )
        return log

    @classmethod
    def _continue(cls, path: Path, fd: int) -> AuditLog:
        size = os.fstat(fd).st_size
        if size == 0:
            fsync_dir(path.parent)
            return cls(path, fd, 1, GENESIS)
        last, torn = _read_tail(fd, size)
        seq, prev = 1, GENESIS
        if last:
            record = _parse_record(last)
            if record is None:
                raise AuditError(
                    f"audit log {path} ends with a line that is not an audit record; run "
                    f"`forseti audit verify {path}`, then move the file aside to start a new one"
                )
            seq, prev = record["seq"] + 1, line_hash(last)
        log = cls(path, fd, seq, prev)
        if torn:
            # A writer died mid-line. End the fragment (so it stays a line of its own) and
            # start this segment with a record of it; verify accepts exactly this pattern.
            log._write(b"\n")
            log.record(
                TORN_EVENT,
                torn_bytes=len(torn),
                torn_sha256=hashlib.sha256(torn).hexdigest(),
                after_seq=seq - 1,
            )
            logger.warning(
                "audit log had a torn last line; recorded and continued",
                extra={"path": str(path), "torn_bytes": len(torn)},
            )
        return log

    @property
    def head(self) -> tuple[int, str]:
        """(seq, sha256) of the last line written: what to record elsewhere as an anchor."""
        with self._lock:
            return self._seq - 1, self._prev

    def record(self, event: str, **fields: object) -> int:
        """Append one record and fsync it; returns its seq. Raises AuditFieldError for
        fields an audit line must not hold, AuditError when the write fails."""
        if not _EVENT_RE.fullmatch(event) or len(event) > 64:
            raise AuditFieldError(f"event name {event[:64]!r} must be dotted lowercase words")
        clean = {_check_name(k, event): _clean(v, f"{event}.{k}", 1) for k, v in fields.items()}
        ts = _now()
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"audit log {self.path} is closed")
            line = encode_record(self._seq, event, clean, self._prev, ts)
            if len(line) > MAX_LINE_BYTES:
                raise AuditFieldError(f"{event}: record is {len(line)} bytes ({MAX_LINE_BYTES})")
            self._write(line)
            seq, digest = self._seq, line_hash(line)
            self._seq, self._prev = seq + 1, digest
        # The process log, usually shipped elsewhere, then witnesses the chain independently.
        logger.info("audit record", extra={"event": event, "seq": seq, "sha256": digest})
        return seq

    async def arecord(self, event: str, **fields: object) -> int:
        """``record`` from async code: validation here, the write and fsync in a thread."""
        return await asyncio.to_thread(self.record, event, **fields)

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole and fsync; on failure cut our own partial bytes back off."""
        before = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            # We hold the flock, so nobody else appended: the bytes past ``before`` are ours
            # and were never acknowledged.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        """Release the file (and its lock); later records raise AuditError."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---- verification -----------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify_file`` found. ``broken_line`` is 1-based; None when the chain holds."""

    ok: bool
    lines: int
    head_seq: int
    head_hash: str
    broken_line: int | None = None
    reason: str = ""
    torn_tail_bytes: int = 0
    recovered_tears: tuple[int, ...] = ()

    @property
    def head(self) -> str:
        """``SEQ:HASH`` as ``--head`` takes it back."""
        return f"{self.head_seq}:{self.head_hash}"


def parse_head(text: str) -> tuple[int, str]:
    """Parse ``SEQ:HASH`` (the head that verify prints)."""
    seq_text, _, digest = text.partition(":")
    if not seq_text.isdigit() or not _HEX64_RE.fullmatch(digest):
        raise ValueError(f"expected SEQ:SHA256 as verify prints it, got {text[:80]!r}")
    return int(seq_text), digest


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from fh


def verify_file(path: str | Path, head: tuple[int, str] | None = None) -> VerifyResult:
    """Check the whole chain of an audit log; report the first broken line and why.

    A final line without a newline fails the check (``torn_tail_bytes`` says how long it is):
    it may be a writer killed mid-write, or bytes appended outside the chain, and the two look
    alike. Everything before it is reported intact in ``lines``.
    With ``head`` (a ``(seq, sha256)`` recorded earlier), the log must still contain that
    line unchanged, which also catches removal of the last lines.
    """
    path = Path(path)
    try:
        raw_lines = list(_lines(path))
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None

    prev, expected_seq = GENESIS, 1
    last_line_no = 0
    tears: list[int] = []
    seq_hashes: dict[int, tuple[int, str]] = {}

    def fail(line_no: int, reason: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            lines=line_no - 1,
            head_seq=expected_seq - 1,
            head_hash=prev,
            broken_line=line_no,
            reason=reason,
            recovered_tears=tuple(tears),
        )

    i = 0
    while i < len(raw_lines):
        line = raw_lines[i]
        line_no = i + 1
        if not line.endswith(b"\n"):
            # Only the very last piece of a file can lack a newline. It is not part of the
            # chain, and bytes anyone appended look the same as a writer killed mid-line, so
            # the log does not verify until the next writer ends and records it.
            return VerifyResult(
                ok=False,
                lines=i,
                head_seq=expected_seq - 1,
                head_hash=prev,
                broken_line=line_no,
                reason=(
                    f"the file ends with {len(line)} bytes without a newline after the last "
                    "record: bytes appended outside the chain, or a writer killed mid-line "
                    "(the next writer to open the log ends such a line and records it)"
                ),
                torn_tail_bytes=len(line),
                recovered_tears=tuple(tears),
            )
        nxt = _parse_record(raw_lines[i + 1]) if i + 1 < len(raw_lines) else None
        if nxt is not None and nxt["event"] == TORN_EVENT and _covers(nxt, line):
            # A fragment left by a killed writer, ended and recorded by the next one. The
            # record after it continues the chain from the line before the fragment.
            tears.append(line_no)
            i += 1
            continue
        record = _parse_record(line)
        if record is None:
            return fail(line_no, "not an audit record (not JSON, or fields missing or malformed)")
        if record["seq"] != expected_seq:
            return fail(
                line_no,
                f"seq is {record['seq']}, expected {expected_seq}: a line before it was "
                "removed, or lines were inserted or reordered",
            )
        if record["prev"] != prev:
            if last_line_no:
                # The sequence is unbroken, so no line went missing: the previous line's
                # bytes are not those this line was chained to.
                return fail(
                    last_line_no,
                    f"altered: its SHA-256 does not match the prev that line {line_no} "
                    "recorded (or that prev was altered)",
                )
            return fail(line_no, "prev does not match the genesis value: not the log's start")
        prev = line_hash(line)
        seq_hashes[expected_seq] = (line_no, prev)
        expected_seq += 1
        last_line_no = line_no
        i += 1

    result = VerifyResult(
        ok=True,
        lines=len(raw_lines),
        head_seq=expected_seq - 1,
        head_hash=prev,
        recovered_tears=tuple(tears),
    )
    return _check_head(result, head, seq_hashes)


def _covers(torn_record: dict, fragment_line: bytes) -> bool:
    fields = torn_record["fields"]
    fragment = fragment_line[:-1]
    return (
        fields.get("torn_bytes") == len(fragment)
        and fields.get("torn_sha256") == hashlib.sha256(fragment).hexdigest()
    )


def _check_head(
    result: VerifyResult, head: tuple[int, str] | None, seq_hashes: dict[int, tuple[int, str]]
) -> VerifyResult:
    """A chain that verifies must still hold a head recorded earlier, unchanged."""
    if head is None:
        return result
    seq, digest = head
    found = seq_hashes.get(seq)
    if found is None:
        reason = (
            f"recorded head seq {seq} is missing: the log ends at seq {result.head_seq}, "
            f"so its last {seq - result.head_seq} record(s) were removed"
            if seq > result.head_seq
            else f"recorded head seq {seq} is missing"
        )
        return _failed(result, result.lines + 1, reason)
    line_no, actual = found
    if actual != digest:
        return _failed(
            result,
            line_no,
            f"seq {seq} differs from the recorded head: this line, or one before it, was "
            "rewritten (and the chain recomputed) after the head was recorded",
        )
    return result


def _failed(result: VerifyResult, line_no: int, reason: str) -> VerifyResult:
    return VerifyResult(
        ok=False,
        lines=result.lines,
        head_seq=result.head_seq,
        head_hash=result.head_hash,
        broken_line=line_no,
        reason=reason,
        torn_tail_bytes=result.torn_tail_bytes,
        recovered_tears=result.recovered_tears,
    )
