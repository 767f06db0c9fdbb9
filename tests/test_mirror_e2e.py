"""Mirroring end to end: shim → mirror ring → drainer → CurveZMQ → appliance
receiver → replica, with the appliance killed, paused and cut off."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import threading
import time
import uuid

import pytest

from tests.test_shim import Guest, assert_clean
from xentap import keys
from xentap.drainer import Drainer, VbdIdentity

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(endpoint, data_dir, keys_dir, allowed_dir, ready, log_path=None):
    import logging
    from appliance_domu.receiver import Receiver
    if log_path:        # what the receiver warns of, for the test to read
        h = logging.FileHandler(log_path)
        h.setLevel(logging.WARNING)
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger().addHandler(h)
    curve = keys.CurveServer.from_dir(keys_dir, allowed_dir)
    rx = Receiver(endpoint, data_dir, curve=curve)
    rx.bind()
    ready.set()
    rx.run()


class Appliance:
    """The receiver in its own process, restartable on the same port and data."""

    def __init__(self, tmp_path, port=None):
        self.dir = tmp_path / "appliance"
        self.keys = tmp_path / "keys"
        self.allowed = tmp_path / "allowed"
        for d in (self.keys, self.allowed):
            d.mkdir(exist_ok=True)
        keys.create(self.keys, keys.APPLIANCE_NAME)
        keys.create(self.keys, keys.DOM0_NAME)
        shutil.copy(keys.paths(self.keys, keys.DOM0_NAME)[0], self.allowed)
        self.endpoint = f"tcp://127.0.0.1:{port or free_port()}"
        self.log = tmp_path / "appliance-warnings.log"
        self.proc = None

    def start(self):
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(self.endpoint, str(self.dir), str(self.keys),
                                                     str(self.allowed), ready, str(self.log)),
                                daemon=True)
        self.proc.start()
        assert ready.wait(20), "appliance did not start"
        return self

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc and self.proc.is_alive():
            self.kill()

    def client(self, dom0_name=keys.DOM0_NAME, keys_dir=None):
        k = keys_dir or self.keys
        c = keys.CurveClient.from_files(keys.paths(k, dom0_name)[1],
                                        keys.paths(self.keys, keys.APPLIANCE_NAME)[0])
        return lambda s: keys.configure_client(s, c)

    def rejections(self) -> list[str]:
        """The frames the receiver rejected as protocol violations (a session
        ended): a correct drainer sends none, whatever the appliance and the
        link do to it."""
        if not self.log.exists():
            return []
        return [ln for ln in self.log.read_text().splitlines() if "frame rejected" in ln]

    def replica(self, vbd_uuid) -> bytes | None:
        p = self.dir / str(vbd_uuid) / "replica.img"
        return p.read_bytes() if p.exists() else None


class Mirrored:
    """A guest whose VBD is mirrored to `appliance` through a drainer."""

    def __init__(self, tmp_path, appliance, *, ring=64 * MiB, spill_limit=256 * MiB,
                 disk=32 * MiB, socket_setup=None, endpoint=None, prefill=(), vbd_uuid=None,
                 **kw):
        """`prefill`: (offset, bytes) the disk holds before it is mirrored."""
        self.image = tmp_path / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(disk)
            for off, data in prefill:
                f.seek(off)
                f.write(data)
        self.g = Guest(tmp_path, self.image, **kw)
        self.g.vbd.disconnect()
        self.g.vbd.mirror_enable(ring)
        self.g.vbd.connect(self.g.transport, self.g.front.params)
        self.ident = VbdIdentity(vbd_uuid=vbd_uuid or uuid.uuid4(), domid=3, devid=51712, vdev="xvda",
                                 size_bytes=disk)
        self.drainer = Drainer(self.g.vbd, self.ident, endpoint or appliance.endpoint, image_path=str(self.image),
                               spill_dir=str(tmp_path / "spill"), spill_limit=spill_limit,
                               socket_setup=socket_setup or appliance.client()).start()

    def run(self, **kw):
        kw.setdefault("verify", True)
        res = self.g.front.run(**kw)
        assert_clean(res)
        return res

    def close(self):
        self.drainer.stop()
        self.g.close()


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def appliance(tmp_path):
    a = Appliance(tmp_path).start()
    yield a
    a.stop()
    assert not a.rejections()


def assert_replica_equals_source(m: Mirrored, appliance: Appliance, timeout=60):
    assert m.drainer.wait_acked(timeout), m.drainer.stats()
    assert digest(appliance.replica(m.ident.vbd_uuid)) == digest(m.image.read_bytes())


@pytest.mark.slow
def test_replica_equals_source_after_random_workloads(tmp_path, appliance):
    m = Mirrored(tmp_path, appliance, queues=2, order=2)
    try:
        # A guest at a pace the appliance keeps up with on 2 cores (at full
        # speed the ring overflows and resyncs: the last test covers that).
        # Each run starts drained: whether a Python drainer outruns a guest
        # writing to the page cache at disk speed depends on what else the 2
        # cores run (test_a_step_past_the_spill_threshold_spills_first checks
        # the drainer's choice itself).
        m.run(block_size=4096, queue_depth=4, read_pct=30, max_ios=20000, flush_every=64, size=16 * MiB)
        assert m.drainer.wait_acked(60), m.drainer.stats()
        m.run(block_size=65536, queue_depth=8, discard_pct=10, max_ios=1000, seed=2)
        assert m.drainer.wait_acked(60), m.drainer.stats()
        m.run(block_size=MiB, queue_depth=1, max_ios=32, seed=3)     # half a ring, at disk speed
        assert_replica_equals_source(m, appliance)
        st = m.drainer.stats()
        assert st["overflows"] == 0 and st["gaps"] == 0
    finally:
        m.close()


@pytest.mark.slow
def test_zeroes_cross_the_link_as_records_without_data(tmp_path, appliance):
    """A guest zeroing 24 MiB (as mkfs.xfs does its log) over data written
    before: the appliance's replica gets the zeroes, the link carries headers."""
    m = Mirrored(tmp_path, appliance)
    try:
        m.run(block_size=65536, queue_depth=4, max_ios=512, seed=7)     # 32 MiB of data
        assert m.drainer.wait_acked(60), m.drainer.stats()
        sent = m.drainer.stats()["bytes_sent"]
        m.g.front.replay([("write", s * 2048, bytes(MiB)) for s in range(24)]
                         + [("flush", 0, b"")], queue_depth=8)
        assert_replica_equals_source(m, appliance)
        assert m.drainer.stats()["bytes_sent"] - sent < 64 << 10
        assert m.image.read_bytes()[:24 * MiB] == bytes(24 * MiB)
    finally:
        m.close()


