"""A xenstored stand-in that speaks the real xenstore wire protocol.

Real xenstored needs a hypervisor.  This module serves the same protocol
(``xen/io/xs_wire.h``) over Unix stream sockets, so that unmodified clients
(pyxs, libxenstore, our daemon) run against it exactly as against the C
xenstored.  Semantics follow ``tools/xenstore/xenstored_core.c``: permission
checks and the errno they yield, parent creation with inherited permissions,
watches (fired once on registration, for the path and its children, for
removed subtrees, relative event paths for relative watches), generation-based
transactions that fail with ``EAGAIN`` on conflict, ``@introduceDomain`` /
``@releaseDomain``, quotas for unprivileged domains, and a connection that
sends an oversized header is dropped.

Connecting
----------
Every listening socket stands for one domain, as the ring of that domain
would on a real host:

* dom0 (privileged): the main socket, ``standin.socket_path``::

      with pyxs.Client(unix_socket_path=standin.socket_path) as c: ...

  The ``xenstore`` pytest fixture also sets ``XENSTORED_PATH`` so that a plain
  ``pyxs.Client()`` lands there.
* domain N (unprivileged guest): ``standin.domain_socket(N)`` returns the path
  of a socket (created on first call, ``<socket_path>.dom<N>``) whose
  connections act as domain N: relative paths resolve against
  ``/local/domain/N``, permissions are checked for N, privileged operations
  answer ``EACCES``::

      with pyxs.Client(unix_socket_path=standin.domain_socket(5)) as guest: ...

  From the command line, ``--domain N`` (repeatable) creates the same socket.

Starting it
-----------
* in-process: ``with XenstoreStandin(path) as xs: ...`` serves from a
  background thread (or use the ``xenstore`` fixture in ``tests/conftest.py``);
* subprocess: ``with run_subprocess(path) as proc: ...``, or by hand
  ``python -m tests.xenstore_standin --socket PATH [--domain N ...]`` (also runs
  as a script); it prints ``READY`` once it accepts connections.

As in xenstored, an unknown operation (or WATCH_EVENT/ERROR sent by a client)
gets ``ENOSYS``, a privileged one from a guest ``EACCES``, an unknown
transaction id ``ENOENT``, a reply over XENSTORE_PAYLOAD_MAX ``E2BIG``.

Known differences from xenstored: no read-only socket, no per-domain node
count quota, no node ownership clean-up when a domain is released, XS_CONTROL
always answers ``EINVAL``, and removing a subtree fires the exact-path event
for its top node once rather than twice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import errno
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

from construct import Int32ul, Struct

log = logging.getLogger("xenstore_standin")

# --- the wire format (xs_wire.h) -------------------------------------------

#: ``struct xsd_sockmsg``: every message on the wire starts with it.
XsdSockmsg = Struct(
    "type" / Int32ul,
    "req_id" / Int32ul,
    "tx_id" / Int32ul,
    "len" / Int32ul,
)
HEADER_SIZE: int = XsdSockmsg.sizeof()

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type``."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: ``xsd_errors[]``: the only errno names that go on the wire; anything else
#: is sent as EINVAL, like xenstored's send_error().
XSD_ERRORS = frozenset({
    errno.EINVAL, errno.EACCES, errno.EEXIST, errno.EISDIR, errno.ENOENT,
    errno.ENOMEM, errno.ENOSPC, errno.EIO, errno.ENOTEMPTY, errno.ENOSYS,
    errno.EROFS, errno.EBUSY, errno.EAGAIN, errno.EISCONN, errno.E2BIG,
    errno.EPERM,
})

NUL = b"\0"

# Quotas xenstored applies to unprivileged domains (its defaults).
QUOTA_MAX_ENTRY_SIZE = 2048
QUOTA_NB_WATCH_PER_DOMAIN = 128
QUOTA_MAX_TRANSACTION = 10
QUOTA_NB_PERMS_PER_NODE = 5

#: A client that stops reading gets disconnected once this much is queued.
MAX_QUEUED_OUTPUT = 4 << 20

PERM_NONE, PERM_READ, PERM_WRITE, PERM_OWNER = 0, 1, 2, 8
_PERM_LETTER = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE,
                "b": PERM_READ | PERM_WRITE}
_LETTER_FOR = {v: k for k, v in _PERM_LETTER.items()}
_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]*")
_SPECIAL_NODES = ("@introduceDomain", "@releaseDomain")

Perms = list[tuple[int, int]]  # [(domid, PERM_* bits)], first entry: owner


class XsError(Exception):
    """A request failed; ``errnum`` goes back as an XS_ERROR reply."""

    def __init__(self, errnum: int) -> None:
        super().__init__(errno.errorcode.get(errnum, str(errnum)))
        self.errnum = errnum


def error_payload(errnum: int) -> bytes:
    """The XS_ERROR payload for errnum, e.g. ``b"ENOENT\\0"``."""
    if errnum not in XSD_ERRORS:
        errnum = errno.EINVAL
    return errno.errorcode[errnum].encode() + NUL


def pack(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One complete message: header plus payload."""
    return XsdSockmsg.build(dict(type=op, req_id=req_id, tx_id=tx_id,
                                 len=len(payload))) + payload


