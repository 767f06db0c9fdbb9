"""The status and coordination subtree: dom0 only, except an appliance
domain's own status; counters that outlive the guest and the daemon; the
indirect-request counter; what an appliance writes is validated."""
from __future__ import annotations

import errno
import json
import threading
import time

from pyxs import Client
from pyxs.exceptions import PyXSError

from xentap import xs_keys as K
from xentap.appliance_node import read_appliance_status
from xentap.xs_keys import XenbusState

from tests.blkfront_test import make_domain, release_domain

A, B, APP = 5, 7, 11
MiB = 1 << 20


def _as(env, domid: int) -> Client:
    c = Client(unix_socket_path=env.standin.domain_socket(domid))
    c.connect()
    return c


def _errno(fn) -> int:
    try:
        fn()
    except PyXSError as e:
        return e.args[0]
    return 0


def _status(env) -> dict:
    r = env.cli("status", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_the_subtree_is_dom0s_and_a_guest_can_neither_read_nor_write_it(xentap_env):
    env = xentap_env
    for path in (K.XENTAP_ROOT, K.DAEMON_PATH, K.STATUS_ROOT, K.APPLIANCE_ROOT):
        assert env.xs.get_perms(path) == ["n0"], path
    env.guest(A)
    devid = env.attach(A, env.image(), "xvda")
    env.front(A, "xvda")
    st = K.status_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_STATE}") == "Connected", what="status")
    with _as(env, A) as guest:
        assert _errno(lambda: guest.read(f"{st}/{K.ST_REQUESTS}".encode())) == errno.EACCES
        assert _errno(lambda: guest.write(f"{st}/{K.ST_ERRORS}".encode(), b"0")) == errno.EACCES
        assert _errno(lambda: guest.write(f"{K.DAEMON_PATH}/state".encode(), b"x")) == errno.EACCES
        assert _errno(lambda: guest.write(f"{K.APPLIANCE_ROOT}/{A}/status/state".encode(),
                                          b"ready")) == errno.EACCES


def test_an_appliance_writes_its_own_status_and_nothing_else(xentap_env):
    env = xentap_env
    env.guest(A)
    make_domain(env.dom0, APP, "appliance1")
    r = env.cli("appliance-grant", "appliance1")
    assert r.exit_code == 0, r.output
    node, status = K.appliance_path(APP), K.appliance_status_path(APP)
    assert env.xs.get_perms(node) == ["n0", f"r{APP}"]
    assert env.xs.get_perms(status) == ["n0", f"b{APP}"]
    key = "rq>Q.wRg!Ej}0k*oOS@y0-OtA+4d8ucO=VI0W-d0"
    with _as(env, APP) as app:
        assert app.read(f"{node}/{K.AP_NAME}".encode()) == b"appliance1"
        app.write(f"{status}/{K.APS_STATE}".encode(), b"ready")
        app.write(f"{status}/{K.APS_ENDPOINT}".encode(), b"tcp://10.0.0.2:7788")
        app.write(f"{status}/{K.APS_PUBLIC_KEY}".encode(), key.encode())
        app.write(f"{status}/{K.APS_HEARTBEAT}".encode(), b"1790000000")
        app.write(f"{status}/vbd/{A}/51712/{K.APS_WINDOW_START}".encode(), b"10")
        app.write(f"{status}/vbd/{A}/51712/{K.APS_WINDOW_END}".encode(), b"99")
        app.write(f"{status}/vbd/{A}/51712/{K.APS_DATA_STATE}".encode(), b"ext4-consistent")
        # Nothing outside its status: not its name, not the VBD status, not dom0's tree.
        for path in (f"{node}/{K.AP_NAME}", f"{node}/other", f"{K.STATUS_ROOT}/{A}/x",
                     f"{K.APPLIANCE_ROOT}/{A}/status/state", f"{K.DAEMON_PATH}/state",
                     f"{K.backend_path(A, 51712)}/state"):
            assert _errno(lambda: app.write(path.encode(), b"x")) == errno.EACCES, path
    with _as(env, A) as guest:                 # another domain cannot even read it
        assert _errno(lambda: guest.read(f"{status}/{K.APS_STATE}".encode())) == errno.EACCES
    a = _status(env)["appliances"]
    assert a == [{"domain": APP, "name": "appliance1", "state": "ready",
                  "endpoint": "tcp://10.0.0.2:7788", "public_key": key, "heartbeat": 1790000000,
                  "vbds": [{"domain": A, "devid": 51712, "window_start": 10, "window_end": 99,
                            "data_state": "ext4-consistent"}],
                  "problems": []}]
    r = env.cli("status")
    assert "appliance appliance1 (domain 11): ready, tcp://10.0.0.2:7788" in r.output

    r = env.cli("appliance-revoke", str(APP))
    assert r.exit_code == 0 and not env.xs.exists(node)
    r = env.cli("appliance-revoke", str(APP))
    assert r.exit_code == 1 and "domain 11 is not an appliance" in r.output


