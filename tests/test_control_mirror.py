"""The control plane with protected VBDs whose appliance misbehaves: a slow
or absent appliance of one VBD never stalls the others' handshakes,
attaches and detaches; a detached VBD's drained spill dir goes; a VBD
protected by an appliance domain follows it to a new address; the lag
shown is the age of the oldest write the appliance has not acknowledged."""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
import uuid

import pytest

from tests.blkfront_test import release_domain
from tests.test_mirror_e2e import Appliance, free_port
from tests.test_protect import ProtectEnv, announce_appliance
from xentap import keys, wire
from xentap import protect as P
from xentap import xs_keys as K
from xentap.stream_state import read_stream_state
from xentap.spill import SpillLog

MiB = 1 << 20
SLOW, OTHER, THIRD = 4, 5, 6


@pytest.fixture
def keys_only(tmp_path):
    """Dom0's and an appliance's keys, and no appliance running."""
    return Appliance(tmp_path)


def make_env(xenstore, tmp_path, appliance, **opts) -> ProtectEnv:
    e = ProtectEnv(xenstore, tmp_path, appliance, **opts)
    e.start_daemon()
    return e


def dead_endpoint_args(env: ProtectEnv) -> list[str]:
    """--protect to an endpoint nobody listens on: the appliance is away."""
    return ["--protect", f"tcp://127.0.0.1:{free_port()}", "--protect-key",
            str(keys.paths(env.appliance.keys, keys.APPLIANCE_NAME)[0])]


def vbd_uuid(env: ProtectEnv, domid: int, vdev: str = "xvda") -> str:
    return env.xs.read(f"{K.backend_path(domid, K.vdev_to_devid(vdev))}/{K.BE_VBD_UUID}")


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --- 1. one appliance's absence stalls nobody else ---------------------------------------

DRAIN = 10.0


def test_an_absent_appliance_stalls_no_other_vbd(xenstore, tmp_path, keys_only, caplog):
    """VBD A is protected by an appliance that is away, with writes it never
    acknowledged: when A's guest dies and A is detached, A's mirror drains
    for up to --drain-timeout (here 10 s) in the background.  Meanwhile
    every other VBD's handshake, I/O, attach and detach go on at once; A's
    image, held until its mirror stopped, can be attached again right
    after; A's spill dir, holding what was never acknowledged, is kept."""
    env = make_env(xenstore, tmp_path, keys_only, drain_timeout=DRAIN)
    try:
        caplog.set_level(logging.INFO, logger="xentap")
        for d in (SLOW, OTHER, THIRD):
            env.guest(d)
        img_a = env.image("a.img")
        r = env.cli("attach", str(SLOW), img_a, "xvda", *dead_endpoint_args(env))
        assert r.exit_code == 0, r.output
        spill = env.state_dir / "spill" / vbd_uuid(env, SLOW)
        fa = env.front(SLOW, "xvda", follow_backend=False)
        res = fa.run(block_size=4096, queue_depth=4, max_ios=300, verify=True)
        assert res["errors"] == 0
        env.attach(OTHER, env.image("b.img"), "xvda")
        fb = env.front(OTHER, "xvda")
        io_b, out_b = fb.run_in_thread(block_size=4096, queue_depth=8, read_pct=50,
                                       seconds=3.0, verify=True)

        # A's guest dies: A closes at once and its mirror drains in the background.
        t0 = time.monotonic()
        fa.stop_io()
        release_domain(env.dom0, SLOW)
        be_a = K.backend_path(SLOW, 51712)
        env.wait_for(lambda: env.xs.read(f"{be_a}/{K.STATE}") == "6", 3, "A Closed")
        st_a = K.status_path(SLOW, 51712)
        env.wait_for(lambda: env.xs.read(f"{st_a}/{K.ST_MIRROR}") == "draining", 3,
                     "A's mirror draining")
        # Meanwhile: a new VBD of another domain does the whole handshake and
        # I/O, B keeps going, and A is detached, all well within A's drain.
        env.attach(THIRD, env.image("c.img"), "xvda")
        fc = env.front(THIRD, "xvda", connect=False)
        fc.connect(timeout=3)
        res = fc.run(block_size=4096, queue_depth=4, max_ios=200, verify=True)
        assert res["errors"] == 0 and res["verify_failures"] == 0
        r = env.cli("detach", str(SLOW), "xvda", "--timeout", "3")
        assert r.exit_code == 0, r.output
        r = env.cli("detach", str(THIRD), "xvda", "--timeout", "3")
        assert r.exit_code == 0, r.output
        assert time.monotonic() - t0 < DRAIN - 1, "the control plane waited for A's mirror"
        assert env.xs.read(f"{K.status_path(OTHER, 51712)}/{K.ST_STATE}") == "Connected"

        # A's image is still held by its draining mirror: attached again, the
        # new VBD waits for it, then connects (no "busy" failure).
        env.attach(THIRD, img_a, "xvdb")
        fc2 = env.front(THIRD, "xvdb", connect=False)
        fc2.connect(timeout=DRAIN + 10)
        res = fc2.run(block_size=4096, queue_depth=4, max_ios=50, verify=True)
        assert res["errors"] == 0
        assert time.monotonic() - t0 > DRAIN - 1      # it did wait for the drain
        io_b.join(20)
        res = out_b.get_nowait()
        assert not isinstance(res, BaseException), res
        assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 100

        # What A's appliance never acknowledged stays in A's spill dir.
        assert P.spill_segments(str(spill)) and read_stream_state(str(spill))["clean"]
        assert f"keeping {spill}" in caplog.text
    finally:
        env.close()


