"""The data analyzer in the appliance: one :class:`analyzer.stream.VbdAnalyzer`
per VBD, fed the mirrored stream after the journal took it.

The receiver calls :meth:`Analysis.submit` for every message it applied (so
the message is already appended to the VBD's journal); that only puts a
reference on a bounded queue and returns.  One worker thread takes messages
off the queue, feeds the VBD's analyzer, and turns every event into a
journal checkpoint tag (``journal.add_tag(kind=ANALYZER, **event.tag_kwargs())``):
``fs_consistent`` events are the consistent tags, an encryption alarm names
the first suspicious write and adds a consistent ``recommended_recovery``
tag at the last consistent point before it.  Tags become durable with the
VBD's next group commit (the worker asks the receiver for one).

Analysis never holds up acknowledgement, and never takes the receiver's
CPU: the worker spends at most ``cpu_share`` of one core (thread CPU time,
a token bucket; the appliance shares its machine with the guests it
protects, and the analyzer's per-byte work cannot keep up with a fast
guest anyway).  Each VBD has its own queue and the worker takes from them
in turn, so that one guest's write flood neither delays nor blinds the
analysis of the others.  The queues share one bound (messages and bytes).
When it is reached, a VBD that holds the most of it has its message not
analysed; a VBD that holds less takes room from the one that holds the most
(whose newest queued messages are then not analysed).  A VBD whose messages
are skipped has its status say ``behind`` (and how many were skipped), one
log line says so, and its messages are skipped until its queue has drained
to a quarter of the bound (so that what is analysed comes in long
contiguous runs, not one message here and there); its analyzer restarts on
the next message it gets, learning the layout again from the replica image.

The VBD's current data state is published to ``<data_dir>/<vbd>/analysis.json``
(:data:`STATE_NAME`; written atomically), where ``xentap analyze VBD`` reads
it: at once when the data state changes (an alarm), else at most every
``publish_interval`` seconds while the VBD is analysed, when the worker goes
idle, and when the journal's window moved (checked every
``publish_interval``).  Beside the analysis it names the VBD as dom0's HELLO
did (``domid``, ``devid``, ``vdev``) and the journal's history ``window``
(``engines.journal.Journal.window()``): the appliance domain's announcer
(appliance_domu/image/announce.py) publishes these in xenstore, under its
status directory, ``vbd/<domid>/<devid>/{window-start, window-end, data-state}``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyzer import events as ev
from xentap import wire
from xentap.durable import write_atomically

if TYPE_CHECKING:
    from analyzer.detector import DetectorConfig
    from analyzer.stream import VbdAnalyzer

log = logging.getLogger(__name__)

# The analyzer (numpy and the format parsers) is imported on first use, by a
# thread that Analysis() starts, not with this module: in the appliance
# domain, emulated, that import is seconds of CPU, and the receiver binds
# (the appliance says it is ready) meanwhile.  The worker waits for it.
_import_lock = threading.Lock()
_imported: tuple[Any, str | None] | None = None  # (VbdAnalyzer or None, why not)


def analyzer_class() -> tuple[Any, str | None]:
    """(analyzer.stream.VbdAnalyzer, None), or (None, why) when it cannot be
    imported here (no numpy); imports it once, the first caller waits."""
    global _imported
    with _import_lock:
        if _imported is None:
            try:
                from analyzer.stream import VbdAnalyzer
                _imported = (VbdAnalyzer, None)
            except ImportError as e:  # then the receiver runs without analysis, and says so
                _imported = (None, f"the analyzer cannot run here: {e}")
        return _imported

STATE_NAME = "analysis.json"
STATE_FORMAT = 1
DEFAULT_QUEUE_BYTES = 256 << 20  #: data bytes waiting for analysis, all VBDs together
DEFAULT_QUEUE_MSGS = 16384  #: messages waiting for analysis
DEFAULT_PUBLISH_INTERVAL = 0.5  #: seconds between analysis.json updates while busy
DEFAULT_CPU_SHARE = 0.1  #: of one core, at most, for the analysis worker (None: no limit)
_CPU_BURST = 0.25  # seconds of CPU the worker may bank while idle
_MAX_FILL = 4 << 20  # ZEROES / DISCARD ranges up to this are analysed as zeroes
_RECENT_EVENTS = 64  # events kept in analysis.json (besides the first fs_identified ones)
_TAG_KIND_ANALYZER = 3  # engines.journal.TagKind.ANALYZER (= wire.CheckpointKind.ANALYZER)


def state_path(vbd_dir: str | os.PathLike) -> Path:
    return Path(vbd_dir) / STATE_NAME


def read_state(vbd_dir: str | os.PathLike) -> dict | None:
    """The published analysis state of a VBD directory, None if there is none.

    Raises ValueError for a file that is not a state."""
    try:
        raw = state_path(vbd_dir).read_bytes()
    except FileNotFoundError:
        return None
    st = json.loads(raw)
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_path(vbd_dir)}: not an analysis state")
    return st


def _write_atomically(path: Path, data: bytes) -> None:
    # readers never see a mix; not fsynced: it is a view, redone from the stream
    write_atomically(path, data, durable=False)


def _window(rep) -> dict | None:
    """The journal's history window now (None without an open journal)."""
    j = rep.journal
    if j is None:
        return None
    try:
        return j.window()
    except Exception:  # closed under us: the last one published stays
        return None


