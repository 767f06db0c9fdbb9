"""The mirror drainer (dom0): one VBD's mirror ring to the appliance.

It takes runs of records from the shim's mirror ring and sends them as wire
frames over a ZeroMQ DEALER socket (CurveZMQ unless told --insecure), within
the credit the appliance grants.  What is sent stays in the ring until the
appliance acknowledges it as durable.  While the appliance is slow or away
the drainer moves the stream, oldest first, into the spill log on a dom0
disk, and sends from there, in order, once the appliance is back.  Only when
the spill log is full too does it stop taking from the ring, whose overflow
goes to the dirty bitmap; the shim then puts a GAP in the stream and the
drainer asks for RESYNC markers, re-reading each dirty chunk from the disk
when it reaches one.

Memory: the ring is fixed; the drainer holds at most one batch besides a
bounded sample of lag figures.  Nothing grows with the write rate or with
the appliance's absence.

A stream outlives the shim that feeds it (the daemon restarts, the guest
reconnects): the shim numbers its records from 1, and the drainer adds
``seq_base`` so that the stream's seqs go on where the previous drainer's
ended.  :meth:`Drainer.close` ends a drainer so that the next one can take
over: it drains to the appliance for a bounded time, moves what is left in
the ring to the spill log, and records the stream's last seq and epoch in
``<spill_dir>/stream`` (:mod:`xentap.stream_state`).

A drainer that did not end that way (the daemon was killed) took with it
what its ring held unacknowledged, and the seqs it gave out are unknown.
Its successor (``unclean=True``) takes nothing from the ring until the
appliance tells it the stream's high water H in the first session; then the
stream goes on after max(H, the spill log's end) with GAP(RESTART), a
RESYNC of every chunk of the disk read from the image, RESYNC_END, and only
then the ring's records: the appliance knows exactly which window of
history is not write-ordered, and its replica equals the disk again.

A new stream (seq_base 0, nothing spilled) on a disk that already holds
data starts the same way, with GAP(INITIAL): the appliance's replica begins
empty, so the disk's content is its first RESYNC (Zerto's "initial sync").
Only the chunks (4 MiB) with data are read (SEEK_DATA; a block device is all data)
when the appliance holds nothing of the stream yet; a new, sparse disk needs
no initial sync at all.  A new stream whose appliance already holds seqs of
it in the first session (dom0's state was lost) is resynced whole after them
with GAP(RESTART): those seqs are not this disk's writes.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import json
import logging
import math
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass

import zmq

from xentap import shim, sparse, wire
from xentap.stream_state import is_new, write_stream_state
from xentap.spill import SpillLog

log = logging.getLogger("xentap.drainer")

BATCH_BYTES = 4 << 20           # a WRITES frame carries at most this much of the ring (per-frame costs are paid less often)
HEARTBEAT_EVERY = 1.0           # seconds
DEAD_AFTER = 10.0               # no word from the appliance: reconnect (3 s made a busy
                                # appliance under emulation reconnect over and over)
HELLO_EVERY = 1.0               # a HELLO unanswered this long is sent again (a new epoch),
HELLO_EVERY_MAX = 4.0           # twice as long each time up to this: an appliance slow to
                                # answer (emulated, loaded) got a new HELLO, and a new session
                                # that the older one's frames then hit, every second
SPILL_AT = 0.25                 # ring fill above which a slow appliance means spill (0.5 and
                                # 0.75 overflowed a 64 MiB ring on a burst of 32 MiB: the
                                # headroom is what absorbs a burst while the spill catches up)
STEP_BYTES = 16 << 20           # a step moves at most about this much (and STEP_FRAMES frames),
STEP_FRAMES = 256               # then looks at the ring again (64 MiB sent in one step let a
                                # disk-speed guest fill the ring before the drainer spilled)
RESYNC_CHUNK = wire.MAX_BATCH_DATA_BYTES   # bytes per RESYNC of a full resync: as large as
                                # one may be (1 MiB chunks synced 113 MiB/s on loopback, 4 MiB 167)
GATHER_BYTES = 256 << 10        # fewer unsent bytes than this in the ring (writes only) wait
GATHER_NS = 2_000_000           # up to this long after the first one's completion for more
LAG_SAMPLES = 65536
LAG_RECENT = 4096               # stats() by default: the lags of the last this many frames
                                # (status asks every second; sorting all LAG_SAMPLES took
                                # 15 ms a VBD here, 30 times that in an emulated dom0)
_SEQ = struct.Struct("<Q")
_MONITOR_EVENT = struct.Struct("=HI")   # a socket monitor message's first frame: event, value
                                        # (read here: zmq.utils.monitor imports asyncio, seconds
                                        # of an emulated dom0's time at the first connection)
_REC_LEN_FLAGS = struct.Struct("<II")
_NO_DATA = int(wire.NO_DATA_FLAGS)


def _rebased(records, count: int, base: int) -> bytearray:
    """A copy of `count` ring records with `base` added to each seq."""
    buf = bytearray(records)
    off = 0
    for _ in range(count):
        seq, = _SEQ.unpack_from(buf, off)
        _SEQ.pack_into(buf, off, seq + base)
        length, flags = _REC_LEN_FLAGS.unpack_from(buf, off + 24)
        off += wire.RECORD_HEADER_SIZE + (0 if flags & _NO_DATA else length)
    return buf


def _resync(sid: int, epoch: int, seq: int, sector: int, data: bytes) -> tuple[bytes, int]:
    """A RESYNC frame of `data` read from the disk at `sector`, and its data
    bytes: an all-zero chunk (most of a new disk) goes as ZEROES, no data."""
    zero = bool(data) and data[0] == 0 and data == bytes(len(data))
    body = b"" if zero else data
    return wire.encode(wire.Resync(stream_id=sid, epoch=epoch, seq=seq, sector=sector,
                                   length=len(data), flags=int(wire.WriteFlags.ZEROES) if zero else 0,
                                   data=body)), len(body)


@dataclass(frozen=True)
class VbdIdentity:
    """What a HELLO says about the VBD."""

    vbd_uuid: uuid.UUID
    domid: int
    devid: int
    vdev: str
    size_bytes: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    host_id: uuid.UUID = uuid.UUID(int=uuid.getnode())

    @property
    def stream_id(self) -> int:
        return self.vbd_uuid.int & ((1 << 64) - 1)


def _now_ns() -> int:
    return time.time_ns()


def _oldest_ts(frame: bytes) -> int:
    """The completion time of a frame's first write (now for a RESYNC)."""
    ts = wire.frame_time_ns(frame)
    return _now_ns() if ts is None else ts


