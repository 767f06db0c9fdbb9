"""The daemon as the separate process it is in dom0: SIGKILLed and restarted
while a guest does I/O, the guest sees no error; SIGTERM stops it cleanly."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import pyxs
from click.testing import CliRunner

from xentap import shim
from xentap import xs_keys as K
from xentap.cli_vbd import cli
from xentap.xenbus import Xs
from xentap.xs_keys import XenbusState

from tests.blkfront_test import TestBlkfront, make_domain, make_image
from tests.xenstore_standin import run_subprocess

GUEST = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_daemon(sock: str, sim_dir: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xentap.cli_vbd", "daemon", "--transport", "sim",
         "--sim-dir", sim_dir, "--xenstore-socket", sock],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def daemon_running(xs: Xs, pid: int) -> bool:
    return (xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_PID}") == str(pid)
            and xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}") == "running")


@pytest.mark.slow
@pytest.mark.parametrize("queue_depth", [1, 16])
def test_sigkill_and_restart_mid_io_the_guest_sees_no_error(tmp_path, queue_depth):
    short = tempfile.mkdtemp(prefix="xs-")
    sock = f"{short}/socket"
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    log = open(tmp_path / "daemon.log", "w+")
    procs: list[subprocess.Popen] = []
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
            procs.append(start_daemon(sock, str(sim_dir), log))
            wait_for(lambda: daemon_running(xs, procs[-1].pid), what="daemon")

            img = make_image(tmp_path / "disk.img", 32 << 20)
            r = CliRunner().invoke(cli, ["attach", str(GUEST), img, "xvda",
                                         "--xenstore-socket", sock])
            assert r.exit_code == 0, r.output
            devid = K.vdev_to_devid("xvda")
            f = TestBlkfront(f"{sock}.dom{GUEST}", str(sim_dir / str(GUEST)), GUEST, devid,
                             max_queues=2, max_ring_order=1)
            stack.callback(f.shutdown)
            stack.callback(f.stop_io)
            f.connect()
            t, out = f.run_in_thread(block_size=4096, queue_depth=queue_depth, read_pct=50,
                                     seconds=4.0, verify=True)
            st = K.status_path(GUEST, devid)
            wait_for(lambda: int(xs.read(f"{st}/{K.ST_REQUESTS}") or 0) > 0, what="I/O")

            procs[-1].kill()                       # mid-I/O, no goodbye
            procs[-1].wait()
            assert f.backend_state() == XenbusState.CONNECTED
            time.sleep(0.5)                        # the guest keeps queueing meanwhile
            procs.append(start_daemon(sock, str(sim_dir), log))
            wait_for(lambda: daemon_running(xs, procs[-1].pid), what="restarted daemon")
            # The new daemon reconnected and serves: its counters start again.
            wait_for(lambda: int(xs.read(f"{st}/{K.ST_REQUESTS}") or 0) > 0
                     and xs.read(f"{st}/{K.ST_SHIM}") == "connected", what="reconnect")

            t.join(30)
            res = out.get_nowait()
            assert not isinstance(res, BaseException), res
            assert res["errors"] == 0 and res["verify_failures"] == 0
            assert res["ios"] > 0

            procs[-1].send_signal(signal.SIGTERM)   # clean stop
            assert procs[-1].wait(timeout=10) == 0
            assert xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}") == "stopped"
            assert f.backend_state() == XenbusState.CONNECTED   # for the next daemon
    finally:
        log.seek(0)
        print(log.read())
        log.close()
        shutil.rmtree(short, ignore_errors=True)


def test_daemon_without_xen_is_one_line():
    r = CliRunner().invoke(cli, ["daemon", "--transport", "xen"])
    if r.exit_code == 0:
        pytest.skip("this machine has Xen")
    assert r.exit_code == 1 and r.stderr.startswith("xentap: ")
    assert r.stderr.count("\n") == 1, r.stderr


def test_daemon_exits_with_one_line_when_xenstored_goes_away(tmp_path):
    short = tempfile.mkdtemp(prefix="xs-")
    sock = f"{short}/socket"
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    try:
        with run_subprocess(sock) as standin:
            proc = subprocess.Popen(
                [sys.executable, "-m", "xentap.cli_vbd", "daemon", "--transport", "sim",
                 "--sim-dir", str(sim_dir), "--xenstore-socket", sock],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                with pyxs.Client(unix_socket_path=sock) as dom0:
                    wait_for(lambda: daemon_running(Xs(dom0), proc.pid), what="daemon")
            finally:
                standin.kill()
                standin.wait()
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 1
        assert err.splitlines()[-1] == "xentap: lost the connection to xenstored", err
        assert "Traceback" not in err
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_xenstore_requests_fail_instead_of_hanging_when_xenstored_dies():
    from xentap.xenbus import XenstoreError

    short = tempfile.mkdtemp(prefix="xs-")
    try:
        with run_subprocess(f"{short}/socket") as standin:
            xs = Xs.open(f"{short}/socket")
            assert xs.read("/local/domain/0/name") == "Domain-0"
            standin.send_signal(signal.SIGSTOP)     # a request in flight, then the end
            t0 = time.monotonic()
            import threading
            killer = threading.Timer(0.3, lambda: (standin.kill(), standin.wait()))
            killer.start()
            with pytest.raises(XenstoreError):
                xs.read("/local/domain/0/name")
            assert time.monotonic() - t0 < 5
            assert not xs.connected
            with pytest.raises(XenstoreError):
                xs.write("/local/domain/0/x", "1")
            killer.join()
            xs.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)
