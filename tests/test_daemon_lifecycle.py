"""The daemon's life with running guests: attach, I/O, detach, re-attach,
status, two guests at once, a guest that dies, a daemon that restarts."""
from __future__ import annotations

import json
import time

import pytest

from xentap import shim
from xentap import xs_keys as K
from xentap.xs_keys import XenbusState

from tests.blkfront_test import release_domain

A, B = 5, 7


def test_attach_io_detach_reattach(xentap_env):
    env = xentap_env
    env.guest(A)
    img = env.image()
    devid = env.attach(A, img, "xvdb")
    be, fe = K.backend_path(A, devid), K.frontend_path(A, devid)
    assert env.xs.get_perms(be) == ["n0", f"r{A}"]
    assert env.xs.get_perms(fe) == [f"n{A}", "r0"]
    # the keys take their node's permissions (written after it, libxl's way)
    assert env.xs.get_perms(f"{be}/{K.BE_PARAMS}") == ["n0", f"r{A}"]
    assert env.xs.get_perms(f"{fe}/{K.STATE}") == [f"n{A}", "r0"]
    assert env.xs.read(f"{fe}/{K.FE_BACKEND}") == be
    assert env.xs.read(f"{be}/{K.BE_FRONTEND}") == fe
    f = env.front(A, "xvdb")
    res = f.run(block_size=4096, queue_depth=16, read_pct=0, max_ios=500, verify=True,
                sequential=True, size=2 << 20)
    assert res["errors"] == 0

    r = env.cli("detach", str(A), "xvdb")
    assert r.exit_code == 0, r.output
    assert f.closed_by_backend.is_set()          # the guest saw Closing and let go
    assert not env.xs.exists(be) and not env.xs.exists(fe)
    env.wait_for(lambda: (A, devid) not in env.daemon.devices, what="device dropped")
    with shim.Vbd(img):                           # the daemon let go of the image
        pass
    f.shutdown()

    env.attach(A, img, "xvdb")
    f2 = env.front(A, "xvdb")
    # What the first session wrote is still there: read it back, verified.
    res = f2.run(block_size=4096, queue_depth=16, read_pct=100, max_ios=512, verify=False,
                 sequential=True, size=2 << 20)
    assert res["errors"] == 0
    res = f2.run(block_size=4096, queue_depth=16, read_pct=50, max_ios=500, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0


def test_detach_of_a_disk_never_connected(xentap_env):
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvdc")
    env.wait_for(lambda: env.xs.read(f"{K.backend_path(A, devid)}/{K.STATE}") == "2",
                 what="InitWait")
    r = env.cli("detach", str(A), "xvdc", "--timeout", "5")
    assert r.exit_code == 0, r.output
    assert not env.xs.exists(K.backend_path(A, devid))


def test_detach_times_out_when_the_guest_holds_on(xentap_env):
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvda")
    f = env.front(A, "xvda", follow_backend=False)     # a guest that ignores Closing
    r = env.cli("detach", str(A), "xvda", "--timeout", "0.5")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "did not close" in r.stderr and "Traceback" not in r.output
    assert env.xs.exists(K.backend_path(A, devid))
    r = env.cli("detach", str(A), "xvda", "--timeout", "0.5", "--force")
    assert r.exit_code == 0, r.output
    assert not env.xs.exists(K.backend_path(A, devid))
    env.wait_for(lambda: (A, devid) not in env.daemon.devices, what="device dropped")
    f.shutdown()


def test_readonly_disk(xentap_env):
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvdd", mode="r")
    f = env.front(A, "xvdd")
    assert f.readonly
    assert env.xs.read(f"{K.backend_path(A, devid)}/{K.BE_INFO}") == str(K.VDISK_READONLY)
    res = f.run(block_size=4096, queue_depth=4, read_pct=100, max_ios=100)
    assert res["errors"] == 0
    res = f.run(block_size=4096, queue_depth=4, read_pct=0, max_ios=10)
    assert res["errors"] == 10


def test_status_is_published_and_listed(xentap_env):
    env = xentap_env
    env.guest(A)
    img = env.image()
    devid = env.attach(A, img, "xvda")
    f = env.front(A, "xvda")
    res = f.run(block_size=4096, queue_depth=8, read_pct=50, max_ios=400)
    st = K.status_path(A, devid)
    env.wait_for(lambda: env.xs.read(f"{st}/{K.ST_REQUESTS}") == "400", what="status")
    assert env.xs.read(f"{st}/{K.ST_STATE}") == "Connected"
    assert int(env.xs.read(f"{st}/{K.ST_BYTES}")) == res["bytes_read"] + res["bytes_written"]
    assert env.xs.read(f"{st}/{K.ST_ERRORS}") == "0"
    assert env.xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}") == "running"
    assert env.xs.get_perms(K.XENTAP_ROOT) == ["n0"]

    r = env.cli("status", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["daemon"]["state"] == "running"
    (row,) = doc["vbds"]
    assert (row["domain"], row["vdev"], row["target"], row["state"]) == (A, "xvda", img, "Connected")
    assert row["requests"] == 400 and row["errors"] == 0
    r = env.cli("status")
    assert "xvda" in r.stdout and "Connected" in r.stdout and "400" in r.stdout
    r = env.cli("list")
    assert r.exit_code == 0 and img in r.stdout
    assert json.loads(env.cli("list", "--json").stdout)[0]["mode"] == "w"


def test_two_domains_at_once(xentap_env):
    env = xentap_env
    env.guest(A)
    env.guest(B)
    env.attach(A, env.image("a.img"), "xvda")
    env.attach(B, env.image("b.img"), "xvda")
    env.attach(B, env.image("b2.img"), "xvdb")
    fa = env.front(A, "xvda", max_queues=2)
    fb = env.front(B, "xvda", max_ring_order=1)
    fb2 = env.front(B, "xvdb")
    runs = [f.run_in_thread(block_size=4096, queue_depth=16, read_pct=50, seconds=1.0,
                            verify=True) for f in (fa, fb, fb2)]
    for t, out in runs:
        t.join(20)
        res = out.get_nowait()
        assert not isinstance(res, BaseException), res
        assert res["errors"] == 0 and res["verify_failures"] == 0 and res["ios"] > 100


@pytest.mark.slow
def test_guest_dying_mid_io_releases_only_its_disk(xentap_env):
    env = xentap_env
    env.guest(A)
    env.guest(B)
    img_a = env.image("a.img")
    dev_a = env.attach(A, img_a, "xvda")
    env.attach(B, env.image("b.img"), "xvda")
    fa = env.front(A, "xvda", follow_backend=False)
    fb = env.front(B, "xvda")
    ta, out_a = fa.run_in_thread(block_size=4096, queue_depth=16, read_pct=50, seconds=30)
    tb, out_b = fb.run_in_thread(block_size=4096, queue_depth=16, read_pct=50, seconds=2.0,
                                 verify=True)
    time.sleep(0.5)
    release_domain(env.dom0, A)
    be_a = K.backend_path(A, dev_a)
    env.wait_for(lambda: env.xs.read(f"{be_a}/{K.STATE}") == "6", what="Closed")
    with shim.Vbd(img_a):           # the image is free again
        pass
    tb.join(20)
    res = out_b.get_nowait()
    assert not isinstance(res, BaseException), res
    assert res["errors"] == 0 and res["verify_failures"] == 0
    assert fb.backend_state() == XenbusState.CONNECTED
    fa.stop_io()                    # the dead guest's run ends (unanswered requests time out)
    ta.join(30)


def test_daemon_stop_and_start_reconnects_without_errors(xentap_env):
    env = xentap_env
    env.guest(A)
    env.attach(A, env.image(), "xvda")
    f = env.front(A, "xvda", max_queues=2, max_ring_order=1)
    t, out = f.run_in_thread(block_size=4096, queue_depth=16, read_pct=50, seconds=2.0,
                             verify=True)
    time.sleep(0.5)
    env.stop_daemon()               # SIGTERM's path: rings let go, states left Connected
    assert f.backend_state() == XenbusState.CONNECTED
    assert env.xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}") == "stopped"
    time.sleep(0.3)
    env.start_daemon()
    t.join(20)
    res = out.get_nowait()
    assert not isinstance(res, BaseException), res
    assert res["errors"] == 0 and res["verify_failures"] == 0