def test_a_mirror_slow_to_start_stalls_nobody(xenstore, tmp_path, keys_only, monkeypatch):
    """A drainer that takes long to start (it reads a spill log of a long
    outage) delays neither its own guest's handshake (the ring keeps the
    writes meanwhile) nor any other VBD's."""
    real = P.Mirror.start

    def slow_start(self, vbd, image):
        time.sleep(DRAIN)
        real(self, vbd, image)

    monkeypatch.setattr(P.Mirror, "start", slow_start)
    env = make_env(xenstore, tmp_path, keys_only)
    try:
        env.guest(SLOW)
        env.guest(OTHER)
        t0 = time.monotonic()
        r = env.cli("attach", str(SLOW), env.image("a.img"), "xvda", *dead_endpoint_args(env))
        assert r.exit_code == 0, r.output
        fa = env.front(SLOW, "xvda", connect=False)
        fa.connect(timeout=3)
        assert fa.run(block_size=4096, queue_depth=4, max_ios=100, verify=True)["errors"] == 0
        env.attach(OTHER, env.image("b.img"), "xvda")
        fb = env.front(OTHER, "xvda", connect=False)
        fb.connect(timeout=3)
        assert fb.run(block_size=4096, queue_depth=4, max_ios=100, verify=True)["errors"] == 0
        assert time.monotonic() - t0 < DRAIN - 2
        env.wait_for(lambda: (env.mirror() or {}).get("state") == "starting", 1, "starting")
        m = env.wait_for(lambda: (m := env.mirror()) and m["state"] == "disconnected" and m,
                         DRAIN + 10, "the drainer to run")
        assert m["next_seq"] == 101 and m["error"] == "", m      # the ring kept every write
    finally:
        env.close()


# --- 2. the spill dirs of detached VBDs ---------------------------------------------------

