"""The xenstored stand-in, driven by the unmodified pyxs client and raw
sockets speaking the xs_wire.h protocol."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import random
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest
from pyxs import Client
from pyxs._internal import Op as PyxsOp
from pyxs.client import Monitor
from pyxs.exceptions import PyXSError

from tests.xenstore_standin import (
    HEADER_SIZE,
    Op,
    XenstoreStandin,
    XsdSockmsg,
    pack,
    run_subprocess,
)

GUEST = 5
VBD = b"51712"


# --- helpers ---------------------------------------------------------------------

@contextlib.contextmanager
def connect(path: str) -> Iterator[Client]:
    # NB: pyxs 0.4.1 refuses to write an empty value (its 7-bit regex needs
    # a character); tests write "-" where a placeholder is needed.
    with Client(unix_socket_path=path) as c:
        yield c


def next_event(monitor: Monitor, timeout: float = 2.0) -> tuple[bytes, bytes]:
    event = monitor.events.get(timeout=timeout)
    return (event.path, event.token)


def events_until(monitor: Monitor, marker: bytes) -> list[tuple[bytes, bytes]]:
    """Events before the one for ``marker``: a connection's events arrive in
    order, so whatever was not seen before the marker was never sent."""
    seen = []
    while True:
        event = next_event(monitor)
        if event[0] == marker:
            return seen
        seen.append(event)


def errnum(excinfo: pytest.ExceptionInfo[PyXSError]) -> int:
    return excinfo.value.args[0]


def setup_guest(dom0: Client, domid: int = GUEST) -> None:
    """What the toolstack does when it builds a domain: its home is readable
    by it, ``device`` and ``data`` are its own; plus one VBD, backend and
    frontend, with libxl's permissions."""
    home = f"/local/domain/{domid}".encode()
    dom0.mkdir(home)
    dom0.set_perms(home, [b"n0", b"r%d" % domid])
    for sub in (b"/device", b"/data"):
        dom0.mkdir(home + sub)
        dom0.set_perms(home + sub, [b"n%d" % domid])
    backend = b"/local/domain/0/backend/vbd/%d/%s" % (domid, VBD)
    frontend = home + b"/device/vbd/" + VBD
    dom0.write(backend + b"/frontend", frontend)
    dom0.write(backend + b"/state", b"1")
    dom0.set_perms(backend, [b"n0", b"r%d" % domid])
    dom0.set_perms(backend + b"/state", [b"n0", b"r%d" % domid])
    dom0.set_perms(backend + b"/frontend", [b"n0", b"r%d" % domid])
    dom0.write(frontend + b"/backend", backend)
    dom0.write(frontend + b"/state", b"1")
    for path in (frontend, frontend + b"/backend", frontend + b"/state"):
        dom0.set_perms(path, [b"n%d" % domid, b"r0"])