def test_what_an_appliance_writes_is_validated(xentap_env):
    env = xentap_env
    make_domain(env.dom0, APP, "app")
    assert env.cli("appliance-grant", str(APP)).exit_code == 0
    status = K.appliance_status_path(APP)
    with _as(env, APP) as app:
        for k, v in ((K.APS_STATE, b"pwned"), (K.APS_ENDPOINT, b"tcp://x:1; rm -rf /"),
                     (K.APS_PUBLIC_KEY, b"short"), (K.APS_HEARTBEAT, b"-1"),
                     (f"vbd/{A}/51712/{K.APS_WINDOW_END}", b"9" * 30),
                     (f"vbd/{A}/51712/{K.APS_DATA_STATE}", b"<script>"),
                     ("vbd/x/y/window-start", b"1")):
            app.write(f"{status}/{k}".encode(), v)
    a = read_appliance_status(env.xs, APP)
    assert (a["state"], a["endpoint"], a["public_key"], a["heartbeat"]) == (None,) * 4
    assert a["vbds"] == [{"domain": A, "devid": 51712, "window_start": None, "window_end": None,
                          "data_state": None}]
    assert sorted(a["problems"]) == sorted([
        "bad state", "bad endpoint", "bad public-key", "bad heartbeat", "bad vbd entry",
        f"bad window-end of {A}/51712", f"bad data-state of {A}/51712"])
    r = env.cli("status")
    assert r.exit_code == 0 and "ignored: bad state" in r.output


def test_the_daemon_drops_the_node_of_a_dead_appliance(xentap_env):
    env = xentap_env
    make_domain(env.dom0, APP, "app")
    assert env.cli("appliance-grant", "app").exit_code == 0
    release_domain(env.dom0, APP)
    env.wait_for(lambda: not env.xs.exists(K.appliance_path(APP)), what="appliance node gone")


def _counters(env, domid, devid) -> dict:
    st = K.status_path(domid, devid)
    return {k: env.xs.read(f"{st}/{k}") for k in (*K.ST_CUMULATIVE, K.ST_STATE, K.ST_SHIM)}


