"""`xentap daemon`: serves every xentap VBD that xenstore names.

One main thread and one xenstore connection for the handshakes, and a
:class:`StatusWriter` thread with a connection of its own for the status
(a slow status round never holds up a handshake).  Watches on the backend root and
``@releaseDomain`` (and on each VBD's frontend ``state``) wake a
:class:`~xentap.xenbus.BackendDevice` whose :meth:`step` does the handshake;
every second the daemon publishes each VBD's counters under
``/local/domain/0/xentap/vbd/<domid>/<devid>`` (see xs_keys): the keys whose
value changed and the sample's time, and every key every
``FULL_STATUS_EVERY`` seconds (an idle VBD costs xenstored one write a
second, not forty, and its watchers one event).

A protected VBD (``protect`` in its backend node, see xentap.protect) is a
:class:`ProtectedDevice`: its shim's mirror ring is on before the shim
connects and a drainer sends the stream to the appliance; its figures are
published with the counters (``mirror-*``; ``mirror-lag-ms`` is the age of
the oldest write the appliance has not acknowledged).  When the VBD's shim
session ends (detach, guest end, daemon stop) the drainer drains for a
bounded time and keeps the rest in its spill log, in a :class:`DrainJob`'s
thread: nothing the appliance does (or fails to do) holds up the main loop,
so every other VBD's handshake, attach and detach go on meanwhile.  The
next session, or the next daemon, goes on with the same stream (the VBD's
``vbd-uuid`` is in xenstore); a detached VBD's stream never does, and its
spill dir is removed once every write is acknowledged.  A VBD that names an
appliance domain follows it when it announces a new endpoint or key.

Stopping (SIGTERM) disconnects every ring after answering what is in flight
and leaves the xenstore states alone: guests stall, they do not see an error,
and the next daemon reconnects them, as after a crash.  A restarted daemon
finds Connected backends, re-reads the frontends' ring keys and attaches to
the rings where the guests' responses end, so requests made while no daemon
ran are served.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable

from xentap import protect as P
from xentap import shim
from xentap import xs_keys as K
from xentap.xenbus import (BackendDevice, BackendNode, ServeOptions, TransportFactory, Xs,
                           XenstoreError, ascii_value)

log = logging.getLogger("xentap.daemon")

SLOW_TURN = 2.0                 # seconds: a turn of the main loop this long is logged
FULL_STATUS_EVERY = 300.0       # seconds: every status key is written again (see publish_status)
_TOKEN_BACKEND = b"xentap-backend"
_TOKEN_RELEASE = b"xentap-release"
_TOKEN_FRONTEND = b"xentap-fe:"


class DrainJob:
    """The end of one protected shim session, off the daemon's main loop.

    The shim is disconnected (no more writes); in a thread of its own the
    drainer drains to the appliance for up to ``timeout`` and keeps the rest
    in its spill log (:meth:`xentap.protect.Mirror.stop`), then the image is
    closed.  A slow or absent appliance thus delays only this VBD: until the
    job is done it holds the image (and its lock), and a new session on the
    image waits for it (:meth:`ProtectedDevice._open`).
    """

    def __init__(self, name: str, mirror: P.Mirror, vbd: shim.Vbd, target: str | None,
                 timeout: float, after: threading.Thread | None = None):
        """``after``: the thread still starting the drainer, waited for first."""
        self.name = name
        self.mirror = mirror
        self.target = target
        self.drainer = mirror.drainer
        self.figures: dict[str, Any] | None = None
        self.overflows = self.gaps = 0
        self._after = after
        self._vbd: shim.Vbd | None = vbd
        self._lock = threading.Lock()        # the image is closed under it
        #: live()'s last answer: while the image closes, the stream's final figures
        self._last_live: tuple[dict[str, Any] | None, dict[str, int] | None] = (None, None)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True,
                                        name=f"drain-{mirror.vbd_uuid}")
        self._thread.start()

    def _run(self, timeout: float) -> None:
        try:
            if self._after is not None:
                self._after.join()
                self.drainer = self.mirror.drainer      # None if it failed to start
            if self.drainer is not None:
                restart_gaps = self.drainer.restart_gaps
                self.figures = self.mirror.stop(timeout)
                self.gaps += restart_gaps
        except Exception as e:  # noqa: BLE001 - one VBD's failure, said, must not stop others
            log.error("%s: stopping the mirror: %s", self.name, e)
        finally:
            with self._lock:                 # what status shows while the image closes
                self._last_live = self.figures, self._vbd.mirror_stats() or {}
            with self._lock:
                vbd, self._vbd = self._vbd, None
                st = vbd.mirror_stats() or {}
                self.overflows = st.get("overflows", 0)
                self.gaps += st.get("gaps", 0)
                vbd.close()
            self.done.set()

    def live(self) -> tuple[dict[str, Any] | None, dict[str, int] | None]:
        """The drainer's figures and the shim's mirror stats while it drains
        (then its last figures, and None).  While the job closes the image
        (seconds in a busy dom0) the last ones taken: a status round does
        not wait for it."""
        if not self._lock.acquire(blocking=False):
            return self._last_live
        try:
            if self._vbd is None:
                return self.figures, None
            d = self.drainer
            self._last_live = (d.stats() if d is not None else None), self._vbd.mirror_stats()
            return self._last_live
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class DrainJobs:
    """The daemon's running DrainJobs."""

    def __init__(self) -> None:
        self.jobs: list[DrainJob] = []

    def start(self, name: str, mirror: P.Mirror, vbd: shim.Vbd, target: str | None,
              timeout: float, after: threading.Thread | None = None) -> DrainJob:
        job = DrainJob(name, mirror, vbd, target, timeout, after)
        self.jobs.append(job)
        return job

    def holding(self, target: str | None) -> bool:
        """Whether a job still holds image ``target``."""
        return any(j.target == target and not j.done.is_set() for j in self.jobs)

    def finished(self) -> list[DrainJob]:
        """Takes the jobs that are done off the list."""
        done = [j for j in self.jobs if j.done.is_set()]
        self.jobs = [j for j in self.jobs if not j.done.is_set()]
        return done

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for j in self.jobs:
            if not j.wait(max(0.0, deadline - time.monotonic())):
                log.warning("%s: the mirror did not stop in time", j.name)