def test_daemon_start_removes_drained_spill_dirs_of_detached_vbds(xenstore, tmp_path,
                                                                  keys_only, caplog):
    """Spill dirs left by VBDs detached while no daemon ran: a drained one
    goes, one still holding unacknowledged writes (or a stream that ended
    uncleanly) stays, and one an attached VBD names stays."""
    caplog.set_level(logging.INFO, logger="xentap")
    root = tmp_path / "state" / "spill"
    drained, held, unclean, attached = (root / str(uuid.uuid4()) for _ in range(4))
    for d, clean in ((drained, True), (held, True), (unclean, False), (attached, True)):
        d.mkdir(parents=True)
        (d / "stream").write_text(json.dumps({"last_seq": 7, "epoch": 1, "clean": clean}))
    (held / "spill-00000000000000000008.log").write_bytes(b"x" * 100)
    (root / "not-a-uuid").mkdir()
    env = ProtectEnv(xenstore, tmp_path, keys_only)
    try:
        env.guest(SLOW)
        r = env.cli("attach", str(SLOW), env.image(), "xvda", *dead_endpoint_args(env))
        assert r.exit_code == 0, r.output
        env.xs.write(f"{K.backend_path(SLOW, 51712)}/{K.BE_VBD_UUID}", attached.name)
        env.start_daemon()
        assert not drained.exists()
        assert held.is_dir() and unclean.is_dir() and attached.is_dir()
        assert (root / "not-a-uuid").is_dir()
        assert f"keeping {held}: 100 bytes" in caplog.text
        assert f"keeping {unclean}" in caplog.text and "ended uncleanly" in caplog.text
    finally:
        env.close()


@pytest.mark.slow
def test_detach_removes_the_spill_dir_of_a_drained_stream_and_keeps_the_others(
        xenstore, tmp_path, appliance_proc):
    """Two protected VBDs: the one whose appliance acknowledged everything
    loses its spill dir at detach, also when its guest had ended long
    before; the one protected by an absent appliance keeps it."""
    env = make_env(xenstore, tmp_path, appliance_proc, drain_timeout=1.0)
    try:
        env.guest(SLOW)
        env.guest(OTHER)
        key = str(keys.paths(appliance_proc.keys, keys.APPLIANCE_NAME)[0])
        r = env.cli("attach", str(OTHER), env.image("b.img"), "xvda", "--protect",
                    appliance_proc.endpoint, "--protect-key", key)
        assert r.exit_code == 0, r.output
        r = env.cli("attach", str(SLOW), env.image("a.img"), "xvda", *dead_endpoint_args(env))
        assert r.exit_code == 0, r.output
        good = env.state_dir / "spill" / vbd_uuid(env, OTHER)
        bad = env.state_dir / "spill" / vbd_uuid(env, SLOW)
        fb = env.front(OTHER, "xvda", follow_backend=False)
        fa = env.front(SLOW, "xvda")
        assert fb.run(block_size=4096, queue_depth=4, max_ios=300, verify=True)["errors"] == 0
        assert fa.run(block_size=4096, queue_depth=4, max_ios=300, verify=True)["errors"] == 0
        st_b = K.status_path(OTHER, 51712)
        env.wait_for(lambda: env.xs.read(f"{st_b}/{K.ST_MIRROR_PENDING}") == "0", 30,
                     "B drained")
        fb.stop_io()
        release_domain(env.dom0, OTHER)          # B's guest ends; B stays attached
        env.wait_for(lambda: env.xs.read(f"{st_b}/{K.ST_MIRROR}") == "stopped", 10,
                     "B's mirror stopped")
        assert good.is_dir()                     # attached: the stream may still go on
        for domid in (OTHER, SLOW):
            r = env.cli("detach", str(domid), "xvda")
            assert r.exit_code == 0, r.output
        env.wait_for(lambda: not good.exists(), 10, "B's spill dir to go")
        env.wait_for(lambda: not env.daemon.drains.jobs, 10, "A's mirror to stop")
        assert bad.is_dir() and P.spill_segments(str(bad))
    finally:
        env.close()


@pytest.fixture
def appliance_proc(tmp_path):
    a = Appliance(tmp_path).start()
    yield a
    a.stop()
    assert not a.rejections()


# --- 3. following an appliance domain to its new address ----------------------------------

