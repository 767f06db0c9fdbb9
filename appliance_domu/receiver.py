"""The appliance's mirror-stream receiver: ZeroMQ ROUTER -> StreamChecker -> replica.

One ROUTER socket, bound to ``tcp://...`` or ``ipc://...``, CurveZMQ server
by default (only the dom0 public keys it was given get in; plain only with
``insecure=True``).  Many dom0 peers, many streams per peer: a stream is keyed
by (peer, stream_id), the peer being the client's Curve public key (its ZAP
User-Id), or its ZeroMQ routing id when insecure.

Per stream, a :class:`xentap.wire.StreamChecker` (``resume=True``: a session
may go on from the appliance's high water) is fed every frame.  A frame
it rejects (malformed, truncated, bad checksum, wrong epoch, replayed,
duplicated, out of order, beyond credit, ...) costs one log line, writes
nothing and *ends the session*: the stream's later frames are dropped (a
rate-limited log line) until dom0 sends a HELLO with a higher epoch, which
the drainer does on reconnect once it stops getting ACKs / HEARTBEATs.

HELLO opens (or creates) the VBD's replica (:mod:`appliance_domu.replica`),
records the session's epoch durably, and is answered with
ACK(acked_seq = durable high water, credit).  A HELLO for a VBD already
bound to another stream supersedes that session.

Durability and ACKs (group commit): accepted messages are appended to the
VBD's journal at once (WRITES batches decoded as arrays, see
:class:`xentap.wire.Records`); a replica is synced (the journal written and
fdatasynced, then the state file) when its oldest unsynced data is
``sync_interval`` old or ``sync_bytes`` have piled up, and each sync is
followed by one cumulative ACK carrying the durable seq and a renewed
credit.  Nothing is ACKed before it is durable.

``replica.img`` is not written on the way in (see :mod:`appliance_domu.replica`):
an ACK that would acknowledge everything received while the image lags is
held for :data:`CATCHUP_IDLE`; if more frames come the stream goes on and the
ACK goes as is, else the image catches up from the journal in the catch-up
thread and then the ACK goes.  So once dom0 saw everything acknowledged the
image equals its disk, and a busy stream pays for one copy of each write
(the journal's), not two.

Credit: the receiver grants a constant window (``credit_bytes`` /
``credit_msgs`` beyond the acked seq) and, by default, *enforces* it
(``StreamChecker(enforce_credit=True)``): a sender that exceeds it is
rejected like any protocol violation.  Because the window never shrinks and
the receiver records an ACK before the sender can see it, a correct sender
can never trip it.

HEARTBEAT is answered with HEARTBEAT(last_seq = durable high water).

Journal: every accepted message is also appended to the VBD's CDP journal
(:mod:`engines.journal`, opened with the replica); a sync writes the
journal's frames (one zstd frame per batch) and fdatasyncs it *before* the
replica image and its state, so "durable" -- and so every ACK -- means
"in the journal".  Retention trims run in the journal's own thread and never
hold up the stream.

Memory is bounded: ZeroMQ buffers at most ``rcvhwm`` frames per peer (each at
most ``wire.MAX_FRAME_BYTES``; a larger one drops the connection), every
frame is applied before the next is read, and the number of streams /
open replicas is capped by ``max_streams``.

Usage: ``Receiver(...).start()`` runs it in a thread (tests, the demo);
``Receiver(...).run()`` in the calling thread (the ``xentap appliance serve``
process); ``stop()`` from anywhere ends it cleanly: pending data synced and
acknowledged, sockets closed.  ``python -m appliance_domu.receiver --bench``
measures what it sustains on loopback.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from appliance_domu.analysis import Analysis
from appliance_domu import replica as replica_mod
from appliance_domu.replica import Replica
from xentap import keys, wire
from xentap.structs import derive_struct

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7788"
DEFAULT_CREDIT_BYTES = 64 << 20  #: payload bytes dom0 may have outstanding (window/rate = lag)
DEFAULT_CREDIT_MSGS = 4096  #: seq-consuming messages dom0 may have outstanding
DEFAULT_SYNC_INTERVAL = 0.005  #: seconds: max age of unsynced data
DEFAULT_SYNC_BYTES = 16 << 20  #: bytes: sync earlier than the interval past this
DEFAULT_RCVHWM = 64  #: frames queued per peer by ZeroMQ
DEFAULT_MAX_STREAMS = 1024
DEFAULT_SYNC_THREADS = 2  #: replicas synced in parallel (one sync at a time per replica)
_BURST = 256  # frames handled per poll before deadlines are looked at again
#: an ACK that would acknowledge everything received waits this long for more
#: frames; if none come the stream paused: replica.img catches up first (Replica.catch_up)
CATCHUP_IDLE = 0.02
CATCHUP_STEP = 64 << 20  #: journal bytes per catch-up step (frames resuming stop the next)
_IDLE_POLL_MS = 50  # also the stop() latency

_HDR, _HDR_FIELDS = derive_struct(wire.Header)  # same layout as wire.decode()
_TYPE_IDX, _STREAM_IDX = _HDR_FIELDS.index("type"), _HDR_FIELDS.index("stream_id")
_EPOCH_IDX = _HDR_FIELDS.index("epoch")


#: the checker of every session: a StreamChecker that accepts what a session
#: resuming from the appliance's high water explains (see xentap.wire)
_session_checker = functools.partial(wire.StreamChecker, resume=True)


@dataclass(eq=False)
class Session:
    """One stream's current session: (peer, stream_id) bound to a replica by HELLO."""

    key: tuple[bytes, int]
    peer_name: str
    route: bytes
    checker: wire.StreamChecker
    replica: Replica
    acked: int = -1  # acked_seq of the last ACK sent
    started: float = field(default_factory=time.monotonic)

    @property
    def epoch(self) -> int:
        return self.checker.epoch