class ProtectedDevice(BackendDevice):
    """A VBD whose backend node may name an appliance: mirrored while open.

    Without ``protect`` it is a plain BackendDevice (and publishes no
    ``mirror-*`` keys).  When a session ends its mirror is handed to a
    :class:`DrainJob`; the next session waits for that job.  A VBD that
    names an appliance domain follows it when it announces another endpoint
    or key (:meth:`mirror_follow`)."""

    def __init__(self, xs: Xs, domid: int, devid: int, transports: TransportFactory, *,
                 serve: ServeOptions, mirror_opts: dict[str, Any], drains: DrainJobs):
        super().__init__(xs, domid, devid, transports, serve=serve)
        self.mirror_opts = mirror_opts
        self.drains = drains
        self.mirror: P.Mirror | None = None
        self.protect: str | None = None
        self.mirror_error = ""
        #: The job draining this VBD's last session, until the daemon reaps it.
        self.drain: DrainJob | None = None
        self._drain_wait = False
        self._drain_timeout: float | None = None     # for the next hand-over; None: the option
        self._mirror_base = {k: 0 for k in K.ST_MIRROR_CUMULATIVE}
        self._last_figures: dict[str, Any] | None = None
        self._last_lag = 0.0
        self._age = P.UnackedAge()
        self._retry_at = 0.0
        self._starter: threading.Thread | None = None     # a drainer starting
        self._start_error: BaseException | None = None

    @property
    def wants_retry(self) -> bool:
        return super().wants_retry or self._drain_wait

    # -- the shim session --

    def _open(self, be: BackendNode) -> bool:
        if self.drain is not None or self.drains.holding(be.params):
            if not self._drain_wait:
                log.info("%s: waiting for the mirror of the previous session on %s to stop",
                         self.name, be.params)
            self._drain_wait = True
            return False
        self._drain_wait = False
        if not super()._open(be):
            return False
        protect = self.xs.read(f"{self.be}/{K.BE_PROTECT}")
        self.protect = protect
        if protect is None:
            self.mirror = None
            return True
        try:
            P.check_protect(protect)
            vbd_uuid = self._vbd_uuid()
        except (ValueError, XenstoreError) as e:
            self._fail(be, errno.EINVAL, f"protect: {e}")
            return False
        if self.mirror is None or self.mirror.vbd_uuid != vbd_uuid:
            self.mirror = P.Mirror(vbd_uuid=vbd_uuid, domid=self.domid, devid=self.devid,
                                   target=None, keys_dir=self.mirror_opts["keys_dir"],
                                   state_dir=self.mirror_opts["state_dir"],
                                   ring_bytes=self.mirror_opts["ring_bytes"],
                                   spill_limit=self.mirror_opts["spill_limit"])
        try:
            self.mirror.enable(self.vbd, self.target)   # before the shim connects
        except OSError as e:
            self._fail(be, e.errno or errno.EIO, f"mirror ring: {e.strerror or e}")
            return False
        self._start_mirror()
        return True

    def _vbd_uuid(self) -> uuid.UUID:
        """The VBD's stream uuid from its backend node; made (and written)
        when the toolstack did not write one."""
        raw = self.xs.read(f"{self.be}/{K.BE_VBD_UUID}")
        if raw is not None:
            try:
                return uuid.UUID(raw)
            except ValueError:
                raise ValueError(f"{K.BE_VBD_UUID} {raw[:40]!r} is not a UUID") from None
        u = uuid.uuid4()
        self.xs.write(f"{self.be}/{K.BE_VBD_UUID}", str(u))
        return u

    def _start_mirror(self) -> None:
        """Starts the drainer in a thread (it reads its spill log, which may
        be large after an outage: the daemon's main loop does not wait for
        it, and the shim connects meanwhile); on failure (appliance not
        announced yet, dom0 keys missing) says why in ``mirror-error`` and
        retries later.  The ring keeps the writes meanwhile (and overflows
        into the dirty bitmap, resynced once the drainer runs)."""
        m = self.mirror
        if m is None or m.drainer is not None or self.vbd is None or self._starter is not None:
            return
        self._retry_at = time.monotonic() + 2.0
        try:
            m.target = P.resolve(self.xs, self.protect, self.xs.read(f"{self.be}/{K.BE_PROTECT_KEY}"),
                                 self.mirror_opts["keys_dir"])
        except (OSError, ValueError) as e:
            self._mirror_failed(e)
            return
        vbd, image = self.vbd, self.target

        def body() -> None:
            try:
                m.start(vbd, image)
            except (OSError, ValueError) as e:
                self._start_error = e

        self._start_error = None
        self._starter = threading.Thread(target=body, daemon=True,
                                         name=f"mirror-start-{m.vbd_uuid}")
        self._starter.start()

    def _mirror_failed(self, e: BaseException) -> None:
        msg = getattr(e, "strerror", None) or str(e)
        if msg != self.mirror_error:
            log.warning("%s: mirror not started: %s", self.name, msg)
        self.mirror_error = msg

    def _reap_starter(self) -> None:
        """Takes the outcome of a drainer's start once its thread is done."""
        t = self._starter
        if t is None or t.is_alive():
            return
        self._starter = None
        if self._start_error is not None:
            self._mirror_failed(self._start_error)
        else:
            self.mirror_error = ""

    def mirror_retry(self) -> None:
        """Called every status round: starts a drainer that could not start."""
        self._reap_starter()
        if (self.mirror is not None and self.mirror.drainer is None and self.vbd is not None
                and self._starter is None and time.monotonic() >= self._retry_at):
            self._start_mirror()

    def mirror_follow(self, resolved: dict[str, P.Target | None]) -> bool:
        """Called every status round: when the appliance domain this VBD
        names now announces another endpoint or key (it restarted with a new
        address), ends the shim session, what the appliance did not
        acknowledge going to the spill log at once, and returns True: the
        daemon steps the VBD, which reconnects to the guest's rings as a
        restarted daemon does, and its new drainer sends the spill log and
        the stream to the new endpoint.  The guest waits meanwhile; it sees
        no error.  While the appliance announces nothing usable the drainer
        goes on (spilling).  ``resolved`` memoizes the appliances' targets
        over one status round."""
        m = self.mirror
        if (m is None or m.drainer is None or not self.connected or self.protect is None
                or P.is_endpoint(self.protect)):
            return False
        if self.protect not in resolved:
            try:
                resolved[self.protect] = P.resolve(self.xs, self.protect, None,
                                                   self.mirror_opts["keys_dir"])
            except (OSError, ValueError):
                resolved[self.protect] = None
        now = resolved[self.protect]
        if now is None or now == m.target:
            return False
        log.info("%s: appliance %s moved from %s to %s%s: following it", self.name,
                 self.protect, m.target.endpoint if m.target else "?", now.endpoint,
                 " (new key)" if m.target and now.public_key != m.target.public_key else "")
        self._drain_timeout = 0.0               # the old endpoint is gone: spill, do not wait
        self.release()
        return True

    def _close_image(self, vbd: shim.Vbd) -> None:
        m = self.mirror
        starter, self._starter = self._starter, None
        if m is not None and (m.drainer is not None or starter is not None):
            timeout = (self.mirror_opts["drain_timeout"] if self._drain_timeout is None
                       else self._drain_timeout)
            self._drain_timeout = None
            self.drain = self.drains.start(self.name, m, vbd, self.target, timeout,
                                           after=starter)
            return
        if m is not None:                       # mirrored, but no drainer ever started
            st = vbd.mirror_stats() or {}
            self._mirror_base[K.ST_MIRROR_OVERFLOWS] += st.get("overflows", 0)
            self._mirror_base[K.ST_MIRROR_GAPS] += st.get("gaps", 0)
        vbd.close()

    def drain_done(self, job: DrainJob) -> None:
        """The daemon reaped ``job``: its final figures become this VBD's."""
        if self.drain is not job:
            return
        self.drain = None
        self._last_figures = job.figures
        self._mirror_base[K.ST_MIRROR_OVERFLOWS] += job.overflows
        self._mirror_base[K.ST_MIRROR_GAPS] += job.gaps

    def resume_counters(self, published: dict[str, str | None]) -> None:
        super().resume_counters(published)
        self._mirror_base = {k: int(v) if (v := published.get(k)) and v.isdigit() and len(v) < 20
                             else 0 for k in K.ST_MIRROR_CUMULATIVE}

    # -- status --

    def status(self) -> dict[str, Any]:
        st = super().status()
        job = self.drain
        if self.protect is None and self.mirror is None and job is None:
            for k in K.ST_MIRROR_KEYS:
                st[k] = ""
            return st
        m = job.mirror if job is not None else self.mirror
        d = m.drainer if (m is not None and job is None and self.vbd is not None) else None
        if job is not None:
            fig, live = job.live()
            drainer = job.drainer
        else:
            fig = d.stats() if d is not None else self._last_figures
            live = self.vbd.mirror_stats() if self.vbd is not None else None
            drainer = d
        err = self.mirror_error
        if d is not None and d.error is not None:
            err = f"drainer failed: {d.error}"
        if err:
            state = "error"
        elif job is not None:
            state = "draining" if live is not None else "stopped"
        elif d is not None:
            state = fig["state"]
        elif self._starter is not None or fig is None:
            state = "starting"
        else:
            state = "stopped"
        st[K.ST_MIRROR] = state
        st[K.ST_MIRROR_ERROR] = err
        st[K.ST_MIRROR_APPLIANCE] = m.target.endpoint if m and m.target else ""
        st[K.ST_MIRROR_UUID] = str(m.vbd_uuid) if m else ""
        for k in (K.ST_MIRROR_ACKED_SEQ, K.ST_MIRROR_NEXT_SEQ, K.ST_MIRROR_PENDING,
                  K.ST_MIRROR_LAG_MS, K.ST_MIRROR_ACK_P99_MS, K.ST_MIRROR_SPILL_BYTES,
                  K.ST_MIRROR_RING_BYTES, K.ST_MIRROR_SYNC, K.ST_MIRROR_SYNC_DONE,
                  K.ST_MIRROR_SYNC_TOTAL):
            st[k] = ""                          # none yet: no stale figures either
        if fig is not None:
            st[K.ST_MIRROR_ACKED_SEQ] = fig["acked_seq"]
            st[K.ST_MIRROR_NEXT_SEQ] = fig["next_seq"]
            st[K.ST_MIRROR_PENDING] = max(0, fig["next_seq"] - 1 - fig["acked_seq"])
            if drainer is not None and (live is not None or d is not None):
                self._last_lag = self._age.ms(drainer, fig["acked_seq"], fig["next_seq"])
            elif st[K.ST_MIRROR_PENDING] == 0:
                self._last_lag = 0.0
            st[K.ST_MIRROR_LAG_MS] = f"{self._last_lag:.1f}"   # when stopped: as it stopped
            st[K.ST_MIRROR_ACK_P99_MS] = f"{fig['lag_ms']['p99']:.1f}"
            st[K.ST_MIRROR_SPILL_BYTES] = fig["spill_bytes"]
            st[K.ST_MIRROR_RING_BYTES] = fig["ring_used_bytes"] if live is not None else 0
            sync = fig.get("sync") or {"kind": "", "done": 0, "total": 0}
            st[K.ST_MIRROR_SYNC] = sync["kind"]
            st[K.ST_MIRROR_SYNC_DONE] = sync["done"] if sync["kind"] else ""
            st[K.ST_MIRROR_SYNC_TOTAL] = sync["total"] if sync["kind"] else ""
        if job is not None and live is None:    # done, not reaped yet: its final counts
            now = {K.ST_MIRROR_OVERFLOWS: job.overflows, K.ST_MIRROR_GAPS: job.gaps}
        else:
            restart_gaps = drainer.restart_gaps if drainer is not None else 0
            now = {K.ST_MIRROR_OVERFLOWS: live["overflows"] if live else 0,
                   K.ST_MIRROR_GAPS: (live["gaps"] if live else 0) + restart_gaps}
        for k in K.ST_MIRROR_CUMULATIVE:
            st[k] = self._mirror_base[k] + now[k]
        return st