# --- the command line ---------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["attach", "9", "{img}", "xvda"], "unknown domain 9"),
    (["attach", "nosuch", "{img}", "xvda"], "unknown domain 'nosuch'"),
    (["attach", "5", "{tmp}/missing.img", "xvda"], "does not exist"),
    (["attach", "5", "{tmp}", "xvda"], "neither a file"),
    (["attach", "5", "{img}", "sda"], "unknown virtual device 'sda'"),
    (["attach", "5", "{img}", "0"], "out of range"),
    (["attach", "5", "{tmp}/caf\u00e9.img", "xvda"], "must be printable ASCII"),
    (["attach", "5", "{tmp}/a\x7fb.img", "xvda"], "must be printable ASCII"),
    (["attach", "5", "{img}", "xvda", "--mode", "x"], "Invalid value"),
    (["attach", "0", "{img}", "xvda"], "domain 0 cannot"),
    (["detach", "5", "xvdz"], "has no xentap disk xvdz"),
    (["detach", "5", "hda"], "unknown virtual device"),
])
def test_cli_bad_input_is_one_line(xentap_env, args, words):
    env = xentap_env
    env.guest(A)
    img = env.image()
    r = env.cli(*[a.format(img=img, tmp=env.tmp) for a in args])
    assert r.exit_code != 0
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.output
    if "Invalid value" not in words:     # click's own usage errors take 3 lines
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("xentap: "), r.stderr


