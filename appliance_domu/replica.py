"""A replica image per VBD, fed by the mirror stream (appliance side).

Layout, one directory per VBD under the appliance's data directory::

    <data_dir>/<vbd_uuid>/replica.img    sparse image, the size HELLO announced
    <data_dir>/<vbd_uuid>/state.json     what is durable (see ReplicaState)

Durability protocol (what an ACK may claim):

1. accepted messages are applied to the image with pwrite / fallocate
   (:meth:`Replica.apply`); this changes only the in-memory *pending* state;
2. :meth:`Replica.sync` fdatasyncs the image, *then* writes the pending state
   atomically (temp file, fsync, rename, fsync of the directory).

So ``state.json``'s ``high_water`` never names a seq whose data is not on
stable storage, and "durable" = data synced and state recorded.  After a
crash the image may also hold some writes beyond ``high_water``; dom0 re-sends
from at most ``high_water + 1`` (it was never ACKed beyond that) and the
writes are re-applied in order, which converges to the same content.

The journal (:mod:`engines.journal`, in ``<data_dir>/<vbd_uuid>/journal``)
keeps every message as well, for restores to any point in its window: what
:meth:`Replica.apply` applies is also appended to it, and
:meth:`Replica.write_durable` makes the journal durable *first* (so the
journal always holds at least ``high_water``; it may hold more after a
crash, and skips those seqs when dom0 re-sends them).  ``replica.img`` is the
live copy; the journal's ``base.img`` is the copy that lags by the retention
window.

With a journal, :meth:`Replica.apply` writes the journal only: a guest's
write would otherwise go into the page cache twice and be written back
twice, and that is most of the appliance's cost.  ``replica.img`` is brought
up to date from the journal by :meth:`Replica.catch_up` (each block once, in
disk order): the receiver calls it when the stream pauses -- before the ACK
that acknowledges everything received, so whoever saw that ACK finds the
image equal to the disk --, when it lags by :data:`IMAGE_MAX_LAG_BYTES`, at
a HELLO and on close.  ``image_applied`` says how far it is.

The state also carries what :class:`xentap.wire.StreamChecker` needs back
after a restart: ``high_water``, ``epoch`` (the highest session epoch ever
accepted, recorded durably *before* the HELLO is answered, so a stale
session can never be accepted again) and ``in_resync`` (a GAP still open).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from engines import journal as journal_mod
from xentap import wire
from xentap.durable import fsync_dir
from xentap.durable import write_atomically

log = logging.getLogger(__name__)

STATE_FORMAT = 1
IMAGE_NAME = "replica.img"
STATE_NAME = "state.json"
JOURNAL_NAME = "journal"
_MAX_STATE_BYTES = 64 * 1024
IMAGE_SYNC_INTERVAL = 1.0  #: seconds between fdatasyncs of replica.img (the journal is the log)
IMAGE_SYNC_BYTES = 256 << 20  #: ... or this many bytes applied since the last one
#: with a journal, replica.img is brought up to date from it when the stream pauses
#: (:meth:`Replica.catch_up`), or once it lags by this many data bytes
IMAGE_MAX_LAG_BYTES = 4 << 30

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_DISCARD = int(wire.WriteFlags.DISCARD)  # plain ints: IntFlag arithmetic is slow
_ZEROES = int(wire.WriteFlags.ZEROES)
_ZERO_CHUNK = 1 << 20
_ZERO_BUF = bytes(_ZERO_CHUNK)


def _load_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags (os.posix_fallocate has none); OSError on failure."""
    if _fallocate is None:  # pragma: no cover
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_tls = threading.local()  # .quick: write_state_atomically may skip the fsyncs (see there)


def write_state_atomically(path: Path, data: bytes) -> None:  # tests patch this name
    """Replace ``path`` atomically (temp file + rename).  Durably (fsyncs of the file
    and of the directory) unless the caller said ``_tls.quick``: a group commit that
    only moves ``high_water`` (and the last flush / checkpoint / GAP) forward, which
    the journal makes durable on its own: :meth:`Replica.open` takes the journal's
    last whole record as the high water when the state lags it after a crash."""
    write_atomically(path, data, durable=not getattr(_tls, "quick", False))


#: ReplicaState fields a quick state write may change (the journal has them too)
_QUICK_FIELDS = dict(high_water=0, last_flush_seq=0, last_flush_ns=0, last_flush_durable_ns=0,
                     last_gap_seq=0, last_gap_reason=0, last_checkpoint_seq=0,
                     last_checkpoint_label="", updated_ns=0)


