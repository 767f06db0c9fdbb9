"""The appliance dies after journaling writes it had not acknowledged, and
comes back on the same data: the drainer's next session must go on from what
the appliance durably holds -- nothing lost, nothing applied twice, no gap
reported, no session ended -- (issue 9: seen on Xen as a session starting at
seq 104 against a journal holding 145, SequenceGap on a HEARTBEAT, the
session ended), and libzmq must not abort the appliance when a peer goes
away while its input is stopped by the high-water mark (``Assertion failed:
!_io_error (src/stream_engine_base.cpp:310)``).

Real ZeroMQ sockets (CurveZMQ over TCP), real files, the receiver in its own
process; no Xen."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from engines.journal import Journal
from tests.test_mirror_e2e import Appliance, Mirrored, digest
from xentap import keys, wire

MiB = 1 << 20


def _serve(endpoint, data_dir, keys_dir, allowed_dir, ready, out, ack_limit):
    """The receiver; with `ack_limit`, every ACK above that seq is lost on its way
    out (the appliance journals and fdatasyncs, dom0 never hears of it), as when
    the appliance domain is destroyed between its journal's fdatasync and the
    ACK reaching dom0."""
    import logging
    from appliance_domu.receiver import Receiver

    logging.basicConfig(level=logging.INFO, force=True)
    if ack_limit is not None:
        orig = Receiver._send

        def lossy(self, sess, msg):
            if isinstance(msg, wire.Ack) and msg.acked_seq > ack_limit:
                return
            orig(self, sess, msg)
        Receiver._send = lossy
    rx = Receiver(endpoint, data_dir, curve=keys.CurveServer.from_dir(keys_dir, allowed_dir))
    rx.bind()

    def term(*_):
        rx.stop(timeout=0)
    signal.signal(signal.SIGTERM, term)
    ready.set()
    rx.run()
    out.put(dict(rx.stats))


class RestartableAppliance(Appliance):
    """test_mirror_e2e's appliance process, which reports its counters when
    stopped with SIGTERM and can lose its ACKs above a seq."""

    ack_limit = None

    def start(self):
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        self.out = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(
            self.endpoint, str(self.dir), str(self.keys), str(self.allowed), ready, self.out,
            self.ack_limit), daemon=True)
        self.proc.start()
        assert ready.wait(20), "appliance did not start"
        return self

    def terminate(self) -> dict:
        os.kill(self.proc.pid, signal.SIGTERM)
        stats = self.out.get(timeout=30)
        self.proc.join(10)
        return stats


def _journal(appliance, vbd_uuid) -> Journal:
    return Journal.open(appliance.dir / str(vbd_uuid) / "journal")


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


def test_restart_after_journaling_unacknowledged_writes(tmp_path):
    app = RestartableAppliance(tmp_path)
    app.ack_limit = 40          # the first appliance's ACKs above seq 40 never reach dom0
    app.start()
    m = Mirrored(tmp_path, app, disk=16 * MiB)
    try:
        m.run(block_size=4096, queue_depth=4, max_ios=300, flush_every=16, size=8 * MiB)
        d = m.drainer
        _wait(lambda: d.sent_seq >= d.seq_base + m.g.vbd.mirror_stats()["next_seq"] - 1,
              20, "everything sent")
        sent = d.sent_seq
        time.sleep(0.5)         # group commits: the journal holds all of it now
        assert d.acked_seq <= 40 < sent, d.stats()
        j = _journal(app, m.ident.vbd_uuid)
        held = j.durable_seq
        j.close()
        assert held == sent     # journaled beyond what dom0 saw acknowledged
        app.kill()              # the appliance domain is destroyed

        app.ack_limit = None
        app.start()             # the same data dir: the journal holds up to `held`
        sessions = d.sessions
        _wait(lambda: d.sessions > sessions, 20, "a new session")
        time.sleep(2.5)         # heartbeats go both ways in the new session
        m.run(block_size=4096, queue_depth=4, max_ios=300, flush_every=16, size=8 * MiB,
              seed=2)
        assert d.wait_acked(60), d.stats()
        st = d.stats()
        assert st["sessions"] == sessions + 1, st   # one session: never ended, never redone
        assert st["gaps"] == 0 and st["overflows"] == 0, st
        last = d.acked_seq
        assert last > held
        assert digest(app.replica(m.ident.vbd_uuid)) == digest(m.image.read_bytes())
        stats = app.terminate()
        assert stats["rejected"] == 0, stats
        assert stats["dropped_no_session"] == 0, stats
        j = _journal(app, m.ident.vbd_uuid)
        try:
            v = j.verify()
            assert v["ok"], v["problems"]
            assert (v["first_seq"], v["last_seq"]) == (0, last), v
            # every seq once: nothing the first appliance journaled was applied again
            assert v["records"] == last, v
            out = tmp_path / "restored.img"
            j.restore(out, seq=last)
            assert digest(out.read_bytes()) == digest(m.image.read_bytes())
        finally:
            j.close()
    finally:
        m.close()
        app.stop()


# ---------------------------------------------------------------------------- libzmq


_ABORT_CHILD = textwrap.dedent("""
    import os, sys, time, threading, logging
    import zmq
    from appliance_domu.receiver import Receiver
    from xentap import wire
    logging.basicConfig(level=logging.INFO, force=True)
    rx = Receiver("tcp://127.0.0.1:0", sys.argv[1], insecure=True, rcvhwm=4)
    rx.bind()
    # the loop stalls (as a HELLO's catch-up under emulation does) while dom0 floods it:
    # ZeroMQ stops reading the connection at the high-water mark
    orig = Receiver._on_message
    stalled = threading.Event()
    def slow(self, parts):
        if not stalled.is_set():
            stalled.set()
            time.sleep(float(sys.argv[2]))
        orig(self, parts)
    Receiver._on_message = slow
    print(rx.endpoint, flush=True)
    rx.start()
    sys.stdin.readline()       # the parent says when to stop
    rx.stop()
    print("stopped", rx.stats["frames"], flush=True)