class _RateLimitedLog:
    """One line per key per second at most; counts what it swallowed."""

    def __init__(self, interval: float = 1.0, maxkeys: int = 256):
        self.interval, self.maxkeys = interval, maxkeys
        self.last: OrderedDict = OrderedDict()  # key -> [time, suppressed]

    def __call__(self, key, level: int, fmt: str, *args) -> None:
        now = time.monotonic()
        ent = self.last.get(key)
        if ent is not None and now - ent[0] < self.interval:
            ent[1] += 1
            return
        if ent is not None and ent[1]:
            fmt += " (%d similar frames dropped before)"
            args = (*args, ent[1])
        self.last[key] = [now, 0]
        self.last.move_to_end(key)
        while len(self.last) > self.maxkeys:
            self.last.popitem(last=False)
        log.log(level, fmt, *args)


class Receiver:
    """See the module docstring.  Attributes worth reading: ``endpoint`` (after
    bind, with the real port), ``stats`` (counters), ``replicas`` (open ones)."""

    def __init__(self, endpoint: str, data_dir: str | os.PathLike, *,
                 curve: keys.CurveServer | None = None, insecure: bool = False,
                 credit_bytes: int = DEFAULT_CREDIT_BYTES,
                 credit_msgs: int = DEFAULT_CREDIT_MSGS,
                 sync_interval: float = DEFAULT_SYNC_INTERVAL,
                 sync_bytes: int = DEFAULT_SYNC_BYTES,
                 enforce_credit: bool = True,
                 rcvhwm: int = DEFAULT_RCVHWM,
                 max_streams: int = DEFAULT_MAX_STREAMS,
                 sync_threads: int = DEFAULT_SYNC_THREADS,
                 journal: dict | None = None,
                 analysis: bool = True):
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"endpoint {endpoint!r}: tcp://HOST:PORT or ipc://PATH expected")
        if curve is None and not insecure:
            raise ValueError("no Curve keys: give the appliance its key pair and the "
                             "allowed dom0 keys, or choose insecure explicitly")
        if curve is not None and insecure:
            raise ValueError("both Curve keys and insecure given")
        if not (0 <= credit_bytes <= wire.U64_MAX and 0 <= credit_msgs <= wire.U32_MAX):
            raise ValueError("credit out of range")
        if credit_bytes < wire.MAX_FRAME_BYTES and enforce_credit:
            log.warning("credit_bytes %d is below one full batch (%d): large batches will "
                        "never fit", credit_bytes, wire.MAX_BATCH_DATA_BYTES)
        self.requested_endpoint = endpoint
        self.endpoint = endpoint
        self.data_dir = Path(data_dir)
        self.curve = curve
        self.insecure = insecure
        self.credit_bytes = credit_bytes
        self.credit_msgs = credit_msgs
        self.sync_interval = sync_interval
        self.sync_bytes = sync_bytes
        self.enforce_credit = enforce_credit
        self.rcvhwm = rcvhwm
        self.max_streams = max_streams
        self.sync_threads = max(1, sync_threads)
        #: options for engines.journal.Journal.open (retention_seconds, retention_bytes,
        #: segment_bytes)
        self.journal_opts = dict(journal or {})
        #: the data analyzer, fed every applied message off the ACK path (analysis.py)
        self.analysis = Analysis() if analysis else None

        self.sessions: dict[tuple[bytes, int], Session] = {}
        self.replicas: dict[uuid.UUID, Replica] = {}
        self._bound_session: dict[uuid.UUID, Session] = {}  # replica -> its session
        self.stats = dict(frames=0, bytes=0, records=0, data_bytes=0, rejected=0,
                          dropped_no_session=0, dropped_stale_epoch=0, duplicates=0,
                          hellos=0, acks=0,
                          heartbeats=0, syncs=0)
        self._ratelog = _RateLimitedLog()
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth = None
        self._done = threading.Event()
        self.error: BaseException | None = None
        # syncs run in worker threads; completions come back through a queue + a pipe
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[uuid.UUID, object] = {}  # vbd -> Future
        self._completed: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r = self._wake_w = -1
        self._held: dict[uuid.UUID, float] = {}  # vbd -> since when its ACK waits (catch-up)
        self._catchups: dict[uuid.UUID, object] = {}  # vbd -> Future of a running catch-up
        self._catchup_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ life cycle
    def bind(self) -> str:
        """Create the socket and bind it; returns the endpoint (real port if ``:*``/``:0``)."""
        if self._sock is not None:
            return self.endpoint
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ctx = zmq.Context()  # one ZAP authenticator per context: never share it
        sock = ctx.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.rcvhwm = self.rcvhwm
            sock.sndhwm = 1024
            sock.maxmsgsize = wire.MAX_FRAME_BYTES
            sock.router_mandatory = 1
            sock.router_handover = 1
            # No ZMTP heartbeats (ZMQ_HEARTBEAT_IVL): libzmq 4.3.x aborts the process
            # (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``) when
            # the heartbeat timer fires on a connection whose input the high-water
            # mark stopped and whose peer has gone (zeromq/libzmq#3937, #4364, #4767):
            # what a slow appliance whose dom0 reconnects does.  The stream has its own
            # HEARTBEAT; dead peers are found by TCP keepalive.
            sock.tcp_keepalive = 1
            sock.tcp_keepalive_idle = 30
            sock.tcp_keepalive_intvl = 5
            sock.tcp_keepalive_cnt = 6
            if self.curve is not None:
                self._auth = keys.configure_server(sock, self.curve)
            ep = self.requested_endpoint
            if ep.startswith("tcp://") and ep.endswith(":0"):
                ep = ep[:-2] + ":*"
            try:
                sock.bind(ep)
            except zmq.ZMQError as e:
                raise OSError(e.errno, f"cannot listen on {self.requested_endpoint}: "
                              f"{e.strerror}") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            sock.close(0)
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            ctx.term()
            raise
        self._ctx, self._sock = ctx, sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(self.sync_threads, thread_name_prefix="xentap-sync")
        self._catchup_pool = ThreadPoolExecutor(1, thread_name_prefix="xentap-catchup")
        log.info("appliance receiver listening on %s (%s), data in %s", self.endpoint,
                 "CurveZMQ, %d dom0 key(s) allowed" % len(self.curve.allowed)
                 if self.curve else "INSECURE: no encryption, no authentication",
                 self.data_dir)
        return self.endpoint

    def start(self) -> Receiver:
        """Bind (errors raised here) and run in a daemon thread."""
        self.bind()
        self._loop_thread = threading.Thread(target=self._run_guarded, name="xentap-receiver",
                                             daemon=True)
        self._loop_thread.start()
        return self

    def run(self) -> None:
        """Bind if needed and serve in the calling thread until :meth:`stop`."""
        self.bind()
        self._loop_thread = threading.current_thread()
        self._run_guarded()
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the loop: pending data synced and ACKed, socket closed.  Idempotent."""
        self._stop.set()
        t = self._loop_thread
        if t is None:  # bound but never run (or never bound)
            if self._sock is not None and not self._done.is_set():
                self._shutdown()
        elif t is not threading.current_thread():
            self._done.wait(timeout)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def public_key(self) -> str | None:
        """The appliance's Z85 Curve public key (what it announces), None if insecure."""
        return self.curve.public.decode("ascii") if self.curve else None

    def status(self) -> dict:
        """Endpoint, key and, per VBD with an open replica, what is durable.

        Safe to call from another thread (a snapshot of plain values)."""
        vbds = {}
        for rep in list(self.replicas.values()):
            st = rep.state
            vbds[st.vbd_uuid] = dict(durable_seq=st.high_water, epoch=st.epoch,
                                     in_resync=st.in_resync, last_flush_seq=st.last_flush_seq,
                                     last_flush_durable_ns=st.last_flush_durable_ns,
                                     domid=st.domid, vdev=st.vdev,
                                     connected=rep.vbd_uuid in self._bound_session)
            j = rep.journal
            if j is not None:
                vbds[st.vbd_uuid]["journal"] = dict(
                    first_seq=j.base_seq, last_seq=j.durable_seq,
                    journal_bytes=j.journal_bytes, warnings=list(j.warnings[-3:]))
        return dict(endpoint=self.endpoint, public_key=self.public_key,
                    stats=dict(self.stats), vbds=vbds,
                    analysis=self.analysis.status() if self.analysis else None)

    @property
    def running(self) -> bool:
        return self._loop_thread is not None and not self._done.is_set()

    def _run_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # pragma: no cover - a bug; keep it visible
            log.exception("receiver loop failed")
            self.error = e
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.analysis is not None:  # its last tags go into the final syncs
            self.analysis.close()
        if self._catchup_pool is not None:
            self._catchup_pool.shutdown(wait=True)
            self._catchup_pool = None
        for rep in list(self.replicas.values()):
            self._sync_now(rep)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for rep in self.replicas.values():
            rep.close()
        self.replicas.clear()
        self.sessions.clear()
        self._bound_session.clear()
        self._done.set()
        log.info("appliance receiver on %s stopped", self.endpoint)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        sock = self._sock
        recv = sock.recv_multipart
        stop = self._stop
        NOBLOCK, EAGAIN, POLLIN = zmq.NOBLOCK, zmq.EAGAIN, zmq.POLLIN
        poller = zmq.Poller()
        poller.register(sock, POLLIN)
        poller.register(self._wake_r, POLLIN)
        while not stop.is_set():
            events = dict(poller.poll(self._next_deadline_ms()))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            self._reap_syncs()
            if sock in events:
                # a burst of frames, cut short after half a sync interval so that
                # deadlines (and other replicas) are looked at in time
                until = time.monotonic() + self.sync_interval / 2
                for _ in range(_BURST):
                    try:
                        parts = recv(NOBLOCK, copy=False)
                    except zmq.ZMQError as e:
                        if e.errno == EAGAIN:
                            break
                        raise
                    self._on_message(parts)
                    if time.monotonic() >= until:
                        break
                self._reap_syncs()
            self._sync_due()
            if self._held:
                self._release_held()

    def _next_deadline_ms(self) -> int:
        due = None
        for rep in self.replicas.values():
            if rep.dirty_since is not None and not rep.syncing:
                t = rep.dirty_since + self.sync_interval
                due = t if due is None else min(due, t)
        for vbd, t in self._held.items():
            if vbd in self._catchups:  # its catch-up wakes the loop when done
                continue
            due = t + CATCHUP_IDLE if due is None else min(due, t + CATCHUP_IDLE)
        if due is None:
            return _IDLE_POLL_MS
        return max(0, min(_IDLE_POLL_MS, int((due - time.monotonic()) * 1000 + 0.999)))

    def _sync_due(self) -> None:
        now = time.monotonic()
        for rep in list(self.replicas.values()):
            if rep.dirty_since is not None and not rep.syncing \
                    and (now - rep.dirty_since >= self.sync_interval
                         or rep.dirty_bytes >= self.sync_bytes):
                self._sync_async(rep)

    # ------------------------------------------------------------------ frames
    def _peer(self, route: bytes, frame: zmq.Frame) -> tuple[bytes, str]:
        if self.curve is not None:
            try:
                uid = frame.get("User-Id")
            except zmq.ZMQError:  # pragma: no cover - no ZAP user id
                uid = None
            if uid:
                key = uid.encode("ascii")
                name = self.curve.names.get(key) or uid[:8]
                return key, f"{name}[{uid[:8]}]"
            # no ZAP identity: cannot happen with configure_server; refuse to guess
            return b"", "unauthenticated"
        return route, f"peer {route.hex()}"

    def _on_message(self, parts: list) -> None:
        st = self.stats
        st["frames"] += 1
        route = parts[0].bytes
        if len(parts) != 2:
            st["rejected"] += 1
            self._ratelog(("parts", route), logging.WARNING,
                          "peer %s: message of %d parts rejected (one frame per message)",
                          route.hex(), len(parts))
            return
        frame = parts[1]
        peer, peer_name = self._peer(route, frame)
        if not peer:
            st["rejected"] += 1
            return
        buf = frame.buffer
        st["bytes"] += buf.nbytes
        if buf.nbytes < wire.HEADER_SIZE:
            st["rejected"] += 1
            self._ratelog(("short", peer), logging.WARNING,
                          "%s: truncated frame of %d bytes (no header) rejected",
                          peer_name, buf.nbytes)
            return
        h = _HDR.unpack_from(buf)
        mtype, stream_id = h[_TYPE_IDX], h[_STREAM_IDX]
        key = (peer, stream_id)
        sess = self.sessions.get(key)
        if mtype == wire.MsgType.HELLO:
            self._on_hello(key, peer_name, route, buf, sess)
            return
        if sess is None:
            st["dropped_no_session"] += 1
            self._ratelog(("nosess", key), logging.WARNING,
                          "%s stream %#x: %s frame without a session (no HELLO, or the "
                          "session ended) dropped", peer_name, stream_id,
                          _type_name(mtype))
            return
        if sess.checker.stale(h[_EPOCH_IDX]):  # of an earlier session: dropped, the session goes on
            st["dropped_stale_epoch"] += 1
            self._ratelog(("stale", key), logging.INFO,
                          "%s: %s frame of epoch %d, from before session epoch %d, dropped",
                          sess.checker.vbd, _type_name(mtype), h[_EPOCH_IDX], sess.epoch)
            return
        sess.route = route
        try:
            msg = sess.checker.feed(buf)
        except wire.WireError as e:
            self._reject(sess, e)
            return
        if msg is None:
            st["duplicates"] += 1
            return
        if isinstance(msg, wire.Heartbeat):
            st["heartbeats"] += 1
            self._send(sess, wire.Heartbeat(stream_id=stream_id, epoch=sess.epoch,
                                            timestamp_ns=time.time_ns(),
                                            last_seq=sess.replica.durable_seq))
            return
        rep = sess.replica
        try:
            n = rep.apply(msg)
        except OSError as e:
            log.error("%s: cannot apply %s to replica %s: %s; session ended",
                      sess.checker.vbd, msg.TYPE.name, rep.dir, e)
            self._end_session(sess)
            return
        if isinstance(msg, wire.Writes):
            st["records"] += len(msg.records)
        st["data_bytes"] += n
        if self.analysis is not None:  # journaled: hand it to the analyzer (never blocks)
            self.analysis.submit(rep, msg)
        if rep.dirty_bytes >= self.sync_bytes and not rep.syncing:
            self._sync_async(rep)

    def _on_hello(self, key, peer_name: str, route: bytes, buf, sess: Session | None) -> None:
        t0 = time.monotonic()
        st = self.stats
        stream_id = key[1]
        try:
            hello = wire.decode(buf)
        except wire.WireError as e:
            st["rejected"] += 1
            log.warning("%s stream %#x: HELLO rejected: %s", peer_name, stream_id, e)
            if sess is not None:
                self._end_session(sess)
            return
        if sess is None and len(self.sessions) >= self.max_streams:
            st["rejected"] += 1
            log.warning("%s stream %#x: HELLO rejected: %d streams open, the maximum",
                        peer_name, stream_id, len(self.sessions))
            return
        vbd = hello.vbd_uuid
        rep = self.replicas.get(vbd)
        try:
            if rep is None:
                rep = Replica.open(self.data_dir, vbd, journal=self.journal_opts)
                if rep is not None:
                    self._cache_replica(rep)
        except (OSError, ValueError) as e:
            st["rejected"] += 1
            log.error("%s stream %#x: HELLO for VBD %s rejected: %s", peer_name, stream_id,
                      vbd, e)
            if sess is not None:
                self._end_session(sess)
            return
        if rep is not None:
            self._sync_now(rep)  # what is applied becomes durable before a new session starts
            if rep.fd < 0:  # the sync failed and dropped the replica
                st["rejected"] += 1
                return
            self._held.pop(vbd, None)
            self._catch_up(rep)
            checker = rep.checker(stream_id, enforce_credit=self.enforce_credit,
                                  cls=_session_checker)
        else:
            checker = Replica.fresh_checker(stream_id, enforce_credit=self.enforce_credit,
                                             cls=_session_checker)
        try:
            checker.feed(buf)
        except wire.WireError as e:
            st["rejected"] += 1
            log.warning("%s: HELLO rejected: %s", peer_name, e)
            if sess is not None:
                self._end_session(sess)
            return
        try:
            if rep is None:
                rep = Replica.create(self.data_dir, hello, journal=self.journal_opts)
                self._cache_replica(rep)
            else:
                rep.begin_session(hello)
        except (OSError, ValueError) as e:
            st["rejected"] += 1
            log.error("%s: HELLO accepted but the replica %s failed: %s", checker.vbd,
                      self.data_dir / str(vbd), e)
            if sess is not None:
                self._end_session(sess)
            if rep is not None:  # its in-memory state is unknown now: reopen from disk later
                self._sync_failed(rep, e)
            return
        if sess is not None:
            self._end_session(sess, quiet=True)
        old = self._bound_session.get(vbd)
        if old is not None:
            log.warning("%s: superseded by a new session from %s stream %#x (epoch %d)",
                        old.checker.vbd, peer_name, stream_id, hello.epoch)
            self._end_session(old, quiet=True)
        new = Session(key, peer_name, route, checker, rep)
        self.sessions[key] = new
        self._bound_session[vbd] = new
        st["hellos"] += 1
        log.info("%s: session from %s, next seq %d, durable %d%s (HELLO handled in %.2f s)",
                 checker.vbd, peer_name, hello.next_seq, rep.durable_seq,
                 " (resync open)" if checker.in_resync else "", time.monotonic() - t0)
        self._ack(new)

    def _reject(self, sess: Session, e: wire.WireError) -> None:
        self.stats["rejected"] += 1
        log.warning("%s: frame rejected, session ended: %s: %s", sess.peer_name,
                    type(e).__name__, e)
        self._end_session(sess)

    def _end_session(self, sess: Session, quiet: bool = False) -> None:
        if self.sessions.get(sess.key) is sess:
            del self.sessions[sess.key]
        vbd = sess.replica.vbd_uuid
        if self._bound_session.get(vbd) is sess:
            del self._bound_session[vbd]
        if sess.replica.dirty and not sess.replica.syncing and sess.replica.fd >= 0:
            self._sync_async(sess.replica)

    def _cache_replica(self, rep: Replica) -> None:
        self.replicas[rep.vbd_uuid] = rep
        if len(self.replicas) > self.max_streams:  # close idle, clean, unbound ones
            for vbd, r in list(self.replicas.items()):
                if vbd not in self._bound_session and not r.dirty and not r.syncing \
                        and r is not rep and vbd not in self._catchups:
                    r.close()
                    del self.replicas[vbd]
                    if len(self.replicas) <= self.max_streams:
                        break

    # ------------------------------------------------------------------ durability, ACK
    def _sync_async(self, rep: Replica) -> None:
        """Start syncing a replica in a worker thread (at most one sync per replica)."""
        snap = rep.begin_sync()
        fut = self._pool.submit(rep.write_durable, snap)
        self._inflight[rep.vbd_uuid] = fut

        def done(f, rep=rep, snap=snap):
            self._completed.put((rep, snap, f.exception()))
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (a wake-up is pending anyway) or closed

        fut.add_done_callback(done)

    def _reap_syncs(self) -> None:
        """Finish the syncs the workers completed: durable state, then ACK."""
        while True:
            try:
                rep, snap, exc = self._completed.get_nowait()
            except queue.Empty:
                return
            self._inflight.pop(rep.vbd_uuid, None)
            self._finish_sync(rep, snap, exc)

    def _finish_sync(self, rep: Replica, snap, exc: BaseException | None) -> None:
        if exc is not None:
            rep.end_sync(None)
            self._sync_failed(rep, exc)
            return
        rep.end_sync(snap)
        self.stats["syncs"] += 1
        if rep.image_lag_bytes >= replica_mod.IMAGE_MAX_LAG_BYTES:
            self._start_catch_up(rep)
        sess = self._bound_session.get(rep.vbd_uuid)
        if sess is not None and sess.acked < rep.durable_seq:
            self._ack_or_hold(sess)

    def _ack_or_hold(self, sess: Session) -> None:
        """ACK what is durable -- unless that is everything received and replica.img
        lags: then the ACK waits CATCHUP_IDLE for more frames (the stream goes on:
        ACK as is) or none (it paused: the image catches up, then the ACK)."""
        rep = sess.replica
        if rep.image_applied < rep.durable_seq and rep.applied_seq <= rep.durable_seq:
            self._held.setdefault(rep.vbd_uuid, time.monotonic())
            if sess.acked < rep.durable_seq - 1:
                # all but the last seq: its credit comes back (dom0 may be waiting for
                # it rather than pausing); "everything acknowledged" waits for the image
                self._ack(sess, rep.durable_seq - 1)
            return
        self._ack(sess)

    def _release_held(self) -> None:
        """Send the held ACKs that are due: at once when more frames came (the stream
        goes on), else once a catch-up (in the catch-up thread, so that the loop
        keeps answering) has brought replica.img to the durable seq."""
        now = time.monotonic()
        for vbd, since in list(self._held.items()):
            sess, rep = self._bound_session.get(vbd), self.replicas.get(vbd)
            if sess is None or rep is None or rep.fd < 0:
                del self._held[vbd]
                if rep is not None and rep.fd >= 0:  # the stream ended: a pause too
                    self._start_catch_up(rep)
                continue
            if rep.applied_seq <= rep.durable_seq and rep.image_applied < rep.durable_seq:
                if now - since < CATCHUP_IDLE or self._catchup_running(vbd):
                    continue
                self._start_catch_up(rep)
                continue
            del self._held[vbd]
            if sess.acked < rep.durable_seq:
                self._ack(sess)

    def _catchup_running(self, vbd: uuid.UUID) -> bool:
        fut = self._catchups.get(vbd)
        if fut is None:
            return False
        if not fut.done():
            return True
        del self._catchups[vbd]
        exc = fut.exception()
        if exc is not None:  # the journal has it all; the next catch-up tries again
            log.error("replica %s: bringing replica.img up to date failed: %s", vbd, exc)
        return False

    def _start_catch_up(self, rep: Replica) -> None:
        """Bring replica.img up to the durable seq in the catch-up thread (one per VBD
        at a time); the loop is woken when it is done."""
        vbd = rep.vbd_uuid
        if self._catchup_pool is None or self._catchup_running(vbd):
            return
        fut = self._catchup_pool.submit(rep.catch_up, CATCHUP_STEP)

        def done(_f):
            try:
                os.write(self._wake_w, b"c")
            except (BlockingIOError, OSError):
                pass

        self._catchups[vbd] = fut
        fut.add_done_callback(done)

    def _catch_up(self, rep: Replica) -> None:
        """The same, in this thread (waits for a running one)."""
        try:
            rep.catch_up()
        except OSError as e:  # the journal has it all; the next catch-up tries again
            log.error("replica %s: bringing replica.img up to date failed: %s", rep.dir, e)

    def _sync_failed(self, rep: Replica, e: BaseException) -> None:
        # after a failed fsync the page cache cannot be trusted: drop the replica,
        # a new HELLO reopens it from its durable state and dom0 re-sends the rest.
        log.error("replica %s: %s; session ended, the replica is reopened from its "
                  "durable state on the next HELLO", rep.dir, e)
        sess = self._bound_session.pop(rep.vbd_uuid, None)
        if sess is not None:
            self.sessions.pop(sess.key, None)
        if self.replicas.get(rep.vbd_uuid) is rep:
            del self.replicas[rep.vbd_uuid]
        rep.close()

    def _sync_now(self, rep: Replica) -> None:
        """Synchronously make everything applied to ``rep`` durable (and ACK it)."""
        fut = self._inflight.get(rep.vbd_uuid)
        if fut is not None:
            fut.exception()  # wait for it; the result is read from the queue
            while rep.vbd_uuid in self._inflight:
                rep2, snap, exc = self._completed.get()
                self._inflight.pop(rep2.vbd_uuid, None)
                self._finish_sync(rep2, snap, exc)
        if rep.fd < 0:
            return
        if not rep.dirty:
            sess = self._bound_session.get(rep.vbd_uuid)
            if sess is not None and sess.acked < rep.durable_seq:
                self._ack(sess)
            return
        snap = rep.begin_sync()
        try:
            rep.write_durable(snap)
        except OSError as e:
            self._finish_sync(rep, snap, e)
        else:
            self._finish_sync(rep, snap, None)

    def _ack(self, sess: Session, seq: int | None = None) -> None:
        ack = wire.Ack(stream_id=sess.key[1], epoch=sess.epoch,
                       acked_seq=sess.replica.durable_seq if seq is None else seq,
                       credit_bytes=self.credit_bytes, credit_msgs=self.credit_msgs)
        sess.checker.granted(ack)  # before dom0 can see it: our window >= dom0's
        sess.acked = ack.acked_seq
        self.stats["acks"] += 1
        self._send(sess, ack)

    def _send(self, sess: Session, msg: wire.Message) -> None:
        try:
            self._sock.send_multipart([sess.route, wire.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            # peer gone or not reading: it will reconnect with a HELLO, and ACKs are cumulative


def _type_name(t: int) -> str:
    try:
        return wire.MsgType(t).name
    except ValueError:
        return f"type-{t}"


# --------------------------------------------------------------------------
# benchmark:  python -m appliance_domu.receiver --bench [--insecure] [--seconds N]


def _bench_sender(endpoint: str, client, rec_size: int, per_batch: int, seconds: float,
                  disk: int, q) -> None:  # pragma: no cover - runs in a child process
    """A credit-respecting sender: HELLO, then WRITES batches until time is up."""
    import random

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if client is not None:
        keys.configure_client(s, client)
    s.connect(endpoint)
    sid, ep = 1, 1
    s.send(wire.encode(wire.Hello(
        stream_id=sid, epoch=ep, host_id=uuid.uuid4(), vbd_uuid=uuid.uuid4(), domid=1,
        devid=51712, vdev="xvda", size_bytes=disk, logical_sector_size=512,
        physical_sector_size=4096, next_seq=1, features=7)))
    win = wire.CreditWindow()
    win.on_ack(wire.decode(s.recv()))
    blob = memoryview(os.urandom(8 << 20))
    rnd = random.Random(1)
    nslots = disk // rec_size
    nbytes = rec_size * per_batch

    now = time.time_ns()  # real timestamps: records stamped 0 would leave the window at once

    def make(seq):
        recs = []
        for i in range(per_batch):
            off = rnd.randrange(nslots) * rec_size
            boff = rnd.randrange(0, (8 << 20) - rec_size, 4096)
            recs.append(wire.WriteRecord(seq + i, now, off // 512, rec_size, 0,
                                         blob[boff:boff + rec_size]))
        return wire.encode(wire.Writes(stream_id=sid, epoch=ep, first_seq=seq, records=recs))

    # frames are built before the clock starts, so that the sender's Python
    # work does not count: what is measured is the transport plus the receiver
    prebuilt = [make(1 + k * per_batch) for k in range(max(1, (256 << 20) // nbytes))]
    seq, frames, payload = 1, 0, 0
    lag: list[float] = []
    sent_at: dict[int, float] = {}
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        now = time.perf_counter()
        if now >= end or frames == len(prebuilt):
            break
        last = seq + per_batch - 1
        while not win.allows(last, nbytes):
            msg = wire.decode(s.recv())
            win.on_ack(msg)
            t = time.perf_counter()
            for k in [k for k in sent_at if k <= msg.acked_seq]:
                lag.append(t - sent_at.pop(k))
        s.send(prebuilt[frames], copy=False)
        win.sent(last, nbytes)
        sent_at[last] = time.perf_counter()
        seq = last + 1
        frames += 1
        payload += nbytes
        while s.poll(0):
            msg = wire.decode(s.recv())
            win.on_ack(msg)
            t = time.perf_counter()
            for k in [k for k in sent_at if k <= msg.acked_seq]:
                lag.append(t - sent_at.pop(k))
    # wait until everything is acknowledged (durable)
    while win.acked_seq < seq - 1:
        msg = wire.decode(s.recv())
        win.on_ack(msg)
        t = time.perf_counter()
        for k in [k for k in sent_at if k <= msg.acked_seq]:
            lag.append(t - sent_at.pop(k))
    el = time.perf_counter() - t0
    lag.sort()
    q.put(dict(frames=frames, records=seq - 1, payload=payload, seconds=el,
               lag_p50_ms=1e3 * lag[len(lag) // 2] if lag else 0,
               lag_p99_ms=1e3 * lag[int(len(lag) * 0.99)] if lag else 0))
    s.close(0)
    ctx.term()


def _bench(argv: list[str]) -> None:  # pragma: no cover - manual
    import multiprocessing as mp
    import shutil
    import tempfile

    insecure = "--insecure" in argv
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 3.0
    base = argv[argv.index("--dir") + 1] if "--dir" in argv else os.environ.get("TMPDIR", "/var/tmp")
    tmp = tempfile.mkdtemp(prefix="xt-rbench-", dir=base)
    try:
        curve = client = None
        if not insecure:
            keys.create(tmp, "appliance")
            keys.create(f"{tmp}/allowed", "dom0")
            curve = keys.CurveServer.from_dir(tmp, f"{tmp}/allowed")
            client = keys.CurveClient.from_files(f"{tmp}/allowed/dom0.key_secret",
                                                 f"{tmp}/appliance.key")
        mpc = mp.get_context("spawn")
        print(f"receiver bench: {'INSECURE' if insecure else 'CurveZMQ'} tcp loopback, "
              f"sender in its own process, {seconds:.0f} s per row, data in {tmp}")
        for label, rec, per in (("4 KiB records x 32/batch", 4096, 32),
                                ("4 KiB records x256/batch", 4096, 256),
                                ("1 MiB records x1/batch", 1 << 20, 1),
                                ("1 MiB records x4/batch", 1 << 20, 4)):
            data = f"{tmp}/data-{rec}-{per}"
            r = Receiver("tcp://127.0.0.1:0", data, curve=curve, insecure=insecure).start()
            q = mpc.Queue()
            cpu0 = time.process_time()
            p = mpc.Process(target=_bench_sender, args=(r.endpoint, client, rec, per,
                                                        seconds, 1 << 30, q))
            p.start()
            res = q.get(timeout=seconds + 60)
            p.join()
            stats = dict(r.stats)
            cpu = time.process_time() - cpu0  # receiver process: loop, sync and zmq I/O threads
            r.stop()
            shutil.rmtree(data, ignore_errors=True)
            el = res["seconds"]
            print(f"  {label:26s} {res['frames'] / el:8.0f} frames/s {res['records'] / el:9.0f} "
                  f"records/s {res['payload'] / el / 1e6:7.1f} MB/s  syncs {stats['syncs']:5d}  "
                  f"ack lag p50 {res['lag_p50_ms']:.0f} ms p99 {res['lag_p99_ms']:.0f} ms  "
                  f"receiver CPU {cpu / el * 100:3.0f}% = {res['records'] / cpu:7.0f} rec/s "
                  f"{res['payload'] / cpu / 1e6:5.0f} MB/s per core")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--bench" in sys.argv:
        logging.basicConfig(level=logging.WARNING)
        _bench(sys.argv)
    else:
        print(__doc__)
