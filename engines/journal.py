"""The CDP journal: every write of a VBD kept for recovery to any point in time.

One directory per VBD (the appliance keeps it at ``<data_dir>/<uuid>/journal``)::

    lock                 flock: one writer (the appliance); restores take it shared
                         while they copy the base, a trim takes it exclusively
    meta.json            base_seq/base_ts (what base.img holds), a trim in progress
    base.img             the base image: the disk as of seq ``base_seq``
    seg-<seq:016x>.xjs   append-only segments (first seq in the name)
    seg-<seq:016x>.idx   sparse index of a segment: one 48-byte entry per frame
    seg-<seq:016x>.ckp   checkpoints found in / tagged into a segment, 148 bytes each

Restore to seq S = copy of base.img + replay of every record base_seq < seq <= S.
Retention (time, size) trims whole segments, oldest first: the segment is
first applied to base.img (made durable), then deleted; ``meta.json`` makes
that redo-able after a crash.

Segment: a 56-byte header (:data:`SEG_HDR`), then frames.  A frame is a
64-byte header (:data:`FRAME_HDR`, checksummed with XXH3-64 together with
everything that follows it), a record table of 24 bytes per record
(:data:`REC`), then the payload: the data of the frame's records, concatenated
and compressed as *one* zstd frame (stored raw if that does not shrink it).
A RECORDS frame covers consecutive seqs ``first_seq..last_seq``, one table
entry each; a TAG frame carries a checkpoint tag added after the fact
(:meth:`Journal.add_tag`) and consumes no seq.  The ``.idx`` / ``.ckp``
files are derived from the segment: those of the tail segment are rebuilt by
scanning it on open (so they need no fsync of their own), sealed segments
have theirs fsynced before the next segment starts.

Crash safety: a frame is durable once :meth:`Journal.write` fdatasynced the
segment; on open the tail segment is scanned and cut after the last whole
frame whose checksum matches (a torn or corrupt tail is dropped).

Consistency: every FLUSH is a crash-consistent checkpoint; a GAP opens a
window that is not write-ordered until RESYNC_END, and no checkpoint inside
it is offered as consistent.

Memory per VBD (writer): the open frame (at most :data:`FRAME_MAX_DATA` of
payload, referenced not copied, + 24 bytes per record), the frames sealed
but not yet written (bounded by the caller's sync threshold), one zstd
context (about 1 MiB at level -1) and its output buffer, and 64 bytes per
segment.  The index stays on disk; nothing grows with the history's length.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import xxhash
import zstandard
from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from xentap import sparse
from xentap.durable import fsync_dir, write_atomically
from xentap.structs import derive_struct
from xentap.wire import Records, numpy_dtype

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# on-disk formats

SEG_MAGIC = b"XTJS"
FRAME_MAGIC = b"XJFR"
FORMAT_VERSION = 1

SegmentHeader = Struct(
    "magic" / Bytes(4),             # SEG_MAGIC
    "version" / Int16ul,            # FORMAT_VERSION
    "flags" / Int16ul,              # SEG_IN_RESYNC | SEG_AFTER_FLUSH
    "vbd_uuid" / Bytes(16),
    "first_seq" / Int64ul,
    "created_ns" / Int64ul,
    "reserved" / Int64ul,
    "checksum" / Int64ul,           # XXH3-64 of the preceding bytes
)
SEG_HDR, _ = derive_struct(SegmentHeader)
SEG_IN_RESYNC = 1
SEG_AFTER_FLUSH = 2  #: the record before the segment's first is a FLUSH

FrameHeader = Struct(
    "magic" / Bytes(4),             # FRAME_MAGIC
    "ftype" / Int8ul,               # FT_*
    "comp" / Int8ul,                # COMP_*
    "reserved" / Int16ul,
    "first_seq" / Int64ul,
    "last_seq" / Int64ul,
    "t_first" / Int64ul,
    "t_last" / Int64ul,
    "nrec" / Int32ul,
    "table_len" / Int32ul,
    "payload_len" / Int32ul,        # as stored
    "raw_len" / Int32ul,            # before compression
    "checksum" / Int64ul,           # XXH3-64 of this header and all that follows
)
FRAME_HDR, _ = derive_struct(FrameHeader)
FT_RECORDS, FT_TAG = 1, 2
COMP_RAW, COMP_ZSTD = 0, 1

RecordEntry = Struct(
    "timestamp_ns" / Int64ul,
    "sector" / Int64ul,             # 512-byte units
    "length" / Int32ul,
    "flags" / Int16ul,
    "kind" / Int8ul,
    "reserved" / Int8ul,
)
REC, _ = derive_struct(RecordEntry)
_REC_DTYPE = numpy_dtype(RecordEntry)
_KIND_OFF = 22  # of ``kind`` in a REC entry

IndexEntry = Struct(                # one per frame, in seg-*.idx
    "first_seq" / Int64ul,
    "last_seq" / Int64ul,
    "t_first" / Int64ul,
    "t_last" / Int64ul,
    "offset" / Int64ul,
    "frame_bytes" / Int32ul,
    "nrec" / Int32ul,
)
IDX, _ = derive_struct(IndexEntry)

LABEL_MAX = 128
CheckpointEntry = Struct(           # one per checkpoint, in seg-*.ckp
    "seq" / Int64ul,
    "timestamp_ns" / Int64ul,
    "kind" / Int8ul,
    "consistent" / Int8ul,
    "label_len" / Int16ul,
    "label" / Bytes(LABEL_MAX),
)
CKP, _ = derive_struct(CheckpointEntry)

TagEntry = Struct(                  # the table of a TAG frame; the label follows
    "seq" / Int64ul,
    "timestamp_ns" / Int64ul,
    "kind" / Int8ul,
    "consistent" / Int8ul,
    "label_len" / Int16ul,
)
TAG, _ = derive_struct(TagEntry)

SECTOR = 512
FRAME_MAX_DATA = 4 << 20  #: payload bytes in one frame
FRAME_MAX_RECORDS = 8192
DEFAULT_SEGMENT_BYTES = 64 << 20
DEFAULT_RETENTION_SECONDS = 24 * 3600
DEFAULT_RETENTION_BYTES = 16 << 30
ZSTD_LEVEL = -1  #: zstd's fast levels: ~2.5x level 1's speed, about its ratio on disk blocks


class Kind:
    """Record kinds (the table's ``kind``); FLUSH..CHECKPOINT mirror the wire's messages."""

    WRITE = 0  #: data (or DISCARD / ZEROES by flags)
    FLUSH = 1  #: crash-consistent point
    GAP = 2  #: dom0 lost write order: not write-ordered until RESYNC_END (sector = reason)
    RESYNC = 3  #: resync data (ZEROES by flags)
    RESYNC_END = 4
    CHECKPOINT = 5  #: a tag from the stream (sector = tag kind, data = label)


class TagKind:
    """Checkpoint kinds, as on the wire (xentap.wire.CheckpointKind)."""

    FLUSH = 1
    USER = 2
    ANALYZER = 3
    NAMES = {1: "flush", 2: "user", 3: "analyzer"}


F_DISCARD, F_ZEROES = 2, 4  # xentap.wire.WriteFlags
_NO_DATA = F_DISCARD | F_ZEROES
_DATA_KINDS = (Kind.WRITE, Kind.RESYNC, Kind.CHECKPOINT)


class JournalError(OSError):
    """The journal is unusable or the request cannot be met (one-line message)."""


class OutOfWindow(JournalError):
    """A restore point outside the history window."""


def _seg_name(first_seq: int) -> str:
    return f"seg-{first_seq:016x}"


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _write_all(fd: int, parts: Iterable) -> None:
    """writev all of parts (IOV_MAX at a time), short writes resumed."""
    bufs = [memoryview(p).cast("B") for p in parts if len(p)]
    i, end = 0, len(bufs)
    while i < end:
        n = os.writev(fd, bufs[i:i + 1024])
        while n and i < end:
            ln = bufs[i].nbytes
            if n >= ln:
                n -= ln
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0


# --------------------------------------------------------------------------
# what the journal hands out


@dataclass(frozen=True)
class Checkpoint:
    """A restore point worth naming.  ``id`` is its seq (what ``--checkpoint`` takes)."""

    seq: int
    timestamp_ns: int
    kind: int
    consistent: bool
    label: str

    @property
    def id(self) -> int:
        return self.seq

    @property
    def kind_name(self) -> str:
        return TagKind.NAMES.get(self.kind, f"kind-{self.kind}")

    def to_dict(self) -> dict:
        return dict(id=self.seq, seq=self.seq, timestamp_ns=self.timestamp_ns,
                    kind=self.kind_name, consistent=self.consistent, label=self.label)


@dataclass
class _Segment:
    first_seq: int
    path: Path  # without suffix
    last_seq: int = 0  # 0: empty
    t_first: int = 0
    t_last: int = 0
    nbytes: int = 0
    in_resync_at_start: bool = False

    @property
    def xjs(self) -> Path:
        return self.path.with_suffix(".xjs")

    @property
    def idx(self) -> Path:
        return self.path.with_suffix(".idx")

    @property
    def ckp(self) -> Path:
        return self.path.with_suffix(".ckp")


class _Frame:
    """An open (or sealed, not yet written) RECORDS frame: consecutive seqs."""

    __slots__ = ("first_seq", "last_seq", "t_first", "t_last", "table", "data", "ndata",
                 "ckps", "nrec", "gap_marks")

    def __init__(self, first_seq: int):
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        self.t_first = self.t_last = 0
        self.table: list[bytes] = []
        self.data: list = []
        self.ndata = 0
        self.ckps: list[bytes] = []  # CKP entries for checkpoints in this frame
        self.nrec = 0
        self.gap_marks: list[bool] = []  # GAP / RESYNC_END in this frame, in order


@dataclass
class ScanResult:
    frames: int = 0
    records: int = 0
    bytes_ok: int = 0
    error: str = ""


# --------------------------------------------------------------------------
# the journal


class Journal:
    """One VBD's journal.  :meth:`open` it (``writable`` for the appliance).

    Writer API: ``append_writes`` / ``append_event`` / ``append_resync`` add
    records to the open frame (nothing is written); :meth:`take` seals what
    is pending and :meth:`write` makes it durable (fdatasync) — the two halves
    let a receiver do the I/O in another thread; :meth:`commit` does both.
    :meth:`add_tag` records a checkpoint tag for an already journaled seq.
    Reader API: :meth:`window`, :meth:`checkpoints`, :meth:`restore`,
    :meth:`verify`, :meth:`info`.
    """

    def __init__(self, directory: Path, *, writable: bool, size_bytes: int,
                 vbd_uuid: str, segment_bytes: int, retention_seconds: float,
                 retention_bytes: int):
        self.dir = directory
        self.writable = writable
        self.size_bytes = size_bytes
        self.vbd_uuid = vbd_uuid
        self.segment_bytes = segment_bytes
        self.retention_seconds = retention_seconds
        self.retention_bytes = retention_bytes
        self.base_seq = 0
        self.base_ts = 0
        self.base_in_resync = False
        self.segments: list[_Segment] = []
        self.last_seq = 0  # highest seq appended (in memory)
        self.durable_seq = 0  # highest seq made durable by write()
        self.last_ts = 0
        self.in_resync = False
        self.warnings: list[str] = []  # recent "journal full" and recovery notes
        self.trimmed_for_space = 0
        #: trims never pass this seq (the live replica image re-applies records after
        #: it on open); None: no limit
        self.keep_from_seq: int | None = None
        self._open: _Frame | None = None
        self._sealed: list[_Frame] = []
        self._pending_tags: list[tuple] = []
        self._lock_fd = -1
        self._writer_fd = -1
        self._written_resync = False  # GAP state after the last frame written
        self._written_kind = -1  # kind of the last record written
        self._written_seq = 0  # last seq written to a segment (durable after the fdatasync)
        self._last_kind = -1  # kind of the last record appended
        # GAP state changes appended since open: [(seq, in_resync)], after the
        # state at open (seq, in_resync); GAPs are rare, entries below the base go
        self._gap_marks: list[tuple[int, bool]] = []
        self._open_state = (0, False)
        self._seg_fd = -1
        self._seg_off = 0
        self._undo: tuple | None = None  # where the last write() started (_forget_write)
        self._idx_fd = -1
        self._ckp_fd = -1
        self._mu = threading.Lock()  # segment list and files (write vs trim)
        self._tag_mu = threading.Lock()  # add_tag may come from another thread
        self._trim_thread: threading.Thread | None = None
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if writable else None
        self._sample_cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if writable else None
        self._dctx = zstandard.ZstdDecompressor()
        self.stats = dict(frames=0, records=0, data_bytes=0, stored_bytes=0, syncs=0,
                          trims=0, compressed_frames=0)

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, directory: str | os.PathLike, *, vbd_uuid: str, size_bytes: int,
               base_from: str | os.PathLike | None = None, base_seq: int = 0,
               base_ts: int = 0, **kw) -> Journal:
        """Make a new journal; its base is ``base_from`` (copied) or a sparse zero image."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        base = d / "base.img"
        tmp = d / "base.img.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if base_from is not None:
                _copy_sparse(str(base_from), fd, size_bytes)
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, base)
        write_atomically(d / "meta.json", json.dumps(dict(
            format=FORMAT_VERSION, vbd_uuid=str(vbd_uuid), base_seq=base_seq, base_ts=base_ts,
            base_in_resync=False, size_bytes=size_bytes, applying=0)).encode())
        return cls.open(d, writable=True, **kw)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, writable: bool = False,
             segment_bytes: int = DEFAULT_SEGMENT_BYTES,
             retention_seconds: float = DEFAULT_RETENTION_SECONDS,
             retention_bytes: int = DEFAULT_RETENTION_BYTES) -> Journal:
        """Open a journal.  A writer takes the lock (one writer at a time), finishes an
        interrupted trim and cuts a torn tail; a reader changes nothing."""
        d = Path(directory)
        meta = cls._read_meta(d)
        j = cls(d, writable=writable, size_bytes=meta["size_bytes"],
                vbd_uuid=meta["vbd_uuid"], segment_bytes=segment_bytes,
                retention_seconds=retention_seconds, retention_bytes=retention_bytes)
        j.base_seq, j.base_ts = meta["base_seq"], meta["base_ts"]
        j.base_in_resync = bool(meta.get("base_in_resync", False))
        try:
            if writable:
                # "writer": held exclusively for the writer's life; "lock": a trim holds
                # it exclusively, a restore shared while it copies the base
                j._writer_fd = os.open(d / "writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                       0o600)
                try:
                    fcntl.flock(j._writer_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise JournalError(errno.EBUSY, f"journal {d} is open by another writer") \
                        from None
                j._lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            j._load_segments()
            if writable:
                if meta.get("applying"):
                    j._finish_trim(meta["applying"])
                j._recover_tail()
                j._open_state = (j.last_seq, j.in_resync)
        except BaseException:
            j.close()
            raise
        return j

    @staticmethod
    def _read_meta(d: Path) -> dict:
        p = d / "meta.json"
        try:
            meta = json.loads(p.read_bytes())
            for k in ("base_seq", "base_ts", "size_bytes"):
                if not isinstance(meta.get(k), int) or meta[k] < 0:
                    raise ValueError(f"{k} is {meta.get(k)!r}")
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown format {meta.get('format')!r}")
        except FileNotFoundError:
            raise JournalError(errno.ENOENT, f"no journal in {d}") from None
        except (ValueError, TypeError) as e:
            raise JournalError(errno.EINVAL, f"corrupt journal meta {p}: {e}") from None
        return meta

    def _write_meta(self, applying: int = 0) -> None:
        write_atomically(self.dir / "meta.json", json.dumps(dict(
            format=FORMAT_VERSION, vbd_uuid=self.vbd_uuid, base_seq=self.base_seq,
            base_ts=self.base_ts, base_in_resync=self.base_in_resync,
            size_bytes=self.size_bytes, applying=applying)).encode())

    def _load_segments(self) -> None:
        segs = []
        for p in sorted(self.dir.glob("seg-*.xjs")):
            try:
                first = int(p.stem[4:], 16)
            except ValueError:
                continue
            segs.append(_Segment(first, p.with_suffix("")))
        for s in segs:
            s.nbytes = _size_of(s.xjs)
            hdr = _read_seg_header(s.xjs)
            if hdr is None:
                s.in_resync_at_start = False
            else:
                s.in_resync_at_start = bool(hdr[2] & SEG_IN_RESYNC)
            ents = self._idx_entries(s)
            if ents:
                s.last_seq, s.t_first, s.t_last = ents[-1][1], ents[0][2], ents[-1][3]
        # segments wholly applied to the base (a trim interrupted after meta.json)
        if self.writable:
            for s in [s for s in segs if s.last_seq and s.last_seq <= self.base_seq]:
                self._unlink_segment(s)
                segs.remove(s)
        self.segments = segs
        self._refresh_tail_state()

    def _refresh_tail_state(self) -> None:
        self.last_seq = self.base_seq
        self.last_ts = self.base_ts
        for s in reversed(self.segments):
            if s.last_seq:
                self.last_seq, self.last_ts = s.last_seq, s.t_last
                break
        self.durable_seq = self._written_seq = self.last_seq

    def _idx_entries(self, s: _Segment) -> list[tuple]:
        try:
            raw = s.idx.read_bytes()
        except FileNotFoundError:
            return []
        n = len(raw) // IDX.size
        return [IDX.unpack_from(raw, i * IDX.size) for i in range(n)]

    def _recover_tail(self) -> None:
        """Scan the tail segment, cut it after its last good frame, rebuild its .idx/.ckp."""
        self.in_resync = self._written_resync = self.base_in_resync
        if not self.segments:
            return
        tail = self.segments[-1]
        hdr = _read_seg_header(tail.xjs)
        if hdr is None:  # a segment whose header never became durable: nothing in it
            log.warning("journal %s: segment %s has no valid header; removed", self.dir,
                        tail.xjs.name)
            self._unlink_segment(tail)
            self.segments.pop()
            self._refresh_tail_state()
            self.in_resync = self.segments[-1].in_resync_at_start if self.segments \
                else self.base_in_resync
            if self.segments:
                self._recover_tail()
            return
        idx, ckps = [], []
        state = [tail.in_resync_at_start, Kind.FLUSH if hdr[2] & SEG_AFTER_FLUSH else -1]
        good = SEG_HDR.size
        res = ScanResult()
        # records continue from the segment before (a segment may start with tags and
        # be named after the seq that was next when it was made)
        prev = [s for s in self.segments[:-1] if s.last_seq]
        expect = max(prev[-1].last_seq if prev else 0, self.base_seq) + 1
        with open(tail.xjs, "rb") as f:
            for off, h, table, payload, err in _scan_frames(f, SEG_HDR.size):
                if err:
                    res.error = err
                    break
                if h[1] == FT_RECORDS:
                    if h[4] != expect:
                        res.error = f"frame at {off} starts at seq {h[4]}, expected {expect}"
                        break
                    expect = h[5] + 1
                    _table_checkpoints(h, table, payload, state, ckps, self._dctx)
                    idx.append(IDX.pack(h[4], h[5], h[6], h[7], off, _frame_len(h), h[8]))
                elif h[1] == FT_TAG:
                    ckps.append(_tag_to_ckp(table))
                good = off + _frame_len(h)
        size = _size_of(tail.xjs)
        if good < size:
            msg = (f"journal {self.dir}: dropped {size - good} bytes at the tail of "
                   f"{tail.xjs.name}" + (f" ({res.error})" if res.error else ""))
            log.warning(msg)
            self.warnings.append(msg)
            with open(tail.xjs, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        write_atomically(tail.idx, b"".join(idx))
        write_atomically(tail.ckp, b"".join(ckps))
        tail.nbytes = good
        if idx:
            e0, e1 = IDX.unpack(idx[0]), IDX.unpack(idx[-1])
            tail.last_seq, tail.t_first, tail.t_last = e1[1], e0[2], e1[3]
        else:
            tail.last_seq = 0
        self.in_resync = self._written_resync = state[0]
        self._last_kind = self._written_kind = state[1]
        self._refresh_tail_state()

    def close(self) -> None:
        """Wait for a trim, close the files; unwritten appends are dropped (not durable)."""
        t = self._trim_thread
        if t is not None:
            t.join()
        for name in ("_seg_fd", "_idx_fd", "_ckp_fd", "_lock_fd", "_writer_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
            setattr(self, name, -1)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ appending
    def _frame_for(self, seq: int, nrec: int, ndata: int) -> _Frame:
        f = self._open
        if f is not None and (f.nrec + nrec > FRAME_MAX_RECORDS
                              or (f.ndata + ndata > FRAME_MAX_DATA and f.nrec)):
            self._sealed.append(f)
            f = None
        if f is None:
            f = self._open = _Frame(seq)
        return f

    def _ts(self, ts: int) -> int:
        """Timestamps are kept non-decreasing, so that time maps to seq by bisection."""
        if ts < self.last_ts:
            return self.last_ts
        self.last_ts = ts
        return ts

    def append_writes(self, first_seq: int, records) -> int:
        """Journal a WRITES batch: ``records`` have ``timestamp_ns``, ``sector``,
        ``length``, ``flags``, ``data`` (wire.WriteRecord).  Seqs already journaled are
        skipped (re-sends after a restart); a gap raises.  Returns records added."""
        skip = self.last_seq + 1 - first_seq
        if skip > 0:
            records = records[skip:]
            first_seq += skip
        elif skip < 0:
            raise JournalError(errno.EINVAL, f"journal {self.dir}: seq {first_seq} after "
                               f"{self.last_seq} leaves a gap")
        if not records:
            return 0
        if type(records) is Records:
            return self._append_records(first_seq, records)
        pack = REC.pack
        nodata = _NO_DATA
        i, n = 0, len(records)
        while i < n:
            # one frame at a time; a batch larger than a frame is split
            f = self._frame_for(first_seq + i, 1, 0)
            table, data = f.table, f.data
            ndata, nrec = f.ndata, f.nrec
            last_ts = self.last_ts
            t0 = None
            while i < n and nrec < FRAME_MAX_RECORDS:
                r = records[i]
                ts = r.timestamp_ns
                if ts < last_ts:
                    ts = last_ts
                last_ts = ts
                fl = r.flags
                if not fl & nodata:
                    d = r.data
                    ln = len(d)
                    if ndata + ln > FRAME_MAX_DATA and nrec:
                        break
                    data.append(d)
                    ndata += ln
                if t0 is None:
                    t0 = ts
                table.append(pack(ts, r.sector, r.length, fl & 0xFFFF, 0, 0))
                nrec += 1
                i += 1
            if f.nrec == 0 and t0 is not None:
                f.t_first = t0
            f.ndata, f.nrec = ndata, nrec
            f.last_seq = f.first_seq + nrec - 1
            f.t_last = last_ts
            self.last_ts = last_ts
            if i < n:
                self._sealed.append(f)
                self._open = None
        self.last_seq = first_seq + n - 1
        self._last_kind = Kind.WRITE
        self.stats["records"] += n
        return n

    def _append_records(self, first_seq: int, recs: Records) -> int:
        """append_writes of a batch decoded as arrays: its table built by numpy,
        its data one contiguous piece (one copy; zstd reads it as it lies)."""
        n = len(recs)
        ndata = recs.data_bytes
        f = self._frame_for(first_seq, n, ndata)
        ts = recs.timestamp_ns.astype(np.uint64)
        if ts[0] < self.last_ts:
            ts[0] = self.last_ts
        np.maximum.accumulate(ts, out=ts)  # non-decreasing (see _ts)
        t = np.zeros(n, dtype=_REC_DTYPE)
        t["timestamp_ns"] = ts
        t["sector"] = recs.sector
        t["length"] = recs.length
        t["flags"] = recs.flags & 0xFFFF
        f.table.append(t.tobytes())
        if ndata:
            f.data.append(memoryview(np.ascontiguousarray(recs.data2d())).cast("B"))
            f.ndata += ndata
        if f.nrec == 0:
            f.t_first = int(ts[0])
        f.nrec += n
        f.last_seq = f.first_seq + f.nrec - 1
        self.last_ts = f.t_last = int(ts[-1])
        self.last_seq = first_seq + n - 1
        self._last_kind = Kind.WRITE
        self.stats["records"] += n
        return n

    def append_event(self, seq: int, kind: int, timestamp_ns: int | None = None, *,
                     arg: int = 0, label: str = "") -> bool:
        """Journal a one-seq marker: FLUSH, GAP (arg = reason), RESYNC_END or
        CHECKPOINT (arg = tag kind, label).  False for a seq already journaled."""
        if seq <= self.last_seq:
            return False
        if seq != self.last_seq + 1:
            raise JournalError(errno.EINVAL, f"journal {self.dir}: seq {seq} after "
                               f"{self.last_seq} leaves a gap")
        ts = self._ts(timestamp_ns if timestamp_ns is not None else self.last_ts)
        data = label.encode()[:LABEL_MAX] if kind == Kind.CHECKPOINT else b""
        f = self._frame_for(seq, 1, len(data))
        if f.nrec == 0:
            f.t_first = ts
        f.table.append(REC.pack(ts, arg, len(data), 0, kind, 0))
        if data:
            f.data.append(data)
            f.ndata += len(data)
        f.nrec += 1
        f.last_seq = seq
        f.t_last = ts
        if kind == Kind.FLUSH:
            f.ckps.append(CKP.pack(seq, ts, TagKind.FLUSH, not self.in_resync, 0, b""))
        elif kind == Kind.CHECKPOINT:
            # consistent when it directly follows a flush outside a GAP window
            cons = self._last_kind == Kind.FLUSH and not self.in_resync
            f.ckps.append(CKP.pack(seq, ts, arg, cons, len(data), data))
        elif kind == Kind.GAP:
            self.in_resync = True
            self._gap_marks.append((seq, True))
            f.gap_marks.append(True)
        elif kind == Kind.RESYNC_END:
            self.in_resync = False
            self._gap_marks.append((seq, False))
            f.gap_marks.append(False)
        if len(self._gap_marks) > 1024:
            self._gap_marks = [g for g in self._gap_marks if g[0] > self.base_seq][-1024:]
        self._last_kind = kind
        self.last_seq = seq
        return True

    def append_resync(self, seq: int, sector: int, length: int, flags: int, data) -> bool:
        """Journal a RESYNC region (not write-ordered: it belongs to a GAP window)."""
        if seq <= self.last_seq:
            return False
        if seq != self.last_seq + 1:
            raise JournalError(errno.EINVAL, f"journal {self.dir}: seq {seq} after "
                               f"{self.last_seq} leaves a gap")
        nd = 0 if flags & F_ZEROES else len(data)
        f = self._frame_for(seq, 1, nd)
        ts = self.last_ts
        if f.nrec == 0:
            f.t_first = ts
        f.table.append(REC.pack(ts, sector, length, flags & 0xFFFF, Kind.RESYNC, 0))
        if nd:
            f.data.append(data)
            f.ndata += nd
        f.nrec += 1
        f.last_seq = seq
        self._last_kind = Kind.RESYNC
        f.t_last = ts
        self.last_seq = seq
        return True

    def add_tag(self, seq: int, kind: int = TagKind.ANALYZER, label: str = "",
                consistent: bool = False, timestamp_ns: int | None = None) -> Checkpoint:
        """Tag an already journaled seq as a checkpoint (the analyzer's entry point).

        ``kind`` is a :class:`TagKind` (ANALYZER for the analyzer, USER for people),
        ``label`` at most 128 UTF-8 bytes, ``consistent`` whether the state after
        ``seq`` is consistent (e.g. a jbd2 commit followed by a flush); a tag inside a
        GAP/RESYNC window is never offered as consistent.  Durable with the next
        :meth:`write` / :meth:`commit` (in the appliance: the VBD's next group
        commit, within milliseconds).  Safe to call from another thread than the
        appends; a seq not yet appended is refused.  Raises :class:`JournalError` for a seq
        outside the window or a bad label.
        """
        if not self.writable:
            raise JournalError(errno.EROFS, f"journal {self.dir} is open read-only")
        if not (self.base_seq <= seq <= self.last_seq):
            raise OutOfWindow(errno.ERANGE, f"seq {seq} is outside the journal "
                              f"({self.base_seq}..{self.last_seq})")
        b = label.encode()
        if len(b) > LABEL_MAX:
            raise JournalError(errno.EINVAL, f"label over {LABEL_MAX} bytes")
        if kind not in TagKind.NAMES:
            raise JournalError(errno.EINVAL, f"unknown checkpoint kind {kind}")
        if consistent and self._in_resync_at(seq):
            consistent = False
        ts = timestamp_ns if timestamp_ns is not None else self._time_of(seq)
        with self._tag_mu:
            self._pending_tags.append((seq, ts, kind, bool(consistent), b))
        return Checkpoint(seq, ts, kind, bool(consistent), label)

    def resize(self, size_bytes: int) -> None:
        """The disk changed size (a HELLO said so): the base follows; restores of any
        point produce the new size."""
        if size_bytes == self.size_bytes:
            return
        with self._mu:
            fd = os.open(self.dir / "base.img", os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.size_bytes = size_bytes
            self._write_meta()

    # ------------------------------------------------------------------ making durable
    def take(self) -> list:
        """Seal what was appended (the caller's thread); pass the result to :meth:`write`."""
        frames = self._sealed
        if self._open is not None and self._open.nrec:
            frames.append(self._open)
        self._open = None
        self._sealed = []
        with self._tag_mu:
            tags, self._pending_tags = self._pending_tags, []
        return [frames, tags]

    def write(self, taken: list) -> int:
        """Compress and append sealed frames, fdatasync the segment; returns the durable
        seq.  May run in another thread than the appends (one write at a time)."""
        frames, tags = taken
        if not frames and not tags:
            return self.durable_seq
        with self._mu:
            self._undo = self._undo_point()
            try:
                for f in frames:
                    if f.last_seq <= self._written_seq:
                        continue
                    self._write_frame(f)
                for t in tags:
                    self._write_tag(*t)
                os.fdatasync(self._seg_fd)
            except OSError:
                self._forget_write()
                raise
            if frames:
                self.durable_seq = max(self.durable_seq, frames[-1].last_seq)
            self.stats["syncs"] += 1
        self._maybe_trim()
        return self.durable_seq

    def _undo_point(self) -> tuple | None:
        if self._seg_fd < 0 or not self.segments:
            return None
        return (self.segments[-1], self._seg_off, os.fstat(self._idx_fd).st_size,
                os.fstat(self._ckp_fd).st_size)

    def _forget_write(self) -> None:
        """Cut what the last :meth:`write` appended to the tail segment (best effort):
        its fdatasync failed, or the caller's own sync did, so none of it may count
        as journaled when the journal is opened again (the caller closes it now).
        Frames sealed by a segment roll inside that write stay: the roll synced them."""
        u, self._undo = self._undo, None
        try:
            if u is not None and self.segments and self.segments[-1] is u[0] \
                    and self._seg_fd >= 0:
                os.ftruncate(self._seg_fd, u[1])
                os.ftruncate(self._idx_fd, u[2])
                os.ftruncate(self._ckp_fd, u[3])
            elif self._seg_fd >= 0:  # a new segment: keep its header only
                os.ftruncate(self._seg_fd, SEG_HDR.size)
                os.ftruncate(self._idx_fd, 0)
                os.ftruncate(self._ckp_fd, 0)
        except OSError as e:
            log.warning("journal %s: cannot cut an unsynced write: %s", self.dir, e)

    def forget_last_write(self) -> None:
        """The caller could not make the state that goes with the last :meth:`write`
        durable: cut that write (see _forget_write).  Close the journal afterwards."""
        with self._mu:
            self._forget_write()

    def commit(self) -> int:
        """take() + write() in the caller's thread."""
        return self.write(self.take())

    def _ensure_segment(self, first_seq: int, nbytes: int) -> None:
        """Make the tail segment ready for a frame starting at ``first_seq``: the
        current one if it fits or holds no records yet, else a new one."""
        tail = self.segments[-1] if self.segments else None
        if tail is not None and (tail.nbytes + nbytes <= self.segment_bytes
                                 or tail.last_seq == 0 or tail.first_seq >= first_seq):
            if self._seg_fd < 0:
                self._open_tail(tail)
            return
        self._roll(first_seq)

    def _open_tail(self, tail: _Segment) -> None:
        self._seg_fd = os.open(tail.xjs, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._idx_fd = os.open(tail.idx, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        self._ckp_fd = os.open(tail.ckp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        self._seg_off = tail.nbytes

    def _roll(self, first_seq: int) -> None:
        """Seal the tail (its .idx/.ckp fsynced) and start a new segment at ``first_seq``."""
        if self._seg_fd >= 0:
            os.fdatasync(self._seg_fd)
            os.fsync(self._idx_fd)
            os.fsync(self._ckp_fd)
            for name in ("_seg_fd", "_idx_fd", "_ckp_fd"):
                os.close(getattr(self, name))
                setattr(self, name, -1)
        elif self.segments:  # sealed by an earlier process: make sure of it
            for p in (self.segments[-1].idx, self.segments[-1].ckp):
                if p.exists():
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
        s = _Segment(first_seq, self.dir / _seg_name(first_seq),
                     in_resync_at_start=self._resync_before(first_seq))
        flags = (SEG_IN_RESYNC if s.in_resync_at_start else 0) | \
            (SEG_AFTER_FLUSH if self._written_kind == Kind.FLUSH else 0)
        hdr = SEG_HDR.pack(SEG_MAGIC, FORMAT_VERSION, flags, uuid.UUID(self.vbd_uuid).bytes,
                           first_seq, time.time_ns(), 0, 0)
        hdr = hdr[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(hdr[:-8]))
        fd = os.open(s.xjs, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        os.write(fd, hdr)
        os.fdatasync(fd)
        os.close(fd)
        for p in (s.idx, s.ckp):
            open(p, "wb").close()
        fsync_dir(self.dir)
        s.nbytes = SEG_HDR.size
        self.segments.append(s)
        self._open_tail(s)

    def _resync_before(self, first_seq: int) -> bool:
        # the state of the GAP window just before first_seq: tracked by the appends;
        # frames are written in order, so the writer's running state at the last
        # frame written is what we need
        return self._written_resync

    def _write_frame(self, f: _Frame) -> None:
        table = b"".join(f.table)
        comp, pieces, plen = COMP_RAW, f.data, f.ndata
        if f.ndata and self._worth_compressing(f.data):
            z = self._cctx.compress(b"".join(f.data) if len(f.data) != 1 else f.data[0])
            if len(z) < f.ndata:
                comp, pieces, plen = COMP_ZSTD, [z], len(z)
            self.stats["compressed_frames"] += 1
        hdr = FRAME_HDR.pack(FRAME_MAGIC, FT_RECORDS, comp, 0, f.first_seq, f.last_seq,
                             f.t_first, f.t_last, f.nrec, len(table), plen, f.ndata, 0)
        h = xxhash.xxh3_64(hdr[:-8])
        h.update(table)
        for p in pieces:  # stored raw: no copy of the records' data before the write
            h.update(p)
        hdr = hdr[:-8] + struct.pack("<Q", h.intdigest())
        total = len(hdr) + len(table) + plen
        self._ensure_segment(f.first_seq, total)
        tail = self.segments[-1]
        off = self._seg_off
        _write_all(self._seg_fd, (hdr, table, *pieces))
        self._seg_off += total
        os.write(self._idx_fd, IDX.pack(f.first_seq, f.last_seq, f.t_first, f.t_last, off,
                                        total, f.nrec))
        # GAP state of the frame's end, for checkpoints' consistency and the next segment
        if f.gap_marks:
            self._written_resync = f.gap_marks[-1]
        self._written_kind = table[(f.nrec - 1) * REC.size + _KIND_OFF]
        if f.ckps:
            os.write(self._ckp_fd, b"".join(f.ckps))
        if tail.last_seq == 0:
            tail.t_first = f.t_first
        tail.last_seq, tail.t_last = f.last_seq, f.t_last
        tail.nbytes = self._seg_off
        self._written_seq = f.last_seq
        self.stats["frames"] += 1
        self.stats["data_bytes"] += f.ndata
        self.stats["stored_bytes"] += total

    def _worth_compressing(self, pieces: list) -> bool:
        """Compress a frame unless a sample of it (its first 64 KiB) does not shrink
        by a tenth: encrypted or already compressed data costs zstd's time for nothing."""
        if self._cctx is None:
            return False
        sample, n = [], 0
        for p in pieces:
            p = memoryview(p)[:(64 << 10) - n]
            sample.append(p)
            n += len(p)
            if n >= 64 << 10:
                break
        if n < 8 << 10:
            return True
        return len(self._sample_cctx.compress(b"".join(sample))) < 0.9 * n

    def _write_tag(self, seq, ts, kind, consistent, label: bytes) -> None:
        table = TAG.pack(seq, ts, kind, consistent, len(label)) + label
        hdr = FRAME_HDR.pack(FRAME_MAGIC, FT_TAG, COMP_RAW, 0, seq, seq, ts, ts, 0, len(table),
                             0, 0, 0)
        h = xxhash.xxh3_64(hdr[:-8])
        h.update(table)
        hdr = hdr[:-8] + struct.pack("<Q", h.intdigest())
        self._ensure_segment(self._written_seq + 1, len(hdr) + len(table))
        _write_all(self._seg_fd, (hdr, table))
        self._seg_off += len(hdr) + len(table)
        self.segments[-1].nbytes = self._seg_off
        os.write(self._ckp_fd, CKP.pack(seq, ts, kind, consistent, len(label), label))

    # ------------------------------------------------------------------ retention
    @property
    def journal_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def _trim_candidates(self, now_ns: int | None = None) -> tuple[int, bool]:
        """(number of oldest segments to trim, whether for space)."""
        segs = self.segments
        if len(segs) < 2:
            return 0, False
        now_ns = now_ns if now_ns is not None else time.time_ns()
        total = sum(s.nbytes for s in segs)
        n, for_space = 0, False
        limit = now_ns - int(self.retention_seconds * 1e9)
        while n < len(segs) - 1:
            s = segs[n]
            if self.keep_from_seq is not None and s.last_seq > self.keep_from_seq:
                break
            if total > self.retention_bytes:
                for_space = for_space or s.t_last >= limit
            elif not (s.last_seq and s.t_last < limit):
                break
            total -= s.nbytes
            n += 1
        return n, for_space

    def _maybe_trim(self) -> None:
        if self._trim_thread is not None and self._trim_thread.is_alive():
            return
        n, _ = self._trim_candidates()
        if n:
            self._trim_thread = threading.Thread(target=self.trim, name="xentap-journal-trim",
                                                 daemon=True)
            self._trim_thread.start()

    def trim(self, now_ns: int | None = None) -> int:
        """Apply the segments that left the window to base.img and delete them.
        Skipped (0) while a restore copies the base.  Returns segments trimmed;
        a trim forced by the size limit logs one warning ("journal full")."""
        done, for_space_upto = 0, 0
        try:
            while True:
                with self._mu:
                    n, for_space = self._trim_candidates(now_ns)
                    if not n:
                        return done
                    s = self.segments[0]
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return done  # a restore is copying the base: next time
                try:
                    self._trim_one(s)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                if for_space:
                    for_space_upto = s.last_seq
                done += 1
                self.stats["trims"] += 1
        finally:
            if for_space_upto:
                self.trimmed_for_space += 1
                msg = (f"journal {self.dir} full (limit {self.retention_bytes} bytes): "
                       f"history up to seq {for_space_upto} trimmed before the retention "
                       f"time ({self.retention_seconds:.0f} s)")
                log.warning(msg)
                self.warnings = self.warnings[-9:] + [msg]

    def settle(self) -> None:
        """Wait for a retention trim running in the background."""
        t = self._trim_thread
        if t is not None:
            t.join()

    def _trim_one(self, s: _Segment) -> None:
        if s.last_seq <= self.base_seq:  # no records to apply (tags only)
            with self._mu:
                self._unlink_segment(s)
                self.segments.remove(s)
            return
        self._write_meta(applying=s.last_seq)
        in_resync = self._apply_segment_to_base(s)
        with self._mu:
            self.base_seq, self.base_ts, self.base_in_resync = s.last_seq, s.t_last, in_resync
            self._write_meta()
            self._unlink_segment(s)
            self.segments.remove(s)

    def _apply_segment_to_base(self, s: _Segment) -> bool:
        fd = os.open(self.dir / "base.img", os.O_RDWR | os.O_CLOEXEC)
        try:
            with open(s.xjs, "rb") as f:
                rs = _replay(fd, f, self._idx_entries(s), self.base_seq + 1, s.last_seq,
                             self._dctx, s.in_resync_at_start)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return rs

    def _finish_trim(self, applying: int) -> None:
        for s in list(self.segments):
            if s.last_seq and s.last_seq <= applying:
                log.warning("journal %s: finishing an interrupted trim of %s", self.dir,
                            s.xjs.name)
                self._trim_one(s)

    def _unlink_segment(self, s: _Segment) -> None:
        for p in (s.xjs, s.idx, s.ckp):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        fsync_dir(self.dir)

    # ------------------------------------------------------------------ reading
    def window(self) -> dict:
        """The restorable history: seqs base_seq..last_seq and their times."""
        first_ts = self.base_ts
        if not self.base_seq:
            for s in self.segments:
                if s.last_seq:
                    first_ts = s.t_first
                    break
        return dict(first_seq=self.base_seq, last_seq=self.durable_seq,
                    first_ts_ns=first_ts, last_ts_ns=self.last_ts_durable)

    @property
    def last_ts_durable(self) -> int:
        for s in reversed(self.segments):
            if s.last_seq:
                return s.t_last
        return self.base_ts

    def checkpoints(self, consistent_only: bool = False) -> list[Checkpoint]:
        """Checkpoints after the window's first point, oldest first (from the .ckp files)."""
        out = []
        for s in list(self.segments):
            try:
                raw = s.ckp.read_bytes()
            except FileNotFoundError:
                continue
            for i in range(len(raw) // CKP.size):
                seq, ts, kind, cons, ln, lab = CKP.unpack_from(raw, i * CKP.size)
                if not (self.base_seq < seq <= self.durable_seq):
                    continue
                if consistent_only and not cons:
                    continue
                out.append(Checkpoint(seq, ts, kind, bool(cons),
                                      lab[:ln].decode("utf-8", "replace")))
        out.sort(key=lambda c: (c.seq, c.kind))
        return out

    def seq_at(self, t_ns: int) -> int:
        """The last seq whose timestamp is <= t_ns.  OutOfWindow outside the window."""
        w = self.window()
        if w["last_seq"] == w["first_seq"]:
            raise OutOfWindow(errno.ERANGE, "the history window is empty")
        if t_ns < w["first_ts_ns"] or t_ns > w["last_ts_ns"]:
            raise OutOfWindow(errno.ERANGE, f"{_fmt_ns(t_ns)} is outside the history window "
                              f"{_fmt_ns(w['first_ts_ns'])} .. {_fmt_ns(w['last_ts_ns'])}")
        best = self.base_seq
        for s in self.segments:
            if not s.last_seq or s.t_first > t_ns:
                break
            if s.t_last <= t_ns:
                best = s.last_seq
                continue
            ents = self._idx_entries(s)
            for e in ents:
                if e[2] > t_ns:
                    return best
                if e[3] <= t_ns:
                    best = e[1]
                    continue
                # inside this frame: read its table
                with open(s.xjs, "rb") as f:
                    h, table, _ = _read_frame(f, e[4], payload=False)
                for i in range(h[8]):
                    if REC.unpack_from(table, i * REC.size)[0] > t_ns:
                        return best
                    best = e[0] + i
                return best
        return best

    def _time_of(self, seq: int) -> int:
        if seq <= self.base_seq:
            return self.base_ts
        for s in self.segments:
            if s.last_seq and s.first_seq <= seq <= s.last_seq:
                for e in self._idx_entries(s):
                    if e[0] <= seq <= e[1]:
                        with open(s.xjs, "rb") as f:
                            _, table, _ = _read_frame(f, e[4], payload=False)
                        return REC.unpack_from(table, (seq - e[0]) * REC.size)[0]
        return self.last_ts

    def _in_resync_at(self, seq: int) -> bool:
        """Whether the state after ``seq`` lies inside a GAP/RESYNC window."""
        open_seq, open_rs = self._open_state
        if self.writable and seq > open_seq:  # appended since open: the marks know
            rs = open_rs
            for s_, v in self._gap_marks:
                if s_ > seq:
                    break
                rs = v
            return rs
        rs = self.base_in_resync
        for s in self.segments:
            if s.first_seq > seq:
                break
            rs = s.in_resync_at_start
            for e in self._idx_entries(s):
                if e[0] > seq:
                    break
                with open(s.xjs, "rb") as f:
                    h, table, _ = _read_frame(f, e[4], payload=False)
                for i in range(min(h[8], seq - e[0] + 1)):
                    k = table[i * REC.size + _KIND_OFF]
                    rs = True if k == Kind.GAP else False if k == Kind.RESYNC_END else rs
        return rs

    def refresh(self) -> None:
        """A reader's view of a journal the appliance keeps writing: read it again."""
        if self.writable:
            return
        meta = self._read_meta(self.dir)
        self.base_seq, self.base_ts = meta["base_seq"], meta["base_ts"]
        self.base_in_resync = bool(meta.get("base_in_resync", False))
        self.size_bytes = meta["size_bytes"]
        self._load_segments()

    def replay_onto(self, fd: int, from_seq: int, to_seq: int,
                    max_bytes: int | None = None) -> tuple[int, int]:
        """Apply the records from_seq..to_seq to an open image (a replica's redo or
        catch-up): each block once, its last write.  With ``max_bytes``, stop after
        the frame that reaches that many journal bytes.  Returns (data bytes written,
        the last seq applied)."""
        if from_seq <= self.base_seq:
            raise OutOfWindow(errno.ERANGE, f"seq {from_seq} is no longer in the journal "
                              f"(it starts after {self.base_seq})")
        if to_seq < from_seq:
            return 0, to_seq
        with self._mu:
            segments = list(self.segments)
        files = []
        try:
            plan, nbytes = [], 0
            for s in segments:
                if not s.last_seq or s.last_seq < from_seq or s.first_seq > to_seq:
                    continue
                ents = [e for e in self._idx_entries(s) if e[1] >= from_seq and e[0] <= to_seq]
                if max_bytes is not None:
                    for k, e in enumerate(ents):
                        nbytes += e[5]
                        if nbytes >= max_bytes and e[1] < to_seq:
                            ents, to_seq = ents[:k + 1], e[1]
                            break
                if ents:
                    f = open(s.xjs, "rb")
                    files.append(f)
                    plan.append((f, ents))
                if max_bytes is not None and nbytes >= max_bytes:
                    break
            return _replay_final(fd, plan, from_seq, to_seq, self._dctx), to_seq
        finally:
            for f in files:
                f.close()

    def restore(self, out_path: str | os.PathLike, *, seq: int,
                progress: Callable[[int, int], None] | None = None) -> dict:
        """Write the disk as it was right after ``seq`` to ``out_path`` (created or
        truncated).  ``progress(done, total)`` is called as it goes.  Returns figures.

        A reader (another process than the appliance) that finds a file of
        the journal gone (a trim won the race for it) looks again and starts
        over; the point may then have left the window (OutOfWindow)."""
        for attempt in range(3):
            try:
                return self._restore_once(out_path, seq=seq, progress=progress)
            except FileNotFoundError:
                if self.writable or attempt == 2:
                    raise
                log.info("journal %s: a file went while restoring (trimmed); again", self.dir)
        raise AssertionError("unreachable")

    def _restore_once(self, out_path: str | os.PathLike, *, seq: int,
                      progress: Callable[[int, int], None] | None) -> dict:
        if not self.writable:
            self.refresh()
        if not (self.base_seq <= seq <= self.durable_seq):
            raise OutOfWindow(errno.ERANGE, f"seq {seq} is outside the history window "
                              f"({self.base_seq}..{self.durable_seq})")
        t0 = time.perf_counter()
        # a new open file description: flock conflicts with the writer's trim lock
        lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            out = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError:
            os.close(lock_fd)
            raise
        files = []
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)  # no trim while the base is copied
            try:
                meta = self._read_meta(self.dir)
                base_seq = meta["base_seq"]
                if not self.writable:  # the appliance may have trimmed since we looked
                    self.refresh()
                with self._mu:
                    segments = list(self.segments)
                if seq < base_seq:
                    raise OutOfWindow(errno.ERANGE, f"seq {seq} left the window while "
                                      f"restoring (now from {base_seq})")
                plan = []
                for s in segments:
                    if not s.last_seq or s.last_seq <= base_seq or s.first_seq > seq:
                        continue
                    ents = [e for e in self._idx_entries(s) if e[1] > base_seq and e[0] <= seq]
                    if ents:
                        f = open(s.xjs, "rb")
                        files.append(f)
                        plan.append((f, ents, s.in_resync_at_start))
                replay_bytes = sum(e[5] for _, ents, _ in plan for e in ents)
                total = self.size_bytes + replay_bytes
                done = _copy_sparse(str(self.dir / "base.img"), out, self.size_bytes,
                                    progress=(lambda n: progress(n, total)) if progress else None)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.ftruncate(out, self.size_bytes)
            base_done = self.size_bytes

            def frame_done(nbytes: int) -> None:
                nonlocal replayed
                replayed += nbytes
                if progress:
                    progress(base_done + replayed, total)

            replayed = 0
            _replay_final(out, [(f, ents) for f, ents, _rs in plan], base_seq + 1, seq,
                          self._dctx, frame_done)
            os.fsync(out)
            if progress:
                progress(total, total)
        finally:
            for f in files:
                f.close()
            os.close(out)
            os.close(lock_fd)
        el = time.perf_counter() - t0
        return dict(seq=seq, bytes=self.size_bytes, copied=done, replayed_bytes=replayed,
                    seconds=el, write_ordered=not self._in_resync_at(seq))

    def verify(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Read every frame, check checksums, seq continuity and decompression."""
        problems = []
        frames = records = 0
        total = self.journal_bytes
        done = 0
        expect = self.base_seq + 1
        for s in list(self.segments):
            hdr = _read_seg_header(s.xjs)
            if hdr is None:
                if s.xjs.exists():
                    problems.append(f"{s.xjs.name}: bad segment header")
                else:  # trimmed by the appliance while we read: the window moved
                    expect = max(expect, self._read_meta(self.dir)["base_seq"] + 1)
                continue
            ents = self._idx_entries(s)
            indexed_end = ents[-1][4] + ents[-1][5] if ents else SEG_HDR.size
            is_tail = s is self.segments[-1]
            with open(s.xjs, "rb") as f:
                for off, h, table, payload, err in _scan_frames(f, SEG_HDR.size):
                    if err:
                        # past the index of the tail: a frame being written right now
                        if not is_tail or off < indexed_end:
                            problems.append(f"{s.xjs.name} offset {off}: {err}")
                        break
                    if h[1] == FT_RECORDS:
                        if h[5] > self.base_seq:
                            if h[4] > expect:
                                problems.append(f"{s.xjs.name} offset {off}: seqs {expect}.."
                                                f"{h[4] - 1} missing")
                            expect = h[5] + 1
                        try:
                            raw = _payload(h, payload, self._dctx)
                        except zstandard.ZstdError as e:
                            problems.append(f"{s.xjs.name} offset {off}: {e}")
                            continue
                        if len(raw) != h[11]:
                            problems.append(f"{s.xjs.name} offset {off}: payload size")
                        frames += 1
                        records += h[8]
                    done += _frame_len(h)
                    if progress:
                        progress(done, total)
        if expect <= self.durable_seq:
            problems.append(f"seqs {expect}..{self.durable_seq} missing")
        return dict(ok=not problems, problems=problems, frames=frames, records=records,
                    first_seq=self.base_seq, last_seq=expect - 1)

    def info(self) -> dict:
        """Window, size and the figures `xentap journal list` shows."""
        w = self.window()
        jb = self.journal_bytes
        idx_bytes = sum(_size_of(s.idx) + _size_of(s.ckp) for s in self.segments)
        return dict(vbd=self.vbd_uuid, size_bytes=self.size_bytes, journal_bytes=jb,
                    index_bytes=idx_bytes, segments=len(self.segments), **w,
                    window_seconds=max(0, w["last_ts_ns"] - w["first_ts_ns"]) / 1e9,
                    in_resync=self.in_resync, retention_seconds=self.retention_seconds,
                    retention_bytes=self.retention_bytes, warnings=list(self.warnings))


# --------------------------------------------------------------------------
# helpers: frames, replay, copy


def _frame_len(h) -> int:
    return FRAME_HDR.size + h[9] + h[10]


def _size_of(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _read_seg_header(p: Path):
    try:
        with open(p, "rb") as f:
            b = f.read(SEG_HDR.size)
    except FileNotFoundError:
        return None
    if len(b) < SEG_HDR.size:
        return None
    h = SEG_HDR.unpack(b)
    if h[0] != SEG_MAGIC or h[7] != xxhash.xxh3_64_intdigest(b[:-8]):
        return None
    return h


def _read_frame(f, off: int, payload: bool = True):
    f.seek(off)
    hb = f.read(FRAME_HDR.size)
    if len(hb) < FRAME_HDR.size:
        raise JournalError(errno.EIO, f"short frame header at {off} in {f.name}")
    h = FRAME_HDR.unpack(hb)
    if h[0] != FRAME_MAGIC:
        raise JournalError(errno.EIO, f"bad frame magic at {off} in {f.name}")
    table = f.read(h[9])
    body = f.read(h[10]) if payload else None
    if payload:
        x = xxhash.xxh3_64(hb[:-8])
        x.update(table)
        x.update(body)
        if x.intdigest() != h[12]:
            raise JournalError(errno.EIO, f"checksum mismatch in the frame at {off} of "
                               f"{f.name}: run 'xentap journal verify'")
    return h, table, body


def _scan_frames(f, off: int) -> Iterator:
    """(offset, header, table, payload, error) for each frame from ``off``; the
    last one yielded has an error (or the end of the file: error '')."""
    while True:
        f.seek(off)
        hb = f.read(FRAME_HDR.size)
        if not hb:
            return
        if len(hb) < FRAME_HDR.size:
            yield off, None, None, None, "torn frame header"
            return
        h = FRAME_HDR.unpack(hb)
        if h[0] != FRAME_MAGIC or h[1] not in (FT_RECORDS, FT_TAG) or h[9] > (64 << 20) \
                or h[10] > (64 << 20):
            yield off, None, None, None, "bad frame header"
            return
        table = f.read(h[9])
        payload = f.read(h[10])
        if len(table) < h[9] or len(payload) < h[10]:
            yield off, None, None, None, "torn frame"
            return
        x = xxhash.xxh3_64(hb[:-8])
        x.update(table)
        x.update(payload)
        if x.intdigest() != h[12]:
            yield off, None, None, None, "checksum mismatch"
            return
        yield off, h, table, payload, ""
        off += _frame_len(h)


def _payload(h, payload: bytes, dctx) -> bytes:
    if h[2] == COMP_ZSTD:
        return dctx.decompress(payload, max_output_size=h[11])
    return payload


def _tag_to_ckp(table: bytes) -> bytes:
    seq, ts, kind, cons, ln = TAG.unpack_from(table)
    lab = table[TAG.size:TAG.size + ln]
    return CKP.pack(seq, ts, kind, cons, ln, lab)


def _table_checkpoints(h, table, payload, state: list, ckps: list, dctx) -> None:
    """Rebuild .ckp entries for a frame (scan on open).  ``state`` is [in_resync,
    kind of the previous record], updated to the frame's end."""
    raw = None
    pos = 0
    in_resync, prev = state
    for i in range(h[8]):
        ts, sector, length, flags, kind, _ = REC.unpack_from(table, i * REC.size)
        seq = h[4] + i
        if kind == Kind.FLUSH:
            ckps.append(CKP.pack(seq, ts, TagKind.FLUSH, not in_resync, 0, b""))
        elif kind == Kind.GAP:
            in_resync = True
        elif kind == Kind.RESYNC_END:
            in_resync = False
        elif kind == Kind.CHECKPOINT:
            if raw is None:
                raw = _payload(h, payload, dctx)
            cons = prev == Kind.FLUSH and not in_resync
            ckps.append(CKP.pack(seq, ts, sector, cons, length, raw[pos:pos + length]))
        if _has_data(kind, flags, length):
            pos += length
        prev = kind
    state[:] = [in_resync, prev]


def _has_data(kind: int, flags: int, length: int) -> bool:
    if kind == Kind.WRITE:
        return not flags & _NO_DATA
    if kind == Kind.RESYNC:
        return not flags & F_ZEROES
    return kind == Kind.CHECKPOINT and length > 0


_FALLOC_PUNCH = 0x02 | 0x01
_FALLOC_ZERO = 0x10 | 0x01


def _zero_range(fd: int, off: int, length: int, punch: bool) -> None:
    from appliance_domu.replica import fallocate
    try:
        fallocate(fd, _FALLOC_PUNCH if punch else _FALLOC_ZERO, off, length)
        return
    except OSError:
        pass
    try:
        fallocate(fd, _FALLOC_PUNCH, off, length)
        return
    except OSError:
        pass
    z = bytes(min(length, 1 << 20))
    while length:
        n = min(length, len(z))
        _pwrite_all(fd, z[:n], off)
        off, length = off + n, length - n


def _replay(fd: int, f, entries, from_seq: int, to_seq: int, dctx, in_resync: bool) -> bool:
    """Apply the records from_seq..to_seq of the frames ``entries`` (idx tuples) to fd.
    Returns the GAP state after the last record applied."""
    pwrite = os.pwrite
    RS = REC.size
    for e in entries:
        if e[1] < from_seq or e[0] > to_seq:
            continue
        h, table, payload = _read_frame(f, e[4])
        raw = memoryview(_payload(h, payload, dctx))
        first = h[4]
        pos = 0
        lo, hi = max(from_seq, first) - first, min(to_seq, h[5]) - first
        recs = list(REC.iter_unpack(table))
        for i in range(hi + 1):
            ts, sector, length, flags, kind, _ = recs[i]
            has = (kind == 0 and not flags & _NO_DATA) or \
                (kind == Kind.RESYNC and not flags & F_ZEROES) or \
                (kind == Kind.CHECKPOINT and length > 0)
            if i >= lo:
                if kind == 0 or kind == Kind.RESYNC:
                    off = sector * SECTOR
                    if has:
                        d = raw[pos:pos + length]
                        n = pwrite(fd, d, off)
                        if n != length:
                            _pwrite_all(fd, d[n:], off + n)
                    else:
                        _zero_range(fd, off, length, bool(flags & F_DISCARD))
                elif kind == Kind.GAP:
                    in_resync = True
                elif kind == Kind.RESYNC_END:
                    in_resync = False
            if has:
                pos += length
    return in_resync


def _replay_final(fd: int, plan: list, from_seq: int, to_seq: int, dctx,
                  frame_done: Callable[[int], None] | None = None) -> int:
    """Apply records from_seq..to_seq of ``plan`` ([(file, idx entries)], in seq
    order) to ``fd``, writing every block only with its last write in the range.

    First pass: the record tables only (no payload) give, for every block, the
    record that wrote it last.  Second pass: frame by frame (each read and
    decompressed once, in seq order), the blocks whose last write is in that
    frame, in disk order, contiguous runs in one pwrite.  A block is 4 KiB when
    every record of the range is 4 KiB-aligned, else 512 bytes.  Returns the
    data bytes written; ``frame_done(frame bytes)`` after each frame."""
    tabs = []  # per frame: (plan index, idx entry, REC array of the records in range)
    for pi, (f, ents) in enumerate(plan):
        for e in ents:
            if e[1] < from_seq or e[0] > to_seq:
                continue
            h, table, _ = _read_frame(f, e[4], payload=False)
            if h[1] != FT_RECORDS:
                continue
            tabs.append((pi, e, np.frombuffer(table, dtype=_REC_DTYPE, count=h[8]), h[4]))
    if not tabs:
        return 0
    # records that touch the image, over all frames, in seq order
    parts = []
    for k, (_pi, _e, t, first) in enumerate(tabs):
        kind, flags, length = t["kind"], t["flags"].astype(np.int64), t["length"].astype(np.int64)
        has = ((kind == Kind.WRITE) & ((flags & _NO_DATA) == 0)) \
            | ((kind == Kind.RESYNC) & ((flags & F_ZEROES) == 0)) \
            | ((kind == Kind.CHECKPOINT) & (length > 0))
        pos = np.cumsum(np.where(has, length, 0)) - np.where(has, length, 0)
        seqs = first + np.arange(len(t), dtype=np.int64)
        sel = ((kind == Kind.WRITE) | (kind == Kind.RESYNC)) & (seqs >= from_seq) \
            & (seqs <= to_seq) & (length > 0)
        idx = np.nonzero(sel)[0]
        if len(idx):
            parts.append((np.full(len(idx), k, np.int64), t["sector"][idx].astype(np.int64)
                          * SECTOR, length[idx], pos[idx], has[idx], flags[idx]))
    if not parts:
        for _ in tabs:
            if frame_done:
                frame_done(0)
        return 0
    fr, off, ln, pos, has, fl = (np.concatenate([p[i] for p in parts]) for i in range(6))
    g = 4096 if not ((off | ln) & 4095).any() else SECTOR
    nb = ln // g
    rec = np.repeat(np.arange(len(off)), nb)  # block -> record
    within = np.arange(len(rec)) - np.repeat(np.cumsum(nb) - nb, nb)
    blk = off[rec] // g + within
    # the last write of each block: first occurrence in the reversed order
    ublk, first_rev = np.unique(blk[::-1], return_index=True)
    last = len(blk) - 1 - first_rev  # indexes into the block arrays; ublk is sorted
    r = rec[last]
    bfr, bpos, bhas = fr[r], pos[r] + within[last] * g, has[r]
    bpunch = (fl[r] & F_DISCARD) != 0
    written = 0
    order = np.argsort(bfr, kind="stable")  # by frame, disk order within each frame
    bounds = np.searchsorted(bfr[order], np.arange(len(tabs) + 1))
    for k, (pi, e, _t, _first) in enumerate(tabs):
        sel = order[bounds[k]:bounds[k + 1]]
        if len(sel):
            b, p, hv, pu = ublk[sel], bpos[sel], bhas[sel], bpunch[sel]
            # runs: consecutive blocks, consecutive payload (or both zero-filled)
            brk = np.nonzero((np.diff(b) != 1) | (hv[1:] != hv[:-1]) | (pu[1:] != pu[:-1])
                             | (hv[1:] & (np.diff(p) != g)))[0] + 1
            starts = np.concatenate(([0], brk))
            ends = np.concatenate((brk, [len(b)]))
            raw = None
            if hv.any():
                h, _table, payload = _read_frame(plan[pi][0], e[4])
                raw = memoryview(_payload(h, payload, dctx))
            # one Python turn per run (a random 4 KiB workload: per block), so the
            # runs' fields come as lists, not numpy scalars, and pwrite is called as is
            pwrite = os.pwrite
            for o, n, has, src, punch in zip((b[starts] * g).tolist(),
                                             ((ends - starts) * g).tolist(),
                                             hv[starts].tolist(), p[starts].tolist(),
                                             pu[starts].tolist()):
                if has:
                    if pwrite(fd, raw[src:src + n], o) != n:
                        _pwrite_all(fd, raw[src:src + n], o)     # a short write: again, whole
                    written += n
                else:
                    _zero_range(fd, o, n, punch)
        if frame_done:
            frame_done(e[5])
    return written


def _copy_sparse(src: str, dst_fd: int, size: int,
                 progress: Callable[[int], None] | None = None) -> int:
    """Copy the data extents of src into dst_fd (holes stay holes; all of it
    where the file system cannot say where its data is); returns bytes copied."""
    copied = 0
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = min(size, os.fstat(fd).st_size)
        extents = sparse.data_extents(fd, end)
        for start, stop in ([(0, end)] if extents is None else extents):
            pos = start
            while pos < stop:
                n = min(stop - pos, 64 << 20)
                try:
                    k = os.copy_file_range(fd, dst_fd, n, pos, pos)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                                       errno.EINVAL):
                        raise
                    buf = os.pread(fd, n, pos)
                    _pwrite_all(dst_fd, buf, pos)
                    k = len(buf)
                if k <= 0:
                    break
                pos += k
                copied += k
                if progress:
                    progress(pos)
    finally:
        os.close(fd)
    if progress:
        progress(size)
    return copied


def _fmt_ns(ns: int) -> str:
    t = time.gmtime(ns // 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ns % 1_000_000_000 // 1_000_000:03d}Z"


def fmt_time(ns: int) -> str:
    """ISO 8601 UTC with milliseconds."""
    return _fmt_ns(ns)