class Raw:
    """A bare xenstore connection: frames built with the shared construct
    declaration, no client-side validation."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2.0)
        self.sock.connect(path)
        self.req_id = 100

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("closed by the stand-in")
            buf += chunk
        return buf

    def recv(self) -> tuple[int, int, int, bytes]:
        hdr = XsdSockmsg.parse(self.recv_exact(HEADER_SIZE))
        return hdr.type, hdr.req_id, hdr.tx_id, self.recv_exact(hdr.len)

    def request(self, op: int, payload: bytes,
                tx_id: int = 0) -> tuple[int, bytes]:
        """Send one request, return (reply type, payload), skipping events."""
        self.req_id += 1
        self.send(pack(op, self.req_id, tx_id, payload))
        while True:
            typ, req_id, reply_tx, data = self.recv()
            if typ == Op.WATCH_EVENT:
                continue
            assert (req_id, reply_tx) == (self.req_id, tx_id)
            return typ, data


def assert_serving(path: str) -> None:
    with connect(path) as c:
        c.write(b"/alive", b"yes")
        assert c.read(b"/alive") == b"yes"


# --- basic operations -----------------------------------------------------------

def test_write_creates_missing_parents_and_directory_lists_children(xenstore):
    with connect(xenstore.socket_path) as c:
        c.write(b"/a/b/c", b"value")
        assert c.read(b"/a/b/c") == b"value"
        assert c.read(b"/a/b") == b""
        assert c.list(b"/a") == [b"b"]
        c.write(b"/a/d", b"-")
        assert sorted(c.list(b"/a")) == [b"b", b"d"]
        assert c.list(b"/a/b/c") == []
        assert set(c.list(b"/")) >= {b"tool", b"local", b"a"}


def test_host_starts_with_dom0_home_as_xencommons_leaves_it(xenstore):
    with connect(xenstore.socket_path) as c:
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        assert c.read(b"/local/domain/0/domid") == b"0"
        assert c.get_perms(b"/local/domain/0") == [b"n0"]


def test_read_of_missing_node_is_enoent(xenstore):
    with connect(xenstore.socket_path) as c:
        with pytest.raises(PyXSError) as e:
            c.read(b"/nope")
        assert errnum(e) == errno.ENOENT
        assert not c.exists(b"/nope")


def test_mkdir_creates_empty_node_and_keeps_existing_value(xenstore):
    with connect(xenstore.socket_path) as c:
        c.mkdir(b"/m/n")
        assert c.read(b"/m/n") == b""
        c.write(b"/m/n", b"kept")
        c.mkdir(b"/m/n")
        assert c.read(b"/m/n") == b"kept"


def test_rm_removes_whole_subtree(xenstore):
    with connect(xenstore.socket_path) as c:
        for leaf in (b"/r/x/1", b"/r/x/2", b"/r/y"):
            c.write(leaf, b"v")
        c.delete(b"/r/x")
        assert c.list(b"/r") == [b"y"]
        assert not c.exists(b"/r/x/1")
        c.delete(b"/r")
        assert not c.exists(b"/r/y")
        assert b"r" not in c.list(b"/")


def test_rm_of_missing_node_is_ok_only_if_parent_exists(xenstore):
    with connect(xenstore.socket_path) as c:
        c.delete(b"/local/missing")
        with pytest.raises(PyXSError) as e:
            c.delete(b"/missing/child")
        assert errnum(e) == errno.ENOENT


def test_rm_of_root_is_einval(xenstore):
    with connect(xenstore.socket_path) as c:
        with pytest.raises(PyXSError) as e:
            c.delete(b"/")
        assert errnum(e) == errno.EINVAL


def test_relative_paths_resolve_against_the_connections_domain(xenstore):
    with connect(xenstore.socket_path) as c:
        c.write(b"rel/key", b"v0")
        assert c.read(b"/local/domain/0/rel/key") == b"v0"
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        g.write(b"data/key", b"v5")
        assert g.read(b"/local/domain/5/data/key") == b"v5"
        assert g.read(b"device/vbd/51712/state") == b"1"


def test_get_domain_path(xenstore):
    with connect(xenstore.socket_path) as c:
        assert c.get_domain_path(7) == b"/local/domain/7"


def test_directory_larger_than_payload_max_is_e2big(xenstore):
    with connect(xenstore.socket_path) as c:
        for i in range(400):
            c.write(b"/big/child-%04d" % i, b"-")
        with pytest.raises(PyXSError) as e:
            c.list(b"/big")
        assert errnum(e) == errno.E2BIG


def test_directory_part_pages_through_children(xenstore):
    with connect(xenstore.socket_path) as c:
        for i in range(400):
            c.write(b"/big/child-%04d" % i, b"-")
    raw = Raw(xenstore.socket_path)
    names: list[bytes] = []
    offset = 0
    while True:
        typ, data = raw.request(Op.DIRECTORY_PART,
                                b"/big\0%d\0" % offset)
        assert typ == Op.DIRECTORY_PART
        generation, _, rest = data.partition(b"\0")
        assert generation.isdigit()
        if rest in (b"", b"\0"):
            break
        last = rest.endswith(b"\0\0")
        chunk = rest[:-1] if last else rest
        names += chunk.split(b"\0")[:-1]
        offset += len(chunk)
        if last:
            break
    raw.close()
    assert names == [b"child-%04d" % i for i in range(400)]


# --- permissions -----------------------------------------------------------------

def test_set_perms_round_trips_and_children_inherit(xenstore):
    with connect(xenstore.socket_path) as c:
        c.write(b"/p", b"-")
        c.set_perms(b"/p", [b"n0", b"r5", b"b7"])
        assert c.get_perms(b"/p") == [b"n0", b"r5", b"b7"]
        c.write(b"/p/q/r", b"-")
        assert c.get_perms(b"/p/q/r") == [b"n0", b"r5", b"b7"]


def test_guest_reads_but_cannot_write_its_backend_nodes(xenstore):
    backend = b"/local/domain/0/backend/vbd/5/51712"
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        assert g.read(backend + b"/state") == b"1"
        for attempt in (lambda: g.write(backend + b"/state", b"4"),
                        lambda: g.write(backend + b"/new", b"x"),
                        lambda: g.delete(backend),
                        lambda: g.mkdir(backend + b"/dir")):
            with pytest.raises(PyXSError) as e:
                attempt()
            assert errnum(e) == errno.EACCES
    with connect(xenstore.socket_path) as c:
        assert c.read(backend + b"/state") == b"1"
        assert not c.exists(backend + b"/new")


def test_guest_writes_its_frontend_and_owns_what_it_creates(xenstore):
    frontend = b"/local/domain/5/device/vbd/51712"
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        g.write(frontend + b"/state", b"3")
        g.write(frontend + b"/ring-ref", b"8")
        assert g.get_perms(frontend + b"/ring-ref") == [b"n5", b"r0"]
    with connect(xenstore.socket_path) as c:
        assert c.read(frontend + b"/state") == b"3"
        assert c.read(frontend + b"/ring-ref") == b"8"


def test_guest_gets_eacces_not_enoent_under_unreadable_nodes(xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        for path in (b"/local/domain/0/name", b"/local/domain/0/no-such"):
            with pytest.raises(PyXSError) as e:
                g.read(path)
            assert errnum(e) == errno.EACCES
        with pytest.raises(PyXSError) as e:
            g.read(b"/local/domain/5/data/no-such")
        assert errnum(e) == errno.ENOENT


def test_guest_may_not_change_owner_or_perms_of_nodes_it_does_not_own(
        xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        g.write(b"data/mine", b"-")
        g.set_perms(b"data/mine", [b"n5", b"r0", b"r9"])
        with pytest.raises(PyXSError) as e:
            g.set_perms(b"data/mine", [b"n9"])
        assert errnum(e) == errno.EPERM
        with pytest.raises(PyXSError) as e:
            g.set_perms(b"/local/domain/0/backend", [b"n5"])
        assert errnum(e) == errno.EACCES


def test_guest_is_denied_privileged_operations(xenstore):
    with connect(xenstore.domain_socket(GUEST)) as g:
        with pytest.raises(PyXSError) as e:
            g.introduce_domain(9, 1, 1)
        assert errnum(e) == errno.EACCES
        with pytest.raises(PyXSError) as e:
            g.is_domain_introduced(9)
        assert errnum(e) == errno.EACCES


def test_node_size_quota_applies_to_guests_not_dom0(xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
        c.write(b"/local/domain/5/data/big0", b"x" * 4000)
    with connect(xenstore.domain_socket(GUEST)) as g:
        g.write(b"data/small", b"x" * 1000)
        with pytest.raises(PyXSError) as e:
            g.write(b"data/big", b"x" * 2048)
        assert errnum(e) == errno.ENOSPC
        assert not g.exists(b"data/big")


# --- watches ---------------------------------------------------------------------

def test_watch_fires_once_on_registration(xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"/w", b"tok")
        assert next_event(m) == (b"/w", b"tok")


def test_watch_fires_for_the_path_and_its_children_but_not_siblings(
        xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"/w", b"tok")
        next_event(m)
        c.write(b"/w", b"1")
        c.write(b"/w/child/grandchild", b"2")
        c.write(b"/wx", b"sibling")
        c.write(b"/other", b"x")
        m.watch(b"/other", b"marker")
        assert events_until(m, b"/other") == [
            (b"/w", b"tok"), (b"/w/child/grandchild", b"tok")]


def test_watch_fires_when_its_node_or_an_ancestor_is_removed(xenstore):
    with connect(xenstore.socket_path) as c:
        c.write(b"/t/a/b", b"v")
        m = c.monitor()
        m.watch(b"/t", b"top")
        m.watch(b"/t/a/b", b"leaf")
        assert {next_event(m), next_event(m)} == {
            (b"/t", b"top"), (b"/t/a/b", b"leaf")}
        c.delete(b"/t/a")
        got = {next_event(m), next_event(m)}
        assert got == {(b"/t/a", b"top"), (b"/t/a/b", b"leaf")}


def test_watch_fires_on_set_perms_and_mkdir(xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"/s", b"tok")
        next_event(m)
        c.mkdir(b"/s")
        assert next_event(m) == (b"/s", b"tok")
        c.set_perms(b"/s", [b"n0", b"r3"])
        assert next_event(m) == (b"/s", b"tok")


def test_unwatch_stops_events_and_unknown_unwatch_is_enoent(xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"/u", b"tok")
        m.watch(b"/marker", b"marker")
        next_event(m), next_event(m)
        m.unwatch(b"/u", b"tok")
        c.write(b"/u", b"ignored")
        c.write(b"/marker", b"-")
        assert events_until(m, b"/marker") == []
        with pytest.raises(PyXSError) as e:
            m.unwatch(b"/u", b"tok")
        assert errnum(e) == errno.ENOENT


def test_same_watch_twice_is_eexist(xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"/dup", b"tok")
        with pytest.raises(PyXSError) as e:
            c.ack(PyxsOp.WATCH, b"/dup\0", b"tok\0")
        assert errnum(e) == errno.EEXIST


def test_relative_watch_reports_relative_paths(xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
    with connect(xenstore.domain_socket(GUEST)) as g:
        m = g.monitor()
        m.watch(b"data", b"rel")
        assert next_event(m) == (b"data", b"rel")
        g.write(b"data/x", b"1")
        assert next_event(m) == (b"data/x", b"rel")


def test_backend_state_watch_reaches_the_guest(xenstore):
    backend = b"/local/domain/0/backend/vbd/5/51712"
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
        with connect(xenstore.domain_socket(GUEST)) as g:
            m = g.monitor()
            m.watch(backend + b"/state", b"be")
            next_event(m)
            c.write(backend + b"/state", b"4")
            assert next_event(m) == (backend + b"/state", b"be")


def test_guest_gets_no_events_for_nodes_it_cannot_read(xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
        with connect(xenstore.domain_socket(GUEST)) as g:
            m = g.monitor()
            m.watch(b"/local/domain/0/secret", b"spy")
            m.watch(b"/local/domain/5/data/marker", b"marker")
            next_event(m), next_event(m)
            c.write(b"/local/domain/0/secret", b"s3cr3t")
            g.write(b"data/marker", b"-")
            assert events_until(m, b"/local/domain/5/data/marker") == []


# --- transactions ----------------------------------------------------------------

def test_transaction_commit_applies_writes_and_fires_watches_then(xenstore):
    with connect(xenstore.socket_path) as c, \
            connect(xenstore.socket_path) as other:
        m = other.monitor()
        m.watch(b"/tx", b"tok")
        next_event(m)
        c.transaction()
        c.write(b"/tx/a", b"1")
        assert c.read(b"/tx/a") == b"1"
        assert not other.exists(b"/tx/a")
        with pytest.raises(queue.Empty):
            m.events.get(timeout=0.1)
        assert c.commit()
        assert other.read(b"/tx/a") == b"1"
        assert next_event(m) == (b"/tx/a", b"tok")


def test_transaction_conflict_is_eagain_and_retry_succeeds(xenstore):
    with connect(xenstore.socket_path) as c, \
            connect(xenstore.socket_path) as other:
        c.write(b"/counter", b"0")
        c.transaction()
        value = int(c.read(b"/counter"))
        other.write(b"/counter", b"10")
        c.write(b"/counter", b"%d" % (value + 1))
        assert c.commit() is False
        assert other.read(b"/counter") == b"10"
        c.transaction()
        value = int(c.read(b"/counter"))
        c.write(b"/counter", b"%d" % (value + 1))
        assert c.commit() is True
        assert other.read(b"/counter") == b"11"


def test_transaction_does_not_conflict_on_untouched_nodes(xenstore):
    with connect(xenstore.socket_path) as c, \
            connect(xenstore.socket_path) as other:
        c.write(b"/iso/a", b"-")
        c.write(b"/iso/b", b"-")
        c.transaction()
        c.write(b"/iso/a", b"mine")
        other.write(b"/iso/b", b"theirs")
        assert c.commit() is True


def test_transaction_on_existing_node_ignores_new_siblings(xenstore):
    with connect(xenstore.socket_path) as c, \
            connect(xenstore.socket_path) as other:
        c.write(b"/sib/a", b"-")
        c.transaction()
        c.write(b"/sib/a", b"mine")
        other.write(b"/sib/new", b"theirs")
        assert c.commit() is True
        assert sorted(other.list(b"/sib")) == [b"a", b"new"]


def test_transactions_creating_siblings_conflict_on_the_parent(xenstore):
    with connect(xenstore.socket_path) as c, \
            connect(xenstore.socket_path) as other:
        c.mkdir(b"/par")
        c.transaction()
        c.write(b"/par/one", b"1")
        other.write(b"/par/two", b"2")
        assert c.commit() is False
        assert other.list(b"/par") == [b"two"]


def test_transaction_rollback_discards(xenstore):
    with connect(xenstore.socket_path) as c:
        c.transaction()
        c.write(b"/rb", b"x")
        c.rollback()
        assert not c.exists(b"/rb")


def test_unknown_transaction_id_is_enoent(xenstore):
    raw = Raw(xenstore.socket_path)
    assert raw.request(Op.READ, b"/local\0", tx_id=4242) == (
        Op.ERROR, b"ENOENT\0")
    assert raw.request(Op.TRANSACTION_END, b"T\0") == (Op.ERROR, b"ENOENT\0")
    typ, tx = raw.request(Op.TRANSACTION_START, b"\0")
    assert typ == Op.TRANSACTION_START
    tx_id = int(tx.rstrip(b"\0"))
    assert raw.request(Op.TRANSACTION_END, b"X\0", tx_id) == (
        Op.ERROR, b"EINVAL\0")
    assert raw.request(Op.TRANSACTION_END, b"F\0", tx_id) == (
        Op.TRANSACTION_END, b"OK\0")
    raw.close()


# --- domains and special watches --------------------------------------------------

def test_introduce_and_release_fire_special_watches(xenstore):
    with connect(xenstore.socket_path) as c:
        m = c.monitor()
        m.watch(b"@introduceDomain", b"intro")
        m.watch(b"@releaseDomain", b"release")
        assert {next_event(m), next_event(m)} == {
            (b"@introduceDomain", b"intro"), (b"@releaseDomain", b"release")}
        assert c.is_domain_introduced(9) is False
        c.introduce_domain(9, 1234, 3)
        assert next_event(m) == (b"@introduceDomain", b"intro")
        assert c.is_domain_introduced(9) is True
        # pyxs refuses RELEASE off a real dom0, so send it directly.
        c.ack(PyxsOp.RELEASE, b"9\0")
        assert next_event(m) == (b"@releaseDomain", b"release")
        assert c.is_domain_introduced(9) is False
        with pytest.raises(PyXSError) as e:
            c.ack(PyxsOp.RELEASE, b"9\0")
        assert errnum(e) == errno.ENOENT


def test_special_watch_events_go_only_to_privileged_connections(xenstore):
    with connect(xenstore.socket_path) as c:
        setup_guest(c)
        with connect(xenstore.domain_socket(GUEST)) as g:
            m = g.monitor()
            m.watch(b"@introduceDomain", b"intro")
            m.watch(b"data/marker", b"marker")
            next_event(m), next_event(m)
            c.introduce_domain(9, 1, 1)
            g.write(b"data/marker", b"-")
            assert events_until(m, b"data/marker") == []


# --- hostile clients --------------------------------------------------------------

def test_unknown_operation_gets_an_error_and_the_connection_lives(xenstore):
    raw = Raw(xenstore.socket_path)
    for op in (Op.WATCH_EVENT, Op.ERROR, 20, 23, 999, 0xFFFFFFFF):
        assert raw.request(op, b"") == (Op.ERROR, b"ENOSYS\0")
    assert raw.request(Op.CONTROL, b"print\0") == (Op.ERROR, b"EINVAL\0")
    assert raw.request(Op.READ, b"/local/domain/0/domid\0") == (
        Op.READ, b"0")
    raw.close()


@pytest.mark.parametrize("payload", [
    b"",                       # no argument
    b"/local",                 # no NUL
    b"/local\0extra\0",        # two arguments where one is expected
    b"/bad path\0",            # invalid character
    b"/trailing/\0",
    b"/double//slash\0",
    b"/" + b"x" * 3100 + b"\0",  # longer than XENSTORE_ABS_PATH_MAX
    b"\xff\xfe\0",
])
def test_malformed_read_is_einval(xenstore, payload):
    raw = Raw(xenstore.socket_path)
    assert raw.request(Op.READ, payload) == (Op.ERROR, b"EINVAL\0")
    raw.close()


@pytest.mark.parametrize("op,payload", [
    (Op.WRITE, b"no-nul"),
    (Op.SET_PERMS, b"/local\0"),
    (Op.SET_PERMS, b"/local\0x5\0"),
    (Op.SET_PERMS, b"/local\0r\0"),
    (Op.WATCH, b"/local\0"),
    (Op.WATCH, b"/local\0a\0b\0"),
    (Op.GET_DOMAIN_PATH, b"five\0"),
    (Op.GET_DOMAIN_PATH, b"\xb2\0"),   # a digit to str.isdigit(), not to us
    (Op.SET_PERMS, b"/local\0r\xb2\0"),
    (Op.DIRECTORY_PART, b"/local\0"),
    (Op.INTRODUCE, b"5\0"),
    (Op.TRANSACTION_END, b""),
])
def test_malformed_requests_are_einval(xenstore, op, payload):
    raw = Raw(xenstore.socket_path)
    typ, data = raw.request(op, payload)
    assert (typ, data) == (Op.ERROR, b"EINVAL\0") or \
        (op == Op.TRANSACTION_END and data == b"ENOENT\0")
    raw.close()


def test_oversized_length_drops_only_that_connection(xenstore):
    bad = Raw(xenstore.socket_path)
    bad.send(XsdSockmsg.build(dict(type=Op.READ, req_id=1, tx_id=0,
                                   len=0x10000)))
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        bad.recv()
    bad.close()
    assert_serving(xenstore.socket_path)


def test_truncated_frame_does_not_stall_other_clients(xenstore):
    stalled = Raw(xenstore.socket_path)
    stalled.send(XsdSockmsg.build(dict(type=Op.WRITE, req_id=1, tx_id=0,
                                       len=100)) + b"/half")
    half_header = Raw(xenstore.socket_path)
    half_header.send(b"\x0b\x00\x00")
    assert_serving(xenstore.socket_path)
    # The stalled request completes when the rest arrives.
    stalled.send(b"\0" + b"v" * 94)
    assert stalled.recv()[::3] == (Op.WRITE, b"OK\0")
    stalled.close()
    half_header.close()


def test_requests_split_and_pipelined_arbitrarily_are_all_answered(xenstore):
    raw = Raw(xenstore.socket_path)
    stream = b"".join(pack(Op.WRITE, i, 0, b"/pipe/%d\0v" % i)
                      for i in range(50))
    rng = random.Random(1)
    while stream:
        cut = rng.randint(1, 40)
        raw.send(stream[:cut])
        stream = stream[cut:]
    replies = [raw.recv() for _ in range(50)]
    assert [r[1] for r in replies] == list(range(50))
    assert all(r[0] == Op.WRITE for r in replies)
    raw.close()


def test_random_garbage_never_kills_the_server(xenstore):
    rng = random.Random(42)
    for _ in range(30):
        raw = Raw(xenstore.socket_path)
        for _ in range(20):
            op = rng.choice([rng.randrange(0, 30), rng.getrandbits(32)])
            payload = bytes(rng.getrandbits(8)
                            for _ in range(rng.randrange(0, 64)))
            if rng.random() < 0.5:
                payload = rng.choice([b"/", b"/local/", b"@", b"a"]) + \
                    payload.replace(b"\0", b"/") + b"\0"
            raw.send(pack(op, rng.getrandbits(32), rng.choice(
                [0, 0, 1, rng.getrandbits(32)]), payload))
        if rng.random() < 0.3:
            raw.send(os.urandom(rng.randrange(1, 40)))
        raw.close()
    assert_serving(xenstore.socket_path)


def test_many_concurrent_connections(xenstore):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with connect(xenstore.socket_path) as c:
                for i in range(10):
                    c.write(b"/conc/%d/%d" % (n, i), b"%d" % i)
                assert len(c.list(b"/conc/%d" % n)) == 10
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    with connect(xenstore.socket_path) as c:
        assert len(c.list(b"/conc")) == 40


def test_client_that_never_reads_does_not_block_others(xenstore):
    hog = Raw(xenstore.socket_path)
    hog.send(pack(Op.WRITE, 1, 0, b"/hog\0" + b"x" * 4000))
    hog.send(b"".join(pack(Op.READ, i, 0, b"/hog\0") for i in range(300)))
    assert_serving(xenstore.socket_path)
    hog.close()


# --- ways to run it ---------------------------------------------------------------

def test_default_pyxs_client_finds_the_fixture_socket(xenstore):
    with Client() as c:
        assert c.read(b"/local/domain/0/name") == b"Domain-0"


def test_runs_as_a_subprocess_with_guest_sockets():
    with tempfile.TemporaryDirectory(prefix="xs-") as tmp:
        path = os.path.join(tmp, "socket")
        with run_subprocess(path, domains=[GUEST]):
            with connect(path) as c:
                c.write(b"/sub", b"process")
                c.set_perms(b"/sub", [b"n0", b"r5"])
            with connect(f"{path}.dom{GUEST}") as g:
                assert g.read(b"/sub") == b"process"
                with pytest.raises(PyXSError) as e:
                    g.write(b"/sub", b"no")
                assert errnum(e) == errno.EACCES
        assert not os.path.exists(path)


def test_in_process_context_manager_cleans_up():
    with tempfile.TemporaryDirectory(prefix="xs-") as tmp:
        path = os.path.join(tmp, "socket")
        with XenstoreStandin(path, domains=[3]) as xs:
            assert_serving(xs.socket_path)
            assert xs.domain_socket(3) == f"{path}.dom3"
        assert os.listdir(tmp) == []
