"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.xenstore_standin import XenstoreStandin


@pytest.fixture
def xenstore(monkeypatch: pytest.MonkeyPatch) -> Iterator[XenstoreStandin]:
    """A running xenstored stand-in (see tests/xenstore_standin.py).

    ``xenstore.socket_path`` is dom0's socket, also exported as
    ``XENSTORED_PATH`` so that ``pyxs.Client()`` finds it;
    ``xenstore.domain_socket(n)`` connects as guest domain n.
    """
    # A short directory: Unix socket paths are limited to 107 bytes.
    tmp = tempfile.mkdtemp(prefix="xs-")
    try:
        with XenstoreStandin(f"{tmp}/socket") as standin:
            monkeypatch.setenv("XENSTORED_PATH", standin.socket_path)
            yield standin
        assert not standin.internal_errors, standin.internal_errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- xentap control plane (tests/test_xenbus*.py, tests/test_daemon*.py) -------------

class XentapEnv:
    """A dom0 for the control-plane tests: the xenstore stand-in, the xentap
    daemon (in a thread, sim transport), sim guest domains and images.

    ``guest(domid)`` makes a domain (xenstore + SimDomain), ``attach`` /
    ``detach`` run the CLI, ``front`` gives a TestBlkfront as the guest.
    """

    def __init__(self, standin: XenstoreStandin, tmp) -> None:
        import pyxs

        from xentap.xenbus import Xs

        self.standin = standin
        self.socket = standin.socket_path
        self.tmp = tmp
        self.sim_dir = tmp / "sim"
        self.sim_dir.mkdir()
        self.dom0 = pyxs.Client(unix_socket_path=self.socket)
        self.dom0.connect()
        self.xs = Xs(self.dom0)
        self.domains: dict[int, object] = {}
        self.fronts: list = []
        self.daemon = None
        self._thread = None

    # -- the daemon --

    def start_daemon(self, serve=None) -> None:
        import threading

        from xentap.daemon import Daemon
        from xentap.xenbus import ServeOptions, sim_transports

        ready = threading.Event()
        self.daemon = Daemon(sim_transports(self.sim_dir), transport_name="sim",
                             xenstore_socket=self.socket, status_interval=0.2,
                             serve=serve or ServeOptions())
        self._errors: list[BaseException] = []

        def body() -> None:
            try:
                self.daemon.run(ready)
            except BaseException as e:  # noqa: BLE001 - reported at teardown
                self._errors.append(e)
                ready.set()

        self._thread = threading.Thread(target=body, name="xentap-daemon", daemon=True)
        self._thread.start()
        assert ready.wait(10), "daemon did not start"
        assert not self._errors, self._errors

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "daemon did not stop"
            self.daemon = None
            assert not self._errors, self._errors

    # -- guests and disks --

    def guest(self, domid: int):
        from tests.blkfront_test import make_domain
        from xentap import shim

        make_domain(self.dom0, domid)
        self.standin.domain_socket(domid)
        dom = shim.SimDomain(self.sim_dir / str(domid), domid=domid, nr_pages=1 << 15)
        self.domains[domid] = dom
        return dom

    def image(self, name: str = "disk.img", size: int = 16 << 20) -> str:
        from tests.blkfront_test import make_image

        return make_image(self.tmp / name, size)

    def cli(self, *args: str):
        from click.testing import CliRunner

        from xentap.cli_vbd import cli

        return CliRunner().invoke(cli, [*args, "--xenstore-socket", self.socket])

    def attach(self, domid: int, target: str, vdev: str, mode: str = "w") -> int:
        from xentap.xs_keys import vdev_to_devid

        r = self.cli("attach", str(domid), target, vdev, "--mode", mode)
        assert r.exit_code == 0, r.output
        return vdev_to_devid(vdev)

    def front(self, domid: int, vdev: str, connect: bool = True, **kw):
        from tests.blkfront_test import TestBlkfront
        from xentap.xs_keys import vdev_to_devid

        f = TestBlkfront(self.standin.domain_socket(domid), str(self.sim_dir / str(domid)),
                         domid, vdev_to_devid(vdev), **kw)
        self.fronts.append(f)
        if connect:
            f.connect()
        return f

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        import time

        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def close(self) -> None:
        for f in self.fronts:
            f.stop_io()
        self.stop_daemon()
        for f in self.fronts:
            try:
                f.shutdown()
            except Exception:  # noqa: BLE001 - already shut
                pass
        for dom in self.domains.values():
            dom.close()
        self.dom0.close()


@pytest.fixture
def xentap_env(xenstore: XenstoreStandin, tmp_path) -> Iterator[XentapEnv]:
    """The xenstore stand-in plus a running xentap daemon (sim transport)."""
    env = XentapEnv(xenstore, tmp_path)
    try:
        env.start_daemon()
        yield env
    finally:
        env.close()
