"""Protected VBDs: `xentap attach --protect` and `protect=` in xentap_disks make
the daemon mirror the VBD to a real appliance process (CurveZMQ on
loopback), publish the mirror's figures in xenstore, and keep the stream
whole across a daemon restart."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid

import pytest
from click.testing import CliRunner

from tests.conftest import XentapEnv
from tests.test_mirror_e2e import Appliance
from xentap import keys
from xentap import xs_keys as K
from xentap.stream_state import read_stream_state

GUEST = 4
MiB = 1 << 20


class ProtectEnv(XentapEnv):
    """XentapEnv whose daemon has dom0's keys and a state dir."""

    def __init__(self, standin, tmp, appliance: Appliance, **daemon_opts):
        super().__init__(standin, tmp)
        self.appliance = appliance
        self.state_dir = tmp / "state"
        self.daemon_opts = daemon_opts

    def start_daemon(self) -> None:
        import xentap.daemon as D

        real = D.Daemon
        opts = {**dict(keys_dir=str(self.appliance.keys), state_dir=str(self.state_dir),
                       drain_timeout=5.0), **self.daemon_opts}

        class Configured(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **{**kw, **opts})

        D.Daemon = Configured
        try:
            super().start_daemon()
        finally:
            D.Daemon = real

    def status(self) -> dict:
        r = self.cli("status", "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    def mirror(self, vdev: str = "xvda") -> dict | None:
        for v in self.status()["vbds"]:
            if v["vdev"] == vdev:
                return v["mirror"]
        return None

    def wait_drained(self, vdev: str = "xvda", timeout: float = 60.0) -> dict:
        def done():
            m = self.mirror(vdev)
            return m if (m and m["state"] == "connected" and m["pending"] == 0
                         and m["acked_seq"] == m["next_seq"] - 1
                         and m["ring_bytes"] == 0 and m["spill_bytes"] == 0
                         and m["acked_seq"] > 0) else None
        return self.wait_for(done, timeout, "the mirror to drain")


@pytest.fixture
def appliance(tmp_path):
    a = Appliance(tmp_path).start()
    yield a
    a.stop()
    assert not a.rejections()


@pytest.fixture
def env(xenstore, tmp_path, appliance):
    e = ProtectEnv(xenstore, tmp_path, appliance)
    try:
        e.start_daemon()
        yield e
    finally:
        e.close()


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def journal(appliance: Appliance, *args: str):
    from xentap.cli_journal import journal as journal_cli
    return CliRunner().invoke(journal_cli, [*args, "--data-dir", str(appliance.dir)])


def announce_appliance(env: ProtectEnv, domid: int, name: str) -> None:
    """An appliance domain as `appliance-grant` makes it, announcing the
    local appliance's endpoint and key as the appliance domain would."""
    env.guest(domid)
    r = env.cli("appliance-grant", str(domid))
    assert r.exit_code == 0, r.output
    env.xs.write(f"{K.appliance_path(domid)}/{K.AP_NAME}", name)
    st = K.appliance_status_path(domid)
    pub = keys.load_public(keys.paths(env.appliance.keys, keys.APPLIANCE_NAME)[0]).decode()
    env.xs.write(f"{st}/{K.APS_STATE}", "ready")
    env.xs.write(f"{st}/{K.APS_ENDPOINT}", env.appliance.endpoint)
    env.xs.write(f"{st}/{K.APS_PUBLIC_KEY}", pub)


def protect_args(env: ProtectEnv, how: str) -> list[str]:
    if how == "endpoint":
        return ["--protect", env.appliance.endpoint, "--protect-key",
                str(keys.paths(env.appliance.keys, keys.APPLIANCE_NAME)[0])]
    announce_appliance(env, 9, "cdp-appliance")
    return ["--protect", "cdp-appliance"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["endpoint", "appliance-domain"])
def test_attach_protect_mirrors_every_guest_write_and_status_shows_the_figures(env, how, caplog):
    env.guest(GUEST)
    img = env.image(size=32 * MiB)
    r = env.cli("attach", str(GUEST), img, "xvda", *protect_args(env, how))
    assert r.exit_code == 0, r.output
    assert "protected by" in r.output
    be = K.backend_path(GUEST, K.vdev_to_devid("xvda"))
    vbd_uuid = uuid.UUID(env.xs.read(f"{be}/{K.BE_VBD_UUID}"))
    f = env.front(GUEST, "xvda", max_queues=2, max_ring_order=1)
    res = f.run(block_size=4096, queue_depth=4, read_pct=30, max_ios=3000, flush_every=64,
                verify=True, size=16 * MiB)
    assert res["errors"] == 0 and res["verify_failures"] == 0
    res = f.run(block_size=65536, queue_depth=2, max_ios=200, verify=True, seed=2)
    assert res["errors"] == 0

    m = env.wait_drained()
    assert m["overflows"] == 0 and m["gaps"] == 0 and m["error"] == ""
    assert m["appliance"] == env.appliance.endpoint
    assert m["acked_seq"] == m["next_seq"] - 1 >= 3000 * 0.7
    assert digest(env.appliance.replica(vbd_uuid)) == digest(open(img, "rb").read())

    # The human table has the mirror's columns; list shows the appliance.
    r = env.cli("status")
    assert "Mirror acked/written" in r.output and f"connected {m['acked_seq']}/" in r.output
    r = env.cli("list")
    assert r.output.splitlines()[1].split()[-1] == (env.appliance.endpoint if how == "endpoint"
                                                    else "cdp-appliance")

    # The journal holds every write in order, and its latest point is the disk.
    r = journal(env.appliance, "verify", str(vbd_uuid), "--json")
    assert r.exit_code == 0, r.output
    out = env.tmp / "restored.img"
    r = journal(env.appliance, "restore", str(vbd_uuid), "--seq", str(m["acked_seq"]),
                "--to", str(out))
    assert r.exit_code == 0, r.output
    assert digest(out.read_bytes()) == digest(open(img, "rb").read())

    # Detach: the mirror stops, drained (the log says up to which seq); the
    # stream never goes on (a new attach is a new stream), so its spill dir goes.
    spill = env.state_dir / "spill" / str(vbd_uuid)
    assert spill.is_dir()
    with caplog.at_level(logging.INFO, logger="xentap"):
        r = env.cli("detach", str(GUEST), "xvda")
        assert r.exit_code == 0, r.output
        env.wait_for(lambda: not spill.exists(), 20, "the drained stream's spill dir to go")
    assert f"mirror stopped, all acknowledged (acked seq {m['acked_seq']}," in caplog.text


@pytest.mark.slow
def test_a_disk_with_data_is_protected_whole_and_status_shows_its_initial_sync(env):
    """An existing disk (24 MiB of data) attached with --protect: status shows
    the initial sync while the appliance cannot take it (paused), then the
    replica and the journal's latest point equal the whole disk."""
    env.guest(GUEST)
    img = env.image(size=32 * MiB)
    with open(img, "r+b") as fh:
        fh.write(os.urandom(24 * MiB))
    env.appliance.pause()
    try:
        r = env.cli("attach", str(GUEST), img, "xvda", *protect_args(env, "endpoint"))
        assert r.exit_code == 0, r.output
        m = env.wait_for(lambda: (m := env.mirror()) and m["state"] == "disconnected" and m,
                         20, "the mirror to start")
        assert m["sync"] == {"kind": "initial", "done": 0, "total": 24}, m
        assert "(initial sync 0/24 MiB, 0%)" in env.cli("status").output
    finally:
        env.appliance.resume()
    be = K.backend_path(GUEST, K.vdev_to_devid("xvda"))
    vbd_uuid = uuid.UUID(env.xs.read(f"{be}/{K.BE_VBD_UUID}"))
    f = env.front(GUEST, "xvda")
    assert f.run(block_size=4096, queue_depth=4, max_ios=500, size=32 * MiB)["errors"] == 0
    m = env.wait_drained()
    assert m["sync"]["kind"] == "" and m["gaps"] == 0 and m["overflows"] == 0, m
    disk = open(img, "rb").read()
    assert digest(env.appliance.replica(vbd_uuid)) == digest(disk)
    out = env.tmp / "restored.img"
    r = journal(env.appliance, "restore", str(vbd_uuid), "--seq", str(m["acked_seq"]),
                "--to", str(out))
    assert r.exit_code == 0, r.output
    assert digest(out.read_bytes()) == digest(disk)


@pytest.mark.slow
def test_daemon_restart_mid_stream_loses_nothing(env):
    """The daemon stops mid-I/O with the appliance away (the drain spills),
    a new daemon takes the stream over from the spill log, the appliance
    comes back: replica and journal equal the disk, no GAP."""
    env.guest(GUEST)
    img = env.image(size=32 * MiB)
    r = env.cli("attach", str(GUEST), img, "xvda", *protect_args(env, "endpoint"))
    assert r.exit_code == 0, r.output
    be = K.backend_path(GUEST, K.vdev_to_devid("xvda"))
    vbd_uuid = uuid.UUID(env.xs.read(f"{be}/{K.BE_VBD_UUID}"))
    f = env.front(GUEST, "xvda")
    t, out = f.run_in_thread(block_size=4096, queue_depth=2, seconds=6.0, verify=True,
                             size=16 * MiB, flush_every=32)
    env.wait_for(lambda: (env.mirror() or {}).get("acked_seq", 0) > 200, 20, "mirroring")
    env.appliance.kill()                    # the appliance goes away...
    time.sleep(0.5)
    env.stop_daemon()                       # ...and the daemon stops mid-stream
    spill = env.state_dir / "spill" / str(vbd_uuid)
    state = read_stream_state(str(spill))
    assert state["last_seq"] > 200
    assert any(p.name.startswith("spill-") for p in spill.iterdir())
    time.sleep(0.5)                         # the guest queues meanwhile
    env.start_daemon()
    env.wait_for(lambda: (env.mirror() or {}).get("state") == "disconnected", 20,
                 "the new daemon's drainer")
    time.sleep(1.0)
    env.appliance.start()
    t.join(60)
    res = out.get_nowait()
    assert not isinstance(res, BaseException), res
    assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 0
    m = env.wait_drained(timeout=90)
    assert m["gaps"] == 0 and m["overflows"] == 0, m
    assert m["acked_seq"] > state["last_seq"], (m, state)
    assert digest(env.appliance.replica(vbd_uuid)) == digest(open(img, "rb").read())
    r = journal(env.appliance, "verify", str(vbd_uuid), "--json")
    assert r.exit_code == 0, r.output


# --- bad values: one line each, nothing written -----------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--protect", "tcp://127.0.0.1"], "is not tcp://HOST:PORT or ipc:///PATH"),
    (["--protect", "tcp://127.0.0.1:70000"], "port 70000 out of range"),
    (["--protect", "no such!"], "neither an appliance domain's name"),
    (["--protect", "ghost"], "no appliance domain named 'ghost'"),
    (["--protect", "tcp://127.0.0.1:7788", "--protect-key", "/nonexistent.key"],
     "/nonexistent.key"),
    (["--protect-key", "/etc/hostname"], "--protect-key goes with --protect"),
    (["--protect", "tcp://127.0.0.1:7788", "--mode", "r"], "read-only disk"),
])
def test_bad_protect_values_are_one_line_and_attach_nothing(xentap_env, args, message):
    env = xentap_env
    env.guest(GUEST)
    img = env.image()
    r = env.cli("attach", str(GUEST), img, "xvda", *args)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("xentap: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert not env.xs.exists(K.backend_path(GUEST, K.vdev_to_devid("xvda")))


def test_protect_key_that_is_not_a_key_is_one_line(xentap_env, tmp_path):
    env = xentap_env
    env.guest(GUEST)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    r = env.cli("attach", str(GUEST), env.image(), "xvda", "--protect",
                "tcp://127.0.0.1:7788", "--protect-key", str(bad))
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert str(bad) in r.stderr


def test_unprotected_vbds_publish_no_mirror_keys(xentap_env):
    env = xentap_env
    env.guest(GUEST)
    env.attach(GUEST, env.image(), "xvda")
    f = env.front(GUEST, "xvda")
    f.run(block_size=4096, queue_depth=1, max_ios=10)
    st = K.status_path(GUEST, K.vdev_to_devid("xvda"))
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_WRITES}") not in (None, "0"), what="status")
    assert all(env.xs.read(f"{st}/{k}") is None for k in K.ST_MIRROR_KEYS)
    r = env.cli("status", "--json")
    assert json.loads(r.output)["vbds"][0]["mirror"] is None