class StatusWriter:
    """Writes the status transactions in a thread of its own, over a xenstore
    connection of its own.

    A status round writes tens of keys, one xenstored round trip each; in a
    busy dom0 (emulated Xen: 30-40 s a round, with a drainer catching up
    beside it) a round written by the main loop held up every VBD's
    handshake behind it.  The main loop computes what changed and hands it
    here; while a round is being written it starts no other one.  (Resting
    between slow rounds, to leave xenstored to the handshakes, left the
    status minutes old in emulated Xen: the Xen suite's cases wait for a
    sample newer than what they did.)
    """

    def __init__(self, xs: Xs) -> None:
        self.xs = xs
        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Event()          # clear: a round handed over, not yet written
        self._idle.set()
        self._result: tuple[bool, float, int] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="status")
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0, ok, n = time.monotonic(), False, 0
            try:
                n = job(self.xs)
                ok = True
            except XenstoreError as e:
                log.warning("publishing status: %s", e.strerror)
            except Exception as e:  # noqa: BLE001 - status must never end the daemon
                log.error("publishing status: %s", e)
            self._result = (ok, time.monotonic() - t0, n)
            self._idle.set()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: Callable[[Xs], int]) -> None:
        """Queues ``job(xs)`` (returns how many keys it wrote); call only when not busy."""
        self._idle.clear()
        self._result = None
        self._jobs.put(job)

    def result(self) -> tuple[bool, float, int] | None:
        """(written, seconds, keys) of the last round, once it is done."""
        return self._result if self._idle.is_set() else None

    def wait(self, timeout: float) -> bool:
        """Waits until the round handed over is written; False after ``timeout``."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5.0)
        self.xs.close()


class Daemon:
    """The control plane's main loop.

    ``transports`` opens a transport to a domain (see xenbus.sim_transports /
    xen_transports); ``transport_name`` is what status shows.  :meth:`run`
    blocks until :meth:`stop` (thread- and signal-safe) is called.
    """

    def __init__(self, transports: TransportFactory, *, transport_name: str = "xen",
                 xenstore_socket: str | None = None, status_interval: float = 1.0,
                 serve: ServeOptions = ServeOptions(), keys_dir: str = P.DEFAULT_KEYS_DIR,
                 state_dir: str = P.DEFAULT_STATE_DIR,
                 mirror_ring: int = shim.DEFAULT_MIRROR_RING,
                 spill_limit: int = P.DEFAULT_SPILL_LIMIT,
                 drain_timeout: float = P.DRAIN_TIMEOUT):
        """``keys_dir`` holds dom0's Curve key pair (dom0.key_secret) and the
        default appliance public key; protected VBDs spill under
        ``<state_dir>/spill/<vbd-uuid>``."""
        self.transports = transports
        self.transport_name = transport_name
        self.xenstore_socket = xenstore_socket
        self.status_interval = status_interval
        self.serve = serve
        self.mirror_opts = dict(keys_dir=keys_dir, state_dir=state_dir, ring_bytes=mirror_ring,
                                spill_limit=spill_limit, drain_timeout=drain_timeout)
        self.devices: dict[tuple[int, int], ProtectedDevice] = {}
        self.drains = DrainJobs()
        self._stop = threading.Event()
        self._xs: Xs | None = None
        self._monitor = None
        self._watched: set[tuple[int, int]] = set()
        #: status path -> key -> the value last written there (publish_status)
        self._published: dict[str, dict[str, str]] = {}
        self._full_status_at = 0.0
        self._writer: StatusWriter | None = None
        self._slowest: tuple[float, str] = (0.0, "")     # of this turn (_part_took)
        #: the round the writer has: (changes, full), for _status_written
        self._in_writing: tuple[dict[ProtectedDevice, dict[str, str]], bool] | None = None

    def stop(self) -> None:
        """Asks run() to return (from a signal handler or another thread)."""
        self._stop.set()

    # -- main loop --

    def run(self, ready: threading.Event | None = None) -> None:
        """Serves until stop(); raises XenstoreError if xenstored is unreachable."""
        with Xs.open(self.xenstore_socket) as xs:
            self._xs = xs
            self._monitor = xs.client.monitor()
            try:
                xs.watch(self._monitor, K.BACKEND_ROOT, _TOKEN_BACKEND)
                xs.watch(self._monitor, K.RELEASE_DOMAIN, _TOKEN_RELEASE)
                self._ensure_root(xs)
                self.rescan()
                self._prune_status()
                self._prune_appliances()
                self._prune_spill()
                self._publish_daemon(xs, "running")
                self._writer = StatusWriter(Xs.open(self.xenstore_socket))
                log.info("xentap daemon running (pid %d, %s transport)", os.getpid(),
                         self.transport_name)
                if ready is not None:
                    ready.set()
                self._loop()
            except XenstoreError:
                if not xs.connected:
                    raise XenstoreError(errno.ECONNRESET,
                                        "lost the connection to xenstored") from None
                raise
            finally:
                self._shutdown(xs)
                self._xs = None

    def _loop(self) -> None:
        next_status = time.monotonic()
        while not self._stop.is_set():
            if not self._xs.connected:
                raise XenstoreError(errno.ECONNRESET, "lost the connection to xenstored")
            self._reap_drains()
            timeout = max(0.0, min(0.2, next_status - time.monotonic()))
            try:
                event = self._monitor.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if event is not None:
                pending = {self._classify(event)}
                while True:                          # coalesce a burst of events
                    try:
                        pending.add(self._classify(self._monitor.events.get_nowait()))
                    except queue.Empty:
                        break
                t0 = time.monotonic()
                self._handle(pending)
                self._note_slow("handling xenstore events", t0)
            retry = [d for d in self.devices.values() if d.wants_retry]
            for dev in retry:
                self._step(dev)
            if time.monotonic() >= next_status:
                t0 = time.monotonic()
                if self._status_round():
                    self._note_slow("a status round", t0)
                    next_status = time.monotonic() + self.status_interval
                else:                                # the last one is still being written
                    next_status = time.monotonic() + 0.1

    def _part_took(self, what: str, t0: float) -> None:
        """Keeps the slowest part of this turn of the loop, for _note_slow."""
        took = time.monotonic() - t0
        if took > self._slowest[0]:
            self._slowest = (took, what)

    def _note_slow(self, what: str, t0: float) -> None:
        """A log line when one turn of the loop held up every VBD's handshake
        and detach (and the status) for long: where a slow daemon's time went."""
        took = time.monotonic() - t0
        part, self._slowest = self._slowest, (0.0, "")
        if took > SLOW_TURN:
            log.warning("%s took %.1f s%s", what, took,
                        f" ({part[1]}: {part[0]:.1f} s)" if part[1] else "")

    def _classify(self, event) -> tuple:
        path = event.path.decode("latin-1")
        token = event.token
        if token == _TOKEN_RELEASE:
            return ("release",)
        if token.startswith(_TOKEN_FRONTEND):
            domid, devid = token[len(_TOKEN_FRONTEND):].decode().split(":")
            return ("device", int(domid), int(devid))
        parts = K.parse_backend_path(path)
        if parts is None or parts[1] is None:   # the root or a domain's dir changed
            return ("rescan",)
        return ("device", parts[0], parts[1])

    def _handle(self, pending: set[tuple]) -> None:
        if ("release",) in pending:
            self._prune_appliances()
        if ("rescan",) in pending or ("release",) in pending:
            self.rescan()
            return
        for item in sorted(pending):
            key = (item[1], item[2])
            t0 = time.monotonic()
            dev = self.devices.get(key)
            if dev is None:
                dev = self._add(*key)
            if dev is not None:
                self._step(dev)
                self._part_took(f"{dev.name}'s step", t0)

    # -- devices --

    def rescan(self) -> None:
        """Steps every VBD, known or new; drops those whose node is gone."""
        xs = self._xs
        found: set[tuple[int, int]] = set()
        for d in xs.ls(K.BACKEND_ROOT) or []:
            if not d.isdigit():
                continue
            for v in xs.ls(f"{K.BACKEND_ROOT}/{d}") or []:
                if v.isdigit():
                    found.add((int(d), int(v)))
        for key in sorted(found | set(self.devices)):
            dev = self.devices.get(key) or self._add(*key)
            if dev is not None:
                self._step(dev)

    def _prune_status(self) -> None:
        """Drops status nodes of VBDs that went away while no daemon ran."""
        xs = self._xs
        for d in xs.ls(K.STATUS_ROOT) or []:
            for v in xs.ls(f"{K.STATUS_ROOT}/{d}") or []:
                if not (d.isdigit() and v.isdigit() and (int(d), int(v)) in self.devices):
                    xs.rm(f"{K.STATUS_ROOT}/{d}/{v}")
            if xs.ls(f"{K.STATUS_ROOT}/{d}") == []:
                xs.rm(f"{K.STATUS_ROOT}/{d}")

    def _add(self, domid: int, devid: int) -> ProtectedDevice | None:
        if not self._xs.exists(K.backend_path(domid, devid)):
            return None
        dev = ProtectedDevice(self._xs, domid, devid, self.transports, serve=self.serve,
                              mirror_opts=self.mirror_opts, drains=self.drains)
        st = K.status_path(domid, devid)
        if self._xs.exists(st):                 # a previous daemon's counters: go on from them
            dev.resume_counters({k: self._xs.read(f"{st}/{k}")
                                 for k in K.ST_CUMULATIVE + K.ST_MIRROR_CUMULATIVE})
        self.devices[(domid, devid)] = dev
        token = _TOKEN_FRONTEND + f"{domid}:{devid}".encode()
        self._xs.watch(self._monitor, f"{dev.fe}/{K.STATE}", token)
        self._watched.add((domid, devid))
        return dev

    def _step(self, dev: ProtectedDevice) -> None:
        try:
            alive = dev.step()
        except XenstoreError as e:   # e.g. the node vanished between two reads
            log.warning("%s: %s", dev.name, e.strerror)
            alive = dev.xs.exists(dev.be)
        if not alive:
            self._drop(dev)

    def _drop(self, dev: ProtectedDevice) -> None:
        dev.release()
        key = (dev.domid, dev.devid)
        self.devices.pop(key, None)
        if key in self._watched:
            token = _TOKEN_FRONTEND + f"{dev.domid}:{dev.devid}".encode()
            try:
                self._xs.unwatch(self._monitor, f"{dev.fe}/{K.STATE}", token)
            except XenstoreError as e:
                log.debug("%s: unwatch: %s", dev.name, e.strerror)
            self._watched.discard(key)
        self._xs.rm(K.status_path(*key))
        self._published.pop(K.status_path(*key), None)
        parent = f"{K.STATUS_ROOT}/{dev.domid}"
        if self._xs.ls(parent) == []:
            self._xs.rm(parent)
        log.info("%s: detached", dev.name)
        m = dev.mirror
        if m is not None and dev.drain is None:
            self._forget_stream(m.vbd_uuid, dev.name)   # else once its DrainJob is done

    # -- the mirrors of sessions that ended --

    def _reap_drains(self) -> None:
        """Gives each finished DrainJob's figures to its VBD; the stream of
        a VBD that was detached meanwhile is forgotten."""
        for job in self.drains.finished():
            owners = [d for d in self.devices.values() if d.drain is job]
            for dev in owners:
                dev.drain_done(job)
            if not owners:
                self._forget_stream(job.mirror.vbd_uuid, job.name)

    def _streams_in_use(self) -> set[str]:
        """The vbd-uuids that backend nodes name, and those of running mirrors."""
        xs = self._xs
        used = {str(j.mirror.vbd_uuid) for j in self.drains.jobs}
        used |= {str(d.mirror.vbd_uuid) for d in self.devices.values() if d.mirror is not None}
        for d in xs.ls(K.BACKEND_ROOT) or []:
            for v in xs.ls(f"{K.BACKEND_ROOT}/{d}") or []:
                u = xs.read(f"{K.BACKEND_ROOT}/{d}/{v}/{K.BE_VBD_UUID}")
                if u is not None:
                    used.add(u)
        return used

    def _forget_stream(self, vbd_uuid: uuid.UUID, name: str) -> None:
        """A detached VBD's stream never goes on (the next attach makes a
        new vbd-uuid): its spill dir goes once every write is acknowledged."""
        try:
            if str(vbd_uuid) in self._streams_in_use():
                return
        except XenstoreError as e:
            log.warning("%s: %s", name, e.strerror)
            return
        P.remove_spill_dir(P.spill_dir(self.mirror_opts["state_dir"], vbd_uuid),
                           f"{name} detached")

    def _prune_spill(self) -> None:
        """At start: spill dirs of VBDs detached while no daemon ran."""
        root = P.spill_root(self.mirror_opts["state_dir"])
        try:
            names = os.listdir(root)
        except OSError:
            return
        used = self._streams_in_use()
        for name in names:
            try:
                u = uuid.UUID(name)
            except ValueError:
                continue
            if str(u) == name and name not in used:
                P.remove_spill_dir(os.path.join(root, name), f"stream {name} (detached)")

    # -- status --

    def _prune_appliances(self) -> None:
        """Drops the nodes of appliance domains that are gone."""
        xs = self._xs
        for d in xs.ls(K.APPLIANCE_ROOT) or []:
            if not d.isdigit() or not xs.introduced(int(d)):
                log.info("appliance domain %s is gone; removing its node", d)
                xs.rm(f"{K.APPLIANCE_ROOT}/{d}")

    def _ensure_root(self, xs: Xs) -> None:
        """xentap's subtree and its fixed directories, dom0's only, whatever
        made them before."""
        for path in (K.XENTAP_ROOT, K.DAEMON_PATH, K.STATUS_ROOT, K.APPLIANCE_ROOT):
            if not xs.exists(path):
                xs.mkdir(path)
            if xs.get_perms(path) != K.XENTAP_PERMS:
                xs.set_perms(path, K.XENTAP_PERMS)

    def _publish_daemon(self, xs: Xs, state: str) -> None:
        self._ensure_root(xs)

        def tx(t: Xs) -> None:
            t.write_many((f"{K.DAEMON_PATH}/{key}", value) for key, value in (
                (K.DAEMON_PID, os.getpid()), (K.DAEMON_STATE, state),
                (K.DAEMON_TRANSPORT, self.transport_name),
                (K.DAEMON_HEARTBEAT, f"{time.time():.0f}")))

        xs.transaction(tx)

    def publish_status(self) -> None:
        """Writes every VBD's status and the daemon's heartbeat, now, over
        the main connection (the last round, at shutdown)."""
        changes, full, now = self._status_changes()
        try:
            self._status_job(changes, full, now)(self._xs)
        except XenstoreError as e:
            log.warning("publishing status: %s", e.strerror)
            self._status_written(changes, full, False)
            return
        self._status_written(changes, full, True)

    def _status_round(self) -> bool:
        """One status round handed to the StatusWriter; False (nothing done)
        while it still writes the previous one."""
        w = self._writer
        if w.busy:
            return False
        if self._in_writing is not None:
            ok, took, keys = w.result() or (False, 0.0, 0)
            self._status_written(*self._in_writing, ok)
            self._in_writing = None
            if took > SLOW_TURN:
                log.warning("writing a status round took %.1f s (%d keys)", took, keys)
        changes, full, now = self._status_changes()
        self._in_writing = (changes, full)
        w.submit(self._status_job(changes, full, now))
        return True

    def _status_changes(self) -> tuple[dict[ProtectedDevice, dict[str, str]], bool, str]:
        """Each VBD's status keys whose value changed since they were last
        written (all of them every FULL_STATUS_EVERY), whether this round
        writes all, and its time; first the mirrors' retries and follows."""
        resolved: dict[str, P.Target | None] = {}
        for d in list(self.devices.values()):
            t0 = time.monotonic()
            d.mirror_retry()
            if d.mirror_follow(resolved):
                self._step(d)
            self._part_took(f"{d.name}'s mirror retry and follow", t0)
        full = time.monotonic() >= self._full_status_at
        changes: dict[ProtectedDevice, dict[str, str]] = {}
        for d in self.devices.values():
            t0 = time.monotonic()
            last = {} if full else self._published.get(K.status_path(d.domid, d.devid), {})
            # as xenstore takes them: one odd character (an error's text) must not
            # fail every status round after it
            changes[d] = {k: v for k, v in ((k, ascii_value(str(v))) for k, v in d.status().items())
                          if last.get(k) != v}
            self._part_took(f"{d.name}'s status", t0)
        return changes, full, f"{time.time():.0f}"

    def _status_job(self, changes: dict[ProtectedDevice, dict[str, str]], full: bool,
                    now: str) -> Callable[[Xs], int]:
        """The xenstore work of one status round, for whichever connection
        runs it; returns how many keys it wrote.  A VBD dropped meanwhile is
        skipped, and so is one whose backend node is gone though the main
        loop has not seen it yet: ``xentap detach`` removes the backend and
        the status in one transaction, and a round written just after it
        must not bring the status back (the transaction reads the backend
        nodes, so one that races the removal conflicts and runs again)."""
        def job(xs: Xs) -> int:
            if full:
                self._ensure_root(xs)
            written = 0

            def tx(t: Xs) -> None:
                nonlocal written
                items: list[tuple[str, str | None]] = [(f"{K.DAEMON_PATH}/{K.DAEMON_HEARTBEAT}", now)]
                live = [d for d in changes if self.devices.get((d.domid, d.devid)) is d]
                backends = t.read_many(K.backend_path(d.domid, d.devid) for d in live)
                for d, backend in zip(live, backends):
                    if backend is None:
                        continue
                    diff = changes[d]
                    path = K.status_path(d.domid, d.devid)
                    items += [(f"{path}/{key}", value or None) for key, value in diff.items()]
                    items.append((f"{path}/{K.ST_UPDATED}", now))
                written = t.write_many(items)       # one round trip, not one a key

            xs.transaction(tx)
            return written
        return job

    def _status_written(self, changes: dict[ProtectedDevice, dict[str, str]], full: bool,
                        ok: bool) -> None:
        """Remembers what a status round wrote (all of it next time if it failed)."""
        if not ok:
            self._full_status_at = 0.0          # what was written is not known: all next time
            return
        if full:
            self._published = {}
            self._full_status_at = time.monotonic() + FULL_STATUS_EVERY
        live = set()
        for d, diff in changes.items():
            if self.devices.get((d.domid, d.devid)) is d:
                path = K.status_path(d.domid, d.devid)
                self._published.setdefault(path, {}).update(diff)
                live.add(path)
        for path in self._published.keys() - live:
            del self._published[path]           # a VBD gone

    def _shutdown(self, xs: Xs) -> None:
        connected = xs.connected
        w, self._writer = self._writer, None
        if w is not None:
            if w.wait(10.0):
                if self._in_writing is not None:
                    self._status_written(*self._in_writing, (w.result() or (False,))[0])
            else:
                log.warning("a status round is still being written; stopping anyway")
            self._in_writing = None
            w.close()
        if connected:
            self.publish_status()                   # the last counters
        for dev in list(self.devices.values()):
            dev.release()                           # the mirrors stop in parallel
        self.drains.wait_all(self.mirror_opts["drain_timeout"] + 30.0)
        if connected:
            try:
                self._monitor.close()
            except Exception:   # noqa: BLE001 - best effort on the way out
                pass
            try:
                self._publish_daemon(xs, "stopped")
            except XenstoreError as e:
                log.warning("publishing daemon state: %s", e.strerror)
        log.info("xentap daemon stopped")