def _commit_soon(rep) -> None:
    """Ask for the replica's next group commit, which writes the pending tags.

    The receiver syncs a replica whose ``dirty_since`` is set within its sync
    interval (its poll wakes at least every 50 ms).  Called after add_tag: if
    a sync's take() runs before this, it already took the tags (an extra,
    empty sync follows at worst); if after, it takes them then."""
    if rep.fd >= 0 and rep.dirty_since is None:
        rep.dirty_since = time.monotonic()


class _Queue:
    """One VBD's messages waiting for the worker (under Analysis._cv); kept by
    the VBD's uuid, so it outlives a _Vbd replaced when the replica reopens."""

    def __init__(self) -> None:
        self.items: deque = deque()  # (its _Vbd, message, payload bytes)
        self.nbytes = 0
        self.skipping = False  # was over the bound: skip until drained to a quarter

    def push(self, item: tuple) -> None:
        self.items.append(item)
        self.nbytes += item[2]

    def take(self, newest: bool = False) -> tuple:
        item = self.items.pop() if newest else self.items.popleft()
        self.nbytes -= item[2]
        return item

    def size(self) -> tuple[int, int]:
        """What it holds of the bound, to compare queues by."""
        return self.nbytes, len(self.items)


class _Vbd:
    """One VBD's analyzer and its bookkeeping (worker thread only, but status())."""

    def __init__(self, vbd_uuid: str, rep, cfg):
        self.uuid = vbd_uuid
        self.rep = rep
        self.cfg = cfg
        self.dir = Path(rep.dir)
        self.analyzer: VbdAnalyzer | None = None
        self.next_seq: int | None = None  # the seq expected next (None: not started)
        self.analysed_seq = -1
        self.submitted_seq = -1  # receiver thread
        self.skipped = 0  # messages not analysed (queue full): receiver thread
        self.skipped_ranges: list[tuple[int, int]] = []  # seqs never analysed (last few)
        self.restarts = 0
        self.tags = 0
        self.tag_errors = 0
        self.events: deque = deque(maxlen=_RECENT_EVENTS)
        self.identified: list[dict] = []
        self.alarm: dict | None = None
        self.in_gap = False
        self.data_state = "unknown"
        self.dirty = False  # state changed since the last publication
        self.published = 0.0
        self.window: dict | None = None  # the journal's window as last published
        self.skip_logged = 0.0  # when a skip was last logged, and skips since (one line
        self.skips_unlogged = 0  # per 10 s: under a write flood every batch may skip)
        self._base_fd = -1

    # what the disk held before the stream (the journal's base image): blocks the
    # analyzer never saw written are judged against it
    def _read_old(self, off: int, n: int):
        if self._base_fd < 0:
            j = self.rep.journal
            if j is None:
                return None
            try:
                self._base_fd = os.open(Path(j.dir) / "base.img", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        try:
            return os.pread(self._base_fd, n, off)
        except OSError:
            return None

    def _read_replica(self, off: int, n: int):
        try:
            return os.pread(self.rep.fd, n, off) if self.rep.fd >= 0 else None
        except OSError:
            return None

    def start(self, first_seq: int, reason: str) -> list[ev.Event]:
        """A fresh analyzer from ``first_seq`` on; learns the layout from the replica."""
        st = self.rep.state
        self.analyzer = analyzer_class()[0](self.uuid, sector_size=wire.SECTOR_SIZE,
                                    size=st.size_bytes or None, detector=self.cfg,
                                    read_old=self._read_old)
        self.next_seq = first_seq
        evs = []
        if first_seq > 1 or reason != "new":
            evs = self.analyzer.learn(self._read_replica)
            log.info("%s: analysis (re)started at seq %d (%s), layout learned from the replica",
                     self.uuid, first_seq, reason)
        if reason != "new":
            self.restarts += 1
        return evs

    def close(self) -> None:
        if self._base_fd >= 0:
            os.close(self._base_fd)
            self._base_fd = -1


class Analysis:
    """See the module docstring.  ``submit`` from the receiver's thread; ``status``
    from anywhere; ``close`` drains (bounded) and stops the worker."""

    def __init__(self, *, detector: "DetectorConfig | None" = None,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES, queue_msgs: int = DEFAULT_QUEUE_MSGS,
                 publish_interval: float = DEFAULT_PUBLISH_INTERVAL,
                 cpu_share: float | None = DEFAULT_CPU_SHARE):
        if detector is not None:
            detector.validate()
        if cpu_share is not None and not 0 < cpu_share:
            raise ValueError(f"cpu_share {cpu_share}: a positive fraction of a core expected")
        self.cfg = detector
        self.queue_bytes = queue_bytes
        self.queue_msgs = queue_msgs
        self.publish_interval = publish_interval
        self.cpu_share = cpu_share
        # The VBDs' queues (by uuid), those with something queued in the order
        # the worker serves them, and what they hold together.
        self._queues: dict[str, _Queue] = {}
        self._ready: deque[_Queue] = deque()
        self._qmsgs = 0
        self._qbytes = 0
        self._cv = threading.Condition()
        self._vbds: dict[str, _Vbd] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False
        self.stats = dict(messages=0, records=0, bytes=0, events=0, tags=0, skipped=0)
        self._behind_logged = 0.0
        self.unavailable: str | None = None  # why the analyzer cannot run (known once imported)
        if _imported is None:
            threading.Thread(target=self._import, name="xentap-analysis-import",
                             daemon=True).start()
        else:
            self._import()

    def _import(self) -> None:
        why = analyzer_class()[1]
        if why:
            self.unavailable = why
            log.warning("data analysis off: %s", why)

    # ------------------------------------------------------------ receiver side
    def submit(self, rep, msg: wire.Message) -> None:
        """Queue a message the receiver applied to ``rep`` (and so to its journal).

        Never blocks: when the queue is full the message is skipped and counted."""
        rng = wire.seq_range(msg)
        if rng is None or self.unavailable:
            return
        key = rep.state.vbd_uuid
        v = self._vbds.get(key)
        if v is None or v.rep is not rep:
            old = v
            v = _Vbd(key, rep, self.cfg)
            if old is not None:  # the replica was reopened: its analyzer goes on
                v.__dict__.update({k: getattr(old, k) for k in (
                    "analyzer", "next_seq", "analysed_seq", "skipped", "skipped_ranges",
                    "restarts", "tags", "tag_errors", "events", "identified", "alarm", "in_gap",
                    "data_state", "window")})
                old.close()
            self._vbds[key] = v
        n = wire.payload_bytes(msg)
        v.submitted_seq = rng[1]
        with self._cv:
            q = self._queues.setdefault(key, _Queue())
            if q.skipping and len(q.items) <= self.queue_msgs // 4 \
                    and q.nbytes <= self.queue_bytes // 4:
                q.skipping = False
            if q.skipping or not self._make_room(q, n):
                self._skip(v, rng)
                return
            if not q.items:
                self._ready.append(q)
            q.push((v, msg, n))
            self._qmsgs += 1
            self._qbytes += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="xentap-analysis",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _full(self, n: int) -> bool:
        return self._qmsgs >= self.queue_msgs or (self._qmsgs > 0 and
                                                  self._qbytes + n > self.queue_bytes)

    def _make_room(self, q: _Queue, n: int) -> bool:
        """Room for `n` more bytes in queue `q`, taken if need be from the
        queue that holds the most (its newest messages go unanalysed); False
        if `q` holds the most itself.  Under self._cv."""
        while self._full(n):
            big = max(self._ready, key=_Queue.size)
            if q.size() >= big.size():
                q.skipping = True
                return False
            v, msg, nn = big.take(newest=True)
            self._qmsgs -= 1
            self._qbytes -= nn
            if not big.items:
                self._ready.remove(big)
            big.skipping = True
            self._skip(v, wire.seq_range(msg))
        return True

    def _skip(self, v: _Vbd, rng: tuple[int, int]) -> None:
        """Counts (and says, once per 10 s) seqs of `v` that go unanalysed."""
        v.skipped += rng[1] - rng[0] + 1
        self.stats["skipped"] += rng[1] - rng[0] + 1
        now = time.monotonic()
        if now - self._behind_logged >= 10:
            self._behind_logged = now
            log.warning("analysis is behind (%d messages, %d MiB queued): %s seqs "
                        "%d..%d not analysed; it restarts from the replica",
                        self._qmsgs, self._qbytes >> 20, v.uuid, rng[0], rng[1])

    def close(self, timeout: float = 10.0) -> None:
        """Analyse what is queued (for at most ``timeout`` s), publish, stop."""
        with self._cv:
            self._stop = True
            self._cv.notify()
            t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                log.warning("analysis: %d messages still queued at shutdown were not "
                            "analysed", self._qmsgs)
        for v in list(self._vbds.values()):
            v.close()

    def idle(self) -> bool:
        with self._cv:
            return not self._qmsgs and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted was analysed (tests, the demo)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.idle():
                return True
            time.sleep(0.01)
        return self.idle()

    def status(self) -> dict:
        """Per VBD: analysed/submitted seqs, behind or not, tags, data state."""
        out = {}
        for key, v in list(self._vbds.items()):
            out[key] = self._vbd_status(v)
        with self._cv:
            q = dict(messages=self._qmsgs, bytes=self._qbytes)
        return dict(queue=q, stats=dict(self.stats), vbds=out, unavailable=self.unavailable)

    def _vbd_status(self, v: _Vbd) -> dict:
        return dict(analysed_seq=v.analysed_seq, submitted_seq=v.submitted_seq,
                    behind=v.submitted_seq - v.analysed_seq if v.submitted_seq >= 0 else 0,
                    skipped=v.skipped, restarts=v.restarts, tags=v.tags, tag_errors=v.tag_errors,
                    data_state=v.data_state)

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        finish_due = False  # analysed something since the last finish/publish pass
        tokens, last = _CPU_BURST, time.monotonic()  # CPU seconds the worker may spend
        while True:
            if self.cpu_share is not None:
                now = time.monotonic()
                tokens = min(_CPU_BURST, tokens + (now - last) * self.cpu_share)
                last = now
                if tokens < 0 and not self._stop:
                    time.sleep(min(1.0, -tokens / self.cpu_share))
                    continue
            with self._cv:
                if self._ready:     # the VBDs in turn, a message each
                    q = self._ready.popleft()
                    v, msg, n = q.take()
                    if q.items:
                        self._ready.append(q)
                    self._qmsgs -= 1
                    self._qbytes -= n
                    self._busy = True
                elif finish_due:
                    v = None
                elif self._stop:
                    self._busy = False
                    return
                else:
                    self._busy = False
                    self._cv.wait(self.publish_interval)
                    v = False
            if v is False:  # idle: publish the VBDs whose journal window moved
                for w in list(self._vbds.values()):
                    win = _window(w.rep)
                    if w.dirty or (win is not None and win != w.window):
                        self._publish(w)
                continue
            if v is None:  # the queue ran dry: analyse partial batches, publish
                finish_due = False
                for w in list(self._vbds.values()):
                    if w.analyzer is not None:
                        self._emit(w, w.analyzer.finish())
                    if w.dirty:
                        self._publish(w)
                continue
            finish_due = True
            cpu0 = time.thread_time()
            try:
                self._feed(v, msg)
            except Exception:  # a bug in the analyzer must not stop the others
                log.exception("%s: analysis failed on %s; its analyzer restarts",
                              v.uuid, msg.TYPE.name)
                v.analyzer = None
                v.next_seq = None
            if v.dirty and time.monotonic() - v.published >= self.publish_interval:
                self._publish(v)
            tokens -= time.thread_time() - cpu0

    def _feed(self, v: _Vbd, msg: wire.Message) -> None:
        if analyzer_class()[0] is None:  # (waits for the import Analysis() started)
            return
        first, last = wire.seq_range(msg)
        evs: list[ev.Event] = []
        if v.analyzer is None or v.next_seq is None:
            evs += v.start(first, "new" if v.analysed_seq < 0 and first <= 1 else "appliance restart")
        elif first != v.next_seq:
            if last < v.next_seq:  # already analysed (a resend after a reconnect)
                return
            if first < v.next_seq:  # partly analysed: the rest only
                msg = wire.Writes(stream_id=msg.stream_id, epoch=msg.epoch, first_seq=v.next_seq,
                                  records=[r for r in msg.records if r.seq >= v.next_seq])
                first = v.next_seq
        if v.next_seq is not None and first != v.next_seq:
            v.skipped_ranges = (v.skipped_ranges + [(v.next_seq, first - 1)])[-8:]
            now = time.monotonic()
            if now - v.skip_logged >= 10:
                more = f" ({v.skips_unlogged} more such skips since the last line)" \
                    if v.skips_unlogged else ""
                log.warning("%s: seqs %d..%d were not analysed (analysis fell behind); "
                            "analyzer restarted%s", v.uuid, v.next_seq, first - 1, more)
                v.skip_logged, v.skips_unlogged = now, 0
            else:
                v.skips_unlogged += 1
            evs += v.start(first, "skipped seqs")
        a = v.analyzer
        st = self.stats
        if isinstance(msg, wire.Writes):
            for r in msg.records:
                data = r.data
                if r.flags & (wire.WriteFlags.DISCARD | wire.WriteFlags.ZEROES):
                    if r.length > _MAX_FILL:
                        continue
                    data = bytes(r.length)
                evs += a.feed(r.seq, r.timestamp_ns, r.sector, data)
                st["bytes"] += r.length
            st["records"] += len(msg.records)
        elif isinstance(msg, wire.Resync):
            data = msg.data
            if msg.flags & wire.WriteFlags.ZEROES:
                data = bytes(msg.length) if msg.length <= _MAX_FILL else b""
            if data:
                evs += a.feed(msg.seq, 0, msg.sector, data)
        elif isinstance(msg, wire.Flush):
            evs += a.flush(msg.seq, msg.timestamp_ns)
        elif isinstance(msg, wire.Gap):
            v.in_gap = True
        elif isinstance(msg, wire.ResyncEnd):
            v.in_gap = False
        st["messages"] += 1
        v.next_seq = last + 1
        v.analysed_seq = last
        v.dirty = True
        self._emit(v, evs)

    def _emit(self, v: _Vbd, evs: list[ev.Event]) -> None:
        if not evs:
            return
        self.stats["events"] += len(evs)
        tagged = False
        for e in evs:
            d = e.as_dict()
            v.events.append(d)
            if e.kind == ev.FS_IDENTIFIED and len(v.identified) < 16:
                v.identified.append(d)
            tagged |= self._tag(v, e.tag_kwargs())
            if e.kind == ev.ENCRYPTION_SUSPECTED:
                v.alarm = d
                rec = e.detail.get("recommended_seq")
                if rec is not None:
                    tagged |= self._tag(v, dict(
                        seq=rec, consistent=True,
                        timestamp_ns=e.detail.get("recommended_time_ns") or None,
                        label=(f"recommended_recovery: last consistent point before mass "
                               f"encryption from write {e.detail['first_seq']}")[:128]))
                log.warning("%s: %s", v.uuid, e.label)
        v.dirty = True
        if tagged:
            _commit_soon(v.rep)
        a = v.analyzer
        if a is not None and a.state()["data_state"] != v.data_state:
            self._publish(v)  # a new data state (an alarm) goes out at once

    def _tag(self, v: _Vbd, kw: dict) -> bool:
        j = v.rep.journal
        if j is None or kw["seq"] < 0:
            return False
        try:
            j.add_tag(kind=_TAG_KIND_ANALYZER, **kw)
        except (OSError, ValueError) as e:  # outside the window (trimmed), closed
            v.tag_errors += 1
            log.debug("%s: tag at seq %d not added: %s", v.uuid, kw["seq"], e)
            return False
        v.tags += 1
        self.stats["tags"] += 1
        return True

    def _publish(self, v: _Vbd) -> None:
        a = v.analyzer
        state = a.state() if a is not None else None
        if state is not None:
            v.data_state = state["data_state"]
        v.window = _window(v.rep) or v.window
        rs = v.rep.state
        doc = dict(format=STATE_FORMAT, vbd=v.uuid, updated_ns=time.time_ns(),
                   domid=rs.domid, devid=rs.devid, vdev=rs.vdev, window=v.window,
                   status=self._vbd_status(v), skipped_ranges=v.skipped_ranges,
                   in_gap=v.in_gap, alarm=v.alarm,
                   state=state,
                   consistent=[dict(seq=s, time_ns=t, label=lab)
                               for s, t, lab in (a.consistent[-_RECENT_EVENTS:] if a else [])],
                   identified=v.identified, events=list(v.events))
        try:
            _write_atomically(state_path(v.dir), json.dumps(doc).encode())
        except OSError as e:
            log.warning("%s: cannot publish the analysis state: %s", v.uuid, e)
        v.published = time.monotonic()
        v.dirty = False