@pytest.mark.slow
def test_a_step_past_the_spill_threshold_spills_first(tmp_path, appliance):
    """With the ring past SPILL_AT, a step moves the oldest records to the
    spill log before it sends, and sends one frame at most: sending first
    (up to 64 MiB a step) let a disk-speed guest overflow the ring."""
    from xentap import drainer as dr
    m = Mirrored(tmp_path, appliance)
    try:
        d = m.drainer
        d._stop.set()                   # the test turns the loop by hand
        d._thread.join(10)
        d._stop.clear()
        d._sock = None                  # the loop closed it on its way out
        d._connect()
        deadline = time.monotonic() + 20
        while not d.in_session and time.monotonic() < deadline:
            d._poll(0.05)
        assert d.in_session
        m.run(block_size=MiB, queue_depth=8, max_ios=40, seed=6)   # 40 MiB, nothing drained
        used = m.g.vbd.mirror_stats()["used_bytes"]
        assert used > dr.SPILL_AT * d.ring_size + dr.STEP_BYTES
        frames = d.frames_sent
        assert d._step()
        assert d.spill.size >= dr.STEP_BYTES
        assert m.g.vbd.mirror_stats()["used_bytes"] <= used - dr.STEP_BYTES
        assert d.frames_sent - frames <= 1
        deadline = time.monotonic() + 60           # and the stream gets there in order
        while not d.wait_acked(0.001) and time.monotonic() < deadline:
            d._step()
            d._poll(0.01)
        assert_replica_equals_source(m, appliance)
        assert d.stats()["overflows"] == 0
    finally:
        m.close()


@pytest.mark.slow
def test_appliance_killed_and_restarted_mid_workload_loses_nothing(tmp_path, appliance):
    m = Mirrored(tmp_path, appliance, spill_limit=1 << 30)
    spilled = 0
    try:
        for round_ in range(3):
            # A steady guest, paced: unpaced, a QD1 guest writes to the page
            # cache faster than the appliance applies 4 KiB records (150 MB/s
            # here), and on a faster host it filled even the 1 GiB spill log
            # within the 4.5 s (34 overflows on CI): that is the spill-overflow
            # test's case, not this one.  Away, everything goes to the spill log.
            t = threading.Thread(target=m.run, kwargs=dict(
                block_size=4096, queue_depth=1, seconds=1.5, size=16 * MiB, seed=round_ + 1,
                rate_iops=8000))
            t.start()
            time.sleep(0.5)
            appliance.kill()
            time.sleep(0.3)
            spilled = max(spilled, m.drainer.spill.size)
            appliance.start()
            t.join()
        assert_replica_equals_source(m, appliance)
        st = m.drainer.stats()
        assert spilled > 0
        assert st["gaps"] == 0 and st["overflows"] == 0     # the spill log kept every write
        assert st["sessions"] >= 2
    finally:
        m.close()


@pytest.mark.slow
def test_burst_larger_than_the_ring_with_the_appliance_paused_keeps_every_write(tmp_path, appliance):
    m = Mirrored(tmp_path, appliance)       # the default 64 MiB ring
    try:
        m.run(block_size=4096, queue_depth=4, max_ios=100)
        assert m.drainer.wait_acked(30)
        appliance.pause()
        # 96 MiB, half again the ring, from one guest queue of small writes, at
        # 32 MB/s: at disk speed (100-200 MB/s here) the guest outran the
        # drainer's spilling on 2 cores shared with other work, and the ring
        # overflowed in 1 of 6 runs beside the Xen suite (see the README).
        m.run(block_size=8192, queue_depth=1, max_ios=12288, size=32 * MiB, seed=4,
              rate_iops=4000)
        st = m.drainer.stats()
        assert st["spill_bytes"] > 32 * MiB, st
        appliance.resume()
        assert_replica_equals_source(m, appliance)
        st = m.drainer.stats()
        assert st["gaps"] == 0 and st["overflows"] == 0
    finally:
        m.close()