def test_final_counters_stay_after_the_guest_ends_and_across_a_daemon_restart(xentap_env):
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(size=32 * MiB), "xvda")
    f = env.front(A, "xvda")
    # 64 KiB requests need 16 segments: blkfront sends them as BLKIF_OP_INDIRECT.
    res = f.run(block_size=64 << 10, queue_depth=8, read_pct=50, max_ios=200, verify=True)
    assert res["errors"] == 0
    stats = env.daemon.devices[(A, devid)].vbd.stats()
    assert stats["reqs_indirect"] > 0
    env.wait_for(lambda: _counters(env, A, devid)[K.ST_INDIRECT] == str(stats["reqs_indirect"]),
                 what="indirect counter published")
    f.stop_io()

    release_domain(env.dom0, A)             # the guest dies
    env.dom0.delete(K.domain_path(A).encode())
    env.wait_for(lambda: _counters(env, A, devid)[K.ST_STATE] == "Closed", what="Closed")
    env.wait_for(lambda: _counters(env, A, devid)[K.ST_SHIM] == "closed", what="shim closed")
    time.sleep(0.5)                          # a few more status rounds
    final = _counters(env, A, devid)
    assert int(final[K.ST_REQUESTS]) == (stats["reqs_read"] + stats["reqs_write"]
                                         + stats["reqs_flush"] + stats["reqs_barrier"]
                                         + stats["reqs_discard"]) > 0
    assert int(final[K.ST_BYTES_WRITTEN]) == stats["bytes_written"] > 0
    assert int(final[K.ST_INDIRECT]) == stats["reqs_indirect"]
    assert final[K.ST_ERRORS] == "0"
    row = [r for r in _status(env)["vbds"] if r["domain"] == A][0]
    assert row["state"] == "Closed" and row["indirect"] == stats["reqs_indirect"]
    assert row["requests"] == int(final[K.ST_REQUESTS])

    env.stop_daemon()                        # a new daemon goes on from the published ones
    env.start_daemon()
    time.sleep(0.5)
    assert _counters(env, A, devid) == final

    r = env.cli("detach", str(A), "xvda")
    assert r.exit_code == 0, r.output
    assert not env.xs.exists(K.status_path(A, devid))


def test_counters_add_up_over_reconnections(xentap_env):
    env = xentap_env
    env.guest(B)
    devid = env.attach(B, env.image(), "xvdb")
    f = env.front(B, "xvdb")
    assert f.run(block_size=4096, queue_depth=4, read_pct=0, max_ios=100)["errors"] == 0
    f.close()                                 # the guest's blkfront lets go (Closed) ...
    env.wait_for(lambda: _counters(env, B, devid)[K.ST_SHIM] == "closed", what="released")
    first = int(_counters(env, B, devid)[K.ST_WRITES])
    assert first >= 100
    f.shutdown()
    f2 = env.front(B, "xvdb", connect=False)  # ... and starts over, as a re-probed blkfront
    f2.set_state(XenbusState.INITIALISING)
    env.wait_for(lambda: f2.backend_state() == XenbusState.INIT_WAIT, what="InitWait again")
    f2.connect()
    assert f2.run(block_size=4096, queue_depth=4, read_pct=0, max_ios=50)["errors"] == 0
    env.wait_for(lambda: int(_counters(env, B, devid)[K.ST_WRITES]) >= first + 50,
                 what="counters added up")



def test_an_idle_vbds_status_costs_one_write_a_round_and_a_busy_ones_what_changed(xentap_env):
    """Every key of every VBD every second was about forty xenstore writes per
    VBD a second, each one an event for every watcher of the subtree: an idle
    VBD now costs its sample time, a busy one the keys that changed."""
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvda")
    f = env.front(A, "xvda")
    st = K.status_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_STATE}") == "Connected", what="status")
    time.sleep(0.5)                          # the rounds that follow the handshake

    def written(seconds: float) -> dict[str, int]:
        """Status keys written in `seconds` (five rounds a second here), and how often."""
        counts: dict[str, int] = {}
        with Client(unix_socket_path=env.socket) as c, c.monitor() as m:
            m.watch(st.encode(), b"st")
            m.events.get(timeout=2)          # the watch's first event
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                try:
                    ev = m.events.get(timeout=left)
                except Exception:            # queue.Empty
                    break
                key = ev.path.decode()[len(st) + 1:]
                counts[key] = counts.get(key, 0) + 1
        return counts

    idle = written(1.0)
    assert set(idle) == {K.ST_UPDATED} and idle[K.ST_UPDATED] >= 3, idle
    result: dict = {}
    io = threading.Thread(target=lambda: result.update(f.run(
        block_size=4096, queue_depth=4, read_pct=0, max_ios=4000, rate_iops=2000)))
    io.start()
    busy = written(1.0)                      # while the guest writes
    io.join()
    assert result["errors"] == 0
    assert {K.ST_WRITES, K.ST_BYTES_WRITTEN, K.ST_REQUESTS, K.ST_UPDATED} <= set(busy), busy
    assert not {K.ST_READS, K.ST_TARGET, K.ST_STATE, K.ST_ERRORS} & set(busy), busy
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_WRITES}") == str(
        env.daemon.devices[(A, devid)].vbd.stats()["reqs_write"]), what="the last count")