class ReplicaError(OSError):
    """A replica directory or state file is unusable (one-line message)."""


@dataclass
class ReplicaState:
    """Contents of ``state.json``.  Seqs are the stream's (see xentap.wire)."""

    vbd_uuid: str
    size_bytes: int
    logical_sector_size: int
    physical_sector_size: int
    high_water: int = 0  #: highest seq whose effect is durable in the image
    epoch: int = 0  #: highest session epoch accepted (recorded before answering HELLO)
    in_resync: bool = False  #: a GAP is open: the image is not write-ordered until RESYNC_END
    stream_id: int = 0  #: dom0's stream id of the latest session
    host_id: str = ""
    domid: int = 0
    devid: int = 0
    vdev: str = ""
    last_flush_seq: int = 0  #: latest FLUSH marker (a crash-consistent point) ...
    last_flush_ns: int = 0  #: ... its dom0 timestamp
    last_flush_durable_ns: int = 0  #: wall clock when it became durable here
    last_gap_seq: int = 0
    last_gap_reason: int = 0
    last_checkpoint_seq: int = 0
    last_checkpoint_label: str = ""
    #: seq up to which replica.img itself is durable; the journal holds the rest up to
    #: high_water and Replica.open re-applies it.  -1: equal to high_water (no journal)
    image_seq: int = -1
    format: int = STATE_FORMAT
    updated_ns: int = 0

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, path: Path, data: bytes) -> ReplicaState:
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            if d.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r}")
            names = {f.name: f.type for f in fields(cls)}
            kw = {k: v for k, v in d.items() if k in names}
            st = cls(**kw)
            for k in ("size_bytes", "logical_sector_size", "physical_sector_size",
                      "high_water", "epoch", "stream_id", "last_flush_seq"):
                v = getattr(st, k)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"{k} is {v!r}")
            if not isinstance(st.in_resync, bool):
                raise ValueError(f"in_resync is {st.in_resync!r}")
            uuid.UUID(st.vbd_uuid)
        except (ValueError, TypeError) as e:
            raise ReplicaError(errno.EINVAL, f"corrupt replica state {path}: {e}") from None
        return st