class Drainer:
    """Drains one VBD's mirror ring; `start()` runs it in a thread."""

    def __init__(self, vbd: shim.Vbd, ident: VbdIdentity, endpoint: str, *, image_path: str,
                 spill_dir: str, spill_limit: int, socket_setup=None,
                 context: zmq.Context | None = None, batch_bytes: int = BATCH_BYTES,
                 seq_base: int = 0, epoch: int = 0, unclean: bool = False,
                 initial_sync: bool = True, data_extents=False):
        """`socket_setup(sock)` configures CurveZMQ on the DEALER (xentap.keys);
        None means plain TCP/IPC, which callers allow only with --insecure.
        `seq_base` is added to the shim's seqs (at least the spill log's last
        seq); `epoch` is the last one this stream used (the next is above);
        `unclean`: the previous drainer of this stream did not close (see
        the module's docstring).  `initial_sync`: a new stream on a disk with
        data begins with a RESYNC of that data (the module's docstring);
        `data_extents`: where the disk held data before the shim connected
        (xentap.sparse.data_extents, taken then: a drainer that starts later
        would take the guest's first writes for data the disk held), False:
        where it holds data now."""
        self.vbd = vbd
        self.ident = ident
        self.endpoint = endpoint
        self.socket_setup = socket_setup
        self.ctx = context or zmq.Context.instance()
        self.batch_bytes = batch_bytes
        self.spill = SpillLog(spill_dir, spill_limit)
        self.spill_dir = spill_dir
        self.seq_base = max(seq_base, self.spill.last_seq)
        self.image_fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
        self.ring_size = vbd.mirror_stats()["ring_bytes"]
        self.size_bytes = ident.size_bytes
        #: After an unclean end, or before a new stream's initial sync: no ring
        #: records before the first session.
        self.takeover = unclean
        self.takeover_reason = wire.GapReason.RESTART
        self.resync_first = self.resync_last = 0     # GAP .. RESYNC_END of a takeover
        #: the takeover's chunks of RESYNC_CHUNK bytes: runs (first chunk, count), and
        #: how many chunks come before each run
        self.resync_runs: list[tuple[int, int]] = []
        self.resync_before: list[int] = []
        self.restart_gaps = 0
        self.initial_syncs = 0
        self.resync_started = 0.0
        self.data_runs: list[tuple[int, int]] = []
        self.new_stream = is_new(not unclean, self.seq_base, bool(self.spill))
        if initial_sync and self.new_stream:
            if data_extents is False:
                data_extents = sparse.data_extents(self.image_fd, ident.size_bytes)
            self.data_runs = sparse.chunk_runs(data_extents, ident.size_bytes, RESYNC_CHUNK)
            if self.data_runs:
                self.takeover = True
                self.takeover_reason = wire.GapReason.INITIAL
        self.wake_fd = vbd.mirror_wake_fd()
        # the stream
        self.epoch = max(int(time.time()), epoch)   # strictly greater at every (re)start
        self.acked_seq = self.spill.first_seq - 1 if self.spill else self.seq_base
        self.sent_seq = self.acked_seq
        self.credit = wire.CreditWindow()
        self.in_session = False
        #: the last seq this session's HELLO and frames told the appliance of: a
        #: HEARTBEAT claims no more (never seqs skipped because an ACK covered them)
        self.session_last = self.acked_seq
        self.ring_sent: collections.deque[tuple[int, int, int]] = collections.deque()  # last_seq, nbytes, count
        self.ring_sent_bytes = 0
        self.pending_ts: collections.deque[tuple[int, int]] = collections.deque()      # last_seq, oldest ts
        self.spill_cursor = None
        self.spill_full = False
        self._gathering = 0             # ns (time_ns) until which a few unsent writes wait
        # figures
        self.lags_ms: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self.frames_sent = 0
        self.bytes_sent = 0
        self.sessions = 0
        self.rejected = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._last_heard = self._last_hello = self._last_beat = 0.0
        self._hello_every = HELLO_EVERY
        self.error: BaseException | None = None
        write_stream_state(spill_dir, max(self.seq_base, self.spill.last_seq), self.epoch,
                            False)     # until close(): a crash leaves it unclean

    # ---- life ----

    def start(self) -> "Drainer":
        self._thread = threading.Thread(target=self._run, name=f"drainer-{self.ident.vdev}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self.spill.close()
        os.close(self.image_fd)

    def close(self, drain_timeout: float = 5.0) -> bool:
        """Ends this drainer so that a later one can take the stream over
        (call after the shim stopped taking writes, e.g. disconnected): waits
        up to `drain_timeout` for the appliance to acknowledge everything,
        stops, moves what the ring still holds to the spill log, and records
        the stream's last seq and epoch.  Returns whether everything was
        acknowledged."""
        try:
            acked = self.wait_acked(drain_timeout)
        except BaseException:   # noqa: BLE001 - the drainer failed: keep what the ring has
            acked = False
        self._stop.set()
        if self._thread:
            self._thread.join(10.0)
        if not acked and not self.takeover:
            while self.vbd.mirror_stats()["used_bytes"] and self._spill_from_ring():
                pass
        left = self.vbd.mirror_stats()["used_bytes"]
        if left:
            log.warning("%s: %d mirror bytes neither acknowledged nor spilled (%s): the "
                        "next drainer resyncs the disk", self.ident.vdev, left,
                        "no session since an unclean restart" if self.takeover
                        else "spill log full")
        clean = not left and not self.takeover and self.sent_seq >= self.resync_last
        last = max(self.acked_seq, self.spill.last_seq, self.resync_last)
        if clean:
            last = max(last, self.seq_base + self.vbd.mirror_stats()["next_seq"] - 1)
        self.spill.sync()
        write_stream_state(self.spill_dir, last, self.epoch, clean)
        self.spill.close()
        os.close(self.image_fd)
        return acked

    def wait_acked(self, timeout: float) -> bool:
        """Waits until everything written so far is acknowledged by the appliance."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.vbd.mirror_stats()
            if st["used_bytes"] == 0 and not self.spill and st["dirty_chunks"] == 0 \
                    and not st["gap_pending"] and not st["resyncing"] and not self.takeover \
                    and self.acked_seq >= max(self.resync_last,
                                              self.seq_base + st["next_seq"] - 1):
                return True
            if self.error:
                raise self.error
            time.sleep(0.02)
        return False

    def reset_figures(self) -> None:
        """Starts a new lag sample (for benchmarks: one per run)."""
        self.lags_ms.clear()

    def stats(self, lag_window: int | None = LAG_RECENT) -> dict:
        """The stream's figures; lag_ms over the last `lag_window` acknowledged
        frames (None: every sample since reset_figures, at most LAG_SAMPLES)."""
        st = self.vbd.mirror_stats() or {}
        lags = self.lags_ms
        if lag_window is not None and len(lags) > lag_window:
            lags = itertools.islice(reversed(lags), lag_window)
        lags = sorted(lags)

        def pct(p: float) -> float:
            return round(lags[min(len(lags) - 1, int(len(lags) * p))], 3) if lags else 0.0
        return {
            "state": "connected" if self.in_session else "disconnected",
            "acked_seq": self.acked_seq, "sent_seq": self.sent_seq,
            "next_seq": self.seq_base + st.get("next_seq", 1), "ring_used_bytes": st.get("used_bytes", 0),
            "spill_bytes": self.spill.size, "overflows": st.get("overflows", 0),
            "gaps": st.get("gaps", 0) + self.restart_gaps, "resyncs": st.get("resyncs", 0),
            "dirty_chunks": st.get("dirty_chunks", 0), "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent, "sessions": self.sessions,
            "lag_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": round(lags[-1], 3) if lags else 0.0},
            "sync": self.sync_progress(),
        }

    def sync_progress(self) -> dict:
        """A full resync (a new stream's initial sync, or after an unclean end)
        under way: its kind ("initial", "restart"; "" when none), and the MiB
        of its chunks the appliance acknowledged, of all."""
        kind = "initial" if self.takeover_reason == wire.GapReason.INITIAL else "restart"
        if self.takeover:               # planned at the first session
            total, done = sum(n for _, n in self._resync_runs(0)), 0
        else:
            total = self.resync_last - self.resync_first - 1
            if total < 0 or self.acked_seq >= self.resync_last:
                return {"kind": "", "done": 0, "total": 0}
            done = min(total, max(0, self.acked_seq - self.resync_first))
        mib = RESYNC_CHUNK >> 20
        return {"kind": kind, "done": done * mib, "total": total * mib}

    def _resync_runs(self, high_water: int) -> list[tuple[int, int]]:
        """A full resync's chunks, as runs (first chunk, count): an initial sync to an
        appliance that holds nothing of the stream (its replica is all zero) needs
        only the chunks with data, any other every chunk of the disk."""
        if self.takeover_reason == wire.GapReason.INITIAL and high_water == 0:
            return self.data_runs
        return [(0, -(-self.size_bytes // RESYNC_CHUNK))]

    # ---- the loop ----

    def _run(self) -> None:
        try:
            self._connect()
            while not self._stop.is_set():
                # armed before looking: a record after this wakes the poll (not while a
                # few records wait to be sent with more: they are there already)
                if self.in_session and not self._gathering:
                    self.vbd.mirror_arm_wake(self.ring_sent_bytes)
                self._gathering = 0
                busy = self._step()
                if busy:
                    self._poll(0)
                elif self._gathering:
                    self._poll(max(0.0, (self._gathering - _now_ns()) / 1e9))
                else:
                    self._poll(0.1)
        except BaseException as e:      # surfaced to the owner through .error
            self.error = e
        finally:
            if self._sock is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._sock.close(linger=0)

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 64)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)     # queue nothing for a peer not (yet) connected
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.socket_setup:
            self.socket_setup(s)
        # Connection events: a new connection means a new session (the
        # appliance may have restarted); a lost one means stop sending.
        self._monitor = s.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        s.connect(self.endpoint)
        self._sock = s
        self._poller = zmq.Poller()     # one per socket, not one per turn of the loop
        for what in (s, self._monitor, self.wake_fd):
            self._poller.register(what, zmq.POLLIN)
        self._hello_anew()

    def _hello_anew(self) -> None:
        """Out of session: the next HELLO goes at once, and its backoff starts over."""
        self.in_session = False
        self._last_heard = time.monotonic()
        self._last_hello = 0.0
        self._hello_every = HELLO_EVERY

    def _send(self, frame: bytes) -> bool:
        try:
            self._sock.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
            return True
        except zmq.Again:
            return False

    def _poll(self, timeout: float) -> None:
        """Waits for the appliance or the ring (the shim's wake fd), at most `timeout`."""
        ready = dict(self._poller.poll(math.ceil(timeout * 1000)))    # ms, rounded up
        if self._monitor in ready:
            self._on_connection_events()
        if self.wake_fd in ready:
            try:
                os.read(self.wake_fd, 8)
            except BlockingIOError:
                pass
        if self._sock in ready:
            while True:
                try:
                    frame = self._sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_frame(frame.buffer)
        now = time.monotonic()
        if self.in_session and now - self._last_heard > DEAD_AFTER:
            self._connect()     # the appliance went away: a new session later
        elif not self.in_session and now - self._last_hello > self._hello_every:
            if self._last_hello:
                self._hello_every = min(2 * self._hello_every, HELLO_EVERY_MAX)
            self._hello()
        if self.in_session and now - self._last_beat > HEARTBEAT_EVERY:
            self._last_beat = now
            self._send(wire.encode(wire.Heartbeat(stream_id=self.ident.stream_id, epoch=self.epoch,
                                                  timestamp_ns=_now_ns(),
                                                  last_seq=self.session_last)))

    def _on_connection_events(self) -> None:
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = _MONITOR_EVENT.unpack_from(frames[0])[0]
            if event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED):
                self._hello_anew()              # a HELLO opens the next session

    def _hello(self) -> None:
        self.epoch += 1
        self._last_hello = time.monotonic()
        self.session_last = self.acked_seq     # what this session has seen, for HEARTBEATs
        i = self.ident
        self._send(wire.encode(wire.Hello(
            stream_id=i.stream_id, epoch=self.epoch, host_id=i.host_id, vbd_uuid=i.vbd_uuid,
            domid=i.domid, devid=i.devid, vdev=i.vdev, size_bytes=i.size_bytes,
            logical_sector_size=i.logical_sector_size, physical_sector_size=i.physical_sector_size,
            next_seq=self.acked_seq + 1,
            features=int(wire.Features.DISCARD | wire.Features.FUA | wire.Features.ZEROES))))

    def _on_frame(self, buf) -> None:
        try:
            msg = wire.decode(buf)
        except wire.WireError:
            self.rejected += 1
            return
        if msg.stream_id != self.ident.stream_id or msg.epoch != self.epoch:
            return                  # an answer to an older session
        self._last_heard = time.monotonic()
        if isinstance(msg, wire.Ack):
            if not self.in_session:
                self._start_session(msg)
            self._on_ack(msg)

    def _start_session(self, ack: wire.Ack) -> None:
        """The appliance answered HELLO: resend everything it does not hold."""
        self.in_session = True
        self.sessions += 1
        self._hello_every = HELLO_EVERY
        self.credit = wire.CreditWindow()
        if not self.takeover and self.new_stream and self.sessions == 1 and ack.acked_seq:
            # A new stream's first session, yet the appliance holds seqs of it (dom0's
            # state was lost; a new disk took an old one's uuid): they are not this
            # disk's writes, and ours up to them would be taken as duplicates.
            log.warning("%s: the appliance holds seqs up to %d of this new stream: "
                        "resyncing the whole disk after them", self.ident.vdev, ack.acked_seq)
            self.takeover, self.takeover_reason = True, wire.GapReason.RESTART
        if self.takeover:
            self._plan_takeover(ack.acked_seq)
        # What the appliance got in the last session but whose ACK was lost
        # (it was stopped, or the link dropped) is released and trimmed now:
        # a first ACK that covers every write may be the last one for a while.
        self._acknowledged(ack.acked_seq)
        self.sent_seq = self.acked_seq
        self.ring_sent_bytes = 0
        self.ring_sent.clear()
        self.spill_cursor = None

    def _on_ack(self, ack: wire.Ack) -> None:
        self.credit.on_ack(ack)
        self._acknowledged(ack.acked_seq)

    def _acknowledged(self, acked_seq: int) -> None:
        """Everything up to `acked_seq` is durable at the appliance: release it
        from the ring, trim it from the spill log, record its lag."""
        if acked_seq <= self.acked_seq:
            return
        self.acked_seq = acked_seq
        now = _now_ns()
        while self.pending_ts and self.pending_ts[0][0] <= self.acked_seq:
            self.lags_ms.append((now - self.pending_ts.popleft()[1]) / 1e6)
        while self.ring_sent and self.ring_sent[0][0] <= self.acked_seq:
            _, nbytes, _ = self.ring_sent.popleft()
            self.vbd.mirror_release(nbytes)
            self.ring_sent_bytes -= nbytes
        if self.ring_sent:
            self._release_acked_part()
        if self.spill and self.spill.segments[0].last_seq <= self.acked_seq:
            self.spill.trim(self.acked_seq)
            self.spill_full = False

    def _release_acked_part(self) -> None:
        """The oldest sent batch is acknowledged in part (an ACK that holds back its
        last seq, or an appliance that journaled more than it had acknowledged before
        it restarted): release its acknowledged records, so that the ring starts
        right after what the appliance holds and a new session sends from there."""
        last, nbytes, count = self.ring_sent[0]
        first = last - count + 1
        k = self.acked_seq - first + 1
        if k <= 0:
            return
        b = self.vbd.mirror_peek(0, nbytes, k)
        if b is None or b.count != k or b.first_seq + self.seq_base != first:
            return      # not the batch we sent: leave it whole (it is sent again and trimmed)
        self.vbd.mirror_release(b.nbytes)
        self.ring_sent_bytes -= b.nbytes
        self.ring_sent[0] = (last, nbytes - b.nbytes, count - k)

    def _plan_takeover(self, high_water: int) -> None:
        """The stream goes on after what the appliance and the spill log hold:
        GAP(RESTART or INITIAL), a RESYNC per chunk of :meth:`_resync_runs`,
        RESYNC_END, then the ring."""
        start = max(high_water, self.spill.last_seq) + 1
        total = -(-self.size_bytes // RESYNC_CHUNK)
        initial = self.takeover_reason == wire.GapReason.INITIAL
        self.resync_runs = self._resync_runs(high_water)
        self.resync_before = []
        chunks = 0
        for _, n in self.resync_runs:
            self.resync_before.append(chunks)
            chunks += n
        self.resync_first, self.resync_last = start, start + chunks + 1
        # the ring's oldest record follows RESYNC_END (records spilled before a new
        # stream's first session keep their seqs: the resync reads their data again)
        b = self.vbd.mirror_peek(0, 1)
        oldest = b.first_seq if b is not None else self.vbd.mirror_stats()["next_seq"]
        self.seq_base = self.resync_last + 1 - oldest
        self.takeover = False
        self.resync_started = time.monotonic()
        if initial:
            self.initial_syncs += 1
            log.info("%s: initial sync: the disk's data to the appliance (GAP(INITIAL) at seq "
                     "%d, %d chunks of %d KiB of %d, ring records from seq %d)", self.ident.vdev,
                     start, chunks, RESYNC_CHUNK >> 10, total, self.seq_base + 1)
        else:
            self.restart_gaps += 1
            log.warning("%s: the previous drainer ended uncleanly: resyncing the whole disk "
                        "(GAP at seq %d, %d chunks, ring records from seq %d)", self.ident.vdev,
                        start, chunks, self.seq_base + 1)

    def _resync_frame(self, seq: int) -> tuple[bytes, int]:
        """The takeover's frame of `seq` (GAP, RESYNC or RESYNC_END) and its data bytes."""
        sid, ep, ts = self.ident.stream_id, self.epoch, _now_ns()
        chunks = self.resync_last - self.resync_first - 1
        if seq == self.resync_first:
            return wire.encode(wire.Gap(stream_id=sid, epoch=ep, seq=seq, timestamp_ns=ts,
                                        reason=self.takeover_reason,
                                        dirty_regions=chunks)), 0
        if seq == self.resync_last:
            return wire.encode(wire.ResyncEnd(stream_id=sid, epoch=ep, seq=seq, timestamp_ns=ts,
                                              regions=chunks)), 0
        i = seq - self.resync_first - 1
        k = bisect.bisect_right(self.resync_before, i) - 1
        off = (self.resync_runs[k][0] + i - self.resync_before[k]) * RESYNC_CHUNK
        data = os.pread(self.image_fd, min(RESYNC_CHUNK, self.size_bytes - off), off)
        return _resync(sid, ep, seq, off // wire.SECTOR_SIZE, data)

    def _send_resync(self, frames: int) -> bool:
        """Sends up to `frames` of the takeover's frames after sent_seq, within credit."""
        did = False
        for _ in range(frames):
            seq = self.sent_seq + 1
            if not self.resync_first <= seq <= self.resync_last:
                break
            frame, nbytes = self._resync_frame(seq)
            if not self.credit.allows(seq, nbytes) or not self._send(frame):
                break
            self.credit.sent(seq, nbytes)
            self._sent(seq, len(frame), _now_ns(), seq)
            did = True
            if seq == self.resync_last and self.takeover_reason == wire.GapReason.INITIAL:
                log.info("%s: initial sync sent: %d chunks in %.1f s", self.ident.vdev,
                         seq - self.resync_first - 1, time.monotonic() - self.resync_started)
        return did

    def _resync_unsent(self) -> bool:
        return self.resync_last > self.sent_seq

    # ---- moving the stream ----

    def _step(self) -> bool:
        """Moves what can be moved now; True if it did anything.

        Spilling comes before sending: a guest writing at disk speed fills the
        ring faster than the appliance takes it, and a sent batch stays in the
        ring until acknowledged, so a drainer that sent first spent its time
        on frames the ring could not yet release while the ring overflowed."""
        st = self.vbd.mirror_stats()
        busy = self._resync(st)
        budget = STEP_BYTES
        # the ring's seqs follow a takeover's frames, known once it is planned (at the
        # first session): nothing to spill before; after, its records spill while the
        # takeover's frames are sent (a guest busy during an initial sync loses nothing)
        if not self.takeover:
            used = st["used_bytes"]
            if (not self.in_session and used) or used > SPILL_AT * self.ring_size:
                if self._spill_from_ring() and \
                        self.vbd.mirror_stats()["used_bytes"] > SPILL_AT * self.ring_size:
                    busy = True
                    budget = 1      # still filling: one frame keeps the appliance fed
        if self.in_session:     # in seq order: spilled, a takeover's frames, spilled, ring
            if self._resync_unsent() and self.sent_seq + 1 >= self.resync_first:
                busy |= self._send_resync(max(1, budget // RESYNC_CHUNK))
            else:
                busy |= self._send_spilled(budget)
                if not self._spill_unsent() and not self._resync_unsent():
                    busy |= self._send_from_ring(budget)
        return busy

    def _resync(self, st: dict) -> bool:
        """After a loss, asks the shim for GAP and RESYNC markers while it has room
        (`st`: the shim's mirror_stats)."""
        if not (st["gap_pending"] or st["dirty_chunks"] or st["resyncing"]):
            return False
        did = False
        for _ in range(64):
            if self.vbd.mirror_resync_step() != 1:
                break
            did = True
        return did

    def _frame(self, b: shim.MirrorBatch, parts: bool = False) -> tuple:
        """(frame, last_seq, payload bytes, oldest timestamp) for a ring batch;
        with `parts`, a WRITES frame comes as a list of buffers (for writev)."""
        sid, ep = self.ident.stream_id, self.epoch
        first = b.first_seq + self.seq_base
        last = first + b.count - 1
        if b.kind == shim.MK_WRITES:
            ts = int.from_bytes(b.data[8:16], "little")
            make = wire.writes_raw_parts if parts else wire.encode_writes_raw
            data = _rebased(b.data, b.count, self.seq_base) if self.seq_base else b.data
            return make(sid, ep, first, b.count, data), last, b.data_bytes, ts
        ts = b.timestamp_ns
        if b.kind == shim.MK_FLUSH:
            msg = wire.Flush(stream_id=sid, epoch=ep, seq=first, timestamp_ns=ts)
        elif b.kind == shim.MK_GAP:
            dirty = int.from_bytes(b.payload()[:8], "little")
            reason = wire.GapReason.SPILL_OVERFLOW if self.spill_full else wire.GapReason.RING_OVERFLOW
            msg = wire.Gap(stream_id=sid, epoch=ep, seq=first, timestamp_ns=ts,
                           reason=reason, dirty_regions=dirty)
        elif b.kind == shim.MK_RESYNC:
            length = int.from_bytes(b.payload()[:8], "little")
            data = os.pread(self.image_fd, length, b.sector * wire.SECTOR_SIZE)
            frame, nbytes = _resync(sid, ep, first, b.sector, data)
            return frame, last, nbytes, ts
        elif b.kind == shim.MK_RESYNC_END:
            msg = wire.ResyncEnd(stream_id=sid, epoch=ep, seq=first, timestamp_ns=ts,
                                 regions=int.from_bytes(b.payload()[:8], "little"))
        elif b.kind == shim.MK_CHECKPOINT:
            msg = wire.Checkpoint(stream_id=sid, epoch=ep, seq=first, timestamp_ns=ts,
                                  kind=wire.CheckpointKind.USER,
                                  label=b.payload().decode(errors="replace"))
        else:
            raise RuntimeError(f"unknown mirror record kind {b.kind}")
        return wire.encode(msg), last, 0, ts

    def _spill_unsent(self) -> bool:
        return bool(self.spill) and self.spill.last_seq > self.sent_seq

    def _send_spilled(self, budget: int = STEP_BYTES) -> bool:
        if not self._spill_unsent():
            return False
        if self.spill_cursor is None:
            self.spill_cursor = self.spill.frames_after(self.sent_seq)
        did = False
        moved = 0
        for _ in range(STEP_FRAMES):
            if moved >= budget:
                break
            try:
                first, last, frame = next(self.spill_cursor)
            except StopIteration:
                self.spill_cursor = None
                break
            if last <= self.sent_seq:
                # a cursor reads on into entries appended after it began: sent
                # batches the ring spilled since (sent is not acknowledged)
                continue
            payload = len(frame)
            if self._resync_unsent() and first >= self.resync_first:
                self.spill_cursor = None        # the takeover's frames come first
                break
            if not self.credit.allows(last, payload):
                self.spill_cursor = self.spill.frames_after(self.sent_seq)
                break
            if not self._send(wire.restamp(frame, self.epoch)):
                self.spill_cursor = self.spill.frames_after(self.sent_seq)
                break
            self.credit.sent(last, payload)
            self._sent(last, len(frame), _oldest_ts(frame), first)
            moved += len(frame)
            did = True
        if not self._spill_unsent():
            self.spill_cursor = None
        return did

    def _send_from_ring(self, budget: int = STEP_BYTES) -> bool:
        did = False
        moved = 0
        for _ in range(STEP_FRAMES):
            if moved >= budget:
                break
            b = self.vbd.mirror_peek(self.ring_sent_bytes, self.batch_bytes)
            if b is None:
                break
            if not did and b.nbytes < GATHER_BYTES and b.kind == shim.MK_WRITES:
                # A few writes: sent with those that follow within GATHER_NS of the
                # first (each frame costs the drainer, libzmq and the appliance about
                # as much as its records: at 8,000 writes/s, 5 a frame, the drainer
                # alone took a third of a core)
                # (a completion time ahead of now, the clock set back: from now)
                now = _now_ns()
                until = min(int.from_bytes(b.data[8:16], "little"), now) + GATHER_NS
                if now < until:
                    self._gathering = until
                    break
            frame, last, payload, ts = self._frame(b)
            if not self.credit.allows(last, payload) or not self._send(frame):
                break
            self.credit.sent(last, payload)
            self.ring_sent.append((last, b.nbytes, b.count))
            self.ring_sent_bytes += b.nbytes
            self._sent(last, len(frame), ts, b.first_seq + self.seq_base)
            moved += b.nbytes
            did = True
        return did

    def _sent(self, last: int, nbytes: int, ts: int, first: int = 0) -> None:
        if first and first > self.sent_seq + 1:     # never expected: say so loudly
            log.error("%s: sending seq %d..%d after %d: a hole in the stream (spill %d..%d)",
                      self.ident.vdev, first, last, self.sent_seq, self.spill.first_seq,
                      self.spill.last_seq)
        self.sent_seq = last
        self.session_last = max(self.session_last, last)
        self.frames_sent += 1
        self.bytes_sent += nbytes
        self.pending_ts.append((last, ts))
        if len(self.pending_ts) > LAG_SAMPLES:
            self.pending_ts.popleft()

    def _spill_from_ring(self) -> bool:
        """Moves the oldest records of the ring, sent or not, to the spill log."""
        did = False
        moved = 0
        for _ in range(STEP_FRAMES):
            if moved >= STEP_BYTES:
                break
            if self.ring_sent:      # a sent batch: the same run again, then spilled
                last, nbytes, count = self.ring_sent[0]
                b = self.vbd.mirror_peek(0, nbytes, count)
            else:
                b = self.vbd.mirror_peek(0, self.batch_bytes)
            if b is None:
                break
            frame, last, _, _ = self._frame(b, parts=True)
            if not self.spill.append(frame, b.first_seq + self.seq_base, last):
                self.spill_full = True
                break
            if self.ring_sent:
                self.ring_sent.popleft()
                self.ring_sent_bytes -= b.nbytes
            self.vbd.mirror_release(b.nbytes)
            moved += b.nbytes
            did = True
        return did
