"""The analyzer in the appliance: a real receiver (ZeroMQ, replica, journal) fed a
real kernel's ext4 trace, then ransomware-style overwrites; the analyzer's
events come back as journal checkpoint tags (consistent ones flagged), the
alarm tag names the first suspicious write, and analysis.json carries the
VBD's data state.  The oracle is the same analyzer run offline on the same
stream."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import zmq

from analyzer import trace as tr
from analyzer import workloads as wl
from analyzer.stream import VbdAnalyzer
from appliance_domu import analysis as an
from appliance_domu.receiver import Receiver
from engines.journal import Journal
from xentap import wire

DATA = Path(__file__).parent / "data"
MiB = 1 << 20
DISK = 64 * MiB


class Sender:
    """dom0 in miniature: HELLO, then WRITES / FLUSH messages, waiting for ACKs
    so that the receiver's credit is never exceeded."""

    def __init__(self, endpoint: str, vbd_uuid: uuid.UUID, size: int = DISK):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.vbd_uuid = vbd_uuid
        self.seq = 1
        self.acked = 0
        self.sent_bytes_since_ack = 0
        self.sock.send(wire.encode(wire.Hello(
            stream_id=1, epoch=1, host_id=uuid.UUID(int=1), vbd_uuid=vbd_uuid, domid=3,
            devid=51712, vdev="xvda", size_bytes=size, logical_sector_size=512,
            physical_sector_size=4096, next_seq=1, features=7)))
        assert isinstance(self._recv(), wire.Ack)

    def _recv(self, timeout=10.0):
        assert self.sock.poll(int(timeout * 1000)), "no answer from the receiver"
        return wire.decode(self.sock.recv())

    def wait_ack(self, seq: int) -> None:
        while self.acked < seq:
            m = self._recv()
            if isinstance(m, wire.Ack):
                self.acked = max(self.acked, m.acked_seq)
        self.sent_bytes_since_ack = 0

    def write(self, offset: int, data: bytes) -> int:
        s = self.seq
        self.sock.send(wire.encode(wire.Writes(stream_id=1, epoch=1, first_seq=s, records=[
            wire.WriteRecord(s, time.time_ns(), offset // 512, len(data), 0, data)])))
        self.seq += 1
        self.sent_bytes_since_ack += len(data)
        if self.sent_bytes_since_ack > 8 * MiB or self.seq - self.acked > 2000:
            self.wait_ack(s)
        return s

    def flush(self) -> int:
        s = self.seq
        self.sock.send(wire.encode(wire.Flush(stream_id=1, epoch=1, seq=s,
                                              timestamp_ns=time.time_ns())))
        self.seq += 1
        return s

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def ext4_stream():
    """The recorded ext4 trace as (kind, offset, data); wire seqs are its seqs + 1."""
    return [("flush", 0, b"") if r.kind == tr.FLUSH else ("write", r.offset, r.data)
            for r in tr.read(DATA / "ext4-small.trace.gz")]


def ransom_stream(nfiles=24, size=256 << 10):
    """Documents written at the end of the disk, flushed, then each overwritten with its
    AES-encrypted content and flushed (ransomware's in-place encryption)."""
    base = DISK - nfiles * size
    docs = [wl.text(size, 40 + i) for i in range(nfiles)]
    ops = [("write", base + i * size, d) for i, d in enumerate(docs)] + [("flush", 0, b"")]
    for i, d in enumerate(docs):
        ops += [("write", base + i * size, wl.encrypt(d, "whole")), ("flush", 0, b"")]
    return ops


def offline(ops):
    """The oracle: the analyzer run in-process on the same stream (wire seqs)."""
    a = VbdAnalyzer()
    evs = []
    for i, (kind, off, data) in enumerate(ops):
        seq = i + 1
        evs += a.feed(seq, 0, off // 512, data) if kind == "write" else a.flush(seq, 0)
    evs += a.finish()
    return a, evs


def send_all(rx, ops, vbd):
    s = Sender(rx.endpoint, vbd)
    try:
        for kind, off, data in ops:
            s.write(off, data) if kind == "write" else s.flush()
        s.wait_ack(s.seq - 1)
    finally:
        s.close()
    assert rx.analysis.wait_idle(60)
    return s.seq - 1


def analyzer_tags(j: Journal):
    return [c for c in j.checkpoints() if c.kind_name == "analyzer"]


def wait_tags(vbd_dir: Path, n: int, timeout=10.0):
    """The tags become durable with the VBD's next group commit."""
    end = time.monotonic() + timeout
    while True:
        j = Journal.open(vbd_dir / "journal")
        try:
            tags = analyzer_tags(j)
        finally:
            j.close()
        if len(tags) >= n or time.monotonic() > end:
            return tags
        time.sleep(0.05)


@pytest.fixture
def rx(tmp_path):
    r = Receiver("tcp://127.0.0.1:0", tmp_path / "appliance", insecure=True).start()
    yield r
    r.stop()


def test_ext4_trace_tags_appear_in_the_journal_with_consistent_flags(rx, tmp_path):
    vbd = uuid.uuid4()
    ops = ext4_stream()
    last = send_all(rx, ops, vbd)
    _, evs = offline(ops)
    want = sorted((e.seq, e.consistent, e.tag_label()) for e in evs)
    assert sum(c for _, c, _ in want) >= 5
    vdir = tmp_path / "appliance" / str(vbd)
    tags = wait_tags(vdir, len(want))
    got = sorted((c.seq, c.consistent, c.label) for c in tags)
    assert got == want
    st = an.read_state(vdir)
    assert st["status"]["analysed_seq"] == last and st["status"]["skipped"] == 0
    assert st["state"]["filesystems"][0]["type"] == "ext4"
    assert st["state"]["data_state"] == "consistent"
    assert st["state"]["last_consistent"]["seq"] == max(s for s, c, _ in want if c)
    assert rx.status()["analysis"]["vbds"][str(vbd)]["tags"] == len(want)


def test_alarm_tag_names_the_first_suspicious_write_and_the_recommended_point(rx, tmp_path):
    vbd = uuid.uuid4()
    ops = ext4_stream() + ransom_stream()
    send_all(rx, ops, vbd)
    a, evs = offline(ops)
    assert a.alarm is not None
    d = a.alarm.detail
    first, rec = d["first_seq"], d["recommended_seq"]
    assert ops[first - 1][0] == "write" and rec is not None and rec < first
    vdir = tmp_path / "appliance" / str(vbd)
    tags = wait_tags(vdir, len(evs) + 1)
    alarm = [c for c in tags if c.label.startswith("encryption_suspected")]
    assert len(alarm) == 1 and not alarm[0].consistent
    assert f"from write {first};" in alarm[0].label and f"recover to seq {rec} " in alarm[0].label
    recommended = [c for c in tags if c.label.startswith("recommended_recovery")]
    assert [(c.seq, c.consistent) for c in recommended] == [(rec, True)]
    assert f"from write {first}" in recommended[0].label
    st = an.read_state(vdir)
    assert st["state"]["data_state"] == "encryption_suspected"
    assert st["alarm"]["detail"]["first_seq"] == first


def test_analysis_that_falls_behind_skips_and_says_so_without_blocking(tmp_path):
    r = Receiver("tcp://127.0.0.1:0", tmp_path / "appliance", insecure=True).start()
    r.analysis.queue_msgs = 1  # a queue that can hold one message: most are skipped
    hold = __import__("threading").Event()
    real_feed = r.analysis._feed

    def slow_feed(v, msg):
        hold.wait(120)  # until the test releases it (a timeout here would let it run early under load)
        real_feed(v, msg)

    r.analysis._feed = slow_feed
    vbd = uuid.uuid4()
    try:
        s = Sender(r.endpoint, vbd)
        try:
            for kind, off, data in ext4_stream():
                s.write(off, data) if kind == "write" else s.flush()
            s.wait_ack(s.seq - 1)  # ACKs come while the analysis is stuck
            st = r.status()["analysis"]["vbds"][str(vbd)]
            assert st["skipped"] > 0 and st["behind"] > 0
            hold.set()
            assert r.analysis.wait_idle(30)
            r.analysis.queue_msgs = 1000
            s.write(DISK - 4096, b"x" * 4096)  # the next message restarts the analyzer
            s.flush()
            s.wait_ack(s.seq - 1)
        finally:
            s.close()
        assert r.analysis.wait_idle(30)
    finally:
        r.stop()
    st = an.read_state(tmp_path / "appliance" / str(vbd))
    # How many separate runs of skipped messages there were (each ends in a
    # restart) depends on when the worker dequeued relative to the sender.
    assert st["status"]["skipped"] > 0 and st["status"]["restarts"] >= 1
    assert st["status"]["analysed_seq"] == s.seq - 1 and st["skipped_ranges"]
    # relearned from the replica: the filesystem is known again
    assert st["state"]["filesystems"][0]["type"] == "ext4"


def test_one_vbds_flood_neither_delays_nor_blinds_another_vbds_analysis(tmp_path):
    """The worker takes the VBDs' queues in turn; a VBD that arrives while
    another fills the shared bound takes room from it, not the skip."""
    import threading

    r = Receiver("tcp://127.0.0.1:0", tmp_path / "appliance", insecure=True).start()
    r.analysis.queue_msgs = 8
    hold = threading.Event()
    fed: list[str] = []
    real_feed = r.analysis._feed

    def slow_feed(v, msg):
        hold.wait(120)
        fed.append(str(v.uuid))
        real_feed(v, msg)

    r.analysis._feed = slow_feed
    a, b = uuid.uuid4(), uuid.uuid4()
    sa = Sender(r.endpoint, a)
    sb = Sender(r.endpoint, b)
    try:
        for i in range(40):                 # a floods: the bound holds 8 of its messages
            sa.write(i * 4096, bytes([i + 1]) * 4096)
        sa.wait_ack(sa.seq - 1)
        for i in range(3):                  # then b: 4 messages
            sb.write(i * 4096, b"\x07" * 4096)
        sb.flush()
        sb.wait_ack(sb.seq - 1)
        st = r.status()["analysis"]["vbds"]
        assert st[str(b)]["skipped"] == 0, st
        assert st[str(a)]["skipped"] >= 40 - 8, st
        hold.set()
        assert r.analysis.wait_idle(30)
    finally:
        hold.set()
        sa.close()
        sb.close()
        r.stop()
    last_b = max(i for i, u in enumerate(fed) if u == str(b))
    assert fed[:last_b].count(str(a)) <= 5, fed    # in turn: a, a, b, a, b, a, b, a, b
    st = an.read_state(tmp_path / "appliance" / str(b))
    assert st["status"]["analysed_seq"] == sb.seq - 1 and st["status"]["skipped"] == 0


@pytest.mark.slow
def test_tags_survive_an_appliance_restart(tmp_path):
    vbd = uuid.uuid4()
    r = Receiver("tcp://127.0.0.1:0", tmp_path / "appliance", insecure=True).start()
    ops = ext4_stream() + ransom_stream()
    try:
        send_all(r, ops, vbd)
    finally:
        r.stop()  # the analysis drains and its tags go into the final sync
    _, evs = offline(ops)
    j = Journal.open(tmp_path / "appliance" / str(vbd) / "journal")
    try:
        tags = analyzer_tags(j)
    finally:
        j.close()
    assert len(tags) == len(evs) + 1
    assert sum(c.consistent for c in tags) == sum(e.consistent for e in evs) + 1


def xentap(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "xentap.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_analyze_vbd_reads_the_appliance_state_by_uuid_prefix(rx, tmp_path):
    vbd = uuid.uuid4()
    send_all(rx, ext4_stream() + ransom_stream(), vbd)
    data = str(tmp_path / "appliance")
    r = xentap("analyze", str(vbd)[:8], "--data-dir", data)
    assert r.returncode == 0, r.stderr
    assert "data state: encryption_suspected" in r.stdout and "ext4 at byte 0" in r.stdout
    assert "ALARM: mass encryption from write" in r.stdout
    r = xentap("analyze", str(vbd), "--data-dir", data, "--json")
    st = __import__("json").loads(r.stdout)
    assert st["vbd"] == str(vbd) and st["alarm"]["detail"]["recommended_seq"] is not None


@pytest.mark.parametrize("args,message", [
    (("analyze", "0123abcd"), "unknown VBD"),
    (("analyze", "dom7/xvdz"), "unknown VBD"),
])
def test_cli_analyze_unknown_vbd_is_one_line(tmp_path, args, message):
    (tmp_path / "appliance").mkdir()
    r = xentap(*args, "--data-dir", str(tmp_path / "appliance"))
    assert r.returncode != 0 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
