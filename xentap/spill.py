"""The spill log: where the drainer keeps the mirror stream, in order, while
the appliance is slow or away, so that no point in time is lost.

A directory of segment files.  Each entry is a small header (declared with
construct below) followed by one wire frame exactly as it would be sent;
the frame's own XXH3 checksum covers it, so a torn or corrupt tail is found
on open and cut off.  Entries hold consecutive sequence ranges; segments
whose every entry is acknowledged are deleted.  The total size is bounded:
`append` refuses (returns False) when the log is full, and the drainer then
stops taking from the ring, which overflows into the dirty bitmap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from construct import Const, Int32ul, Int64ul, Struct

from xentap import wire

EntryHeader = Struct(
    "magic" / Const(b"XTSP"),
    "frame_len" / Int32ul,
    "first_seq" / Int64ul,
    "last_seq" / Int64ul,
)
ENTRY_HEADER_SIZE = EntryHeader.sizeof()
DEFAULT_LIMIT = 1 << 30
SEGMENT_BYTES = 64 << 20


@dataclass
class _Segment:
    path: str
    first_seq: int
    last_seq: int
    size: int


#: What each log closed in this process held: directory -> its segments and, per
#: file, (size, mtime_ns).  A log opened again on that directory takes them
#: over when every file is as it was left, instead of reading and checking
#: every frame: a daemon that follows its appliance to a new address starts
#: the next drainer at once on a log it has just written, while the guest's
#: writes fill the ring (0.7 s to re-read 98 MB under load let a 92 MB/s
#: guest overflow a 64 MiB ring).
_CLOSED: dict[str, tuple[list[_Segment], dict[str, tuple[int, int]]]] = {}


def _files(directory: str) -> dict[str, tuple[int, int]]:
    out = {}
    for name in os.listdir(directory):
        if name.startswith("spill-") and name.endswith(".log"):
            st = os.stat(os.path.join(directory, name))
            out[os.path.join(directory, name)] = (st.st_size, st.st_mtime_ns)
    return out


class SpillLog:
    """An ordered, bounded, checksummed log of frames on a dom0 disk."""

    def __init__(self, directory: str, limit: int = DEFAULT_LIMIT,
                 segment_bytes: int = SEGMENT_BYTES):
        self.dir = directory
        self.limit = limit
        self.segment_bytes = min(segment_bytes, max(limit // 4, 1 << 20))
        os.makedirs(directory, exist_ok=True)
        self.segments: list[_Segment] = []
        self._fd: int | None = None     # the segment being appended to
        self._recover()

    # ---- state ----

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last_seq if self.segments else 0

    @property
    def first_seq(self) -> int:
        return self.segments[0].first_seq if self.segments else 0

    def __bool__(self) -> bool:
        return bool(self.segments)

    def _recover(self) -> None:
        """Loads the segments on disk, cutting a torn or corrupt tail (or takes
        over what this process closed there, unchanged since: see _CLOSED)."""
        left = _CLOSED.pop(os.path.realpath(self.dir), None)
        if left is not None and left[1] == _files(self.dir):
            self.segments = [_Segment(g.path, g.first_seq, g.last_seq, g.size) for g in left[0]]
            return
        names = sorted(n for n in os.listdir(self.dir) if n.startswith("spill-") and n.endswith(".log"))
        for name in names:
            path = os.path.join(self.dir, name)
            first = last = 0
            good = 0
            with open(path, "rb") as f:
                data = f.read()
            while good + ENTRY_HEADER_SIZE <= len(data):
                try:
                    h = EntryHeader.parse(data[good:good + ENTRY_HEADER_SIZE])
                    end = good + ENTRY_HEADER_SIZE + h.frame_len
                    if end > len(data):
                        break
                    wire.decode(data[good + ENTRY_HEADER_SIZE:end])
                except Exception:   # any damage ends the good part of the log
                    break
                first = first or h.first_seq
                last = h.last_seq
                good = end
            if good < len(data):
                os.truncate(path, good)
            if good == 0:
                os.unlink(path)
                continue
            self.segments.append(_Segment(path, first, last, good))

    # ---- writing ----

    def append(self, frame, first_seq: int, last_seq: int) -> bool:
        """Appends one frame (bytes, or a list of buffers that make it up);
        False (nothing written) when the log is full."""
        parts = frame if isinstance(frame, list) else [frame]
        frame_len = sum(memoryview(p).nbytes for p in parts)
        need = ENTRY_HEADER_SIZE + frame_len
        if self.size + need > self.limit:
            return False
        seg = self.segments[-1] if self.segments and self._fd is not None else None
        if seg is None or seg.size + need > self.segment_bytes:
            self._roll(first_seq)
            seg = self.segments[-1]
        head = EntryHeader.build(dict(frame_len=frame_len, first_seq=first_seq, last_seq=last_seq))
        written = os.writev(self._fd, [head, *parts])
        if written != need:     # a short write: finish it (rare, on a full disk it raises)
            data = b"".join([head, *map(bytes, parts)])[written:]
            while data:
                data = data[os.write(self._fd, data):]
        seg.size += need
        seg.last_seq = last_seq
        return True

    def _roll(self, first_seq: int) -> None:
        # No fdatasync here: the drainer must never stall on a busy disk (the
        # ring would overflow); the log exists for the appliance's absence,
        # and a dom0 crash takes the guest's in-flight writes with it anyway.
        if self._fd is not None:
            os.close(self._fd)
        path = os.path.join(self.dir, f"spill-{first_seq:020d}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.segments.append(_Segment(path, first_seq, first_seq - 1, 0))

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    # ---- reading ----

    def frames_after(self, seq: int, head: int | None = None):
        """Yields (first_seq, last_seq, frame) of every entry with last_seq > seq,
        in order; with ``head``, only the first ``head`` bytes of each frame."""
        for seg in list(self.segments):
            if seg.last_seq <= seq:
                continue
            with open(seg.path, "rb") as f:
                while True:
                    raw = f.read(ENTRY_HEADER_SIZE)
                    if len(raw) < ENTRY_HEADER_SIZE:
                        break
                    h = EntryHeader.parse(raw)
                    if h.last_seq <= seq:
                        f.seek(h.frame_len, os.SEEK_CUR)
                        continue
                    if head is None or head >= h.frame_len:
                        yield h.first_seq, h.last_seq, f.read(h.frame_len)
                    else:
                        frame = f.read(head)
                        f.seek(h.frame_len - head, os.SEEK_CUR)
                        yield h.first_seq, h.last_seq, frame

    # ---- trimming ----

    def trim(self, acked_seq: int) -> None:
        """Deletes segments the appliance has made durable."""
        while self.segments and self.segments[0].last_seq <= acked_seq:
            seg = self.segments[0]
            if len(self.segments) == 1 and self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.unlink(seg.path)
            self.segments.pop(0)

    def close(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        if os.path.isdir(self.dir):
            _CLOSED[os.path.realpath(self.dir)] = (
                [_Segment(g.path, g.first_seq, g.last_seq, g.size) for g in self.segments],
                _files(self.dir))
