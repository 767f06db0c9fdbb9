"""The one binding to the C shim (xentap._shim_c, cffi API mode).

Everything else in xentap uses these classes, never the raw `lib`: they turn
the C functions' negative errno + message into OSError subclasses
(FileNotFoundError, PermissionError, ...; `VbdBusyError` for EBUSY) and C
lifetimes into context managers.  No Python runs per request: the C threads
serve the rings, Python only opens, connects, stops and reads counters.
"""
from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable


def _load_shim():
    """The compiled shim: xentap._shim_c, or the module file that
    XENTAP_SHIM_MODULE names (a sanitizer build; see tools/asan.sh)."""
    path = os.environ.get("XENTAP_SHIM_MODULE")
    if not path:
        from xentap import _shim_c
        return _shim_c
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("xentap._shim_c", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"XENTAP_SHIM_MODULE={path} is not a loadable extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["xentap._shim_c"] = mod
    return mod


_shim = _load_shim()
ffi, lib = _shim.ffi, _shim.lib

MAX_QUEUES = lib.XT_MAX_QUEUES
MAX_RING_ORDER = lib.XT_MAX_RING_ORDER
MAX_RING_PAGES = lib.XT_MAX_RING_PAGES
MAX_INDIRECT_SEGMENTS = lib.XT_MAX_INDIRECT_SEGMENTS
MAX_PERSISTENT_GRANTS = lib.XT_MAX_PERSISTENT_GRANTS
SECTOR_SIZE = lib.XT_SECTOR_SIZE
DEFAULT_POLL_US = lib.XT_DEFAULT_POLL_US
DIRECT_MODES = {False: lib.XT_DIRECT_OFF, True: lib.XT_DIRECT_ON, "auto": lib.XT_DIRECT_AUTO}

ENGINES = {"auto": lib.XT_ENGINE_AUTO, "io_uring": lib.XT_ENGINE_URING,
           "threads": lib.XT_ENGINE_THREADS, "sync": lib.XT_ENGINE_SYNC}
# The frontend's `protocol` xenstore value -> ring ABI.
PROTOCOLS = {"x86_64-abi": lib.XT_PROTO_NATIVE, "x86_32-abi": lib.XT_PROTO_X86_32}
STATES = {lib.XT_STATE_OPEN: "open", lib.XT_STATE_CONNECTED: "connected",
          lib.XT_STATE_FAILED: "failed"}


DEFAULT_MIRROR_RING = 64 << 20     # bytes per VBD
DEFAULT_DIRTY_CHUNK = 64 << 10     # bytes per dirty-bitmap bit

# Mirror ring record kinds (xt_mirror_batch.kind) and record flags.
MK_WRITES, MK_FLUSH, MK_GAP = lib.XT_MK_WRITES, lib.XT_MK_FLUSH, lib.XT_MK_GAP
MK_RESYNC, MK_RESYNC_END, MK_CHECKPOINT = lib.XT_MK_RESYNC, lib.XT_MK_RESYNC_END, lib.XT_MK_CHECKPOINT
MREC_HEADER = ffi.sizeof("struct xt_mirror_rec")
MREC_KIND_SHIFT = lib.XT_MREC_KIND_SHIFT

_MIRROR_FIELDS = ("ring_bytes", "used_bytes", "chunk_bytes", "next_seq", "records", "markers",
                  "bytes", "overflows", "overflow_bytes", "markers_dropped", "dirty_chunks",
                  "gaps", "resyncs", "gap_pending", "resyncing")


@dataclass
class MirrorBatch:
    """A run of write records (kind MK_WRITES) or one marker, as in the ring."""

    kind: int
    count: int
    first_seq: int
    data: Any           # buffer over the ring: records in wire layout
    nbytes: int
    data_bytes: int
    sector: int
    timestamp_ns: int
    length: int

    def payload(self) -> bytes:
        """A marker's payload (after its 32-byte header)."""
        return bytes(self.data[MREC_HEADER:MREC_HEADER + self.length])


def set_log_fd(fd: int) -> None:
    """Sends the shim's log lines (one write(2) each) to `fd`; 2, stderr, by default."""
    lib.xt_set_log_fd(fd)


def set_persistent_grants_limit(n: int = 0) -> int:
    """Persistent grants the whole process keeps mapped, at most (each is a
    mapping of its own, and past vm.max_map_count every mmap of the process
    fails); 0: the default, half of vm.max_map_count.  Returns the limit."""
    return lib.xt_set_persistent_grants_limit(n)


class VbdBusyError(OSError):
    """The image is already served by another VBD, or the VBD is connected."""


def _errbuf():
    return ffi.new("char[]", lib.XT_ERRLEN)


def _check(rc: int, err) -> None:
    if rc >= 0:
        return
    code = -rc
    msg = ffi.string(err).decode(errors="replace") or os.strerror(code)
    if code == errno.EBUSY:
        raise VbdBusyError(code, msg)
    raise OSError(code, msg)


def _path(p: str | os.PathLike) -> bytes:
    return os.fsencode(os.fspath(p))


class SimDomain:
    """A simulated guest domain: its grant table and event channels (sim transport).

    Lives as long as this object (and this process): the grant table is a
    memfd published as /proc/PID/fd/N in `path`.
    """

    def __init__(self, path: str | os.PathLike, domid: int = 1, nr_pages: int = 1 << 18):
        self.path = os.fspath(path)
        self.domid = domid
        out = ffi.new("xt_simdom **")
        err = _errbuf()
        _check(lib.xt_simdom_create(_path(path), domid, nr_pages, out, err), err)
        self._d = out[0]

    def close(self) -> None:
        if self._d is not None:
            lib.xt_simdom_destroy(self._d)
            self._d = None

    def __enter__(self) -> "SimDomain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Transport:
    """How the backend reaches a frontend: `Transport.sim(dir)` or `Transport.xen()`."""

    def __init__(self, handle):
        self._t = handle

    @classmethod
    def sim(cls, simdir: str | os.PathLike) -> "Transport":
        out = ffi.new("xt_transport **")
        err = _errbuf()
        _check(lib.xt_transport_sim_open(_path(simdir), out, err), err)
        return cls(out[0])

    @classmethod
    def xen(cls) -> "Transport":
        out = ffi.new("xt_transport **")
        err = _errbuf()
        _check(lib.xt_transport_xen_open(out, err), err)
        return cls(out[0])

    @property
    def name(self) -> str:
        return ffi.string(lib.xt_transport_name(self._t)).decode()

    def close(self) -> None:
        if self._t is not None:
            lib.xt_transport_close(self._t)
            self._t = None

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class RingParams:
    """What a frontend publishes (xenstore's ring-ref*, event-channel, protocol)."""

    domid: int
    nr_queues: int
    ring_order: int
    ring_refs: list[list[int]]      # [queue][page]
    evtchns: list[int]              # [queue]
    protocol: int = lib.XT_PROTO_NATIVE
    persistent: bool = False        # feature-persistent: its data pages stay granted

    def to_c(self):
        p = ffi.new("struct xt_ring_params *")
        p.domid = self.domid
        p.protocol = self.protocol
        p.persistent = int(self.persistent)
        p.nr_queues = self.nr_queues
        p.ring_order = self.ring_order
        if len(self.ring_refs) > MAX_QUEUES or len(self.evtchns) > MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues")
        for q, refs in enumerate(self.ring_refs):
            if len(refs) > MAX_RING_PAGES:
                raise ValueError(f"at most {MAX_RING_PAGES} ring pages per queue")
            for i, ref in enumerate(refs):
                p.ring_ref[q * MAX_RING_PAGES + i] = ref
        for q, port in enumerate(self.evtchns):
            p.evtchn[q] = port
        return p

    @classmethod
    def from_c(cls, p) -> "RingParams":
        pages = 1 << p.ring_order
        return cls(domid=p.domid, nr_queues=p.nr_queues, ring_order=p.ring_order,
                   ring_refs=[[p.ring_ref[q * MAX_RING_PAGES + i] for i in range(pages)]
                              for q in range(p.nr_queues)],
                   evtchns=[p.evtchn[q] for q in range(p.nr_queues)],
                   protocol=p.protocol, persistent=bool(p.persistent))


_STAT_FIELDS = ("nr_queues", "sectors", "reqs_read", "reqs_write", "reqs_flush",
                "reqs_barrier", "reqs_discard", "reqs_indirect", "bytes_read", "bytes_written", "err_bad_request",
                "err_unsupported", "err_grant", "err_io", "in_flight", "buffer_bytes",
                "ring_stopped", "timed", "ns_to_engine", "ns_at_engine", "ns_to_answer",
                "grants_mapped")


class Vbd:
    """A virtual block device served from an image file or block device."""

    def __init__(self, path: str | os.PathLike, *, engine: str = "auto",
                 direct: bool | str = False,
                 readonly: bool = False, max_indirect_segments: int = MAX_INDIRECT_SEGMENTS,
                 sector_size: int = 0, physical_sector_size: int = 0,
                 poll_us: int = DEFAULT_POLL_US):
        """`direct`: O_DIRECT on the image (True), the page cache (False), or
        "auto": O_DIRECT where the image takes it (`info()["direct"]` says).
        `poll_us`: how long a queue thread may poll its ring and completions
        before sleeping (adaptive, at most this; 0 never polls)."""
        if engine not in ENGINES:
            raise ValueError(f"unknown I/O engine {engine!r} (choose from {', '.join(ENGINES)})")
        if not 0 <= poll_us <= 1_000_000:
            raise ValueError(f"poll_us {poll_us} out of range 0..1000000")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.max_indirect_segments = max_indirect_segments
        self._cpath = ffi.new("char[]", _path(path))
        cfg = ffi.new("struct xt_vbd_config *")
        cfg.path = self._cpath
        cfg.engine = ENGINES[engine]
        if direct not in DIRECT_MODES:
            raise ValueError(f"direct must be True, False or 'auto', not {direct!r}")
        cfg.direct = DIRECT_MODES[direct]
        cfg.readonly = int(readonly)
        cfg.max_indirect_segments = max_indirect_segments
        cfg.sector_size = sector_size
        cfg.physical_sector_size = physical_sector_size
        cfg.poll_us = poll_us
        out = ffi.new("xt_vbd **")
        err = _errbuf()
        _check(lib.xt_vbd_open(cfg, out, err), err)
        self._v = out[0]
        self._transport: Transport | None = None
        self._batch = ffi.new("struct xt_mirror_batch *")

    @property
    def sectors(self) -> int:
        """Size in 512-byte sectors."""
        return lib.xt_vbd_sectors(self._v)

    @property
    def engine(self) -> str:
        return ffi.string(lib.xt_vbd_engine_name(self._v)).decode()

    def info(self) -> dict[str, int]:
        """What this VBD can do: the source of every feature key the backend advertises."""
        i = ffi.new("struct xt_vbd_info *")
        lib.xt_vbd_info(self._v, i)
        return {k: getattr(i, k) for k in (
            "sectors", "sector_size", "physical_sector_size", "readonly", "is_blockdev",
            "feature_flush", "feature_barrier", "feature_discard", "discard_granularity",
            "discard_alignment", "discard_secure", "max_indirect_segments", "max_ring_order", "direct",
            "max_queues", "feature_persistent")}

    def connect(self, transport: Transport, params: RingParams) -> None:
        """Maps the rings, binds the event channels and starts serving."""
        err = _errbuf()
        _check(lib.xt_vbd_connect(self._v, transport._t, params.to_c(), err), err)
        self._transport = transport

    def disconnect(self) -> None:
        """Answers what is in flight, then stops serving and unmaps the rings."""
        lib.xt_vbd_disconnect(self._v)
        self._transport = None

    def stats(self) -> dict[str, Any]:
        s = ffi.new("struct xt_stats *")
        lib.xt_vbd_stats(self._v, s)
        out: dict[str, Any] = {"state": STATES.get(s.state, str(s.state))}
        out.update({k: getattr(s, k) for k in _STAT_FIELDS})
        return out

    # ---- the tap ----

    def mirror_enable(self, ring_bytes: int = DEFAULT_MIRROR_RING,
                      chunk_bytes: int = DEFAULT_DIRTY_CHUNK) -> None:
        """Turns the mirror ring on (only while not connected)."""
        err = _errbuf()
        _check(lib.xt_vbd_mirror_enable(self._v, ring_bytes, chunk_bytes, err), err)

    def mirror_peek(self, skip: int = 0, max_bytes: int = 4 << 20,
                    max_records: int = 4096) -> "MirrorBatch | None":
        """What lies `skip` bytes past the oldest unreleased record, or None.

        The batch's `data` is a view of the ring itself: valid until those
        bytes are released."""
        b = self._batch
        rc = lib.xt_vbd_mirror_peek(self._v, skip, max_bytes, max_records, b)
        if rc == 0:
            return None
        if rc < 0:
            raise OSError(-rc, "mirroring is off")
        return MirrorBatch(kind=b.kind, count=b.count, first_seq=b.first_seq,
                           data=ffi.buffer(b.data, b.nbytes), nbytes=b.nbytes,
                           data_bytes=b.data_bytes, sector=b.sector,
                           timestamp_ns=b.timestamp_ns, length=b.length)

    def mirror_release(self, nbytes: int) -> None:
        """Frees the oldest `nbytes` of the ring (they are safe elsewhere)."""
        lib.xt_vbd_mirror_release(self._v, nbytes)

    def mirror_resync_step(self) -> int:
        """After a GAP: 1 if a RESYNC (or RESYNC_END) marker was appended,
        0 when nothing is dirty, -ENOSPC while the ring is full."""
        return lib.xt_vbd_mirror_resync_step(self._v)

    def mirror_checkpoint(self, label: str) -> None:
        err = _errbuf()
        _check(lib.xt_vbd_mirror_checkpoint(self._v, label.encode(), err), err)

    def mirror_wake_fd(self) -> int:
        """Readable when the drainer has work (see xt.h); read 8 bytes to clear."""
        fd = lib.xt_vbd_mirror_wake_fd(self._v)
        if fd < 0:
            raise OSError(-fd, "mirroring is off")
        return fd

    def mirror_arm_wake(self, sent: int) -> bool:
        """Before sleeping on :meth:`mirror_wake_fd` having sent the first `sent`
        bytes past the oldest unreleased record: the next record wakes it.
        True, and not armed, if more than `sent` is already there."""
        rc = lib.xt_vbd_mirror_arm_wake(self._v, sent)
        if rc < 0:
            raise OSError(-rc, "mirroring is off")
        return bool(rc)

    def mirror_stats(self) -> dict[str, int] | None:
        st = ffi.new("struct xt_mirror_stats *")
        if lib.xt_vbd_mirror_stats(self._v, st) < 0:
            return None
        return {k: getattr(st, k) for k in _MIRROR_FIELDS}

    def close(self) -> None:
        if self._v is not None:
            lib.xt_vbd_close(self._v)
            self._v = None

    def __enter__(self) -> "Vbd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Workload:
    """A fio-like job for the sim blkfront."""

    block_size: int = 4096
    queue_depth: int = 32
    read_pct: int = 0
    sequential: bool = False
    offset: int = 0
    size: int = 0               # bytes; 0: to the end of the disk
    seconds: float = 0.0
    max_ios: int = 0
    verify: bool = False
    flush_every: int = 0
    barrier_every: int = 0
    discard_pct: int = 0
    seed: int = 1
    rate_iops: int = 0          # at most this many I/Os a second, all queues (0: no limit)


def _front_result(res) -> dict[str, Any]:
    return {k: getattr(res, k) for k in (
        "ios", "reads", "writes", "flushes", "barriers", "discards", "bytes_read", "bytes_written", "errors",
        "verify_failures", "first_bad_sector", "flush_order_violations", "seconds", "lat_us_p50", "lat_us_p99",
        "lat_us_max", "lat_us_mean", "wakes", "wake_us_p50")}


class SimFront:
    """The sim blkfront of a SimDomain: publishes rings, runs workloads."""

    def __init__(self, simdir: str | os.PathLike, *, sectors: int, nr_queues: int = 1,
                 ring_order: int = 0, max_indirect_segments: int = 0,
                 protocol: str = "x86_64-abi"):
        self._cdir = ffi.new("char[]", _path(simdir))
        cfg = ffi.new("struct xt_front_config *")
        cfg.simdir = self._cdir
        cfg.nr_queues = nr_queues
        cfg.ring_order = ring_order
        cfg.max_indirect_segments = max_indirect_segments
        cfg.sectors = sectors
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown ring protocol {protocol!r}")
        cfg.protocol = PROTOCOLS[protocol]
        out = ffi.new("xt_front **")
        p = ffi.new("struct xt_ring_params *")
        err = _errbuf()
        _check(lib.xt_front_open(cfg, out, p, err), err)
        self._f = out[0]
        self.params = RingParams.from_c(p)

    def run(self, workload: Workload | None = None, **kw) -> dict[str, Any]:
        """Runs a workload to its end (releases the GIL meanwhile); returns its result."""
        w = workload or Workload(**kw)
        cw = ffi.new("struct xt_workload *")
        for f in fields(Workload):
            setattr(cw, f.name, getattr(w, f.name))
        res = ffi.new("struct xt_front_result *")
        err = _errbuf()
        _check(lib.xt_front_run(self._f, cw, res, err), err)
        out = _front_result(res)
        out["workload"] = asdict(w)
        return out

    def replay(self, ops: Iterable[tuple[str, int, bytes]], queue_depth: int = 32) -> dict[str, Any]:
        """Replays a recorded guest's I/O in order: ("write", sector, data) and
        ("flush", 0, b"") items, as a guest's block layer issues them (up to
        `queue_depth` non-overlapping writes in flight; a flush after every
        earlier write is answered, and before any later one is issued)."""
        ops = list(ops)
        cops = ffi.new("struct xt_replay_op[]", max(len(ops), 1))
        keep = []
        for c, (kind, sector, data) in zip(cops, ops):
            if kind == "flush":
                c.kind = lib.XT_REPLAY_FLUSH
            elif kind == "write":
                c.kind, c.sector, c.len = lib.XT_REPLAY_WRITE, sector, len(data)
                buf = ffi.from_buffer(data)
                keep.append(buf)
                c.data = buf
            else:
                raise ValueError(f"unknown replay op {kind!r}")
        res = ffi.new("struct xt_front_result *")
        err = _errbuf()
        _check(lib.xt_front_replay(self._f, cops, len(ops), queue_depth, res, err), err)
        return _front_result(res)

    def stop(self) -> None:
        lib.xt_front_stop(self._f)

    def close(self) -> None:
        if self._f is not None:
            lib.xt_front_close(self._f)
            self._f = None

    def __enter__(self) -> "SimFront":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