def test_a_slow_status_round_does_not_hold_up_a_handshake(xentap_env, monkeypatch):
    """The status is written by its own thread over its own connection: a
    xenstored that takes seconds for a round (an emulated dom0's took 20-40 s)
    delays the status, never a guest's handshake."""
    from xentap.daemon import StatusWriter

    env = xentap_env
    rounds = []
    submit = StatusWriter.submit

    def slow_submit(self, job):
        def slow(xs):
            rounds.append(time.monotonic())
            time.sleep(3.0)
            return job(xs)
        submit(self, slow)
    monkeypatch.setattr(StatusWriter, "submit", slow_submit)
    env.wait_for(lambda: rounds, what="a slow status round")    # one under way
    env.guest(A)
    t0 = time.monotonic()
    devid = env.attach(A, env.image(), "xvda")
    env.front(A, "xvda")
    be = f"{K.backend_path(A, devid)}/{K.STATE}"
    env.wait_for(lambda: env.xs.read(be) == str(int(XenbusState.CONNECTED)), timeout=2.5,
                 what="Connected while the status round is written")
    assert time.monotonic() - t0 < 2.5
    st = K.status_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_STATE}") == "Connected", timeout=15,
                 what="the status, a round later")


def test_a_status_value_xenstore_cannot_take_is_made_ascii_not_a_failed_round(xentap_env, monkeypatch):
    """An error text with a character outside printable ASCII failed the whole
    status round (xenstore takes no such value), and every round after it."""
    from xentap.daemon import ProtectedDevice
    original = ProtectedDevice.status

    def status(self):
        st = original(self)
        st[K.ST_MIRROR_ERROR] = "caf\u00e9\nbroken"
        return st

    monkeypatch.setattr(ProtectedDevice, "status", status)
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvda")
    env.front(A, "xvda")
    st = K.status_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_STATE}") == "Connected", what="status")
    assert env.xs.read(f"{st}/{K.ST_MIRROR_ERROR}") == "caf??broken"
    before = env.xs.read(f"{st}/{K.ST_UPDATED}")
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_UPDATED}") != before, what="the next round")


def test_a_status_round_after_a_detach_does_not_bring_the_status_back(xentap_env, monkeypatch):
    """``xentap detach`` removes the backend and the status in one transaction;
    a status round written after it, before the main loop saw the backend go,
    wrote the VBD's status again (the Xen suite's xentap-hotplug found the
    status node still there after detach)."""
    from xentap.daemon import Daemon, StatusWriter

    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvda")
    env.front(A, "xvda")
    st, be, fe = K.status_path(A, devid), K.backend_path(A, devid), K.frontend_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_STATE}") == "Connected", what="status")

    held, removed, written, looked = (threading.Event() for _ in range(4))
    submit, drop = StatusWriter.submit, Daemon._drop

    def gated_submit(self, job):
        def gated(xs):
            if not held.is_set():
                held.set()
                removed.wait(10)         # the round was computed before the detach
            try:
                return job(xs)
            finally:
                written.set()
        submit(self, gated)

    def late_drop(self, dev):
        looked.wait(10)                  # the main loop sees the backend go after the round
        drop(self, dev)

    monkeypatch.setattr(StatusWriter, "submit", gated_submit)
    monkeypatch.setattr(Daemon, "_drop", late_drop)
    env.wait_for(held.is_set, what="a status round held")

    def remove(t):                       # what detach_vbd does once the backend closed
        t.rm(be)
        t.rm(fe)
        t.rm(st)
    env.xs.transaction(remove)
    removed.set()
    env.wait_for(written.is_set, what="the round written")
    there = env.xs.exists(st)
    looked.set()
    assert not there, "the status is back after the detach"
    env.wait_for(lambda: (A, devid) not in env.daemon.devices, what="the VBD dropped")
    assert not env.xs.exists(st)