class Replica:
    """One VBD's replica image and its durable state.

    ``state`` is what is on disk (durable); ``pending`` what has been applied
    to the image since (not yet synced).  Use :meth:`open` / :meth:`create`.
    """

    def __init__(self, directory: Path, state: ReplicaState, fd: int):
        self.journal: journal_mod.Journal | None = None  # attached by open / create
        self._jtaken = None  # journal frames taken by begin_sync, written by write_durable
        self.dir = directory
        self.image_path = directory / IMAGE_NAME
        self.state_path = directory / STATE_NAME
        self.state = state
        self.pending = replace(state)
        self.fd = fd
        self.dirty_bytes = 0  # bytes applied since the last sync
        self._image_synced_at = time.monotonic()
        self._image_bytes = 0  # bytes applied since the image's last fdatasync
        self._image_due = True  # this sync fdatasyncs the image too
        self._failed = False  # a sync failed: the page cache is not trusted any more
        self.dirty_since: float | None = None  # monotonic time of the first unsynced apply
        self.syncs = 0
        self.syncing = False  # between begin_sync() and end_sync()
        self._punch_ok = True
        self._zero_range_ok = True
        #: seq up to which replica.img holds the stream (page cache, maybe not durable);
        #: with a journal it lags while the stream is busy (see catch_up)
        self.image_applied = state.high_water
        self.image_lag_bytes = 0  # data bytes journaled but not yet in replica.img
        self._catchup_mu = threading.Lock()  # one catch_up at a time; close waits for it

    # -- naming
    @staticmethod
    def directory(data_dir: str | os.PathLike, vbd_uuid: uuid.UUID | str) -> Path:
        return Path(data_dir) / str(uuid.UUID(str(vbd_uuid)))

    @property
    def vbd_uuid(self) -> uuid.UUID:
        return uuid.UUID(self.state.vbd_uuid)

    def __repr__(self) -> str:
        return (f"<Replica {self.state.vbd_uuid} durable {self.state.high_water} "
                f"applied {self.pending.high_water} epoch {self.pending.epoch}>")

    # -- open / create
    @classmethod
    def load_state(cls, data_dir, vbd_uuid) -> ReplicaState | None:
        """The durable state of a VBD's replica, or None if it has none."""
        path = cls.directory(data_dir, vbd_uuid) / STATE_NAME
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(data) > _MAX_STATE_BYTES:
            raise ReplicaError(errno.EINVAL, f"corrupt replica state {path}: too large")
        st = ReplicaState.from_json(path, data)
        if st.vbd_uuid != str(uuid.UUID(str(vbd_uuid))):
            raise ReplicaError(errno.EINVAL, f"replica state {path} belongs to VBD {st.vbd_uuid}")
        return st

    @classmethod
    def open(cls, data_dir, vbd_uuid, *, journal: dict | None = None) -> Replica | None:
        """Open an existing replica and its journal; None if there is none.

        ``journal``: options for :meth:`engines.journal.Journal.open` (retention,
        segment size).  The journal is created if missing (its base is then a copy
        of the image) and recovered if the appliance died (a torn tail is cut)."""
        st = cls.load_state(data_dir, vbd_uuid)
        if st is None:
            return None
        d = cls.directory(data_dir, vbd_uuid)
        try:
            fd = os.open(d / IMAGE_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ReplicaError(errno.ENOENT, f"replica {d} has a state but no image") from None
        rep = cls(d, st, fd)
        try:
            rep._attach_journal(journal or {})
        except BaseException:
            rep.close()
            raise
        return rep

    def _attach_journal(self, opts: dict) -> None:
        jdir = self.dir / JOURNAL_NAME
        st = self.state
        if not (jdir / "meta.json").exists():
            self.journal = journal_mod.Journal.create(
                jdir, vbd_uuid=st.vbd_uuid, size_bytes=st.size_bytes,
                base_from=self.image_path if st.high_water else None,
                base_seq=st.high_water, base_ts=st.updated_ns if st.high_water else 0, **opts)
            return
        j = journal_mod.Journal.open(jdir, writable=True, **opts)
        if j.last_seq < st.high_water:
            # the journal lost durable records (damaged disk?): restart its history
            # from the replica rather than leave a hole in it
            j.close()
            lost = jdir.with_name(f"{JOURNAL_NAME}.lost-{time.time_ns()}")
            log.error("replica %s: the journal ends at seq %d, the replica at %d; history "
                      "restarted from the replica (old journal kept in %s)", self.dir,
                      j.last_seq, st.high_water, lost.name)
            os.rename(jdir, lost)
            j = journal_mod.Journal.create(
                jdir, vbd_uuid=st.vbd_uuid, size_bytes=st.size_bytes,
                base_from=self.image_path, base_seq=st.high_water, base_ts=st.updated_ns,
                **opts)
        elif j.last_seq > st.high_water and st.image_seq >= 0:
            # group commits record the state without fsync (write_state_atomically):
            # after a crash the journal's last whole record is the high water
            log.info("replica %s: the journal holds seqs up to %d, the state said %d",
                     self.dir, j.last_seq, st.high_water)
            self.state = replace(st, high_water=j.last_seq, in_resync=j.in_resync)
            self.pending = replace(self.pending, high_water=j.last_seq, in_resync=j.in_resync)
        self.journal = j
        self._redo_image()

    def _redo_image(self) -> None:
        """Re-apply what the journal holds beyond the image's durable point."""
        st, j = self.state, self.journal
        img = st.high_water if st.image_seq < 0 else st.image_seq
        if img < st.high_water:
            if j.base_seq > img:
                raise ReplicaError(errno.EIO, f"replica {self.dir}: image durable to seq {img}, "
                                   f"the journal starts after {j.base_seq}")
            log.info("replica %s: re-applying seqs %d..%d from the journal", self.dir, img + 1,
                     st.high_water)
            j.replay_onto(self.fd, img + 1, st.high_water)
            os.fdatasync(self.fd)
            self.image_applied = st.high_water
            self.state = replace(st, image_seq=st.high_water)
            write_state_atomically(self.state_path, self.state.to_json())
            self.pending = replace(self.pending, image_seq=st.high_water)
            img = st.high_water
        j.keep_from_seq = img

    @classmethod
    def create(cls, data_dir, hello: wire.Hello, *, journal: dict | None = None) -> Replica:
        """Create the replica for a (validated) HELLO: a sparse image and its state."""
        data_dir = Path(data_dir)
        d = cls.directory(data_dir, hello.vbd_uuid)
        d.mkdir(parents=True, exist_ok=True)
        if (d / STATE_NAME).exists():
            raise ReplicaError(errno.EEXIST, f"replica {d} exists")
        fd = os.open(d / IMAGE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, hello.size_bytes)
            os.fsync(fd)
            st = ReplicaState(vbd_uuid=str(hello.vbd_uuid), size_bytes=hello.size_bytes,
                              logical_sector_size=hello.logical_sector_size,
                              physical_sector_size=hello.physical_sector_size, image_seq=0)
            rep = cls(d, st, fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            if (d / JOURNAL_NAME).exists():  # left by a replica whose state was lost
                os.rename(d / JOURNAL_NAME, d / f"{JOURNAL_NAME}.old-{time.time_ns()}")
            rep._attach_journal(journal or {})
        except BaseException:
            rep.close()
            raise
        rep.begin_session(hello)  # writes state.json (the replica exists from here)
        fsync_dir(data_dir)
        return rep

    def close(self) -> None:
        """Close the image and the journal (what the journal did not write is dropped);
        after a clean life the image is made durable up to the durable high water."""
        if self.journal is not None and self.fd >= 0 and not self._failed and not self.syncing:
            try:
                self.catch_up()  # (waits for one running in another thread)
            except OSError as e:  # the journal still has it: redone on open
                log.warning("replica %s: bringing the image up to date failed: %s", self.dir, e)
        st = self.state
        if self.journal is not None and self.fd >= 0 and not self._failed and not self.syncing \
                and st.image_seq != st.high_water and self.image_applied == st.high_water:
            try:
                os.fdatasync(self.fd)
                self.state = replace(st, image_seq=st.high_water)
                write_state_atomically(self.state_path, self.state.to_json())
            except OSError as e:  # the journal still has it: redone on open
                log.warning("replica %s: image sync on close failed: %s", self.dir, e)
        with self._catchup_mu:  # a catch-up in another thread finishes first
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    # -- sessions
    def checker(self, stream_id: int, *, enforce_credit: bool = False,
                cls: type = wire.StreamChecker) -> wire.StreamChecker:
        """A StreamChecker (or `cls`) continuing from what this replica has applied."""
        p = self.pending
        return cls(stream_id, high_water=p.high_water, epoch=p.epoch,
                   vbd_uuid=self.vbd_uuid, in_resync=p.in_resync,
                   enforce_credit=enforce_credit)

    @staticmethod
    def fresh_checker(stream_id: int, *, enforce_credit: bool = False,
                      cls: type = wire.StreamChecker) -> wire.StreamChecker:
        """The checker for a VBD with no replica yet."""
        return cls(stream_id, enforce_credit=enforce_credit)

    def begin_session(self, hello: wire.Hello) -> None:
        """Record an accepted HELLO (epoch, identity, size) durably, before it is answered."""
        p = self.pending
        if hello.size_bytes != p.size_bytes:
            log.info("replica %s: disk size %d -> %d bytes", p.vbd_uuid, p.size_bytes,
                     hello.size_bytes)
            self.catch_up()  # records from before the resize go in first
            os.ftruncate(self.fd, hello.size_bytes)
            if self.journal is not None:
                self.journal.resize(hello.size_bytes)
            self._dirty(0)
        p.size_bytes = hello.size_bytes
        p.logical_sector_size = hello.logical_sector_size
        p.physical_sector_size = hello.physical_sector_size
        p.epoch = max(p.epoch, hello.epoch)
        p.stream_id = hello.stream_id
        p.host_id = str(hello.host_id)
        p.domid, p.devid, p.vdev = hello.domid, hello.devid, hello.vdev
        self.sync(force=True)

    # -- applying
    def _dirty(self, n: int) -> None:
        self.dirty_bytes += n
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    @property
    def dirty(self) -> bool:
        return self.dirty_since is not None

    def _pwrite(self, data, offset: int) -> None:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        fd = self.fd
        while mv.nbytes:
            n = os.pwrite(fd, mv, offset)
            mv, offset = mv[n:], offset + n

    def _write_records(self, recs: wire.Records) -> int:
        """pwrite a batch of data records decoded as arrays (no per-record objects)."""
        fd, pwrite, w = self.fd, os.pwrite, recs.wire_len
        offs = (recs.sector.astype("u8") * wire.SECTOR_SIZE).tolist()
        for off, d in zip(offs, recs.data_views()):
            n = pwrite(fd, d, off)
            if n != w:  # short write: finish it the slow way
                self._pwrite(d[n:], off + n)
        return recs.data_bytes

    def _write_zeroes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, _ZERO_CHUNK)
            self._pwrite(memoryview(_ZERO_BUF)[:n], offset)
            offset, length = offset + n, length - n

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range (reads back as zeroes); zeroes written if unsupported."""
        if self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._punch_ok = False
        self._write_zeroes(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeroes (ZERO_RANGE, else punch hole, else write zeroes)."""
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._zero_range_ok = False
        self.punch(offset, length)

    def apply(self, msg: wire.Message) -> int:
        """Apply one message accepted by the StreamChecker; returns data bytes written.

        Only seq-consuming messages change the replica; their effect is
        pending until :meth:`sync`.
        """
        rng = wire.seq_range(msg)
        if rng is None:
            return 0
        p = self.pending
        if self.journal is not None:  # the journal only: catch_up() does the image
            self._journal(msg)
            nbytes = wire.payload_bytes(msg)
            self.image_lag_bytes += nbytes
        else:
            nbytes = self._apply_image(msg)
            self._image_bytes += nbytes
            self.image_applied = rng[1]
        if isinstance(msg, wire.Flush):
            p.last_flush_seq, p.last_flush_ns = msg.seq, msg.timestamp_ns
        elif isinstance(msg, wire.Gap):
            p.in_resync = True
            p.last_gap_seq, p.last_gap_reason = msg.seq, int(msg.reason)
        elif isinstance(msg, wire.ResyncEnd):
            p.in_resync = False
        elif isinstance(msg, wire.Checkpoint):
            p.last_checkpoint_seq, p.last_checkpoint_label = msg.seq, msg.label
        p.high_water = rng[1]
        self._dirty(nbytes)
        return nbytes

    def _apply_image(self, msg: wire.Message) -> int:
        """Write a WRITES / RESYNC message's data into the image; returns data bytes."""
        nbytes = 0
        if isinstance(msg, wire.Writes):
            recs = msg.records
            if type(recs) is wire.Records and recs.wire_len and not recs.flags.any():
                return self._write_records(recs)
            DISCARD, ZEROES = _DISCARD, _ZEROES
            for r in recs:
                off = r.sector * wire.SECTOR_SIZE
                if r.flags & DISCARD:
                    self.punch(off, r.length)
                elif r.flags & ZEROES:
                    self.zero(off, r.length)
                else:
                    self._pwrite(r.data, off)
                    nbytes += r.length
        elif isinstance(msg, wire.Resync):
            off = msg.sector * wire.SECTOR_SIZE
            if msg.flags & _ZEROES:
                self.zero(off, msg.length)
            else:
                self._pwrite(msg.data, off)
                nbytes += msg.length
        return nbytes

    @property
    def image_behind(self) -> bool:
        """replica.img lacks records the journal holds (see catch_up)."""
        return self.image_applied < self.pending.high_water

    def catch_up(self, max_bytes: int | None = None) -> int:
        """Bring replica.img up to the durable high water from the journal (records
        not yet durable stay for the next call), or only ``max_bytes`` of journal
        further; returns the seq it holds now."""
        with self._catchup_mu:
            st = self.state
            if self.journal is None or self.image_applied >= st.high_water or self.fd < 0:
                return self.image_applied
            lag = self.image_lag_bytes
            n, upto = self.journal.replay_onto(self.fd, self.image_applied + 1, st.high_water,
                                               max_bytes)
            self._image_bytes += n
            # roughly: what came in meanwhile, or what this step left, still lags
            if upto >= self.pending.high_water:
                self.image_lag_bytes = 0
            elif upto >= st.high_water:
                self.image_lag_bytes = max(0, self.image_lag_bytes - lag)
            self.image_applied = upto
            return self.image_applied

    def _journal(self, msg: wire.Message) -> None:
        j, K = self.journal, journal_mod.Kind
        if isinstance(msg, wire.Writes):
            j.append_writes(msg.first_seq, msg.records)
        elif isinstance(msg, wire.Flush):
            j.append_event(msg.seq, K.FLUSH, msg.timestamp_ns)
        elif isinstance(msg, wire.Resync):
            j.append_resync(msg.seq, msg.sector, msg.length, msg.flags, msg.data)
        elif isinstance(msg, wire.Gap):
            j.append_event(msg.seq, K.GAP, msg.timestamp_ns, arg=int(msg.reason))
        elif isinstance(msg, wire.ResyncEnd):
            j.append_event(msg.seq, K.RESYNC_END, msg.timestamp_ns)
        elif isinstance(msg, wire.Checkpoint):
            j.append_event(msg.seq, K.CHECKPOINT, msg.timestamp_ns, arg=int(msg.kind),
                           label=msg.label)
        else:
            raise ValueError(f"not a journaled message: {msg.TYPE.name}")

    # -- durability
    def sync(self, *, force: bool = False) -> int:
        """Make everything applied durable: fdatasync the image, then record the state.

        Returns the durable high water.  A no-op when nothing is pending.
        Must not run while a :meth:`begin_sync` is unfinished.
        """
        if not force and not self.dirty:
            return self.state.high_water
        snap = self.begin_sync()
        try:
            self.write_durable(snap)
        except BaseException:
            self.end_sync(None)
            raise
        self.end_sync(snap)
        return snap.high_water

    # The same in three steps, so that the I/O can run in another thread while
    # the caller keeps applying: begin_sync() (caller's thread) snapshots the
    # pending state -- every write it covers has returned from pwrite --,
    # write_durable() (any thread) fdatasyncs and then writes that snapshot,
    # end_sync() (caller's thread) makes it the durable state.  At most one
    # begin..end at a time per replica, so state files are written in order.

    def begin_sync(self) -> ReplicaState:
        if self.syncing:
            raise RuntimeError(f"{self!r}: a sync is already under way")
        self.syncing = True
        snap = replace(self.pending, updated_ns=time.time_ns())
        if snap.last_flush_seq != self.state.last_flush_seq:
            snap.last_flush_durable_ns = snap.updated_ns
        self.dirty_bytes = 0
        self.dirty_since = None
        st = self.state
        durable_img = st.high_water if st.image_seq < 0 else st.image_seq
        self._image_due = self.journal is None or (
            self.image_applied > durable_img
            and (self._image_bytes >= IMAGE_SYNC_BYTES
                 or time.monotonic() - self._image_synced_at >= IMAGE_SYNC_INTERVAL))
        if self.journal is None:
            snap.image_seq = -1
        elif self._image_due:
            snap.image_seq = max(durable_img, min(self.image_applied, snap.high_water))
            self._image_bytes = 0
        else:
            snap.image_seq = durable_img
        self._jtaken = self.journal.take() if self.journal is not None else None
        return snap

    def write_durable(self, snap: ReplicaState) -> None:
        taken, self._jtaken = self._jtaken, None
        if taken is None:  # no journal: the image is what is durable
            os.fdatasync(self.fd)
        elif not self._image_due:
            self.journal.write(taken)  # the journal is the log; the image syncs later
        else:
            # the journal's write + fdatasync and the image's fdatasync overlap (a
            # helper thread); both are done before the state says "durable"
            err: list[BaseException] = []

            def image_sync():
                try:
                    os.fdatasync(self.fd)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    err.append(e)

            t = threading.Thread(target=image_sync, name="xentap-image-sync", daemon=True)
            t.start()
            try:
                self.journal.write(taken)
            finally:
                t.join()
            if err:
                self.journal.forget_last_write()  # not durable as a whole: none of it counts
                raise err[0]
        _tls.quick = taken is not None and \
            replace(snap, **_QUICK_FIELDS) == replace(self.state, **_QUICK_FIELDS)
        try:
            write_state_atomically(self.state_path, snap.to_json())
        except OSError:
            if taken is not None:
                self.journal.forget_last_write()
            raise
        finally:
            _tls.quick = False

    def end_sync(self, snap: ReplicaState | None) -> None:
        """Finish a sync; ``None`` if write_durable failed (nothing becomes durable)."""
        self.syncing = False
        if snap is None:
            self._failed = True
            return
        if self.journal is not None and snap.image_seq != self.state.image_seq:
            self._image_synced_at = time.monotonic()
            self.journal.keep_from_seq = snap.image_seq  # trims stay behind the image
        self.pending.image_seq = snap.image_seq
        self.state = snap
        self.pending.last_flush_durable_ns = snap.last_flush_durable_ns
        self.pending.updated_ns = snap.updated_ns
        self.syncs += 1

    @property
    def durable_seq(self) -> int:
        return self.state.high_water

    @property
    def applied_seq(self) -> int:
        return self.pending.high_water

    # -- reading (tests, restore)
    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)