@pytest.mark.slow
def test_ring_and_spill_overflow_gives_a_gap_then_a_resync(tmp_path, appliance):
    m = Mirrored(tmp_path, appliance, ring=1 * MiB, spill_limit=2 * MiB)
    try:
        appliance.kill()
        m.run(block_size=65536, queue_depth=8, max_ios=2048, size=32 * MiB, seed=5)
        st = m.drainer.stats()
        assert st["overflows"] > 0
        appliance.start()
        assert_replica_equals_source(m, appliance, timeout=120)
        st = m.drainer.stats()
        assert st["gaps"] >= 1 and st["resyncs"] >= 1 and st["dirty_chunks"] == 0
    finally:
        m.close()


@pytest.mark.slow
def test_wrong_curve_key_is_refused_and_nothing_is_written(tmp_path, appliance):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    keys.create(stranger, keys.DOM0_NAME)       # not in the appliance's allowed keys
    m = Mirrored(tmp_path, appliance, socket_setup=appliance.client(keys_dir=stranger))
    try:
        m.run(block_size=4096, queue_depth=4, max_ios=200)
        time.sleep(2)
        assert m.drainer.stats()["sessions"] == 0
        assert m.drainer.acked_seq == 0
        assert not (appliance.dir / str(m.ident.vbd_uuid)).exists()
    finally:
        m.close()


class Link:
    """A TCP link between dom0 and the appliance that can drop: a forwarding
    proxy on its own port.  `drop()` stops moving bytes and stops accepting
    (a black hole: nothing is refused, nothing arrives, as when a cable or a
    bridge goes); `restore()` resets what was open then (the peers' TCP
    connections would have timed out) and forwards again."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.lsock.getsockname()[1]}"
        self.up = threading.Event()
        self.up.set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import selectors
        sel = selectors.DefaultSelector()
        while not self.done:
            self.up.wait(0.1)
            if not self.up.is_set():
                continue
            sel.close()
            sel = selectors.DefaultSelector()
            sel.register(self.lsock, selectors.EVENT_READ)
            with self.lock:
                for a, b in self.pairs:
                    sel.register(a, selectors.EVENT_READ, b)
                    sel.register(b, selectors.EVENT_READ, a)
            for key, _ in sel.select(0.05):
                if not self.up.is_set():
                    break
                if key.fileobj is self.lsock:
                    c, _ = self.lsock.accept()
                    try:
                        s = socket.create_connection(self.target, timeout=2)
                    except OSError:
                        c.close()
                        continue
                    with self.lock:
                        self.pairs.append((c, s))
                    continue
                try:
                    data = key.fileobj.recv(1 << 16)
                    if data:
                        key.data.sendall(data)
                        continue
                except OSError:
                    pass
                self._close_pair(key.fileobj)
        sel.close()

    def _close_pair(self, sock):
        with self.lock:
            for p in [p for p in self.pairs if sock in p]:
                self.pairs.remove(p)
                for s in p:
                    s.close()

    def drop(self):
        self.up.clear()

    def restore(self):
        with self.lock:
            old, self.pairs = self.pairs, []
        for p in old:
            for s in p:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
                s.close()
        self.up.set()

    def close(self):
        self.done = True
        self.up.set()
        self.thread.join(5)
        self.restore()
        self.lsock.close()


@pytest.mark.slow
def test_network_link_drop_loses_nothing(tmp_path, appliance):
    link = Link(appliance.endpoint)
    m = Mirrored(tmp_path, appliance, endpoint=link.endpoint, spill_limit=1 << 30)
    try:
        m.run(block_size=4096, queue_depth=4, max_ios=200)
        assert m.drainer.wait_acked(30)
        for round_ in range(2):
            t = threading.Thread(target=m.run, kwargs=dict(
                block_size=4096, queue_depth=1, seconds=1.5, size=16 * MiB, seed=round_ + 7))
            t.start()
            time.sleep(0.3)
            link.drop()
            time.sleep(4.5)     # the guest goes on; the drainer keeps what it cannot send
            t.join()
            link.restore()
            # the next drop only once this link has its session (on a loaded
            # machine the Curve handshake and HELLO can take longer than the
            # next round's 0.3 s, and both rounds then share one session)
            deadline = time.monotonic() + 30
            while m.drainer.stats()["sessions"] < round_ + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert_replica_equals_source(m, appliance)
        st = m.drainer.stats()
        assert st["gaps"] == 0 and st["overflows"] == 0
        assert st["sessions"] >= 3, st      # one session per link
    finally:
        m.close()
        link.close()
