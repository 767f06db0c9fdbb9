"""`xentap daemon`: serves every xentap VBD that xenstore names.

One thread, one xenstore connection.  Watches on the backend root and
``@releaseDomain`` (and on each VBD's frontend ``state``) wake a
:class:`~xentap.xenbus.BackendDevice` whose :meth:`step` does the handshake;
every second the daemon publishes each VBD's counters under
``/local/domain/0/xentap/vbd/<domid>/<devid>`` (see xs_keys).

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
from typing import Any

from xentap import xs_keys as K
from xentap.xenbus import BackendDevice, TransportFactory, Xs, XenstoreError

log = logging.getLogger("xentap.daemon")

_TOKEN_BACKEND = b"xentap-backend"
_TOKEN_RELEASE = b"xentap-release"
_TOKEN_FRONTEND = b"xentap-fe:"


class Daemon:
    """The control plane's main loop.

    ``transports`` opens a transport to a domain (see xenbus.sim_transports /
    xen_transports); ``transport_name`` is what status shows.  :meth:`run`
    blocks until :meth:`stop` (thread- and signal-safe) is called.
    """

    def __init__(self, transports: TransportFactory, *, transport_name: str = "xen",
                 xenstore_socket: str | None = None, status_interval: float = 1.0,
                 engine: str = "auto"):
        self.transports = transports
        self.transport_name = transport_name
        self.xenstore_socket = xenstore_socket
        self.status_interval = status_interval
        self.engine = engine
        self.devices: dict[tuple[int, int], BackendDevice] = {}
        self._stop = threading.Event()
        self._xs: Xs | None = None
        self._monitor = None
        self._watched: set[tuple[int, int]] = set()

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
                self._publish_daemon(xs, "running")
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
                self._handle(pending)
            retry = [d for d in self.devices.values() if d.wants_retry]
            for dev in retry:
                self._step(dev)
            if time.monotonic() >= next_status:
                self.publish_status()
                next_status = time.monotonic() + self.status_interval

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
        if ("rescan",) in pending or ("release",) in pending:
            self.rescan()
            return
        for item in sorted(pending):
            key = (item[1], item[2])
            dev = self.devices.get(key)
            if dev is None:
                dev = self._add(*key)
            if dev is not None:
                self._step(dev)

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

    def _add(self, domid: int, devid: int) -> BackendDevice | None:
        if not self._xs.exists(K.backend_path(domid, devid)):
            return None
        dev = BackendDevice(self._xs, domid, devid, self.transports, engine=self.engine)
        self.devices[(domid, devid)] = dev
        token = _TOKEN_FRONTEND + f"{domid}:{devid}".encode()
        self._xs.watch(self._monitor, f"{dev.fe}/{K.STATE}", token)
        self._watched.add((domid, devid))
        return dev

    def _step(self, dev: BackendDevice) -> None:
        try:
            alive = dev.step()
        except XenstoreError as e:   # e.g. the node vanished between two reads
            log.warning("%s: %s", dev.name, e.strerror)
            alive = dev.xs.exists(dev.be)
        if not alive:
            self._drop(dev)

    def _drop(self, dev: BackendDevice) -> None:
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
        parent = f"{K.STATUS_ROOT}/{dev.domid}"
        if self._xs.ls(parent) == []:
            self._xs.rm(parent)
        log.info("%s: detached", dev.name)

    # -- status --

    def _ensure_root(self, xs: Xs) -> None:
        if not xs.exists(K.XENTAP_ROOT):
            xs.mkdir(K.XENTAP_ROOT)
            xs.set_perms(K.XENTAP_ROOT, K.XENTAP_PERMS)

    def _publish_daemon(self, xs: Xs, state: str) -> None:
        self._ensure_root(xs)

        def tx(t: Xs) -> None:
            t.write(f"{K.DAEMON_PATH}/{K.DAEMON_PID}", os.getpid())
            t.write(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}", state)
            t.write(f"{K.DAEMON_PATH}/{K.DAEMON_TRANSPORT}", self.transport_name)
            t.write(f"{K.DAEMON_PATH}/{K.DAEMON_HEARTBEAT}", f"{time.time():.0f}")

        xs.transaction(tx)

    def publish_status(self) -> None:
        """Writes every VBD's status and the daemon's heartbeat."""
        xs = self._xs
        now = f"{time.time():.0f}"
        samples: list[tuple[str, dict[str, Any]]] = [
            (K.status_path(d.domid, d.devid), d.status()) for d in self.devices.values()]

        def tx(t: Xs) -> None:
            t.write(f"{K.DAEMON_PATH}/{K.DAEMON_HEARTBEAT}", now)
            for path, st in samples:
                for key, value in st.items():
                    if value == "":
                        t.rm(f"{path}/{key}")
                    else:
                        t.write(f"{path}/{key}", value)
                t.write(f"{path}/{K.ST_UPDATED}", now)

        try:
            self._ensure_root(xs)
            xs.transaction(tx)
        except XenstoreError as e:
            log.warning("publishing status: %s", e.strerror)

    def _shutdown(self, xs: Xs) -> None:
        connected = xs.connected
        if connected:
            self.publish_status()                   # the last counters
        for dev in list(self.devices.values()):
            dev.release()
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