""")


def test_a_peer_leaving_while_input_is_stopped_does_not_abort_the_appliance(tmp_path):
    """libzmq (4.3.x) asserts !_io_error when a ZMTP heartbeat timer fires on a
    connection whose input the high-water mark stopped and whose peer then
    went away (zeromq/libzmq#3937, #4364, #4767): the appliance's ROUTER must
    not arm ZMTP heartbeats (the stream has its own HEARTBEAT, TCP keepalive
    finds dead peers)."""
    stall = 6.0
    p = subprocess.Popen([sys.executable, "-c", _ABORT_CHILD, str(tmp_path / "data"), str(stall)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        endpoint = p.stdout.readline().strip()
        assert endpoint.startswith("tcp://"), p.stderr.read()
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = 100000
        s.connect(endpoint)
        hello = wire.encode(wire.Hello(
            stream_id=1, epoch=1, host_id=wire.uuid.UUID(int=1), vbd_uuid=wire.uuid.uuid4(),
            domid=3, devid=51712, vdev="xvda", size_bytes=MiB, logical_sector_size=512,
            physical_sector_size=512, next_seq=1, features=0))
        for _ in range(3000):      # far beyond the receiver's rcvhwm and the TCP buffers
            s.send(hello)
        time.sleep(1.0)
        s.close(0)                 # dom0 goes away (it reconnects with a new socket)
        ctx.term()
        time.sleep(stall + 1.0)    # the loop goes on; the stopped connection is torn down
        assert p.poll() is None, f"appliance died: {p.returncode}: {p.stderr.read()[-2000:]}"
        out, err = p.communicate("stop\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-2000:]
    assert "Assertion failed" not in err
    assert out.startswith("stopped")