def start_spawned(a: Appliance) -> None:
    """Appliance.start, but a fresh process: a forked one would inherit the
    daemon's open images, and their locks with them."""
    import multiprocessing as mp

    from tests.test_mirror_e2e import _serve

    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    a.proc = ctx.Process(target=_serve, args=(a.endpoint, str(a.dir), str(a.keys),
                                              str(a.allowed), ready, str(a.log)), daemon=True)
    a.proc.start()
    assert ready.wait(60), "appliance did not start"


@pytest.mark.slow
def test_the_mirror_follows_an_appliance_domain_to_its_new_endpoint(xenstore, tmp_path,
                                                                     appliance_proc):
    """The appliance domain restarts with a new address (same journal): once
    it announces the new endpoint in xenstore the VBD's mirror sends there,
    from where the appliance's journal ends; the guest sees no error, no
    write is lost (no GAP) and the replica equals the disk."""
    first = appliance_proc
    env = make_env(xenstore, tmp_path, first)
    moved = Appliance.__new__(Appliance)
    moved.__dict__.update(first.__dict__)         # same keys, same data dir...
    moved.endpoint = f"tcp://127.0.0.1:{free_port()}"   # ...another address
    moved.proc = None
    try:
        announce_appliance(env, 9, "cdp")
        env.guest(SLOW)
        img = env.image(size=16 * MiB)
        r = env.cli("attach", str(SLOW), img, "xvda", "--protect", "cdp")
        assert r.exit_code == 0, r.output
        u = vbd_uuid(env, SLOW)
        f = env.front(SLOW, "xvda")
        # A busy guest, at a pace the appliance keeps up with (16 MB/s): unpaced,
        # 4 KiB writes at disk speed (about 90 MB/s here) outran what the drainer
        # spills and sends beside the appliance on 2 cores in about 1 run in 10
        # (ring overflow, GAP), which is bench mirror's subject, not this test's.
        t, out = f.run_in_thread(block_size=4096, queue_depth=4, seconds=6.0, verify=True,
                                 size=8 * MiB, flush_every=32, rate_iops=4000)
        env.wait_for(lambda: (env.mirror() or {}).get("acked_seq", 0) > 200, 20, "mirroring")
        first.kill()                              # the appliance domain goes down...
        time.sleep(1.0)
        start_spawned(moved)                      # ...and comes back elsewhere
        env.xs.write(f"{K.appliance_status_path(9)}/{K.APS_ENDPOINT}", moved.endpoint)
        env.wait_for(lambda: (env.mirror() or {}).get("appliance") == moved.endpoint, 10,
                     "the mirror to follow")
        t.join(60)
        res = out.get_nowait()
        assert not isinstance(res, BaseException), res
        assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 0
        m = env.wait_drained(timeout=60)
        assert m["gaps"] == 0 and m["overflows"] == 0 and m["error"] == "", m
        assert digest(moved.replica(u)) == digest(open(img, "rb").read())
    finally:
        env.close()
        moved.stop()


# --- 4. the lag: how far behind the appliance is now ---------------------------------------

@pytest.mark.slow
def test_lag_is_the_age_of_the_oldest_unacknowledged_write(xenstore, tmp_path, appliance_proc):
    """With the appliance stopped (SIGSTOP) the lag grows with the wait of the
    writes it has not acknowledged, while the acknowledgement times seen
    stay small; once it is back and has everything, the lag is 0."""
    env = make_env(xenstore, tmp_path, appliance_proc)
    try:
        env.guest(SLOW)
        key = str(keys.paths(appliance_proc.keys, keys.APPLIANCE_NAME)[0])
        r = env.cli("attach", str(SLOW), env.image(), "xvda", "--protect",
                    appliance_proc.endpoint, "--protect-key", key)
        assert r.exit_code == 0, r.output
        f = env.front(SLOW, "xvda")
        assert f.run(block_size=4096, queue_depth=4, max_ios=300)["errors"] == 0
        m = env.wait_drained()
        assert m["lag_ms"] == 0.0
        appliance_proc.pause()
        try:
            t0 = time.monotonic()
            assert f.run(block_size=4096, queue_depth=4, max_ios=100)["errors"] == 0
            time.sleep(4.0)
            m = env.wait_for(lambda: (m := env.mirror()) and m["pending"] > 0
                             and m["lag_ms"] >= 3500 and m, 5, "the lag to show the wait")
            assert m["lag_ms"] <= (time.monotonic() - t0) * 1000 + 1500, m
            assert m["ack_p99_ms"] < 1000, m
        finally:
            appliance_proc.resume()
        # The next session's first ACK covers every write (the appliance read
        # the old session's frames when it woke): the spill log is trimmed.
        m = env.wait_drained()
        assert m["pending"] == 0 and m["lag_ms"] == 0.0, m
    finally:
        env.close()