# --- the tree ----------------------------------------------------------------

@dataclasses.dataclass
class Node:
    value: bytes
    perms: Perms
    children: list[str]
    generation: int = 0

    def copy(self) -> Node:
        return Node(self.value, list(self.perms), list(self.children),
                    self.generation)

    def entry_size(self) -> int:
        """Size of the node's TDB record, which quota_max_entry_size limits."""
        childlen = sum(len(c) + 1 for c in self.children)
        return 20 + 8 * len(self.perms) + len(self.value) + childlen


def parent_of(path: str) -> str:
    """get_parent(): "/a/b" -> "/a", "/a" -> "/", "/" -> "/"."""
    head = path.rpartition("/")[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rpartition("/")[2]


def join(parent: str, child: str) -> str:
    return "/" + child if parent == "/" else f"{parent}/{child}"


def is_child(name: str, watched: str) -> bool:
    """Does a change to ``name`` concern a watch on ``watched``?"""
    if name.startswith("@") or watched.startswith("@"):
        return name == watched
    if watched == "/":
        return True
    return name == watched or name.startswith(watched + "/")


def _is_number(s: str) -> bool:
    """ASCII decimal digits only (str.isdigit() also takes "\u00b2")."""
    return s.isascii() and s.isdigit()


def perms_from_strings(strings: Iterable[str]) -> Perms:
    """xs_strings_to_perms(): "r5" -> (5, PERM_READ); EINVAL if malformed."""
    perms: Perms = []
    for s in strings:
        if len(s) < 2 or s[0] not in _PERM_LETTER or not _is_number(s[1:]):
            raise XsError(errno.EINVAL)
        domid = int(s[1:])
        if domid > 0xFFFF:
            raise XsError(errno.EINVAL)
        perms.append((domid, _PERM_LETTER[s[0]]))
    return perms


def perms_to_bytes(perms: Perms) -> bytes:
    return b"".join(f"{_LETTER_FOR[bits & 3]}{domid}".encode() + NUL
                    for domid, bits in perms)


class Store:
    """The committed tree, path -> Node.  get() hands out copies, so a
    request that fails half-way leaves nothing behind unless it put()."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.generation = 0

    def get(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        return node.copy() if node else None

    def put(self, path: str, node: Node) -> None:
        self.generation += 1
        node = node.copy()
        node.generation = self.generation
        self.nodes[path] = node

    def delete(self, path: str) -> None:
        self.nodes.pop(path, None)


@dataclasses.dataclass
class PendingEvent:
    path: str
    exact: bool
    perms: list[Perms]


class Transaction:
    """A view on the store, as in xenstored since 4.9: every node the
    transaction touches is copied on first access and its generation
    remembered; the commit fails (EAGAIN) if any of those nodes changed in
    the store meanwhile.  Watch events wait for the commit."""

    def __init__(self, store: Store, tx_id: int) -> None:
        self.store = store
        self.id = tx_id
        self.seen: dict[str, int | None] = {}
        self.changed: dict[str, Node | None] = {}
        self.events: list[PendingEvent] = []

    def _touch(self, path: str) -> None:
        if path not in self.seen:
            node = self.store.nodes.get(path)
            self.seen[path] = node.generation if node else None

    def get(self, path: str) -> Node | None:
        self._touch(path)
        if path in self.changed:
            node = self.changed[path]
            return node.copy() if node else None
        return self.store.get(path)

    def put(self, path: str, node: Node) -> None:
        self._touch(path)
        self.changed[path] = node.copy()

    def delete(self, path: str) -> None:
        self._touch(path)
        self.changed[path] = None

    def conflicts(self) -> bool:
        for path, generation in self.seen.items():
            node = self.store.nodes.get(path)
            if (node.generation if node else None) != generation:
                return True
        return False

    def apply(self) -> None:
        for path, node in self.changed.items():
            if node is None:
                self.store.delete(path)
            else:
                self.store.put(path, node)


View = Store | Transaction


# --- connections and the protocol engine -------------------------------------

@dataclasses.dataclass
class Watch:
    path: str            # absolute, or a special "@..." name
    token: str
    relative_to: str | None  # domain path when registered relative


class Conn:
    """One client connection; it acts as domain ``domid``."""

    def __init__(self, sock: socket.socket | None, domid: int) -> None:
        self.sock = sock
        self.domid = domid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.closed = False
        self.want_write = False

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def domain_path(self) -> str:
        return f"/local/domain/{self.domid}"

    def send(self, data: bytes) -> None:
        self.outbuf += data


def _strings(payload: bytes) -> list[str]:
    """get_strings(): the NUL-terminated strings; trailing bytes ignored."""
    return payload.decode("latin-1").split("\0")[:payload.count(NUL)]


def _onearg(payload: bytes) -> str:
    """onearg(): exactly one string, NUL-terminated, else EINVAL."""
    if not payload or payload.find(NUL) != len(payload) - 1:
        raise XsError(errno.EINVAL)
    return payload[:-1].decode("latin-1")


def _domid(arg: str) -> int:
    if not _is_number(arg) or int(arg) > 0xFFFF:
        raise XsError(errno.EINVAL)
    return int(arg)


class XenstoreCore:
    """The protocol state machine, without I/O: handle() takes one request
    from a connection and queues replies and watch events on connections."""

    def __init__(self, populate: bool = True) -> None:
        self.store = Store()
        self.conns: list[Conn] = []
        self.introduced: set[int] = {0}
        self.targets: dict[int, int] = {}
        self._after_reply: list[Callable[[], None]] = []
        self.special_perms: dict[str, Perms] = {
            name: [(0, PERM_NONE)] for name in _SPECIAL_NODES}
        root = [(0, PERM_NONE)]
        self.store.put("/", Node(b"", list(root), ["tool"]))
        self.store.put("/tool", Node(b"", list(root), ["xenstored"]))
        self.store.put("/tool/xenstored", Node(b"", list(root), []))
        if populate:  # what xencommons writes for dom0 at boot
            dom0 = Conn(None, 0)
            self._create(dom0, self.store, "/local/domain/0/name", b"Domain-0")
            self._create(dom0, self.store, "/local/domain/0/domid", b"0")

    # -- dispatch --

    def handle(self, conn: Conn, op: int, req_id: int, tx_id: int,
               payload: bytes) -> None:
        handler = self._HANDLERS.get(op)
        self._after_reply.clear()
        try:
            if handler is None:
                raise XsError(errno.ENOSYS)
            if op in self._PRIVILEGED and not conn.privileged:
                raise XsError(errno.EACCES)
            tx = None
            if op not in (Op.WATCH, Op.UNWATCH) and tx_id:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise XsError(errno.ENOENT)
            reply = handler(self, conn, tx, payload)
            if len(reply) > XENSTORE_PAYLOAD_MAX:
                raise XsError(errno.E2BIG)
            conn.send(pack(op, req_id, tx_id, reply))
        except XsError as e:
            conn.send(pack(Op.ERROR, req_id, tx_id, error_payload(e.errnum)))
            return
        for action in self._after_reply:
            action()

    # -- permissions and lookups --

    def _perm_for(self, conn: Conn, perms: Perms) -> int:
        """perm_for_conn()."""
        everything = PERM_READ | PERM_WRITE | PERM_OWNER
        target = self.targets.get(conn.domid)
        owner = perms[0][0]
        if conn.privileged or owner == conn.domid or owner == target:
            return everything
        for domid, bits in perms[1:]:
            if domid == conn.domid or domid == target:
                return bits & everything
        return perms[0][1] & everything

    def _canonical(self, conn: Conn, name: str) -> str:
        """canonicalize() + is_valid_nodename(), EINVAL if invalid."""
        if not name.startswith("/"):
            name = f"{conn.domain_path}/{name}"
        if (name.endswith("/") and name != "/") or "//" in name \
                or len(name) > XENSTORE_ABS_PATH_MAX \
                or not _VALID_PATH.fullmatch(name):
            raise XsError(errno.EINVAL)
        m = re.match(r"/local/domain/\d{1,5}/", name)
        relative_len = len(name) - (m.end() if m else 0)
        if not conn.privileged and relative_len > XENSTORE_REL_PATH_MAX:
            raise XsError(errno.EINVAL)
        return name

    def _get(self, conn: Conn, view: View, path: str, perm: int) -> Node:
        """get_node(): the node if conn has ``perm`` on it; otherwise ENOENT
        or EACCES, never revealing what the caller may not know."""
        node = view.get(path)
        if node is not None:
            if self._perm_for(conn, node.perms) & perm == perm:
                return node
            err = errno.EACCES
        else:
            err = errno.ENOENT
        # errno_from_parents(): ask the nearest existing ancestor.
        ancestor = path
        while True:
            ancestor = parent_of(ancestor)
            parent = view.get(ancestor)
            if parent is not None or ancestor == "/":
                break
        if parent is not None and self._perm_for(conn, parent.perms) & perm:
            raise XsError(err)
        raise XsError(errno.EACCES)

    def _check_size(self, conn: Conn, node: Node) -> None:
        if not conn.privileged and node.entry_size() >= QUOTA_MAX_ENTRY_SIZE:
            raise XsError(errno.ENOSPC)

    def _create(self, conn: Conn, view: View, path: str,
                value: bytes) -> Node:
        """create_node(): the node and any missing parents.  New nodes
        inherit their parent's perms; a guest owns what it creates."""
        chain: list[tuple[str, Node]] = []
        p = path
        while True:
            chain.append((p, Node(value if p == path else b"", [], [])))
            top_parent_path = parent_of(p)
            top_parent = view.get(top_parent_path)
            if top_parent is not None:
                break
            p = top_parent_path
        perms = top_parent.perms
        for _, node in reversed(chain):
            node.perms = list(perms)
            if not conn.privileged:
                node.perms[0] = (conn.domid, node.perms[0][1])
            perms = node.perms
        for (child_path, _), (_, node) in zip(chain, chain[1:], strict=False):
            node.children.append(basename(child_path))
        top_parent.children.append(basename(chain[-1][0]))
        for _, node in chain:
            self._check_size(conn, node)
        self._check_size(conn, top_parent)
        view.put(top_parent_path, top_parent)
        for p, node in chain:
            view.put(p, node)
        return chain[0][1]

    # -- watches --

    def _fire(self, conn: Conn | None, tx: Transaction | None, path: str,
              exact: bool, perms: list[Perms]) -> None:
        """fire_watches(): inside a transaction, queue until commit."""
        if tx is not None:
            tx.events.append(PendingEvent(path, exact, perms))
            return
        special = path.startswith("@")
        for other in self.conns:
            if special:
                if not (other.privileged or self._perm_for(
                        other, self.special_perms[path]) & PERM_READ):
                    continue
            elif not other.privileged and not any(
                    self._perm_for(other, p) & PERM_READ for p in perms):
                continue
            for watch in other.watches:
                if (path == watch.path) if exact else is_child(path,
                                                               watch.path):
                    self._send_event(other, watch, path)

    def _send_event(self, conn: Conn, watch: Watch, path: str) -> None:
        if watch.relative_to and path.startswith(watch.relative_to):
            path = path[len(watch.relative_to):].lstrip("/")
        payload = (path + "\0" + watch.token + "\0").encode("latin-1")
        if len(payload) <= XENSTORE_PAYLOAD_MAX:
            conn.send(pack(Op.WATCH_EVENT, 0, 0, payload))

    def _node_perms(self, path: str, node: Node) -> list[Perms]:
        """Perms that let a watcher see an event: node's or its parent's.
        The parent is looked up in the committed store, so that a
        transaction does not record it as read (no spurious EAGAIN)."""
        parent = self.store.nodes.get(parent_of(path))
        return [node.perms] + ([parent.perms] if parent else [])

    # -- operations; each returns the reply payload --

    def _read(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        view = tx or self.store
        return self._get(conn, view, self._canonical(conn, _onearg(p)),
                         PERM_READ).value

    def _directory(self, conn: Conn, tx: Transaction | None,
                   p: bytes) -> bytes:
        view = tx or self.store
        node = self._get(conn, view, self._canonical(conn, _onearg(p)),
                         PERM_READ)
        return b"".join(c.encode("latin-1") + NUL for c in node.children)

    def _directory_part(self, conn: Conn, tx: Transaction | None,
                        p: bytes) -> bytes:
        args = _strings(p)
        if len(args) != 2:
            raise XsError(errno.EINVAL)
        view = tx or self.store
        node = self._get(conn, view, self._canonical(conn, args[0]),
                         PERM_READ)
        m = re.match(r"[0-9]*", args[1])
        offset = int(m.group() or 0)
        gen = str(node.generation).encode() + NUL
        children = b"".join(c.encode("latin-1") + NUL for c in node.children)
        if offset >= len(children):
            return gen + NUL
        room = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        part = b""
        for name in children[offset:].split(NUL)[:-1]:
            if len(part) + len(name) >= room:
                break
            part += name + NUL
        if offset + len(part) == len(children):
            part += NUL
        return gen + part

    def _get_perms(self, conn: Conn, tx: Transaction | None,
                   p: bytes) -> bytes:
        view = tx or self.store
        node = self._get(conn, view, self._canonical(conn, _onearg(p)),
                         PERM_READ)
        return perms_to_bytes(node.perms)

    def _write(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        if NUL not in p:
            raise XsError(errno.EINVAL)
        raw, _, value = p.partition(NUL)
        path = self._canonical(conn, raw.decode("latin-1"))
        view = tx or self.store
        try:
            node = self._get(conn, view, path, PERM_WRITE)
        except XsError as e:
            if e.errnum != errno.ENOENT:
                raise
            node = self._create(conn, view, path, bytes(value))
        else:
            node.value = bytes(value)
            self._check_size(conn, node)
            view.put(path, node)
        self._fire(conn, tx, path, False, self._node_perms(path, node))
        return b"OK\0"

    def _mkdir(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        path = self._canonical(conn, _onearg(p))
        view = tx or self.store
        try:
            self._get(conn, view, path, PERM_WRITE)
        except XsError as e:
            if e.errnum != errno.ENOENT:
                raise
            node = self._create(conn, view, path, b"")
            self._fire(conn, tx, path, False,
                       self._node_perms(path, node))
        return b"OK\0"

    def _rm(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        path = self._canonical(conn, _onearg(p))
        view = tx or self.store
        try:
            node = self._get(conn, view, path, PERM_WRITE)
        except XsError as e:
            # Gone already?  Fine, if the parent exists.
            if e.errnum == errno.ENOENT and view.get(parent_of(path)):
                return b"OK\0"
            raise
        if path == "/":
            raise XsError(errno.EINVAL)
        parent = view.get(parent_of(path))
        if parent is None:
            raise XsError(errno.EINVAL)
        self._fire(conn, tx, path, False, [node.perms, parent.perms])
        self._delete_tree(conn, tx, view, path, node, top=True)
        if basename(path) in parent.children:
            parent.children.remove(basename(path))
        view.put(parent_of(path), parent)
        return b"OK\0"

    def _delete_tree(self, conn: Conn, tx: Transaction | None, view: View,
                     path: str, node: Node, top: bool) -> None:
        """delete_node(): children first, an exact event for each."""
        for child in node.children:
            child_path = join(path, child)
            child_node = view.get(child_path)
            if child_node is not None:
                self._delete_tree(conn, tx, view, child_path, child_node,
                                  top=False)
        if not top:
            self._fire(conn, tx, path, True, [node.perms])
        view.delete(path)

    def _set_perms(self, conn: Conn, tx: Transaction | None,
                   p: bytes) -> bytes:
        args = _strings(p)
        if len(args) < 2:
            raise XsError(errno.EINVAL)
        if not conn.privileged and len(args) - 1 > QUOTA_NB_PERMS_PER_NODE:
            raise XsError(errno.ENOSPC)
        perms = perms_from_strings(args[1:])
        name = args[0]
        if name.startswith("@"):
            if name not in self.special_perms:
                raise XsError(errno.EINVAL)
            need = PERM_WRITE | PERM_OWNER
            if self._perm_for(conn, self.special_perms[name]) & need != need:
                raise XsError(errno.EACCES)
            self.special_perms[name] = perms
            return b"OK\0"
        path = self._canonical(conn, name)
        view = tx or self.store
        node = self._get(conn, view, path, PERM_WRITE | PERM_OWNER)
        if not conn.privileged and perms[0][0] != node.perms[0][0]:
            raise XsError(errno.EPERM)
        old = node.perms
        node.perms = perms
        self._check_size(conn, node)
        view.put(path, node)
        self._fire(conn, tx, path, False,
                   [old] + self._node_perms(path, node))
        return b"OK\0"

    def _watch(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        args = _strings(p)
        if len(args) != 2:
            raise XsError(errno.EINVAL)
        name, token = args
        relative_to = None
        if name.startswith("@"):
            if len(name) > XENSTORE_REL_PATH_MAX:
                raise XsError(errno.EINVAL)
        else:
            if not name.startswith("/"):
                relative_to = conn.domain_path
            name = self._canonical(conn, name)
        if any(w.path == name and w.token == token for w in conn.watches):
            raise XsError(errno.EEXIST)
        if not conn.privileged and \
                len(conn.watches) >= QUOTA_NB_WATCH_PER_DOMAIN:
            raise XsError(errno.E2BIG)
        watch = Watch(name, token, relative_to)
        conn.watches.append(watch)
        # Fire once up front, after the ack, as xenstored does.
        self._after_reply.append(lambda: self._send_event(conn, watch, name))
        return b"OK\0"

    def _unwatch(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        args = _strings(p)
        if len(args) != 2:
            raise XsError(errno.EINVAL)
        name, token = args
        if not name.startswith("@"):
            name = self._canonical(conn, name)
        for watch in conn.watches:
            if watch.path == name and watch.token == token:
                conn.watches.remove(watch)
                return b"OK\0"
        raise XsError(errno.ENOENT)

    def _reset_watches(self, conn: Conn, tx: Transaction | None,
                       p: bytes) -> bytes:
        conn.watches.clear()
        conn.transactions.clear()
        return b"OK\0"

    def _transaction_start(self, conn: Conn, tx: Transaction | None,
                           p: bytes) -> bytes:
        if tx is not None:
            raise XsError(errno.EBUSY)
        if not conn.privileged and \
                len(conn.transactions) >= QUOTA_MAX_TRANSACTION:
            raise XsError(errno.ENOSPC)
        while conn.next_tx_id in conn.transactions or not conn.next_tx_id:
            conn.next_tx_id = (conn.next_tx_id + 1) & 0xFFFFFFFF
        tx_id = conn.next_tx_id
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(self.store, tx_id)
        return str(tx_id).encode() + NUL

    def _transaction_end(self, conn: Conn, tx: Transaction | None,
                         p: bytes) -> bytes:
        if tx is None:
            raise XsError(errno.ENOENT)
        arg = _onearg(p)
        if arg not in ("T", "F"):
            raise XsError(errno.EINVAL)
        del conn.transactions[tx.id]
        if arg == "T":
            if tx.conflicts():
                raise XsError(errno.EAGAIN)
            tx.apply()
            for ev in tx.events:
                self._fire(conn, None, ev.path, ev.exact, ev.perms)
        return b"OK\0"

    def _get_domain_path(self, conn: Conn, tx: Transaction | None,
                         p: bytes) -> bytes:
        return f"/local/domain/{_domid(_onearg(p))}".encode() + NUL

    def _introduce(self, conn: Conn, tx: Transaction | None,
                   p: bytes) -> bytes:
        args = _strings(p)
        if len(args) < 3:
            raise XsError(errno.EINVAL)
        domid = _domid(args[0])
        if not _is_number(args[1]) or not _is_number(args[2]):
            raise XsError(errno.EINVAL)
        if domid not in self.introduced:
            self.introduced.add(domid)
            self._fire(None, None, "@introduceDomain", False, [])
        return b"OK\0"

    def _release(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        domid = _domid(_onearg(p))
        if domid == 0:
            raise XsError(errno.EINVAL)
        if domid not in self.introduced:
            raise XsError(errno.ENOENT)
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        self._fire(None, None, "@releaseDomain", False, [])
        return b"OK\0"

    def _is_domain_introduced(self, conn: Conn, tx: Transaction | None,
                              p: bytes) -> bytes:
        domid = _domid(_onearg(p))
        return b"T\0" if domid in self.introduced else b"F\0"

    def _resume(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        if _domid(_onearg(p)) not in self.introduced:
            raise XsError(errno.ENOENT)
        return b"OK\0"

    def _set_target(self, conn: Conn, tx: Transaction | None,
                    p: bytes) -> bytes:
        args = _strings(p)
        if len(args) < 2:
            raise XsError(errno.EINVAL)
        domid, target = _domid(args[0]), _domid(args[1])
        if domid not in self.introduced or target not in self.introduced:
            raise XsError(errno.ENOENT)
        self.targets[domid] = target
        return b"OK\0"

    def _control(self, conn: Conn, tx: Transaction | None, p: bytes) -> bytes:
        raise XsError(errno.EINVAL)

    _HANDLERS = {
        Op.CONTROL: _control,
        Op.DIRECTORY: _directory,
        Op.READ: _read,
        Op.GET_PERMS: _get_perms,
        Op.WATCH: _watch,
        Op.UNWATCH: _unwatch,
        Op.TRANSACTION_START: _transaction_start,
        Op.TRANSACTION_END: _transaction_end,
        Op.INTRODUCE: _introduce,
        Op.RELEASE: _release,
        Op.GET_DOMAIN_PATH: _get_domain_path,
        Op.WRITE: _write,
        Op.MKDIR: _mkdir,
        Op.RM: _rm,
        Op.SET_PERMS: _set_perms,
        Op.IS_DOMAIN_INTRODUCED: _is_domain_introduced,
        Op.RESUME: _resume,
        Op.SET_TARGET: _set_target,
        Op.RESET_WATCHES: _reset_watches,
        Op.DIRECTORY_PART: _directory_part,
    }
    _PRIVILEGED = frozenset({Op.CONTROL, Op.INTRODUCE, Op.RELEASE,
                             Op.IS_DOMAIN_INTRODUCED, Op.RESUME,
                             Op.SET_TARGET})


# --- sockets -------------------------------------------------------------------

def _listen(path: str) -> socket.socket:
    """Bind a listening Unix socket at path, replacing a stale one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class XenstoreStandin:
    """Serves XenstoreCore on Unix sockets: ``socket_path`` for dom0, one
    more per guest domain (see domain_socket()).  One thread runs a selector
    loop, so requests are handled one at a time, like xenstored."""

    def __init__(self, socket_path: str | os.PathLike[str],
                 domains: Iterable[int] = (), populate: bool = True) -> None:
        self.socket_path = os.fspath(socket_path)
        self.core = XenstoreCore(populate=populate)
        #: Unexpected exceptions inside the stand-in (bugs); tests assert
        #: this stays empty.
        self.internal_errors: list[str] = []
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._listeners: dict[int, socket.socket] = {}
        self._pending: list[tuple[int, socket.socket]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._add_listener(0, self.socket_path)
        for domid in domains:
            self.domain_socket(domid)

    # -- public --

    def domain_socket(self, domid: int) -> str:
        """Path of a socket whose connections act as domain ``domid``
        (created on first call; thread-safe)."""
        if domid == 0:
            return self.socket_path
        path = f"{self.socket_path}.dom{domid}"
        with self._lock:
            if domid not in self._listeners:
                self._add_listener(domid, path)
        self._wake()
        return path

    def start(self) -> XenstoreStandin:
        """Serve from a background (daemon) thread."""
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="xenstore-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, remove the socket files."""
        self._stopping = True
        if not self._running:  # never served: nothing else will clean up
            self._shutdown()
            return
        self._wake()
        if self._thread is not None and \
                self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> XenstoreStandin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve until stop(); then close everything."""
        self._running = True
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                self._register_pending()
                for key, mask in self._sel.select():
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    elif isinstance(key.data, int):
                        self._accept(key.fileobj, key.data)
                    else:
                        self._service(key.data, mask)
                self._flush_all()
        finally:
            self._shutdown()

    # -- internals --

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _add_listener(self, domid: int, path: str) -> None:
        sock = _listen(path)
        self._listeners[domid] = sock
        self._pending.append((domid, sock))

    def _register_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for domid, sock in pending:
            self._sel.register(sock, selectors.EVENT_READ, domid)

    def _accept(self, listener: socket.socket, domid: int) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = Conn(sock, domid)
        self.core.conns.append(conn)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _service(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(conn)
                return
            if data:
                conn.inbuf += data
                self._consume(conn)
        if mask & selectors.EVENT_WRITE and not conn.closed:
            self._flush(conn)

    def _consume(self, conn: Conn) -> None:
        """Handle every complete message in conn's input buffer."""
        while not conn.closed and len(conn.inbuf) >= HEADER_SIZE:
            hdr = XsdSockmsg.parse(bytes(conn.inbuf[:HEADER_SIZE]))
            if hdr.len > XENSTORE_PAYLOAD_MAX:
                # xenstored: "Client tried to feed us ..." -> bad client.
                log.info("dropping connection: payload length %d", hdr.len)
                self._close(conn)
                return
            end = HEADER_SIZE + hdr.len
            if len(conn.inbuf) < end:
                return
            payload = bytes(conn.inbuf[HEADER_SIZE:end])
            del conn.inbuf[:end]
            try:
                self.core.handle(conn, hdr.type, hdr.req_id, hdr.tx_id,
                                 payload)
            except Exception as e:  # a bug here must not kill the server
                log.exception("internal error handling op %d", hdr.type)
                self.internal_errors.append(f"op {hdr.type}: {e!r}")
                conn.send(pack(Op.ERROR, hdr.req_id, hdr.tx_id,
                               error_payload(errno.EIO)))

    def _flush(self, conn: Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.outbuf[:sent]
        if len(conn.outbuf) > MAX_QUEUED_OUTPUT:
            log.info("dropping connection that does not read its replies")
            self._close(conn)
            return
        want_write = bool(conn.outbuf)
        if want_write != conn.want_write:
            conn.want_write = want_write
            events = selectors.EVENT_READ | (
                selectors.EVENT_WRITE if want_write else 0)
            self._sel.modify(conn.sock, events, conn)

    def _flush_all(self) -> None:
        for conn in list(self.core.conns):
            if conn.outbuf and not conn.closed:
                self._flush(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.watches.clear()
        conn.transactions.clear()
        with contextlib.suppress(ValueError):
            self.core.conns.remove(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _shutdown(self) -> None:
        if self._sel.get_map() is None:  # already shut down
            return
        for conn in list(self.core.conns):
            self._close(conn)
        with self._lock:
            for sock in self._listeners.values():
                path = sock.getsockname()
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._listeners.clear()
            self._pending.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


@contextlib.contextmanager
def run_subprocess(socket_path: str | os.PathLike[str],
                   domains: Iterable[int] = ()) -> Iterator[subprocess.Popen]:
    """Run the stand-in as a separate process; yields once it accepts
    connections, terminates it on exit.  Guest sockets as in the CLI."""
    cmd = [sys.executable, os.path.abspath(__file__), "--socket",
           os.fspath(socket_path)]
    for domid in domains:
        cmd += ["--domain", str(domid)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "READY":
            raise RuntimeError(f"xenstore stand-in failed to start: {line!r}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="xenstored stand-in on Unix sockets (for tests)")
    parser.add_argument("--socket", required=True,
                        help="dom0 socket path; guests get PATH.dom<N>")
    parser.add_argument("--domain", type=int, action="append", default=[],
                        metavar="N", help="also listen as domain N")
    parser.add_argument("--empty", action="store_true",
                        help="do not create /local/domain/0")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    server = XenstoreStandin(args.socket, args.domain,
                             populate=not args.empty)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print("READY", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
