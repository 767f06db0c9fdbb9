"""A test blkfront: the frontend half of the xenbus handshake, done the way
Linux's xen-blkfront does it (talk_to_blkback / blkfront_connect /
blkfront_closing), over the sim transport.

It connects to xenstore as the guest domain (the stand-in's per-domain
socket), so every permission check is the one a real guest meets.  The ring
itself is served by ``shim.SimFront``, which publishes ring pages and event
channels in the domain's sim grant table; this class only does xenstore.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import os
import queue
import threading
import time
from typing import Any

from pyxs import Client
from pyxs.exceptions import PyXSError

from xentap import shim
from xentap import xs_keys as K
from xentap.xs_keys import XenbusState


class HandshakeError(Exception):
    """The backend did not connect; ``error`` is its error node, if any."""

    def __init__(self, message: str, error: str | None = None):
        super().__init__(message + (f" (backend error: {error})" if error else ""))
        self.error = error


class TestBlkfront:
    """One VBD's frontend in guest ``domid``.

    ``max_queues`` / ``max_ring_order`` / ``max_indirect_segments`` are the
    guest's module parameters: what it asks for, capped by what the backend
    advertises.  ``follow_backend`` makes it react to a backend going to
    Closing as blkfront does (stop I/O, write Closed).
    """

    __test__ = False  # not a pytest class

    def __init__(self, xs_socket: str, simdir: str, domid: int, devid: int, *,
                 max_queues: int = 1, max_ring_order: int = 0,
                 max_indirect_segments: int = 32, follow_backend: bool = True):
        self.xs_socket = xs_socket
        self.simdir = simdir
        self.domid = domid
        self.devid = devid
        self.fe = K.frontend_path(domid, devid)
        self.max_queues = max_queues
        self.max_ring_order = max_ring_order
        self.max_indirect_segments = max_indirect_segments
        self.follow_backend = follow_backend
        self.client = Client(unix_socket_path=xs_socket)
        self.client.connect()
        self.be = self.read(f"{self.fe}/{K.FE_BACKEND}")
        if self.be is None:
            raise HandshakeError(f"{self.fe} has no backend key")
        self.front: shim.SimFront | None = None
        self.features: dict[str, int] = {}
        self.sectors = 0
        self.readonly = False
        self.closed_by_backend = threading.Event()
        self._running = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop_watch = threading.Event()

    # -- xenstore, as the guest --

    def read(self, path: str) -> str | None:
        try:
            return self.client.read(path.encode()).decode("latin-1")
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise

    def write(self, path: str, value: Any) -> None:
        self.client.write(path.encode(), str(value).encode())

    def backend_state(self) -> XenbusState:
        return XenbusState.parse(self.read(f"{self.be}/{K.STATE}"))

    def set_state(self, state: XenbusState) -> None:
        self.write(f"{self.fe}/{K.STATE}", int(state))

    def wait_backend(self, *states: XenbusState, timeout: float = 10.0) -> XenbusState:
        """Waits for the backend to reach one of ``states`` (or Closed)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.backend_state()
            if s in states:
                return s
            if s == XenbusState.CLOSED and XenbusState.CLOSED not in states:
                raise HandshakeError(f"backend {self.be} closed",
                                     self.read(f"{self.be}/{K.BE_ERROR}"))
            if time.monotonic() > deadline:
                raise HandshakeError(f"backend {self.be} stayed {s.label}",
                                     self.read(f"{self.be}/{K.BE_ERROR}"))
            time.sleep(0.02)

    # -- the handshake --

    def _feature(self, key: str) -> int:
        raw = self.read(f"{self.be}/{key}")
        return int(raw) if raw is not None and raw.isdigit() else 0

    def connect(self, timeout: float = 10.0) -> None:
        """InitWait -> publish rings -> Initialised -> wait Connected -> Connected."""
        self.wait_backend(XenbusState.INIT_WAIT, XenbusState.CONNECTED, timeout=timeout)
        for key in K.BE_FEATURE_KEYS:
            self.features[key] = self._feature(key)
        self.sectors = self._feature(K.BE_SECTORS)
        self.readonly = bool(self._feature(K.BE_INFO) & K.VDISK_READONLY)
        ring_order = min(self.max_ring_order, self.features[K.BE_MAX_RING_PAGE_ORDER])
        nr_queues = max(1, min(self.max_queues, self.features[K.BE_MULTI_QUEUE_MAX_QUEUES]))
        indirect = min(self.max_indirect_segments,
                       self.features[K.BE_FEATURE_MAX_INDIRECT_SEGMENTS])
        self.front = shim.SimFront(self.simdir, sectors=self.sectors, nr_queues=nr_queues,
                                   ring_order=ring_order, max_indirect_segments=indirect)
        self.publish(self.front.params)
        self.wait_backend(XenbusState.CONNECTED, timeout=timeout)
        self.set_state(XenbusState.CONNECTED)
        if self.follow_backend:
            self._start_watcher()

    def publish(self, p: shim.RingParams, extra: dict[str, Any] | None = None,
                state: XenbusState = XenbusState.INITIALISED) -> None:
        """Writes the ring keys as talk_to_blkback does, in one transaction."""
        keys: dict[str, Any] = {}
        if p.ring_order > 0:
            keys[K.FE_RING_PAGE_ORDER] = p.ring_order
        if p.nr_queues > 1:
            keys[K.FE_MULTI_QUEUE_NUM_QUEUES] = p.nr_queues
        for q in range(p.nr_queues):
            prefix = "" if p.nr_queues == 1 else K.fe_queue_dir(q) + "/"
            if p.ring_order == 0:
                keys[prefix + K.FE_RING_REF] = p.ring_refs[q][0]
            else:
                for i, ref in enumerate(p.ring_refs[q]):
                    keys[prefix + K.fe_ring_ref(i)] = ref
            keys[prefix + K.FE_EVENT_CHANNEL] = p.evtchns[q]
        keys[K.FE_PROTOCOL] = K.PROTOCOL_X86_64
        keys[K.FE_FEATURE_PERSISTENT] = int(p.persistent)
        keys.update(extra or {})
        self.write_keys(keys, state)

    def write_keys(self, keys: dict[str, Any], state: XenbusState | None) -> None:
        """Writes keys (a value of None removes the key) and the state, in
        one transaction, retried on conflict."""
        for _ in range(50):
            self.client.transaction()
            try:
                for key, value in keys.items():
                    path = f"{self.fe}/{key}".encode()
                    if value is None:
                        with contextlib.suppress(PyXSError):
                            self.client.delete(path)
                    else:
                        self.client.write(path, str(value).encode())
                if state is not None:
                    self.client.write(f"{self.fe}/{K.STATE}".encode(), str(int(state)).encode())
            except BaseException:
                self.client.rollback()
                raise
            if self.client.commit():
                return
        raise RuntimeError("transaction kept conflicting")

    # -- I/O --

    def run(self, **workload) -> dict[str, Any]:
        """Runs a workload on the rings (see shim.Workload)."""
        assert self.front is not None, "connect() first"
        with self._running:
            return self.front.run(**workload)

    def run_in_thread(self, **workload) -> tuple[threading.Thread, queue.Queue]:
        """Starts run() in a thread; its result (or exception) lands in the queue."""
        out: queue.Queue = queue.Queue()

        def body() -> None:
            try:
                out.put(self.run(**workload))
            except BaseException as e:  # noqa: BLE001 - handed to the test
                out.put(e)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t, out

    def stop_io(self) -> None:
        if self.front is not None:
            self.front.stop()

    # -- closing --

    def _start_watcher(self) -> None:
        """blkfront_backend_changed: backend Closing -> stop, close, Closed."""
        wclient = copy.copy(self.client)    # same connection, never in a transaction
        mon = wclient.monitor()
        token = f"be-state-{self.domid}-{self.devid}".encode()
        mon.watch(f"{self.be}/{K.STATE}".encode(), token)

        def body() -> None:
            while not self._stop_watch.is_set():
                try:
                    mon.events.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    s = XenbusState.parse(wclient.read(f"{self.be}/{K.STATE}".encode()))
                except Exception:  # noqa: BLE001 - node or connection gone
                    return
                if s in (XenbusState.CLOSING, XenbusState.CLOSED):
                    self.stop_io()
                    with self._running:      # the run has ended: rings are quiet
                        with contextlib.suppress(Exception):
                            wclient.write(f"{self.fe}/{K.STATE}".encode(),
                                          str(int(XenbusState.CLOSED)).encode())
                    self.closed_by_backend.set()
                    return

        self._watcher = threading.Thread(target=body, daemon=True)
        self._watcher.start()

    def close(self, wait: bool = True, timeout: float = 10.0) -> None:
        """The guest lets the disk go: Closing, then Closed; waits for the backend."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        self.stop_io()
        with contextlib.suppress(PyXSError):
            if self.read(f"{self.fe}/{K.STATE}") is not None:
                self.set_state(XenbusState.CLOSING)
                self.set_state(XenbusState.CLOSED)
        if wait and self.read(f"{self.be}/{K.STATE}") is not None:
            self.wait_backend(XenbusState.CLOSED, timeout=timeout)
        self.shutdown()

    def shutdown(self) -> None:
        """Drops the rings and the xenstore connection (no handshake)."""
        self._stop_watch.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2)
        if self.front is not None:
            with self._running:
                self.front.close()
            self.front = None
        self.client.close()


# --- helpers for tests: guest domains as a toolstack makes them ----------------------

def make_domain(dom0: Client, domid: int, name: str | None = None) -> None:
    """What xl create does in xenstore for a domain: introduce it, its home
    (``n0 r<domid>``) with a name, and its ``device`` directory."""
    dom0.introduce_domain(domid, 0x1000 + domid, 1)
    home = K.domain_path(domid).encode()
    dom0.mkdir(home)
    dom0.set_perms(home, [b"n0", f"r{domid}".encode()])
    dom0.write(home + b"/name", (name or f"guest{domid}").encode())
    dom0.write(home + b"/domid", str(domid).encode())
    dom0.mkdir(home + b"/device")
    dom0.set_perms(home + b"/device", [f"n{domid}".encode(), b"r0"])


def release_domain(dom0: Client, domid: int) -> None:
    """xenstored's view of a domain dying: RELEASE fires @releaseDomain."""
    from pyxs._internal import Op
    dom0.ack(Op.RELEASE, str(domid).encode() + b"\0")


def make_image(path: str | os.PathLike, size: int = 16 << 20) -> str:
    """A sparse raw image."""
    with open(path, "wb") as f:
        f.truncate(size)
    return os.fspath(path)
