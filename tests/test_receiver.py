"""The appliance receiver: replica == what was sent, ACK only after durability,
restart and re-sends, Curve refusal, bad frames, credit, heartbeats."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from appliance_domu import replica as replica_mod
from appliance_domu.receiver import Receiver
from appliance_domu.replica import Replica, ReplicaError
from xentap import keys, wire

MiB = 1 << 20
DISK = 8 * MiB
ALL_FEATURES = int(wire.Features.DISCARD | wire.Features.ZEROES | wire.Features.FUA)


# --------------------------------------------------------------------------- helpers


class Dom0:
    """A small test sender: wire.encode + a DEALER (Curve unless client is None),
    with a model of the disk to compare the replica with."""

    def __init__(self, endpoint: str, client: keys.CurveClient | None, *, stream_id: int = 1,
                 vbd_uuid: uuid.UUID | None = None, size: int = DISK,
                 features: int = ALL_FEATURES, model: bytearray | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        # a send with no peer to queue for (refused: the handshake failed) waits
        # this long, then raises zmq.Again, instead of hanging the suite
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        if client is not None:
            keys.configure_client(self.sock, client)
        self.sock.connect(endpoint)
        self.stream_id = stream_id
        self.vbd_uuid = vbd_uuid or uuid.uuid4()
        self.size = size
        self.features = features
        self.model = model if model is not None else bytearray(size)
        self.seq = 1  # next seq to send
        self.epoch = 0
        self.sent: dict[int, bytes] = {}  # first seq -> frame (for re-sends / replays)

    def close(self):
        self.sock.close(0)
        self.ctx.term()

    # -- raw
    def send_frame(self, frame: bytes) -> None:
        self.sock.send(frame)

    def send(self, msg: wire.Message) -> bytes:
        frame = wire.encode(msg)
        self.send_frame(frame)
        return frame

    def recv(self, timeout: float = 3.0) -> wire.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return wire.decode(self.sock.recv())

    def wait_ack(self, seq: int, timeout: float = 5.0) -> wire.Ack:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            m = self.recv(max(0.0, left))
            if m is None:
                raise AssertionError(f"no ACK for seq {seq} within {timeout} s")
            if isinstance(m, wire.Ack) and m.acked_seq >= seq:
                return m

    # -- messages
    def hello_msg(self, epoch: int | None = None, next_seq: int | None = None, **kw):
        self.epoch = self.epoch + 1 if epoch is None else epoch
        if next_seq is not None:
            self.seq = next_seq
        d = dict(stream_id=self.stream_id, epoch=self.epoch, host_id=uuid.UUID(int=1),
                 vbd_uuid=self.vbd_uuid, domid=3, devid=51712, vdev="xvda",
                 size_bytes=self.size, logical_sector_size=512, physical_sector_size=4096,
                 next_seq=self.seq, features=self.features)
        d.update(kw)
        return wire.Hello(**d)

    def hello(self, epoch: int | None = None, next_seq: int | None = None,
              expect_ack: bool = True, **kw) -> wire.Ack | None:
        self.send(self.hello_msg(epoch, next_seq, **kw))
        if not expect_ack:
            return None
        m = self.recv()
        assert isinstance(m, wire.Ack), m
        return m

    def writes_msg(self, recs, *, update_model: bool = True) -> wire.Writes:
        """recs: (sector, data) or (sector, length, flags) tuples."""
        out = []
        for i, r in enumerate(recs):
            if len(r) == 2:
                sector, data = r
                length, flags = len(data), 0
            else:
                sector, length, flags = r
                data = b""
            if update_model:
                off = sector * 512
                self.model[off:off + length] = data if data else bytes(length)
            out.append(wire.WriteRecord(self.seq + i, time.time_ns(), sector, length, flags, data))
        m = wire.Writes(stream_id=self.stream_id, epoch=self.epoch, first_seq=self.seq,
                        records=out)
        self.seq += len(out)
        return m

    def writes(self, recs, **kw) -> bytes:
        m = self.writes_msg(recs, **kw)
        f = self.send(m)
        self.sent[m.first_seq] = f
        return f

    def flush(self) -> bytes:
        m = wire.Flush(stream_id=self.stream_id, epoch=self.epoch, seq=self.seq,
                       timestamp_ns=time.time_ns())
        self.seq += 1
        f = self.send(m)
        self.sent[m.seq] = f
        return f

    def heartbeat(self, last_seq: int | None = None) -> None:
        self.send(wire.Heartbeat(stream_id=self.stream_id, epoch=self.epoch,
                                 timestamp_ns=time.time_ns(),
                                 last_seq=self.seq - 1 if last_seq is None else last_seq))


def replica_bytes(data_dir, vbd: uuid.UUID) -> bytes:
    return (Replica.directory(data_dir, vbd) / replica_mod.IMAGE_NAME).read_bytes()


def replica_state(data_dir, vbd: uuid.UUID) -> dict:
    return json.loads((Replica.directory(data_dir, vbd) / replica_mod.STATE_NAME).read_bytes())


def wait_for(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def random_batch(rnd: random.Random, size: int, n: int):
    recs = []
    for _ in range(n):
        nsect = rnd.choice((1, 8, 8, 8, 16, 64, 256))
        sector = rnd.randrange(0, size // 512 - nsect)
        kind = rnd.random()
        if kind < 0.1:
            recs.append((sector, nsect * 512, int(wire.WriteFlags.DISCARD)))
        elif kind < 0.15:
            recs.append((sector, nsect * 512, int(wire.WriteFlags.ZEROES)))
        else:
            recs.append((sector, rnd.randbytes(nsect * 512)))
    return recs


@pytest.fixture
def pki(tmp_path):
    """Appliance pair, an allowed dom0 pair, and an unknown dom0 pair."""
    keys.create(tmp_path / "app", "appliance")
    keys.create(tmp_path / "allowed", "dom0")
    keys.create(tmp_path / "allowed", "dom0b")
    keys.create(tmp_path / "stranger", "dom0")
    app_pub = tmp_path / "app" / "appliance.key"

    class P:
        server = keys.CurveServer.from_dir(tmp_path / "app", tmp_path / "allowed")
        client = keys.CurveClient.from_files(tmp_path / "allowed" / "dom0.key_secret", app_pub)
        client_b = keys.CurveClient.from_files(tmp_path / "allowed" / "dom0b.key_secret", app_pub)
        stranger = keys.CurveClient.from_files(tmp_path / "stranger" / "dom0.key_secret", app_pub)
    return P


@pytest.fixture
def env(tmp_path, pki):
    """start() -> a running Curve receiver on tmp_path/data; dom0() -> a connected sender."""
    state = {"rcv": None, "senders": []}
    data = tmp_path / "data"

    class E:
        data_dir = data

        @staticmethod
        def start(**kw) -> Receiver:
            kw.setdefault("curve", pki.server)
            r = Receiver("tcp://127.0.0.1:0", data, **kw).start()
            state["rcv"] = r
            return r

        @staticmethod
        def dom0(client=pki.client, **kw) -> Dom0:
            d = Dom0(state["rcv"].endpoint, client, **kw)
            state["senders"].append(d)
            return d

    yield E
    for d in state["senders"]:
        d.close()
    if state["rcv"] is not None:
        state["rcv"].stop()


# --------------------------------------------------------------------------- tests


def test_random_workload_replica_equals_what_was_sent(env):
    r = env.start(sync_interval=0.002)
    d = env.dom0()
    ack = d.hello()
    assert ack.acked_seq == 0 and ack.credit_bytes > 0 and ack.credit_msgs > 0
    rnd = random.Random(4)
    for i in range(60):
        d.writes(random_batch(rnd, DISK, rnd.randrange(1, 40)))
        if rnd.random() < 0.3:
            d.flush()
        if i % 10 == 9:
            d.send(wire.Checkpoint(stream_id=1, epoch=d.epoch, seq=d.seq,
                                   timestamp_ns=1, kind=wire.CheckpointKind.USER,
                                   label=f"cp{i}"))
            d.seq += 1
    last = d.seq - 1
    d.wait_ack(last)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    st = replica_state(env.data_dir, d.vbd_uuid)
    assert st["high_water"] == last and st["epoch"] == 1 and not st["in_resync"]
    assert st["last_checkpoint_label"] == "cp59"
    assert r.stats["rejected"] == 0 and r.stats["dropped_no_session"] == 0
    assert r.stats["syncs"] >= 1
    # the image is sparse where it was discarded / never written
    assert os.stat(Replica.directory(env.data_dir, d.vbd_uuid) / "replica.img").st_blocks * 512 < DISK


def test_ack_only_after_data_synced_and_state_recorded(env, monkeypatch):
    events: list[tuple] = []
    real_fdatasync, real_write_state = os.fdatasync, replica_mod.write_state_atomically

    def fdatasync(fd):
        real_fdatasync(fd)
        events.append(("fdatasync", fd))

    def write_state(path, data):
        events.append(("state-begin", json.loads(data)["high_water"]))
        real_write_state(path, data)
        events.append(("state", json.loads(data)["high_water"]))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(replica_mod, "write_state_atomically", write_state)
    r = env.start(sync_interval=0.003)
    real_send = r._send

    def send(sess, msg):
        if isinstance(msg, wire.Ack):
            events.append(("ack", msg.acked_seq))
        real_send(sess, msg)

    r._send = send
    d = env.dom0()
    d.hello()
    rnd = random.Random(1)
    seen = []
    for _ in range(30):
        d.writes(random_batch(rnd, DISK, 20))
        if rnd.random() < 0.5:
            d.flush()
        while (m := d.recv(0)) is not None:
            # the state file already says at least this much when the ACK arrives
            assert replica_state(env.data_dir, d.vbd_uuid)["high_water"] >= m.acked_seq
            seen.append(m.acked_seq)
    ack = d.wait_ack(d.seq - 1)
    assert replica_state(env.data_dir, d.vbd_uuid)["high_water"] >= ack.acked_seq
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    # order: every ACK of seq S follows an fdatasync, then a completed state write of >= S
    acks = [i for i, e in enumerate(events) if e[0] == "ack" and e[1] > 0]
    assert acks
    for i in acks:
        s = events[i][1]
        j = max(k for k in range(i) if events[k][0] == "state" and events[k][1] >= s)
        b = max(k for k in range(j) if events[k][0] == "state-begin")
        assert any(events[k][0] == "fdatasync" for k in range(b)), events[:i + 1]
        # and the data sync for that state came after the previous state write
        prev_state = [k for k in range(b) if events[k][0] == "state"]
        lo = prev_state[-1] if prev_state else -1
        assert any(events[k][0] == "fdatasync" for k in range(lo + 1, b)), events[lo:i + 1]


def test_restart_then_new_epoch_resends_are_dropped_and_stream_goes_on(env):
    r = env.start()
    d = env.dom0()
    d.hello()
    rnd = random.Random(2)
    frames = []
    for _ in range(10):
        first = d.seq
        frames.append((first, d.writes(random_batch(rnd, DISK, 8))))
    hw = d.seq - 1
    d.wait_ack(hw)
    r.stop()
    original = bytes(d.model)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == original

    r2 = env.start()
    assert r2.endpoint != r.endpoint or True
    d2 = env.dom0(vbd_uuid=d.vbd_uuid, model=d.model)
    # a stale epoch is refused after the restart too (it was recorded durably)
    d2.hello(epoch=1, next_seq=1, expect_ack=False)
    wait_for(lambda: r2.stats["rejected"] == 1, what="stale HELLO rejected")
    assert d2.recv(0.2) is None
    # resuming above the high water would hide a gap: refused
    d2.hello(epoch=2, next_seq=hw + 2, expect_ack=False)
    wait_for(lambda: r2.stats["rejected"] == 2, what="gap HELLO rejected")
    # a proper HELLO re-sending from an older seq: ACK says what is durable
    resend_from = frames[4][0]
    ack = d2.hello(epoch=3, next_seq=resend_from)
    assert ack.acked_seq == hw
    # re-send with DIFFERENT data: explicable duplicates are dropped, not re-applied
    while d2.seq <= hw:
        n = min(8, hw - d2.seq + 1)
        d2.writes([(s, os.urandom(4096)) for s in range(0, 8 * n, 8)], update_model=False)
    # ... the stream goes on with fresh data
    for _ in range(5):
        d2.writes(random_batch(rnd, DISK, 8))
    d2.flush()
    d2.wait_ack(d2.seq - 1)
    assert r2.stats["duplicates"] == 6 and r2.stats["rejected"] == 2
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)
    st = replica_state(env.data_dir, d.vbd_uuid)
    assert st["epoch"] == 3 and st["high_water"] == d2.seq - 1


def test_batch_straddling_high_water_is_trimmed(env):
    env.start()
    d = env.dom0()
    d.hello()
    d.writes([(0, b"A" * 512), (1, b"B" * 512)])
    d.wait_ack(2)
    d.hello(next_seq=2)
    # seq 2 is a re-send (different content: dropped), seq 3 is fresh
    d.writes([(1, b"X" * 512), (2, b"C" * 512)], update_model=False)
    d.model[2 * 512:3 * 512] = b"C" * 512
    d.wait_ack(3)
    assert replica_bytes(env.data_dir, d.vbd_uuid)[:1536] == b"A" * 512 + b"B" * 512 + b"C" * 512


@pytest.mark.parametrize("who", ["stranger", "plain"])
def test_wrong_or_missing_curve_key_is_refused(env, pki, who):
    r = env.start()
    d = env.dom0(client=pki.stranger if who == "stranger" else None)
    try:
        d.send(d.hello_msg())
        d.writes([(0, b"x" * 4096)])
    except zmq.Again:       # refused before these could even be queued: the same
        pass
    assert d.recv(0.6) is None
    assert r.stats["frames"] == 0 and r.stats["hellos"] == 0
    assert list(env.data_dir.iterdir()) == []
    # the receiver still serves allowed peers
    ok = env.dom0()
    assert ok.hello().acked_seq == 0


def test_insecure_needs_to_be_explicit(tmp_path):
    with pytest.raises(ValueError, match="no Curve keys"):
        Receiver("tcp://127.0.0.1:0", tmp_path)
    with pytest.raises(ValueError, match="ipc://PATH"):
        Receiver("udp://127.0.0.1:0", tmp_path, insecure=True)


def test_insecure_ipc_works(tmp_path):
    ep = f"ipc://{tmp_path}/a.sock"
    with Receiver(ep, tmp_path / "data", insecure=True) as r:
        d = Dom0(r.endpoint, None)
        try:
            d.hello()
            d.writes([(8, b"z" * 4096)])
            d.wait_ack(1)
            assert replica_bytes(tmp_path / "data", d.vbd_uuid) == bytes(d.model)
        finally:
            d.close()


def _corrupt(frame: bytes, off: int) -> bytes:
    b = bytearray(frame)
    b[off] ^= 0x40
    return bytes(b)


def test_bad_frames_are_rejected_nothing_corrupted_stream_resumes(env, caplog):
    r = env.start()
    d = env.dom0()
    d.hello()
    rnd = random.Random(3)
    for _ in range(3):
        d.writes(random_batch(rnd, DISK, 5))
    d.flush()
    d.wait_ack(d.seq - 1)
    good = bytes(d.model)

    def attempt(make_bad, counter="rejected"):
        """Send one bad frame, then a valid next frame (dropped: session ended);
        check nothing changed; resume with a new HELLO."""
        before = dict(r.stats)
        hw = d.seq - 1
        bad = make_bad()
        d.send_frame(bad)
        wait_for(lambda: r.stats[counter] > before[counter], what=f"{counter} count")
        nxt = d.writes_msg([(0, b"N" * 4096)], update_model=False)  # would be seq hw+1
        d.send(nxt)
        wait_for(lambda: r.stats["frames"] >= before["frames"] + 2, what="frames")
        assert r.stats["dropped_no_session"] > before["dropped_no_session"] or counter == "dropped_no_session"
        assert r.stats["records"] == before["records"]
        d.seq = hw + 1
        # nothing written, nothing claimed
        time.sleep(0.02)
        assert replica_bytes(env.data_dir, d.vbd_uuid) == good
        assert replica_state(env.data_dir, d.vbd_uuid)["high_water"] == hw
        while d.recv(0) is not None:  # late ACKs of the previous session
            pass
        assert d.hello(next_seq=hw + 1).acked_seq == hw

    attempt(lambda: wire.encode(d.writes_msg([(0, b"T" * 4096)], update_model=False))[:-7])
    attempt(lambda: _corrupt(wire.encode(d.writes_msg([(0, b"C" * 4096)], update_model=False)),
                             200))  # checksum mismatch
    attempt(lambda: _corrupt(wire.encode(d.writes_msg([(0, b"M" * 4096)], update_model=False)),
                             0))  # bad magic
    attempt(lambda: wire.encode(d.writes_msg([(0, b"E" * 4096)], update_model=False)).replace(
        b"XTAP\x01\x00", b"XTAP\x09\x00", 1))  # unsupported version
    # replay inside the session: the same frame twice
    f = d.writes([(16, b"R" * 4096)])
    d.wait_ack(d.seq - 1)
    good = bytes(d.model)
    attempt(lambda: f)

    def gap():  # out of order: a seq skipped
        d.seq += 1
        return wire.encode(d.writes_msg([(0, b"G" * 4096)], update_model=False))
    attempt(gap)
    # records in a batch out of order
    attempt(lambda: wire.encode(wire.Writes(
        stream_id=1, epoch=d.epoch, first_seq=d.seq, records=[
            wire.WriteRecord(d.seq + 1, 0, 0, 512, 0, b"o" * 512),
            wire.WriteRecord(d.seq, 0, 1, 512, 0, b"o" * 512)])))
    # past the end of the disk; misaligned
    attempt(lambda: wire.encode(d.writes_msg([(DISK // 512, b"P" * 512)], update_model=False)))
    attempt(lambda: wire.encode(d.writes_msg([(0, b"P" * 100)], update_model=False)))
    # a frame shorter than the header (no stream to attribute it to: no session ends)
    before = r.stats["rejected"]
    d.send_frame(b"XTAP")
    wait_for(lambda: r.stats["rejected"] > before)
    d.writes([(24, b"k" * 4096)])
    d.wait_ack(d.seq - 1)
    # an unknown stream without HELLO: no replica, nothing written
    before = r.stats["dropped_no_session"]
    other = env.dom0(stream_id=99)
    other.epoch = 1
    other.writes([(0, b"u" * 4096)])
    wait_for(lambda: r.stats["dropped_no_session"] > before)
    time.sleep(0.05)
    assert sorted(p.name for p in env.data_dir.iterdir()) == [str(d.vbd_uuid)]
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    rejected_lines = [m for m in caplog.messages if "rejected" in m]
    assert rejected_lines and all("\n" not in m for m in rejected_lines)


def test_bad_hello_creates_nothing(env):
    r = env.start()
    d = env.dom0()
    d.hello(next_seq=5, expect_ack=False)  # a new VBD must start at 1
    d2 = env.dom0(stream_id=2)
    d2.send(d2.hello_msg(logical_sector_size=1000))  # not a power of two
    d3 = env.dom0(stream_id=3)
    d3.send_frame(wire.encode(d3.hello_msg())[:-3])  # truncated HELLO
    wait_for(lambda: r.stats["rejected"] == 3)
    assert d.recv(0.1) is None and d2.recv(0) is None and d3.recv(0) is None
    assert list(env.data_dir.iterdir()) == []


def test_credit_is_enforced(env):
    r = env.start(credit_bytes=16 * 4096, credit_msgs=4, sync_interval=0.5)
    d = env.dom0()
    ack = d.hello()
    assert (ack.credit_bytes, ack.credit_msgs) == (16 * 4096, 4)
    # within credit: 4 messages of 4 records each
    for i in range(4):
        d.writes([(8 * (4 * i + k), b"c" * 4096) for k in range(4)])
    # a 5th before any ACK exceeds credit_msgs: rejected, not applied
    d.writes([(512, b"X" * 4096)], update_model=False)
    wait_for(lambda: r.stats["rejected"] == 1, what="credit rejection")
    d.seq -= 1
    while d.recv(0.05) is not None:
        pass
    assert d.hello(next_seq=17).acked_seq == 16  # the 16 records within credit were kept
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    # a sender that respects the window (CreditWindow) streams a lot through a small one
    r.sync_interval = 0.002
    win = wire.CreditWindow()
    win.on_ack(wire.Ack(stream_id=1, epoch=d.epoch, acked_seq=16, credit_bytes=16 * 4096,
                        credit_msgs=4))
    rnd = random.Random(5)
    for _ in range(40):
        m = d.writes_msg([(rnd.randrange(0, DISK // 512 - 8, 8), rnd.randbytes(4096))
                          for _ in range(4)])
        while not win.allows(m.last_seq, 4 * 4096):
            win.on_ack(d.recv(3))
        d.send(m)
        win.sent(m.last_seq, 4 * 4096)
    d.wait_ack(d.seq - 1, timeout=10)
    assert r.stats["rejected"] == 1
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)


def test_heartbeats_answered_with_durable_seq(env):
    r = env.start()
    d = env.dom0()
    d.hello()
    d.heartbeat()
    hb = d.recv()
    assert isinstance(hb, wire.Heartbeat) and hb.last_seq == 0 and hb.epoch == d.epoch
    d.writes([(0, b"h" * 4096)])
    d.wait_ack(1)
    d.heartbeat()
    hb = d.recv()
    assert isinstance(hb, wire.Heartbeat) and hb.last_seq == 1
    # a heartbeat claiming more than was received reveals a gap: session ended
    d.heartbeat(last_seq=5)
    wait_for(lambda: r.stats["rejected"] == 1)
    d.heartbeat()
    assert d.recv(0.3) is None
    assert d.hello(next_seq=2).acked_seq == 1


def test_session_resumes_from_the_high_water_the_appliance_holds(env):
    """The appliance holds more than dom0 saw acknowledged (its ACKs were lost, then
    it restarted): dom0's HELLO says the seq after its last ACK, the ACK says the high
    water; a HEARTBEAT and frames going on from the high water are explicable and
    accepted, nothing held is applied again; a real gap is still rejected."""
    r = env.start()
    d = env.dom0()
    d.hello()
    for i in range(4):
        d.writes([(8 * i, bytes([65 + i]) * 4096), (8 * i + 64, bytes([97 + i]) * 4096)])
    d.flush()
    d.wait_ack(9)
    r.stop()
    good = bytes(d.model)

    r = env.start()
    d2 = env.dom0(vbd_uuid=d.vbd_uuid, model=d.model)
    d2.epoch = d.epoch
    ack = d2.hello(next_seq=4)  # dom0 saw ACKs up to 3 only
    assert ack.acked_seq == 9
    d2.heartbeat(last_seq=3)  # what the session saw
    assert isinstance(d2.recv(), wire.Heartbeat)
    d2.heartbeat(last_seq=9)  # claims only seqs the appliance holds
    hb = d2.recv()
    assert isinstance(hb, wire.Heartbeat) and hb.last_seq == 9
    d2.seq = 10  # goes on after the ACK's seq
    d2.writes([(200, b"Z" * 4096)])
    d2.flush()
    d2.wait_ack(11)
    d2.heartbeat()
    assert isinstance(d2.recv(), wire.Heartbeat)
    assert r.stats["rejected"] == 0 and r.stats["records"] == 1
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)
    assert bytes(d2.model)[:200 * 512] == good[:200 * 512]

    # the first frame of a session may straddle the HELLO's seq (a spilled batch):
    # the held part is dropped (different content here: never applied)
    ack = d2.hello(next_seq=10)
    assert ack.acked_seq == 11
    d2.seq = 9
    d2.writes([(0, b"x" * 4096), (0, b"y" * 4096), (0, b"y" * 4096), (300, b"W" * 4096)],
              update_model=False)
    d2.model[300 * 512:300 * 512 + 4096] = b"W" * 4096
    d2.wait_ack(12)
    assert r.stats["rejected"] == 0
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)

    # what the appliance cannot explain is still rejected, with a line saying why
    d2.heartbeat(last_seq=20)
    wait_for(lambda: r.stats["rejected"] == 1, what="heartbeat beyond the high water")
    assert d2.hello(next_seq=13).acked_seq == 12
    d2.seq = 14  # seq 13 never sent: a gap
    d2.writes([(0, b"g" * 4096)], update_model=False)
    wait_for(lambda: r.stats["rejected"] == 2, what="gap")
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)


def test_many_peers_many_streams(env, pki):
    r = env.start(sync_interval=0.002)
    senders = [env.dom0(client=c, stream_id=s) for c in (pki.client, pki.client_b)
               for s in (1, 2)]
    for s in senders:
        s.hello()
    rnd = random.Random(6)
    for _ in range(20):
        s = rnd.choice(senders)
        s.writes(random_batch(rnd, DISK, 6))
        s.flush()
    for s in senders:
        s.wait_ack(s.seq - 1)
        assert replica_bytes(env.data_dir, s.vbd_uuid) == bytes(s.model)
    assert len(list(env.data_dir.iterdir())) == 4
    assert len(r.sessions) == 4 and r.stats["rejected"] == 0
    st = r.status()
    assert st["public_key"] == pki.server.public.decode() and st["endpoint"] == r.endpoint
    assert {str(s.vbd_uuid): s.seq - 1 for s in senders} == {
        k: v["durable_seq"] for k, v in st["vbds"].items()}
    assert all(v["connected"] for v in st["vbds"].values())


def test_same_stream_id_from_two_peers_are_two_streams_and_takeover(env, pki):
    r = env.start()
    a = env.dom0(client=pki.client, stream_id=7)
    b = env.dom0(client=pki.client_b, stream_id=7)
    a.hello()
    b.hello()
    a.writes([(0, b"a" * 512)])
    b.writes([(0, b"b" * 512)])
    a.wait_ack(1)
    b.wait_ack(1)
    assert replica_bytes(env.data_dir, a.vbd_uuid)[:512] == b"a" * 512
    assert replica_bytes(env.data_dir, b.vbd_uuid)[:512] == b"b" * 512
    # peer b takes over a's VBD with a higher epoch: a's session is superseded
    c = env.dom0(client=pki.client_b, stream_id=8, vbd_uuid=a.vbd_uuid, model=a.model)
    c.seq = 2
    assert c.hello(epoch=2).acked_seq == 1
    a.writes([(1, b"A" * 512)], update_model=False)
    wait_for(lambda: r.stats["dropped_no_session"] == 1)
    c.writes([(2, b"c" * 512)])
    c.wait_ack(2)
    assert replica_bytes(env.data_dir, a.vbd_uuid)[:1536] == b"a" * 512 + bytes(512) + b"c" * 512


def test_gap_resync_state_survives_restart(env):
    r = env.start()
    d = env.dom0()
    d.hello()
    d.writes([(0, b"w" * 4096)])
    d.send(wire.Gap(stream_id=1, epoch=d.epoch, seq=d.seq, timestamp_ns=1,
                    reason=wire.GapReason.RING_OVERFLOW, dirty_regions=2))
    d.seq += 1
    d.send(wire.Resync(stream_id=1, epoch=d.epoch, seq=d.seq, sector=8, length=4096, flags=0,
                       data=b"r" * 4096))
    d.model[4096:8192] = b"r" * 4096
    d.seq += 1
    d.wait_ack(3)
    assert replica_state(env.data_dir, d.vbd_uuid)["in_resync"] is True
    r.stop()
    r2 = env.start()
    d2 = env.dom0(vbd_uuid=d.vbd_uuid, model=d.model)
    d2.seq = 4
    d2.hello(epoch=2)
    d2.send(wire.Resync(stream_id=1, epoch=2, seq=4, sector=16, length=4096,
                        flags=int(wire.WriteFlags.ZEROES), data=b""))
    d2.send(wire.ResyncEnd(stream_id=1, epoch=2, seq=5, timestamp_ns=2, regions=2))
    d2.seq = 6
    d2.wait_ack(5)
    st = replica_state(env.data_dir, d.vbd_uuid)
    assert st["in_resync"] is False and st["last_gap_seq"] == 2
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)
    # RESYNC without an open GAP is a protocol error
    d2.send(wire.Resync(stream_id=1, epoch=2, seq=6, sector=0, length=512, flags=0,
                        data=b"q" * 512))
    wait_for(lambda: r2.stats["rejected"] == 1)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d2.model)


def test_failed_sync_acks_nothing_and_a_new_hello_resumes(env, monkeypatch):
    r = env.start()
    d = env.dom0()
    d.hello()
    d.writes([(0, b"1" * 4096)])
    d.wait_ack(1)
    real = os.fdatasync
    failed = []

    def eio(fd):
        if not failed:
            failed.append(fd)
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", eio)
    d.writes([(8, b"2" * 4096)])
    wait_for(lambda: failed, what="the failing sync")
    assert d.recv(0.2) is None  # seq 2 is not acknowledged
    assert replica_state(env.data_dir, d.vbd_uuid)["high_water"] == 1
    d.writes_msg([(16, b"x" * 4096)], update_model=False)  # would be seq 3: dropped
    d.seq = 2
    assert d.hello().acked_seq == 1  # reopened from its durable state
    d.writes([(8, b"2" * 4096)])  # dom0 re-sends seq 2
    d.wait_ack(2)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    assert r.stats["rejected"] == 0


def test_disk_size_change_on_hello(env):
    env.start()
    d = env.dom0(size=MiB)
    d.hello()
    d.writes([(0, b"s" * 512)])
    d.wait_ack(1)
    d.size = 2 * MiB
    d.model.extend(bytes(MiB))
    assert d.hello().acked_seq == 1
    d.writes([(2 * MiB // 512 - 1, b"e" * 512)])
    d.wait_ack(2)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)


def test_stop_is_clean_and_idempotent(tmp_path, pki):
    r = Receiver("tcp://127.0.0.1:0", tmp_path, curve=pki.server).start()
    assert r.running
    r.stop()
    r.stop()
    assert not r.running and r.error is None
    # bound, never run
    r = Receiver("tcp://127.0.0.1:0", tmp_path, curve=pki.server)
    r.bind()
    r.stop()
    # the port is free again: bind twice on a fixed one
    r1 = Receiver("tcp://127.0.0.1:0", tmp_path, insecure=True)
    ep = r1.bind()
    with pytest.raises(OSError, match="cannot listen on"):
        Receiver(ep, tmp_path, insecure=True).bind()
    r1.stop()
    r2 = Receiver(ep, tmp_path, insecure=True)
    r2.bind()
    r2.stop()


# --------------------------------------------------------------------------- replica unit


def _hello(size=MiB, **kw):
    d = dict(stream_id=1, epoch=1, host_id=uuid.UUID(int=1), vbd_uuid=uuid.uuid4(), domid=1,
             devid=1, vdev="xvda", size_bytes=size, logical_sector_size=512,
             physical_sector_size=512, next_seq=1, features=ALL_FEATURES)
    d.update(kw)
    return wire.Hello(**d)


def test_replica_apply_sync_reopen(tmp_path):
    h = _hello()
    rep = Replica.create(tmp_path, h)
    assert rep.durable_seq == 0 and rep.state.epoch == 1
    rep.apply(wire.Writes(stream_id=1, epoch=1, first_seq=1, records=[
        wire.WriteRecord(1, 0, 0, 8192, 0, b"\xff" * 8192),
        wire.WriteRecord(2, 0, 4, 1024, int(wire.WriteFlags.DISCARD), b""),
        wire.WriteRecord(3, 0, 8, 512, int(wire.WriteFlags.ZEROES), b"")]))
    rep.apply(wire.Flush(stream_id=1, epoch=1, seq=4, timestamp_ns=77))
    assert rep.applied_seq == 4 and rep.durable_seq == 0 and rep.dirty
    assert json.loads(rep.state_path.read_bytes())["high_water"] == 0  # not yet durable
    assert rep.sync() == 4 and not rep.dirty
    rep.close()
    rep = Replica.open(tmp_path, h.vbd_uuid)
    assert rep.state.high_water == 4 and rep.state.last_flush_seq == 4
    assert rep.state.last_flush_durable_ns > 0
    img = rep.read(0, 8192)
    assert img == b"\xff" * 2048 + bytes(1024) + b"\xff" * 1024 + bytes(512) + b"\xff" * 3584
    c = rep.checker(9)
    assert (c.high_water, c.epoch, c.vbd_uuid, c.in_resync) == (4, 1, h.vbd_uuid, False)
    rep.close()
    assert Replica.open(tmp_path, uuid.uuid4()) is None


def test_replica_corrupt_state_is_an_error(tmp_path):
    h = _hello()
    Replica.create(tmp_path, h).close()
    p = Replica.directory(tmp_path, h.vbd_uuid) / "state.json"
    p.write_text("{not json")
    with pytest.raises(ReplicaError, match="corrupt replica state"):
        Replica.open(tmp_path, h.vbd_uuid)
    p.write_text(json.dumps({"format": 1, "vbd_uuid": str(h.vbd_uuid), "size_bytes": -1,
                             "logical_sector_size": 512, "physical_sector_size": 512}))
    with pytest.raises(ReplicaError, match="size_bytes"):
        Replica.open(tmp_path, h.vbd_uuid)


def test_receiver_refuses_hello_for_corrupt_replica(env):
    r = env.start()
    d = env.dom0()
    d.hello()
    d.writes([(0, b"1" * 512)])
    d.wait_ack(1)
    r.stop()
    (Replica.directory(env.data_dir, d.vbd_uuid) / "state.json").write_text("garbage")
    r2 = env.start()
    d2 = env.dom0(vbd_uuid=d.vbd_uuid)
    d2.hello(epoch=2, next_seq=1, expect_ack=False)
    wait_for(lambda: r2.stats["rejected"] == 1)
    assert d2.recv(0.2) is None
    assert (Replica.directory(env.data_dir, d.vbd_uuid) / "state.json").read_text() == "garbage"


# --------------------------------------------------------------------------- the process


def _serve(tmp_path, *args):
    code = ("import sys; from xentap.cli_appliance import appliance; "
            "appliance.main(args=sys.argv[1:], prog_name='xentap appliance')")
    return subprocess.Popen([sys.executable, "-c", code, "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))


def test_serve_process_curve_and_sigterm(tmp_path, pki):
    keys.create(tmp_path / "k", "appliance")
    keys.create(tmp_path / "k" / "allowed", "dom0")
    client = keys.CurveClient.from_files(tmp_path / "k" / "allowed" / "dom0.key_secret",
                                         tmp_path / "k" / "appliance.key")
    ep = f"ipc://{tmp_path}/app.sock"
    p = _serve(tmp_path, "--listen", ep, "--data-dir", str(tmp_path / "data"),
               "--keys", str(tmp_path / "k"))
    try:
        # listening first: the HELLO's 3 s answer timeout is not for a loaded
        # machine's interpreter start-up
        wait_for(lambda: os.path.exists(f"{tmp_path}/app.sock") or p.poll() is not None,
                 timeout=60, what="the serve process listening")
        d = Dom0(ep, client)
        try:
            assert d.hello().acked_seq == 0
            d.writes([(0, b"p" * 4096)])
            d.wait_ack(1)
            assert replica_bytes(tmp_path / "data", d.vbd_uuid) == bytes(d.model)
        finally:
            d.close()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "listening on ipc://" in err and "CurveZMQ, 1 dom0 key(s) allowed" in err
    assert "stopped" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_resend_from_ack(tmp_path):
    """SIGKILL the serving process repeatedly; dom0 re-sends from its last ACK + 1.

    Dom0 keeps within the credit each ACK grants, as the drainer does: on a
    loaded machine more was unacknowledged at each kill, and a re-send of all
    of it at once went beyond the credit and ended the session."""
    ep = f"ipc://{tmp_path}/app.sock"
    data = tmp_path / "data"
    rnd = random.Random(7)
    vbd = uuid.uuid4()
    model = bytearray(DISK)
    acked = 0
    unacked: list[tuple[int, wire.Writes]] = []  # (last_seq, batch) sent beyond acked
    epoch = 0

    def session(d: Dom0, epoch: int) -> tuple[wire.CreditWindow, int]:
        d.seq = unacked[0][1].first_seq if unacked else acked + 1
        ack = d.hello(epoch=epoch)
        credit = wire.CreditWindow()
        credit.on_ack(ack)
        return credit, ack.acked_seq

    def on_acks(d: Dom0, credit: wire.CreditWindow, wait: bool) -> int:
        """Takes the ACKs that came (waits for one with `wait`); the highest acked seq."""
        top = 0
        while (a := d.recv(10 if wait else 0)) is not None:
            if isinstance(a, wire.Ack):
                credit.on_ack(a)
                top = max(top, a.acked_seq)
                wait = False
        assert not wait, "no ACK within 10 s"
        return top

    def send(d: Dom0, credit: wire.CreditWindow, m: wire.Writes) -> int:
        top = 0
        while not credit.allows(m.last_seq, wire.payload_bytes(m)):
            top = max(top, on_acks(d, credit, wait=True))
        d.send(m)
        credit.sent(m.last_seq, wire.payload_bytes(m))
        return top

    for round_ in range(3):
        p = _serve(tmp_path, "--listen", ep, "--data-dir", str(data), "--insecure")
        d = Dom0(ep, None, vbd_uuid=vbd, model=model)
        try:
            epoch += 1
            unacked = [(ls, m) for ls, m in unacked if ls > acked]
            credit, hw = session(d, epoch)
            assert hw >= acked
            for _, m in unacked:  # re-send what was not acknowledged (same content)
                acked = max(acked, send(d, credit, wire.Writes(
                    stream_id=1, epoch=epoch, first_seq=m.first_seq, records=m.records)))
            d.seq = unacked[-1][0] + 1 if unacked else d.seq
            for _ in range(40):
                m = d.writes_msg(random_batch(rnd, DISK, 16))
                acked = max(acked, send(d, credit, m))
                unacked.append((m.last_seq, m))
                acked = max(acked, on_acks(d, credit, wait=False))
            time.sleep(0.01)
            acked = max(acked, on_acks(d, credit, wait=False))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
            d.close()
        st = json.loads((Replica.directory(data, vbd) / "state.json").read_bytes())
        assert st["high_water"] >= acked  # nothing ACKed was lost
    # final round: finish cleanly
    p = _serve(tmp_path, "--listen", ep, "--data-dir", str(data), "--insecure")
    d = Dom0(ep, None, vbd_uuid=vbd, model=model)
    try:
        epoch += 1
        unacked = [(ls, m) for ls, m in unacked if ls > acked]
        # The HELLO's ACK carries the durable high water, which may already
        # cover batches whose ACK the killed process never got out.
        credit, hw = session(d, epoch)
        acked = max(acked, hw)
        for ls, m in unacked:
            acked = max(acked, send(d, credit, wire.Writes(
                stream_id=1, epoch=epoch, first_seq=m.first_seq, records=m.records)))
        last = unacked[-1][0] if unacked else acked
        if last > acked:
            d.wait_ack(last, timeout=10)
        assert replica_bytes(data, vbd) == bytes(model)
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
        d.close()
        print(err)      # shown when the test fails
    assert "frame rejected" not in err, err


def test_a_frame_of_an_earlier_session_is_dropped_and_the_session_goes_on(env):
    """A reconnecting drainer's frames of the previous epoch may still be in
    flight after its new HELLO: dropped and counted, nothing applied, and the
    new session is not ended by them (it was, and a slow appliance livelocked)."""
    r = env.start()
    d = env.dom0()
    d.hello()
    d.writes([(0, b"A" * 4096)])
    d.wait_ack(d.seq - 1)
    hw = d.seq - 1
    stale = wire.encode(d.writes_msg([(8, b"S" * 4096)], update_model=False))   # epoch 1, seq hw+1
    d.seq = hw + 1
    d.hello(next_seq=hw + 1)                                                   # epoch 2
    good = bytes(d.model)
    before = dict(r.stats)
    d.send_frame(stale)
    wait_for(lambda: r.stats["dropped_stale_epoch"] > before["dropped_stale_epoch"],
             what="stale epoch count")
    assert r.stats["rejected"] == before["rejected"]
    assert replica_bytes(env.data_dir, d.vbd_uuid) == good
    d.writes([(16, b"B" * 4096)])          # the session goes on
    d.wait_ack(d.seq - 1)
    assert replica_bytes(env.data_dir, d.vbd_uuid) == bytes(d.model)
    assert r.stats["rejected"] == before["rejected"]
