"""The backend side of the xenbus handshake, for one VBD, as Linux blkfront
expects it.

:class:`Xs` is a small str-typed face of a pyxs client (absent keys read as
None, errors become :class:`XenstoreError`, transactions retry on conflict).
:func:`parse_ring_params` validates what a frontend published;
:class:`BackendDevice` is one VBD's state machine.  It is level-triggered:
:meth:`BackendDevice.step` reads the backend and frontend nodes as they are
now and moves towards what they ask for, so a lost or repeated watch event,
or a daemon restarted while the guest runs, ends up in the right state.

The handshake (``xen/include/public/io/blkif.h``; Linux xen-blkback)::

    toolstack: backend state=1, frontend state=1
    backend:   open image; sectors, info, features...; state=2 (InitWait)
    frontend:  ring-ref*/event-channel/protocol...; state=3 (Initialised)
    backend:   validate, map rings, bind channels; state=4 (Connected)
    frontend:  state=4
    close:     frontend 5/6, backend online=0 or state=5 (detach), node
               removal or domain death -> disconnect, backend 5 -> 6

Every value the frontend wrote is untrusted: it is parsed strictly and
checked against what we advertised before it reaches the shim; a bad value
puts that VBD (only) in Closed with an ``error`` node.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyxs
from pyxs.exceptions import PyXSError

from xentap import shim
from xentap import xs_keys as K
from xentap.xs_keys import XenbusState

log = logging.getLogger("xentap.xenbus")

#: How long an image held by a dying process may stay locked before we give up.
BUSY_RETRY_SECONDS = 10.0


# --- xenstore access -------------------------------------------------------------

class XenstoreError(OSError):
    """A xenstore request failed (errno from xenstored), or it is unreachable."""


#: The bytes a xenstore value may hold here (what pyxs takes, less NUL and DEL).
PRINTABLE = range(0x20, 0x7f)


def ascii_value(value: str) -> str:
    """``value`` as it may be written to xenstore: anything not PRINTABLE is "?"."""
    return "".join(c if ord(c) in PRINTABLE else "?" for c in value)


class _Router(pyxs.Router):
    """pyxs's router, except that requests waiting for a reply when the
    connection dies fail (ECONNRESET) instead of waiting forever."""

    def __call__(self):
        try:
            super().__call__()
        except PyXSError as e:     # the connection died: requests fail, .connected is False
            log.debug("xenstore connection lost: %s", e)
        finally:
            from pyxs._internal import Op, Packet
            for rq_id, rvar in list(self.rvars.items()):
                rvar.set(Packet(Op.ERROR, b"ECONNRESET\0", rq_id=rq_id))
            self.rvars.clear()


class Xs:
    """A pyxs client with str paths and values.

    Reads of absent nodes give None; xenstored's errors become
    :class:`XenstoreError` with their errno.  Empty values are written with
    MKDIR (pyxs cannot write an empty value).
    """

    def __init__(self, client: pyxs.Client):
        self.client = client

    @classmethod
    def open(cls, socket_path: str | None = None) -> "Xs":
        """Connects to xenstored (``socket_path``, else $XENSTORED_PATH or
        the default socket).  Raises XenstoreError when it is unreachable."""
        from pyxs.connection import UnixSocketConnection
        client = pyxs.Client(router=_Router(UnixSocketConnection(socket_path)))
        try:
            client.connect()
        except (PyXSError, OSError) as e:
            from pyxs.connection import _get_unix_socket_path
            where = socket_path or _get_unix_socket_path()
            why = "no such socket" if not os.path.exists(where) else _reason(e)
            raise XenstoreError(errno.ECONNREFUSED,
                                f"cannot reach xenstored at {where}: {why}") from None
        return cls(client)

    def close(self) -> None:
        self.client.close()

    @property
    def connected(self) -> bool:
        """False once the connection to xenstored is gone (for good)."""
        router = self.client.router
        return router.is_connected and router.thread.is_alive()

    def __enter__(self) -> "Xs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, path: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PyXSError as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else errno.EIO
            raise XenstoreError(code, f"xenstore {what} {path}: {_reason(e)}") from None
        except ValueError as e:  # pyxs refuses a path or value before sending it
            raise XenstoreError(errno.EINVAL, f"xenstore {what} {path}: invalid path or value") from e

    def read(self, path: str) -> str | None:
        """The value at ``path`` (latin-1 decoded: any byte survives), or None."""
        try:
            return self.client.read(path.encode()).decode("latin-1")
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise XenstoreError(e.args[0] if e.args and isinstance(e.args[0], int) else errno.EIO,
                                f"xenstore read {path}: {_reason(e)}") from None

    def write(self, path: str, value: str | int) -> None:
        value = str(value)
        if value == "":
            self.mkdir(path)
            return
        self._call("write", path, lambda: self.client.write(path.encode(), value.encode("ascii")))

    def mkdir(self, path: str) -> None:
        self._call("mkdir", path, lambda: self.client.mkdir(path.encode()))

    def write_many(self, items: Iterable[tuple[str, str | int | None]]) -> int:
        """Writes each (path, value): "" makes an empty node, None removes the
        node (absent is fine).  Pipelined (see :meth:`_pipelined`); raises
        XenstoreError for the first request that failed, after every reply is
        in; returns how many requests were sent."""
        from pyxs._internal import NUL, Op
        requests = []
        for path, value in items:
            p = path.encode()
            if value is None:
                requests.append((path, "rm", Op.RM, p + NUL))
            elif str(value) == "":
                requests.append((path, "mkdir", Op.MKDIR, p + NUL))
            else:
                v = str(value).encode("utf-8")
                requests.append((path, "write", Op.WRITE, p + NUL + v))
        self._pipelined(requests)
        return len(requests)

    def read_many(self, paths: Iterable[str]) -> list[str | None]:
        """The values at ``paths`` (None where absent), pipelined (see
        :meth:`_pipelined`)."""
        from pyxs._internal import NUL, Op
        replies = self._pipelined([(path, "read", Op.READ, path.encode() + NUL) for path in paths])
        return [None if r is None else r.decode("latin-1") for r in replies]

    def read_dir(self, path: str) -> dict[str, str]:
        """Every child of ``path`` with its value (empty when ``path`` is absent),
        in two round trips."""
        names = self.ls(path) or []
        values = self.read_many(f"{path}/{n}" for n in names)
        return {n: v for n, v in zip(names, values) if v is not None}

    def _pipelined(self, requests: list[tuple[str, str, int, bytes]]) -> list[bytes | None]:
        """Sends every (path, what, op, payload) request before awaiting the
        first reply, so N requests cost xenstored's work and one round trip,
        not N round trips and 2N thread hand-overs (a status round of 171 keys,
        one at a time, took 574 s in a one-CPU emulated dom0); xenstored
        answers a connection's requests in order.  Returns each reply's
        payload (None for ENOENT, which only RM and READ take as an answer);
        raises XenstoreError for the first other failure once every reply is in.
        A path or value xenstore cannot take (paths as pyxs checks them, values
        printable 7-bit ASCII) is refused before anything is sent.
        """
        from pyxs._internal import NUL, Op, Packet, next_rq_id
        from pyxs.helpers import check_path, error
        for path, what, op, payload in requests:
            value = payload.partition(NUL)[2]
            try:
                check_path(path.encode())
            except ValueError:
                raise XenstoreError(errno.EINVAL, f"xenstore {what} {path}: invalid path") from None
            if len(payload) > 4096 or not all(c in PRINTABLE for c in value):
                raise XenstoreError(errno.EINVAL, f"xenstore {what} {path}: invalid value")
        sent = []
        failed: XenstoreError | None = None
        for path, what, op, payload in requests:
            packet = Packet(op, payload, rq_id=next_rq_id(), tx_id=self.client.tx_id)
            try:
                sent.append((path, what, self.client.router.send(packet)))
            except (PyXSError, OSError) as e:
                failed = XenstoreError(errno.ECONNRESET, f"xenstore {what} {path}: {_reason(e)}")
                break
        out: list[bytes | None] = []
        for path, what, reply in sent:          # every reply, even after a failure
            packet = reply.get()
            if packet.op != Op.ERROR:
                out.append(packet.payload.rstrip(NUL))
                continue
            out.append(None)
            code = error(packet.payload.rstrip(NUL)).args[0] or errno.EIO
            if failed is None and not (code == errno.ENOENT and what in ("rm", "read")):
                failed = XenstoreError(code, f"xenstore {what} {path}: {os.strerror(code)}")
        if failed is not None:
            raise failed
        return out

    def rm(self, path: str) -> None:
        """Removes ``path`` and its children; absent is fine."""
        try:
            self.client.delete(path.encode())
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return
            raise XenstoreError(e.args[0], f"xenstore rm {path}: {_reason(e)}") from None

    def ls(self, path: str) -> list[str] | None:
        """Children of ``path``, or None when it does not exist."""
        try:
            return [c.decode("latin-1") for c in self.client.list(path.encode())]
        except PyXSError as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise XenstoreError(e.args[0], f"xenstore ls {path}: {_reason(e)}") from None

    def exists(self, path: str) -> bool:
        return self.ls(path) is not None

    def set_perms(self, path: str, perms: list[str]) -> None:
        self._call("chmod", path, lambda: self.client.set_perms(path.encode(),
                                                                 [p.encode() for p in perms]))

    def get_perms(self, path: str) -> list[str]:
        return [p.decode() for p in self._call("getperms", path,
                                               lambda: self.client.get_perms(path.encode()))]

    def watch(self, monitor, path: str, token: bytes) -> None:
        """Adds a watch on a monitor of this client (events: monitor.events)."""
        self._call("watch", path, lambda: monitor.watch(path.encode(), token))

    def unwatch(self, monitor, path: str, token: bytes) -> None:
        self._call("unwatch", path, lambda: monitor.unwatch(path.encode(), token))

    def introduced(self, domid: int) -> bool:
        """Whether xenstored talks to ``domid`` (false once it died or was released)."""
        return self._call("is-introduced", str(domid),
                          lambda: self.client.is_domain_introduced(domid))

    def transaction(self, fn: Callable[["Xs"], Any], retries: int = 32) -> Any:
        """Runs ``fn(xs_in_transaction)`` in a transaction, again on conflict.

        ``fn`` must only touch xenstore through the Xs it is given and may run
        several times.  Raises XenstoreError(EAGAIN) after ``retries`` conflicts.
        """
        for _ in range(retries):
            tc = copy.copy(self.client)   # shares the connection, own tx id
            self._call("transaction", "start", tc.transaction)
            try:
                result = fn(Xs(tc))
            except BaseException:
                try:
                    tc.rollback()
                except (PyXSError, OSError):
                    pass
                raise
            if self._call("transaction", "commit", tc.commit):
                return result
            time.sleep(0.001)
        raise XenstoreError(errno.EAGAIN, "xenstore transaction: too many conflicts")


def _reason(e: BaseException) -> str:
    if isinstance(e, PyXSError) and len(e.args) >= 2 and isinstance(e.args[0], int):
        return str(e.args[1])
    return str(e) or type(e).__name__


# --- transports -----------------------------------------------------------------

#: Opens the transport that reaches domain ``domid``; the caller closes it.
TransportFactory = Callable[[int], shim.Transport]


def sim_transports(sim_dir: str | os.PathLike) -> TransportFactory:
    """Sim domains live in ``<sim_dir>/<domid>`` (made by shim.SimDomain)."""
    base = os.fspath(sim_dir)
    return lambda domid: shim.Transport.sim(os.path.join(base, str(domid)))


def xen_transports() -> TransportFactory:
    """Real Xen: libxengnttab + libxenevtchn."""
    return lambda domid: shim.Transport.xen()


# --- what the frontend published --------------------------------------------------

class FrontendError(Exception):
    """A frontend (or the toolstack) published something we refuse.

    ``errnum`` is what xenbus_dev_fatal would print before the reason.
    """

    def __init__(self, errnum: int, reason: str):
        super().__init__(reason)
        self.errnum = errnum
        self.reason = reason


_U32_MAX = (1 << 32) - 1


def _uint(raw: str | None, key: str, lo: int, hi: int) -> int:
    """A decimal value of a frontend key, strictly: digits only, lo..hi."""
    if raw is None:
        raise FrontendError(errno.ENOENT, f"missing {key}")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10:
        raise FrontendError(errno.EINVAL, f"{key} {raw[:32]!r} is not a number")
    value = int(raw)
    if not lo <= value <= hi:
        raise FrontendError(errno.ERANGE, f"{key} {value} out of range {lo}..{hi}")
    return value


def parse_ring_params(read: Callable[[str], str | None], domid: int,
                      max_queues: int = shim.MAX_QUEUES,
                      max_ring_order: int = shim.MAX_RING_ORDER) -> shim.RingParams:
    """Validates a frontend's ring keys; ``read(key)`` reads relative to its node.

    Follows Linux blkback's connect_ring(): protocol (absent = native; the
    ABIs in shim.PROTOCOLS are served),
    multi-queue-num-queues (absent = 1; queues' keys under queue-<q>/ when
    over 1), ring-page-order (absent = one ``ring-ref``, else
    ``ring-ref0..2^order-1``), event-channel, feature-persistent (absent =
    0).  Raises FrontendError.
    """
    protocol = read(K.FE_PROTOCOL)
    served = shim.PROTOCOLS
    if protocol in (None, ""):
        protocol = K.PROTOCOL_NATIVE
    if protocol not in served:
        raise FrontendError(errno.ENOSYS, f"unknown frontend protocol {protocol[:32]!r}"
                                          f" (served: {', '.join(sorted(served))})")
    nq_raw = read(K.FE_MULTI_QUEUE_NUM_QUEUES)
    nr_queues = 1 if nq_raw is None else _uint(nq_raw, K.FE_MULTI_QUEUE_NUM_QUEUES, 1, max_queues)
    order_raw = read(K.FE_RING_PAGE_ORDER)
    order = None if order_raw is None else _uint(order_raw, K.FE_RING_PAGE_ORDER, 0, max_ring_order)

    ring_refs: list[list[int]] = []
    evtchns: list[int] = []
    for q in range(nr_queues):
        prefix = "" if nr_queues == 1 else K.fe_queue_dir(q) + "/"
        if order is None:
            keys = [prefix + K.FE_RING_REF]
        else:
            keys = [prefix + K.fe_ring_ref(i) for i in range(1 << order)]
        ring_refs.append([_uint(read(k), k, 0, _U32_MAX) for k in keys])
        key = prefix + K.FE_EVENT_CHANNEL
        evtchns.append(_uint(read(key), key, 1, _U32_MAX))   # port 0 is never valid

    seen: set[int] = set()
    for refs in ring_refs:
        for ref in refs:
            if ref in seen:
                raise FrontendError(errno.EINVAL, f"grant ref {ref} is given for two ring pages")
            seen.add(ref)
    if len(set(evtchns)) != len(evtchns):
        raise FrontendError(errno.EINVAL, "two queues share one event channel")
    persistent_raw = read(K.FE_FEATURE_PERSISTENT)
    persistent = persistent_raw is not None and _uint(persistent_raw, K.FE_FEATURE_PERSISTENT, 0, 1) == 1
    return shim.RingParams(domid=domid, nr_queues=nr_queues, ring_order=order or 0,
                           ring_refs=ring_refs, evtchns=evtchns, protocol=served[protocol],
                           persistent=persistent)


# --- how images are served ------------------------------------------------------------

@dataclass(frozen=True)
class ServeOptions:
    """How the daemon serves every image: the shim's I/O engine, direct I/O
    ("auto": O_DIRECT where the image takes it, the page cache elsewhere),
    the queue threads' polling window (see shim.Vbd) and whether persistent
    grants are offered (a frontend that takes them may allocate a page per
    grant of every ring slot up front, as Linux blkfront does)."""
    engine: str = "auto"
    direct: bool | str = "auto"
    poll_us: int = shim.DEFAULT_POLL_US
    persistent: bool = True


# --- what the backend advertises -------------------------------------------------------

def feature_keys(vbd: shim.Vbd, persistent: bool = True) -> dict[str, int]:
    """The backend keys blkfront reads, from what the shim reports
    (persistent grants only if `persistent` too)."""
    i = vbd.info()
    keys = {
        K.BE_SECTORS: i["sectors"],
        K.BE_SECTOR_SIZE: i["sector_size"],
        K.BE_PHYSICAL_SECTOR_SIZE: i["physical_sector_size"],
        K.BE_INFO: K.VDISK_READONLY if i["readonly"] else 0,
        K.BE_MAX_RING_PAGE_ORDER: i["max_ring_order"],
        K.BE_MULTI_QUEUE_MAX_QUEUES: i["max_queues"],
    }
    if i.get("feature_flush"):
        keys[K.BE_FEATURE_FLUSH_CACHE] = 1
    if i.get("feature_barrier"):
        keys[K.BE_FEATURE_BARRIER] = 1
    if i.get("feature_discard"):
        keys[K.BE_FEATURE_DISCARD] = 1
        keys[K.BE_DISCARD_GRANULARITY] = i["discard_granularity"]
        keys[K.BE_DISCARD_ALIGNMENT] = i["discard_alignment"]
        keys[K.BE_DISCARD_SECURE] = int(bool(i["discard_secure"]))
    if i.get("max_indirect_segments"):
        keys[K.BE_FEATURE_MAX_INDIRECT_SEGMENTS] = i["max_indirect_segments"]
    if i.get("feature_persistent") and persistent:
        keys[K.BE_FEATURE_PERSISTENT] = 1
    return keys


# --- one VBD ------------------------------------------------------------------------

@dataclass
class BackendNode:
    """The toolstack-written keys of a backend node (None: absent)."""

    state: XenbusState
    online: bool
    params: str | None
    mode: str | None
    frontend: str | None
    frontend_id: str | None

    @classmethod
    def read(cls, xs: Xs, path: str) -> "BackendNode | None":
        if not xs.exists(path):
            return None
        r = lambda k: xs.read(f"{path}/{k}")  # noqa: E731
        return cls(state=XenbusState.parse(r(K.STATE)), online=r(K.BE_ONLINE) == "1",
                   params=r(K.BE_PARAMS), mode=r(K.BE_MODE), frontend=r(K.BE_FRONTEND),
                   frontend_id=r(K.BE_FRONTEND_ID))


class BackendDevice:
    """One VBD: its image (shim.Vbd), its rings, and its two xenstore nodes.

    Call :meth:`step` whenever something under its backend or frontend node
    (or a domain) changed; it returns False once the backend node is gone
    and the device has let everything go.  :meth:`release` lets go of the
    rings and the image without touching xenstore (daemon shutdown).
    """

    def __init__(self, xs: Xs, domid: int, devid: int, transports: TransportFactory,
                 *, serve: ServeOptions = ServeOptions()):
        self.xs = xs
        self.domid = domid
        self.devid = devid
        self.be = K.backend_path(domid, devid)
        self.fe = K.frontend_path(domid, devid)
        self.transports = transports
        self.serve = serve
        self.vbd: shim.Vbd | None = None
        self.transport: shim.Transport | None = None
        self.connected = False
        self.target: str | None = None
        #: The reason this VBD gave up, until the frontend starts over.
        self.failed: str | None = None
        self._fe_moved = False
        self.state = XenbusState.UNKNOWN
        self._busy_since: float | None = None
        self._waiting_logged = False
        #: Cumulative counters of the shim sessions that ended (and, for a
        #: restarted daemon, what the previous one published): status adds
        #: the current session's to them, so they survive the guest.
        self._base: dict[str, int] = {k: 0 for k in K.ST_CUMULATIVE}

    def __repr__(self) -> str:
        return f"<vbd {self.domid}/{self.devid} {self.state.label}>"

    @property
    def name(self) -> str:
        return f"domain {self.domid} {K.devid_to_vdev(self.devid)}"

    @property
    def wants_retry(self) -> bool:
        """True while waiting for something no watch reports (a busy image)."""
        return self._busy_since is not None

    # -- the state machine --

    def step(self) -> bool:
        be = BackendNode.read(self.xs, self.be)
        if be is None:                              # detached: nodes removed
            if self.vbd is not None:
                log.info("%s: backend node removed, releasing %s", self.name, self.target)
            self.release()
            return False
        self.state = be.state
        if be.frontend is None or be.frontend_id is None or be.params is None:
            if not self._waiting_logged:             # written key by key: wait for the rest
                log.debug("%s: backend node incomplete, waiting", self.name)
                self._waiting_logged = True
            return True
        if be.frontend != self.fe or be.frontend_id != str(self.domid):
            if not self.failed:
                self._fail(be, errno.EINVAL, f"backend node names frontend {be.frontend!r} of "
                                             f"domain {be.frontend_id!r}, expected {self.fe}")
            return True

        fe_raw = self.xs.read(f"{self.fe}/{K.STATE}")
        if fe_raw is None or not self.xs.introduced(self.domid):
            if be.state != XenbusState.CLOSED or self.vbd is not None:
                log.info("%s: %s, closing", self.name,
                         "frontend node gone" if fe_raw is None else "domain gone")
            self.release()
            self._go_closed(be)
            return True
        fe = XenbusState.parse(fe_raw)
        if self.failed and fe != XenbusState.INITIALISING:
            self._fe_moved = True                 # it may start over once back at Initialising

        if not be.online or be.state == XenbusState.CLOSING:      # detach, or we are closing
            if self.connected and fe in (XenbusState.INITIALISED, XenbusState.CONNECTED):
                if be.state != XenbusState.CLOSING:               # tell the frontend, wait for it
                    self._set_state(XenbusState.CLOSING)
                return True
            self.release()
            self._go_closed(be)
            return True

        if fe in (XenbusState.CLOSING, XenbusState.CLOSED):        # the frontend leaves
            if be.state != XenbusState.CLOSED or self.vbd is not None:
                self.release()
                self._go_closed(be)
            return True

        if self.failed:
            # Given up: start over only when the frontend does, i.e. goes
            # back to Initialising after the failure (not merely stays there).
            if not (self._fe_moved and fe == XenbusState.INITIALISING
                    and be.state == XenbusState.CLOSED):
                return True
            log.info("%s: frontend starts over, retrying", self.name)
            self.failed = None
            self.xs.rm(f"{self.be}/{K.BE_ERROR}")
        elif be.state == XenbusState.CLOSED and fe != XenbusState.INITIALISING:
            return True                                            # closed until the frontend
                                                                   # starts over

        if self.vbd is None:
            if not self._open(be):
                return True
            if not (be.state == XenbusState.CONNECTED
                    and fe in (XenbusState.INITIALISED, XenbusState.CONNECTED)):
                self._advertise()
                be.state = XenbusState.INIT_WAIT
            # else: a restarted daemon finds the guest connected: reconnect below

        if not self.connected:
            if fe in (XenbusState.INITIALISED, XenbusState.CONNECTED):
                self._connect(be)
            return True

        if fe not in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            # Connected, and the frontend went back to Initialising (or wrote
            # garbage): it lost the rings; close, it may start over.
            log.info("%s: frontend went to %s while connected, closing", self.name, fe.label)
            self.release()
            self._go_closed(be)
        return True

    # -- steps --

    def _open(self, be: BackendNode) -> bool:
        mode = be.mode or "w"
        if mode not in ("r", "w"):
            self._fail(be, errno.EINVAL, f"mode {mode!r} is neither r nor w")
            return False
        try:
            self.vbd = shim.Vbd(be.params, engine=self.serve.engine, readonly=(mode == "r"),
                                direct=self.serve.direct, poll_us=self.serve.poll_us)
        except shim.VbdBusyError as e:
            # A previous daemon's image lock can outlive its process briefly.
            now = time.monotonic()
            if self._busy_since is None:
                self._busy_since = now
                log.info("%s: %s; retrying", self.name, e.strerror)
            if now - self._busy_since < BUSY_RETRY_SECONDS:
                return False
            self._busy_since = None
            self._fail(be, e.errno, e.strerror or str(e))
            return False
        except OSError as e:
            self._busy_since = None
            self._fail(be, e.errno or errno.EIO, e.strerror or str(e))
            return False
        self._busy_since = None
        self.target = be.params
        return True

    def _advertise(self) -> None:
        """Writes size and features, then InitWait, in one transaction.

        Every key comes from what the shim says this VBD can do
        (``Vbd.info()``); a feature it does not report is removed, not
        written as 0.
        """
        assert self.vbd is not None
        keys = feature_keys(self.vbd, self.serve.persistent)
        absent = [k for k in K.BE_FEATURE_KEYS if k not in keys] + [K.BE_ERROR]

        def tx(t: Xs) -> None:
            t.write_many([*((f"{self.be}/{key}", value) for key, value in keys.items()),
                          # a feature is advertised only when it works
                          *((f"{self.be}/{key}", None) for key in absent),
                          (f"{self.be}/{K.STATE}", int(XenbusState.INIT_WAIT))])

        self.xs.transaction(tx)
        self.state = XenbusState.INIT_WAIT
        log.info("%s: %s open (%d sectors, %s, %s, %s), InitWait", self.name, self.target,
                 self.vbd.sectors, "read-only" if self.vbd.readonly else "read-write",
                 self.vbd.engine, "O_DIRECT" if self.vbd.info()["direct"] else "page cache")

    def _connect(self, be: BackendNode) -> None:
        assert self.vbd is not None
        try:
            params = parse_ring_params(lambda k: self.xs.read(f"{self.fe}/{k}"), self.domid)
        except FrontendError as e:
            self._fail(be, e.errnum, f"frontend {self.fe}: {e.reason}")
            return
        # Both ends must want them; a frontend's key alone is not enough.
        params = dataclasses.replace(
            params, persistent=params.persistent and K.BE_FEATURE_PERSISTENT in feature_keys(
                self.vbd, self.serve.persistent))
        try:
            self.transport = self.transports(self.domid)
            self.vbd.connect(self.transport, params)
        except OSError as e:
            self._close_transport()
            self._fail(be, e.errno or errno.EIO,
                       f"connecting to frontend {self.fe}: {e.strerror or e}")
            return
        self.connected = True
        self.xs.rm(f"{self.be}/{K.BE_ERROR}")
        self._set_state(XenbusState.CONNECTED)
        pages = 1 << params.ring_order
        log.info("%s: connected (%d queue%s x %d ring page%s%s)", self.name, params.nr_queues,
                 "s" * (params.nr_queues > 1), pages, "s" * (pages > 1),
                 ", persistent grants" if params.persistent else "")

    def _fail(self, be: BackendNode, errnum: int, reason: str) -> None:
        """xenbus_dev_fatal: an ``error`` node, one log line, then Closed."""
        self.failed = reason
        self._fe_moved = False
        log.warning("%s: %s", self.name, reason)
        self.release()
        try:
            self.xs.write(f"{self.be}/{K.BE_ERROR}", ascii_value(f"{errnum} {reason}"))
        except XenstoreError as e:
            log.warning("%s: cannot write error node: %s", self.name, e.strerror)
        self._go_closed(be)

    def _set_state(self, state: XenbusState) -> None:
        self.xs.write(f"{self.be}/{K.STATE}", int(state))
        self.state = state

    def _go_closed(self, be: BackendNode) -> None:
        """Closing then Closed (each written, so both are seen), unless Closed."""
        if be.state == XenbusState.CLOSED or not self.xs.exists(self.be):
            return
        if be.state != XenbusState.CLOSING:
            self._set_state(XenbusState.CLOSING)
        self._set_state(XenbusState.CLOSED)
        be.state = XenbusState.CLOSED
        log.info("%s: Closed", self.name)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def release(self) -> None:
        """Disconnects the rings (answering what is in flight) and closes the
        image; leaves xenstore alone.  The session's counters are kept."""
        if self.connected and self.vbd is not None:
            self.vbd.disconnect()
        self.connected = False
        self._close_transport()
        if self.vbd is not None:
            final = _counters(self.vbd.stats())
            self._base = {k: self._base[k] + final[k] for k in K.ST_CUMULATIVE}
            vbd, self.vbd = self.vbd, None
            self._close_image(vbd)
        self._busy_since = None

    def _close_image(self, vbd: shim.Vbd) -> None:
        """Closes the image of a session that ended (disconnected, counters
        taken); a subclass may hand it over to finish later."""
        vbd.close()

    def resume_counters(self, published: dict[str, str | None]) -> None:
        """Starts the cumulative counters from what a previous daemon
        published (values that are not decimal numbers count as 0)."""
        self._base = {k: int(v) if (v := published.get(k)) and v.isdigit() and len(v) < 20
                      else 0 for k in K.ST_CUMULATIVE}

    # -- status --

    def status(self) -> dict[str, Any]:
        """What the daemon publishes under the status subtree: the state,
        and counters over the VBD's whole life (the last ones stay after the
        guest ends)."""
        st: dict[str, Any] = {K.ST_STATE: self.state.label, K.ST_TARGET: self.target or ""}
        s = self.vbd.stats() if self.vbd is not None else None
        now = _counters(s) if s is not None else {k: 0 for k in K.ST_CUMULATIVE}
        st[K.ST_SHIM] = s["state"] if s is not None else "closed"
        for k in K.ST_CUMULATIVE:
            st[k] = self._base[k] + now[k]
        st[K.ST_IN_FLIGHT] = s["in_flight"] if s is not None else 0
        st[K.ST_GRANTS_MAPPED] = s["grants_mapped"] if s is not None else 0
        st[K.ST_NR_QUEUES] = s["nr_queues"] if s is not None else 0
        st[K.ST_ERROR] = self.failed or ""
        return st


def _counters(s: dict[str, Any]) -> dict[str, int]:
    """The cumulative status counters of one shim session's stats."""
    return {
        K.ST_REQUESTS: (s["reqs_read"] + s["reqs_write"] + s["reqs_flush"]
                        + s["reqs_barrier"] + s["reqs_discard"]),
        K.ST_BYTES: s["bytes_read"] + s["bytes_written"],
        K.ST_ERRORS: s["err_bad_request"] + s["err_unsupported"] + s["err_grant"] + s["err_io"],
        K.ST_READS: s["reqs_read"], K.ST_WRITES: s["reqs_write"],
        K.ST_FLUSHES: s["reqs_flush"], K.ST_BARRIERS: s["reqs_barrier"],
        K.ST_DISCARDS: s["reqs_discard"], K.ST_INDIRECT: s["reqs_indirect"],
        K.ST_BYTES_READ: s["bytes_read"], K.ST_BYTES_WRITTEN: s["bytes_written"],
    }