class _FakeDrainer:
    def __init__(self, spill):
        self.pending_ts: collections.deque = collections.deque()
        self.spill = spill


def _writes_frame(first_seq: int, ts: int) -> bytes:
    recs = [wire.WriteRecord(seq=first_seq + i, timestamp_ns=ts + i, sector=8 * i, length=512,
                             flags=0, data=b"\0" * 512) for i in range(2)]
    return wire.encode(wire.Writes(stream_id=1, epoch=1, first_seq=first_seq, records=recs))


def test_unacked_age_dates_the_oldest_unacknowledged_write(tmp_path):
    """Unit: the date comes from the spill log, the frames in flight or, for
    writes still in the ring, from when the seq was first seen."""
    s = 10**9
    spill = SpillLog(str(tmp_path / "sp"), 8 * MiB)
    d = _FakeDrainer(spill)
    age = P.UnackedAge()
    assert age.ms(d, acked_seq=10, next_seq=11, now_ns=100 * s) == 0.0      # nothing pending
    # Seqs 11..20 appear in the ring at 100 s: dated by when first seen.
    assert age.ms(d, 10, 21, now_ns=100 * s) == 0.0
    assert age.ms(d, 10, 21, now_ns=103 * s) == 3000.0
    assert age.ms(d, 10, 31, now_ns=104 * s) == 4000.0      # newer writes do not make it younger
    assert age.ms(d, 20, 31, now_ns=105 * s) == 1000.0      # 11..20 acked: 21.. seen at 104 s
    # A frame in flight dates its writes by their completion time.
    d.pending_ts.append((25, 90 * s))
    assert age.ms(d, 20, 31, now_ns=105 * s) == 15000.0
    d.pending_ts.popleft()
    # So does a spilled frame (written at 80 s, after acked seq 20).
    spill.append(_writes_frame(21, 80 * s), 21, 22)
    assert age.ms(d, 20, 31, now_ns=105 * s) == 25000.0
    assert age.ms(d, 30, 31, now_ns=106 * s) == 0.0
    spill.close()


def test_status_shows_both_lag_figures(xentap_env):
    """`status --json` has the oldest write's age (lag_ms) and the p99 of the
    acknowledgement times (ack_p99_ms); the table heads its column so."""
    env = xentap_env
    st = K.status_path(SLOW, 51712)
    env.guest(SLOW)
    r = env.cli("attach", str(SLOW), env.image(), "xvda", "--protect", "tcp://127.0.0.1:1")
    assert r.exit_code == 0, r.output
    env.daemon.stop()                 # nothing else publishes: the figures stay as written
    env._thread.join(15)
    env.daemon = None
    for k, v in ((K.ST_MIRROR, "connected"), (K.ST_MIRROR_PENDING, "3"),
                 (K.ST_MIRROR_LAG_MS, "2500.0"), (K.ST_MIRROR_ACK_P99_MS, "12.5")):
        env.xs.write(f"{st}/{k}", v)
    m = json.loads(env.cli("status", "--json").output)["vbds"][0]["mirror"]
    assert (m["lag_ms"], m["ack_p99_ms"], m["pending"]) == (2500.0, 12.5, 3)
    out = env.cli("status").output
    assert "Lag: pending (oldest)" in out and "3 (2500 ms)" in out