def test_cli_vdev_in_use_and_guest_by_name(xentap_env):
    env = xentap_env
    env.guest(A)
    env.attach(A, env.image("one.img"), "xvda")
    r = env.cli("attach", "guest5", env.image("two.img"), "51712")
    assert r.exit_code == 1 and "xvda of domain 5 is in use" in r.stderr
    r = env.cli("attach", "guest5", env.image("two.img"), "xvdb")
    assert r.exit_code == 0, r.output


def test_cli_without_xenstored_is_one_line(tmp_path):
    from click.testing import CliRunner

    from xentap.cli_vbd import cli

    r = CliRunner().invoke(cli, ["list", "--xenstore-socket", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.startswith("xentap: cannot reach xenstored")
    assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(cli, ["daemon", "--transport", "sim"])
    assert r.exit_code == 1 and "needs --sim-dir" in r.stderr


def test_the_daemon_serves_images_with_direct_io_where_they_take_it(xentap_env, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="xentap")
    env = xentap_env
    env.guest(A)
    devid = env.attach(A, env.image(), "xvdb")
    f = env.front(A, "xvdb")
    assert f.run(block_size=4096, queue_depth=8, max_ios=200, verify=True)["errors"] == 0
    dev = env.daemon.devices[(A, devid)]
    assert dev.vbd.info()["direct"] == 1            # an image on ext4 takes O_DIRECT
    assert dev.serve.poll_us == shim.DEFAULT_POLL_US
    assert "O_DIRECT" in caplog.text
    f.shutdown()


@pytest.mark.parametrize("args,message", [
    (["--poll-us", "-1"], "--poll-us"),
    (["--direct", "sometimes"], "--direct"),
])
def test_daemon_serving_options_are_checked(args, message):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "xentap.cli", "daemon", "--transport", "sim", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