def test_appliance_not_announced_yet_is_a_mirror_error_not_a_guest_error(xentap_env):
    """A protected VBD whose appliance domain has not published its endpoint:
    the guest is served, status says why the mirror waits."""
    env = xentap_env
    env.guest(GUEST)
    env.guest(9)
    assert env.cli("appliance-grant", "9").exit_code == 0
    name = env.xs.read(f"{K.appliance_path(9)}/{K.AP_NAME}")
    r = env.cli("attach", str(GUEST), env.image(), "xvda", "--protect", name)
    assert r.exit_code == 0, r.output
    f = env.front(GUEST, "xvda")
    res = f.run(block_size=4096, queue_depth=1, max_ios=50, verify=True)
    assert res["errors"] == 0
    st = K.status_path(GUEST, K.vdev_to_devid("xvda"))
    err = env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_MIRROR_ERROR}"), what="mirror error")
    assert "no endpoint or public key published yet" in err
    assert env.xs.read(f"{st}/{K.ST_MIRROR}") == "error"
    r = env.cli("status")
    assert f"mirror to {name}: appliance {name} (domain 9)" in r.output


# --- xentap_disks -----------------------------------------------------------------------

def test_xentap_disks_protect_is_parsed_and_checked():
    from xentap.xl_config import parse_disk_spec

    d = parse_disk_spec("vdev=xvda, protect=tcp://10.0.0.2:7788, protect-key=ap.key, "
                        "target=/srv/a,b.img")
    assert (d.protect, d.protect_key, d.target) == ("tcp://10.0.0.2:7788", "ap.key",
                                                    "/srv/a,b.img")
    assert parse_disk_spec("vdev=xvdb, target=/x, protect=cdp").protect == "cdp"
    for spec, msg in [("vdev=xvda, target=/x, protect=tcp://h", "tcp://HOST:PORT"),
                      ("vdev=xvda, protect-key=k, target=/x", "protect-key= without protect="),
                      ("vdev=xvda, access=ro, protect=cdp, target=/x", "read-only"),
                      ("vdev=xvda, protect=, target=/x", "protect= is empty")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            parse_disk_spec(spec)


def test_create_dry_run_shows_protection_and_checks_the_key_file(tmp_path):
    from xentap.cli_vbd import cli

    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 4096)
    cfg = tmp_path / "g.cfg"
    cfg.write_text(f"name = 'g'\nxentap_disks = [ 'vdev=xvda, protect=tcp://127.0.0.1:7788, "
                   f"protect-key=missing.key, target={img}' ]\n")
    r = CliRunner().invoke(cli, ["create", "-n", str(cfg)])
    assert r.exit_code == 1 and "protect-key" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    keys.create(tmp_path, keys.APPLIANCE_NAME)
    cfg.write_text(f"name = 'g'\nxentap_disks = [ 'vdev=xvda, protect=tcp://127.0.0.1:7788, "
                   f"protect-key=appliance.key, target={img}' ]\n")
    r = CliRunner().invoke(cli, ["create", "-n", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "protected by tcp://127.0.0.1:7788" in r.output


def test_daemon_bad_sizes_are_one_line():
    from xentap.cli_vbd import cli

    for args, msg in [(["--mirror-ring", "3M"], "power of two"),
                      (["--spill-limit", "lots"], "not a size")]:
        r = CliRunner().invoke(cli, ["daemon", "--transport", "sim", "--sim-dir", "/", *args])
        assert r.exit_code == 1 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_stream_state_survives_and_seqs_go_on(tmp_path):
    """Unit: a Drainer with seq_base numbers the shim's records after it."""
    from tests.test_shim import Guest
    from xentap import wire
    from xentap.drainer import Drainer, VbdIdentity

    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * (4 * MiB))
    g = Guest(tmp_path, image)
    try:
        g.vbd.disconnect()
        g.vbd.mirror_enable(1 * MiB)
        g.vbd.connect(g.transport, g.front.params)
        g.front.run(block_size=4096, queue_depth=1, max_ios=5)
        ident = VbdIdentity(uuid.uuid4(), 3, 51712, "xvda", 4 * MiB)
        d = Drainer(g.vbd, ident, "tcp://127.0.0.1:1", image_path=str(image),
                    spill_dir=str(tmp_path / "sp"), spill_limit=8 * MiB, seq_base=1000,
                    epoch=2_000_000_000)
        assert d.epoch == 2_000_000_000 and d.acked_seq == 1000
        b = g.vbd.mirror_peek()
        frame, last, _, _ = d._frame(b)
        msg = wire.decode(frame)
        assert [r.seq for r in msg.records] == list(range(1001, 1001 + b.count))
        assert last == 1000 + b.count
        assert not d.close(drain_timeout=0.2)        # nobody listens: all spilled
        st = read_stream_state(str(tmp_path / "sp"))
        assert st == {"last_seq": 1005, "epoch": 2_000_000_000, "clean": True}
    finally:
        g.close()


# --- the daemon killed: the next one resyncs after a GAP ---------------------------------

@pytest.mark.slow
def test_daemon_sigkilled_mid_stream_the_next_one_resyncs_after_a_gap(tmp_path, appliance):
    """SIGKILL takes the ring's unacknowledged writes with it: the restarted
    daemon's drainer finds the stream unclean and, after the appliance's high
    water, sends GAP(RESTART) and the whole disk; the replica equals the disk."""
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import pyxs

    from tests.blkfront_test import TestBlkfront, make_domain, make_image
    from tests.test_daemon_restart import daemon_running, wait_for
    from tests.xenstore_standin import run_subprocess
    from xentap import shim
    from xentap.xenbus import Xs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    short = tempfile.mkdtemp(prefix="xs-")
    sock = f"{short}/socket"
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    state_dir = tmp_path / "state"
    log = open(tmp_path / "daemon.log", "w+")
    procs: list[subprocess.Popen] = []

    def start():
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "xentap.cli_vbd", "daemon", "--transport", "sim",
             "--sim-dir", str(sim_dir), "--xenstore-socket", sock, "--keys-dir",
             str(appliance.keys), "--state-dir", str(state_dir)],
            cwd=root, stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: daemon_running(xs, procs[-1].pid), what="daemon")

    def mirror():
        r = CliRunner().invoke(cli, ["status", "--json", "--xenstore-socket", sock])
        return json.loads(r.output)["vbds"][0]["mirror"] or {}

    from xentap.cli_vbd import cli
    try:
        with run_subprocess(sock, domains=[GUEST]), contextlib.ExitStack() as stack:
            stack.callback(lambda: [(p.kill(), p.wait()) for p in procs if p.poll() is None])
            dom0 = pyxs.Client(unix_socket_path=sock)
            dom0.connect()
            stack.callback(dom0.close)
            xs = Xs(dom0)
            make_domain(dom0, GUEST)
            dom = shim.SimDomain(sim_dir / str(GUEST), domid=GUEST, nr_pages=1 << 15)
            stack.callback(dom.close)
            start()
            img = make_image(tmp_path / "disk.img", 16 * MiB)
            key = str(keys.paths(appliance.keys, keys.APPLIANCE_NAME)[0])
            r = CliRunner().invoke(cli, ["attach", str(GUEST), img, "xvda", "--protect",
                                         appliance.endpoint, "--protect-key", key,
                                         "--xenstore-socket", sock])
            assert r.exit_code == 0, r.output
            vbd_uuid = xs.read(f"{K.backend_path(GUEST, 51712)}/{K.BE_VBD_UUID}")
            f = TestBlkfront(f"{sock}.dom{GUEST}", str(sim_dir / str(GUEST)), GUEST, 51712)
            stack.callback(f.shutdown)
            stack.callback(f.stop_io)
            f.connect()
            t, out = f.run_in_thread(block_size=4096, queue_depth=4, seconds=5.0, verify=True,
                                     size=8 * MiB, flush_every=16)
            wait_for(lambda: mirror().get("acked_seq", 0) > 300, 30, what="mirroring")
            appliance.pause()                   # unacknowledged writes pile up in the ring
            time.sleep(0.5)
            procs[-1].kill()                    # ...and die with the daemon
            procs[-1].wait()
            appliance.resume()
            before = mirror()["acked_seq"]
            start()
            t.join(60)
            res = out.get_nowait()
            assert not isinstance(res, BaseException), res
            assert res["errors"] == 0 and res["verify_failures"] == 0
            seen = []

            def drained():
                m = mirror()
                seen[:] = [m]
                return (m.get("state") == "connected" and m["pending"] == 0
                        and m["ring_bytes"] == 0 and m["acked_seq"] == m["next_seq"] - 1 and m)
            try:
                m = wait_for(drained, 90, what="drained")
            except AssertionError:
                raise AssertionError(f"not drained: {seen}") from None
            assert m["acked_seq"] > before + 16 + 1     # GAP, 16 RESYNCs, RESYNC_END, writes
            assert m["gaps"] >= 1 and m["error"] == "", m      # the restart's GAP, said
            assert digest(appliance.replica(vbd_uuid)) == digest(open(img, "rb").read())
            r = journal(appliance, "verify", vbd_uuid, "--json")
            assert r.exit_code == 0, r.output
            procs[-1].send_signal(signal.SIGTERM)
            assert procs[-1].wait(timeout=30) == 0
            st = read_stream_state(str(state_dir / "spill" / vbd_uuid))
            assert st["clean"] and st["last_seq"] == m["acked_seq"]
    finally:
        log.seek(0)
        print(log.read())
        log.close()
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
def test_guest_end_stops_the_mirror_with_every_write_acknowledged(env):
    """The guest finishes and its domain dies: the VBD closes, the mirror
    drains and stops; status keeps its final figures; the stream is clean."""
    from tests.blkfront_test import release_domain

    env.guest(GUEST)
    img = env.image(size=16 * MiB)
    r = env.cli("attach", str(GUEST), img, "xvda", *protect_args(env, "endpoint"))
    assert r.exit_code == 0, r.output
    vbd_uuid = env.xs.read(f"{K.backend_path(GUEST, 51712)}/{K.BE_VBD_UUID}")
    f = env.front(GUEST, "xvda", follow_backend=False)
    res = f.run(block_size=4096, queue_depth=4, max_ios=2000, flush_every=32, verify=True)
    assert res["errors"] == 0
    f.stop_io()
    release_domain(env.dom0, GUEST)
    be = K.backend_path(GUEST, 51712)
    env.wait_for(lambda: env.xs.read(f"{be}/{K.STATE}") == "6", what="Closed")
    m = env.wait_for(lambda: (m := env.mirror()) and m["state"] == "stopped" and m, 30,
                     "the mirror to stop")
    assert m["pending"] == 0 and m["spill_bytes"] == 0 and m["error"] == "", m
    assert m["acked_seq"] == m["next_seq"] - 1 > 0 and m["overflows"] == 0 == m["gaps"]
    assert digest(env.appliance.replica(vbd_uuid)) == digest(open(img, "rb").read())
    st = read_stream_state(str(env.state_dir / "spill" / vbd_uuid))
    assert st["clean"] and st["last_seq"] == m["acked_seq"]
