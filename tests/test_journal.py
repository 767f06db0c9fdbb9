"""The CDP journal (engines/journal.py): restores, checkpoints, retention, the
receiver writing to it, and `xentap journal` as a user runs it."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engines import journal as jm
from engines.journal import Journal, Kind, OutOfWindow, TagKind
from xentap import wire

DISK = 256 * 1024
XENTAP = [sys.executable, "-m", "xentap.cli"]


class Oracle:
    """A journal and the disk it should describe at every seq."""

    def __init__(self, path: Path, disk: int = DISK, vbd: uuid.UUID | None = None,
                 snaps: bool = True, **opts):
        self.keep = snaps
        self.disk = bytearray(disk)
        self.snap = {0: bytes(self.disk)}  # seq -> image after it
        self.ts = {0: 0}
        self.seq = 1
        self.now = time.time_ns() - 3600 * 10**9
        self.opts = opts
        self.j = Journal.create(path, vbd_uuid=str(vbd or uuid.uuid4()), size_bytes=disk,
                                **opts)
        self.rnd = random.Random(5)

    def tick(self) -> int:
        self.now += self.rnd.randrange(0, 5_000_000)
        return self.now

    def writes(self, recs):
        """recs: (sector, data) or (sector, length, flags)."""
        out = []
        for i, r in enumerate(recs):
            if len(r) == 2:
                sector, data = r
                out.append(wire.WriteRecord(self.seq + i, self.tick(), sector, len(data), 0, data))
            else:
                sector, length, flags = r
                out.append(wire.WriteRecord(self.seq + i, self.tick(), sector, length, flags, b""))
        self.j.append_writes(self.seq, out)
        for r in out:
            off = r.sector * 512
            self.disk[off:off + r.length] = r.data if r.data else bytes(r.length)
            if self.keep:
                self.snap[self.seq] = bytes(self.disk)
            self.ts[self.seq] = r.timestamp_ns
            self.seq += 1

    def event(self, kind, **kw):
        t = self.tick()
        self.j.append_event(self.seq, kind, t, **kw)
        if self.keep:
            self.snap[self.seq] = bytes(self.disk)
        self.ts[self.seq] = t
        self.seq += 1
        return self.seq - 1

    def random_writes(self, n):
        recs = []
        for _ in range(n):
            nsect = self.rnd.choice((1, 8, 8, 16))
            sector = self.rnd.randrange(0, len(self.disk) // 512 - nsect)
            k = self.rnd.random()
            if k < 0.1:
                recs.append((sector, nsect * 512, int(wire.WriteFlags.DISCARD)))
            elif k < 0.15:
                recs.append((sector, nsect * 512, int(wire.WriteFlags.ZEROES)))
            else:
                recs.append((sector, self.rnd.randbytes(nsect * 512)))
        self.writes(recs)

    def check(self, tmp: Path, seqs):
        out = tmp / "restored.img"
        for s in seqs:
            self.j.restore(out, seq=s)
            assert out.read_bytes() == self.snap[s], f"restore at seq {s}"


def test_restore_any_write_boundary_equals_the_disk_then(tmp_path):
    o = Oracle(tmp_path / "j")
    for i in range(30):
        o.random_writes(o.rnd.randrange(1, 12))
        if i % 3 == 0:
            o.event(Kind.FLUSH)
        if i % 5 == 4:
            o.j.commit()
    o.j.commit()
    flushes = [c.seq for c in o.j.checkpoints()]
    o.check(tmp_path, sorted({0, o.seq - 1, *flushes, *o.rnd.sample(range(o.seq), 30)}))
    assert o.j.verify()["ok"]


def test_a_sparse_base_is_copied_and_restored_with_its_holes(tmp_path):
    """A journal made from a disk that holds data here and there: its base and
    a restore at the base seq hold the same bytes, and the holes stay holes."""
    size = 64 << 20
    src = tmp_path / "disk.img"
    pieces = {4 << 20: os.urandom(100_000), 40 << 20: os.urandom(1 << 20), size - 4096: b"z" * 4096}
    with open(src, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    j = Journal.create(tmp_path / "j", vbd_uuid=str(uuid.uuid4()), size_bytes=size,
                       base_from=src, base_seq=7)
    out = tmp_path / "restored.img"
    j.restore(out, seq=7)
    for copy in (tmp_path / "j" / "base.img", out):
        assert copy.read_bytes() == src.read_bytes()
        assert os.stat(copy).st_blocks * 512 < 8 << 20     # ~1.2 MiB of data, not 64


def test_restore_at_time_is_the_last_write_at_or_before_it(tmp_path):
    o = Oracle(tmp_path / "j")
    for _ in range(20):
        o.random_writes(5)
        o.j.commit()
    for s in o.rnd.sample(range(1, o.seq), 25):
        t = o.ts[s]
        want = max(q for q in o.ts if q and o.ts[q] <= t)
        assert o.j.seq_at(t) == want
    with pytest.raises(OutOfWindow, match="outside the history window"):
        o.j.seq_at(o.ts[1] - 1)
    with pytest.raises(OutOfWindow):
        o.j.seq_at(o.ts[o.seq - 1] + 1)


def test_one_frame_per_batch_and_metadata_under_5_percent_for_4k_writes(tmp_path):
    o = Oracle(tmp_path / "j", disk=4 << 20, snaps=False)
    for _ in range(16):
        o.writes([(o.rnd.randrange(0, (4 << 20) // 4096) * 8, os.urandom(2048) + bytes(2048))
                  for _ in range(32)])
        o.event(Kind.FLUSH)
        o.j.commit()
    info = o.j.info()
    assert o.j.stats["frames"] == 16
    meta = info["index_bytes"] + sum(jm.SEG_HDR.size for _ in o.j.segments)
    meta += 16 * jm.FRAME_HDR.size + (16 * 33) * jm.REC.size
    assert meta / (info["journal_bytes"] + info["index_bytes"]) < 0.05
    # compressed: half of each block is zeroes
    assert info["journal_bytes"] < 0.6 * 16 * 32 * 4096


def test_flushes_are_consistent_checkpoints_but_not_inside_a_gap(tmp_path):
    o = Oracle(tmp_path / "j")
    o.random_writes(3)
    f1 = o.event(Kind.FLUSH)
    gap = o.event(Kind.GAP, arg=int(wire.GapReason.RING_OVERFLOW))
    o.j.append_resync(o.seq, 0, 4096, 0, b"r" * 4096)
    o.disk[0:4096] = b"r" * 4096
    o.snap[o.seq] = bytes(o.disk)
    o.seq += 1
    f2 = o.event(Kind.FLUSH)
    tag_in_gap = o.seq - 1
    o.event(Kind.RESYNC_END)
    o.random_writes(2)
    f3 = o.event(Kind.FLUSH)
    u = o.event(Kind.CHECKPOINT, arg=TagKind.USER, label="before upgrade")
    o.j.commit()
    o.j.add_tag(tag_in_gap, TagKind.ANALYZER, "jbd2 commit", consistent=True)
    o.j.add_tag(f3, TagKind.ANALYZER, "ext4 clean", consistent=True)
    o.j.commit()
    cps = {(c.seq, c.kind): c for c in o.j.checkpoints()}
    assert cps[(f1, TagKind.FLUSH)].consistent
    assert not cps[(f2, TagKind.FLUSH)].consistent  # inside the GAP window
    assert cps[(f3, TagKind.FLUSH)].consistent
    assert cps[(u, TagKind.USER)].label == "before upgrade" and cps[(u, TagKind.USER)].consistent
    assert not cps[(tag_in_gap, TagKind.ANALYZER)].consistent
    assert cps[(f3, TagKind.ANALYZER)].consistent and cps[(f3, TagKind.ANALYZER)].label == "ext4 clean"
    assert {c.seq for c in o.j.checkpoints(consistent_only=True)} == {f1, f3, u}
    assert gap not in {c.seq for c in o.j.checkpoints()}
    # the same after a reopen (the tail's .ckp rebuilt from the segment)
    o.j.close()
    (tmp_path / "j" / f"{jm._seg_name(1)}.ckp").unlink()
    j = Journal.open(tmp_path / "j", writable=True)
    assert {(c.seq, c.kind, c.consistent, c.label) for c in j.checkpoints()} == \
        {(c.seq, c.kind, c.consistent, c.label) for c in cps.values()}
    res = j.restore(tmp_path / "x.img", seq=f2)
    assert not res["write_ordered"]
    assert j.restore(tmp_path / "x.img", seq=f3)["write_ordered"]
    j.close()


def test_add_tag_validates(tmp_path):
    o = Oracle(tmp_path / "j")
    o.random_writes(3)
    o.j.commit()
    with pytest.raises(OutOfWindow):
        o.j.add_tag(99, TagKind.ANALYZER, "x")
    with pytest.raises(jm.JournalError, match="label over"):
        o.j.add_tag(2, TagKind.ANALYZER, "x" * 200)
    with pytest.raises(jm.JournalError, match="unknown checkpoint kind"):
        o.j.add_tag(2, 42, "x")
    ro = Journal.open(tmp_path / "j")
    with pytest.raises(jm.JournalError, match="read-only"):
        ro.add_tag(2)
    ro.close()


def test_retention_by_size_trims_oldest_applies_to_base_and_warns(tmp_path, caplog):
    o = Oracle(tmp_path / "j", segment_bytes=16 << 10, retention_bytes=64 << 10)
    for _ in range(40):
        o.random_writes(4)
        o.event(Kind.FLUSH)
        o.j.commit()
    o.j.settle()
    assert o.j.base_seq > 0 and o.j.journal_bytes <= (64 << 10) + (16 << 10)
    assert any("full" in w for w in o.j.warnings)
    assert "history up to seq" in caplog.text
    o.check(tmp_path, [o.j.base_seq, o.j.base_seq + 1, (o.j.base_seq + o.seq) // 2, o.seq - 1])
    with pytest.raises(OutOfWindow):
        o.j.restore(tmp_path / "x", seq=o.j.base_seq - 1)
    # reopen: same window, same content
    base = o.j.base_seq
    o.j.close()
    o.j = Journal.open(tmp_path / "j", writable=True, segment_bytes=16 << 10,
                       retention_bytes=64 << 10)
    assert o.j.base_seq == base and o.j.last_seq == o.seq - 1
    o.check(tmp_path, [base, o.seq - 1])
    o.j.close()


def test_retention_by_time(tmp_path):
    o = Oracle(tmp_path / "j", segment_bytes=8 << 10, retention_seconds=600)
    o.now = time.time_ns() - 3600 * 10**9  # an hour ago: older than the retention
    for _ in range(10):
        o.random_writes(4)
        o.j.commit()
    o.now = time.time_ns()
    for _ in range(10):
        o.random_writes(4)
        o.j.commit()
    o.j.settle()
    assert o.j.window()["first_ts_ns"] >= time.time_ns() - 700 * 10**9 or o.j.base_seq >= 40
    assert not o.j.warnings  # trimmed by time: no "full" warning
    o.check(tmp_path, [o.j.base_seq, o.seq - 1])
    o.j.close()


def test_interrupted_trim_is_finished_on_open(tmp_path, monkeypatch):
    o = Oracle(tmp_path / "j", segment_bytes=8 << 10, retention_bytes=1 << 40)
    for _ in range(12):
        o.random_writes(4)
        o.j.commit()
    first = o.j.segments[0]
    o.j.close()
    # what a trim killed mid-way leaves: meta says "applying", base half updated
    j = Journal.open(tmp_path / "j", writable=True, segment_bytes=8 << 10)
    j._write_meta(applying=first.last_seq)
    fd = os.open(tmp_path / "j" / "base.img", os.O_RDWR)
    with open(first.xjs, "rb") as f:
        jm._replay(fd, f, j._idx_entries(first), 1, first.last_seq // 2, j._dctx, False)
    os.close(fd)
    j.close()
    j = Journal.open(tmp_path / "j", writable=True, segment_bytes=8 << 10)
    assert j.base_seq == first.last_seq and not first.xjs.exists()
    o.j = j
    o.check(tmp_path, [j.base_seq, o.seq - 1])
    j.close()


def test_one_writer_at_a_time(tmp_path):
    o = Oracle(tmp_path / "j")
    with pytest.raises(jm.JournalError, match="another writer"):
        Journal.open(tmp_path / "j", writable=True)
    ro = Journal.open(tmp_path / "j")  # readers are welcome
    ro.close()
    o.j.close()


def test_batch_split_across_frames_and_resends_skipped(tmp_path):
    o = Oracle(tmp_path / "j", disk=16 << 20)
    big = [(i * 2048, os.urandom(1 << 20)) for i in range(6)]  # 6 MiB > one frame
    o.writes(big)
    o.j.commit()
    assert o.j.stats["frames"] == 2
    # a re-send of seqs 5..6 plus one new record: only the new one is journaled
    recs = [wire.WriteRecord(5 + i, o.tick(), 0, 512, 0, b"z" * 512) for i in range(3)]
    assert o.j.append_writes(5, recs) == 1
    o.disk[0:512] = b"z" * 512
    o.snap[7] = bytes(o.disk)
    o.seq = 8
    o.j.commit()
    o.check(tmp_path, [3, 6, 7])
    with pytest.raises(jm.JournalError, match="gap"):
        o.j.append_writes(10, recs[:1])
    o.j.close()


# --------------------------------------------------------------------------- the receiver


def test_receiver_journals_every_message_and_acks_only_durable(tmp_path):
    from tests.test_receiver import Dom0, random_batch
    from appliance_domu.receiver import Receiver

    r = Receiver("tcp://127.0.0.1:0", tmp_path / "data", insecure=True,
                 sync_interval=0.002).start()
    try:
        d = Dom0(r.endpoint, None, size=DISK)
        rnd = random.Random(3)
        snaps = {}
        try:
            d.hello()
            for i in range(30):
                d.writes(random_batch(rnd, DISK, rnd.randrange(1, 20)))
                d.flush()
                snaps[d.seq - 1] = bytes(d.model)
            d.wait_ack(d.seq - 1)
            last = d.seq - 1
        finally:
            d.close()
        st = r.status()["vbds"][str(d.vbd_uuid)]
        assert st["journal"]["last_seq"] >= last
    finally:
        r.stop()
    j = Journal.open(tmp_path / "data" / str(d.vbd_uuid) / "journal")
    assert j.durable_seq == last
    flushes = [c.seq for c in j.checkpoints(consistent_only=True)]
    assert flushes == sorted(snaps)
    for s in rnd.sample(flushes, 10):
        j.restore(tmp_path / "r.img", seq=s)
        assert (tmp_path / "r.img").read_bytes() == snaps[s]
    assert j.verify()["ok"]
    j.close()


def test_replica_without_journal_gets_one_based_on_its_image(tmp_path):
    from appliance_domu.replica import Replica
    from tests.test_receiver import _hello

    h = _hello(size=DISK)
    rep = Replica.create(tmp_path, h)
    rep.apply(wire.Writes(stream_id=1, epoch=1, first_seq=1, records=[
        wire.WriteRecord(1, time.time_ns(), 0, 4096, 0, b"a" * 4096)]))
    rep.sync()
    rep.close()
    jdir = Replica.directory(tmp_path, h.vbd_uuid) / "journal"
    import shutil
    shutil.rmtree(jdir)  # an appliance from before the journal
    rep = Replica.open(tmp_path, h.vbd_uuid)
    assert rep.journal.base_seq == 1
    rep.journal.restore(tmp_path / "r.img", seq=1)
    assert (tmp_path / "r.img").read_bytes()[:4096] == b"a" * 4096
    rep.close()


# --------------------------------------------------------------------------- the CLI


def run(*args, **kw):
    return subprocess.run([*XENTAP, *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def data_dir(tmp_path):
    """An appliance data dir with one VBD (dom3/xvdb): 3 flushes, a user tag."""
    vbd = uuid.UUID(int=0x1234)
    d = tmp_path / "data" / str(vbd)
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(dict(vbd_uuid=str(vbd), domid=3, vdev="xvdb")))
    o = Oracle(d / "journal", vbd=vbd)
    for i in range(3):
        o.random_writes(5)
        o.event(Kind.FLUSH)
    o.event(Kind.CHECKPOINT, arg=TagKind.USER, label="nightly")
    o.j.commit()
    o.j.close()
    o.vbd = vbd
    o.data = tmp_path / "data"
    return o


def test_cli_list_checkpoints_restore_verify(data_dir, tmp_path):
    o, dd = data_dir, str(data_dir.data)
    r = run("journal", "list", "--data-dir", dd, "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["vbd"] == str(o.vbd) and row["name"] == "dom3/xvdb"
    assert row["first_seq"] == 0 and row["last_seq"] == o.seq - 1
    assert row["rpo_seconds"] > 0 and row["journal_bytes"] > 0
    r = run("journal", "list", "--data-dir", dd)
    assert r.returncode == 0 and "dom3/xvdb" in r.stdout
    r = run("journal", "checkpoints", "dom3/xvdb", "--data-dir", dd, "--json")
    cps = json.loads(r.stdout)
    assert [c["kind"] for c in cps] == ["flush"] * 3 + ["user"]
    assert all(c["consistent"] for c in cps) and cps[-1]["label"] == "nightly"
    r = run("journal", "checkpoints", str(o.vbd)[:8], "--data-dir", dd)
    assert r.returncode == 0 and "nightly" in r.stdout
    out = tmp_path / "out.img"
    cp = cps[1]
    r = run("journal", "restore", str(o.vbd), "--checkpoint", str(cp["id"]), "--to", str(out),
            "--data-dir", dd)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == o.snap[cp["seq"]]
    assert "restoring" in r.stderr  # the progress bar
    # --at a time: the last write at or before it
    s = 7
    at = o.ts[s] / 1e9
    r = run("journal", "restore", str(o.vbd), "--at", f"{at:.9f}", "--to", str(out), "--force",
            "--data-dir", dd, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["seq"]
    assert o.ts[got] <= o.ts[s] + 1000 and out.read_bytes() == o.snap[got]
    r = run("journal", "verify", str(o.vbd), "--data-dir", dd, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]


def test_cli_verify_reports_corruption_as_one_line(data_dir):
    seg = data_dir.data / str(data_dir.vbd) / "journal" / f"{jm._seg_name(1)}.xjs"
    b = bytearray(seg.read_bytes())
    b[jm.SEG_HDR.size + jm.FRAME_HDR.size + 5] ^= 0x40  # inside the first frame
    seg.write_bytes(bytes(b))
    r = run("journal", "verify", str(data_dir.vbd), "--data-dir", str(data_dir.data))
    assert r.returncode == 1
    assert "checksum mismatch" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("xentap: journal of")


@pytest.mark.parametrize("args,message", [
    (("checkpoints", "nosuchvbd"), "unknown VBD 'nosuchvbd'"),
    (("restore", "dom3/xvdb", "--at", "2001-01-01T00:00:00Z", "--to", "{tmp}/x.img"),
     "outside the history window"),
    (("restore", "dom3/xvdb", "--at", "yesterday-ish", "--to", "{tmp}/x.img"), "not a time"),
    (("restore", "dom3/xvdb", "--seq", "999999", "--to", "{tmp}/x.img"),
     "outside the history window"),
    (("restore", "dom3/xvdb", "--checkpoint", "424242", "--to", "{tmp}/x.img"),
     "no checkpoint 424242"),
    (("restore", "dom3/xvdb", "--seq", "1", "--to", "{tmp}/no/such/dir/x.img"),
     "no directory"),
    (("restore", "dom3/xvdb", "--seq", "1", "--to", "/proc/xentap-restore.img"),
     "/proc/xentap-restore.img"),
    (("restore", "dom3/xvdb", "--to", "{tmp}/x.img"), "exactly one of"),
    (("restore", "dom3/xvdb", "--seq", "1", "--to", "{exists}"), "exists (use --force"),
])
def test_cli_bad_input_is_one_line(data_dir, tmp_path, args, message):
    (tmp_path / "exists.img").write_bytes(b"keep me")
    args = [a.format(tmp=tmp_path, exists=tmp_path / "exists.img") for a in args]
    r = run("journal", *args, "--data-dir", str(data_dir.data))
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "exists.img").read_bytes() == b"keep me"


def test_cli_no_data_dir_is_one_line(tmp_path):
    r = run("journal", "list", "--data-dir", str(tmp_path / "nope"))
    assert r.returncode == 1 and "no appliance data directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_journal_json_has_the_figures(tmp_path):
    r = run("bench", "journal", "--dir", str(tmp_path), "--size", "64M", "--history", "1m",
            "--history-size", "16M", "--ingest-size", "16M", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("ingest_4k_mb_s", "ingest_1m_mb_s", "restore_mb_s", "seq_write_mb_s",
              "restore_ratio"):
        assert out[k] > 0, k
    assert 0 < out["metadata_overhead"] < 0.05


def test_replica_image_behind_its_state_is_redone_from_the_journal(tmp_path, monkeypatch):
    """The journal is the image's write-ahead log: a group commit syncs the journal
    only; after a crash, what the image lost beyond image_seq is re-applied on open."""
    from appliance_domu import replica as replica_mod
    from appliance_domu.replica import Replica
    from tests.test_receiver import _hello

    monkeypatch.setattr(replica_mod, "IMAGE_SYNC_INTERVAL", 3600.0)
    h = _hello(size=DISK)
    rep = Replica.create(tmp_path, h)
    recs = [wire.WriteRecord(1 + i, time.time_ns(), i * 8, 4096, 0, bytes([65 + i]) * 4096)
            for i in range(4)]
    rep.apply(wire.Writes(stream_id=1, epoch=1, first_seq=1, records=recs))
    assert rep.sync() == 4
    st = json.loads(rep.state_path.read_bytes())
    assert st["high_water"] == 4 and st["image_seq"] == 0  # durable in the journal only
    # the crash: the image's unsynced writes are lost (here: overwritten), nothing closed
    fd = os.open(rep.image_path, os.O_RDWR)
    os.pwrite(fd, bytes(4 * 4096), 0)
    os.close(fd)
    rep.journal._writer_fd, fd_w = -1, rep.journal._writer_fd
    os.close(fd_w)  # the dead process's lock goes with it
    rep2 = Replica.open(tmp_path, h.vbd_uuid)
    assert rep2.read(0, 4 * 4096) == b"".join(bytes([65 + i]) * 4096 for i in range(4))
    assert json.loads(rep2.state_path.read_bytes())["image_seq"] == 4
    rep2.close()


def test_cli_restore_at_now_is_the_latest_point_and_the_future_is_refused(data_dir, tmp_path):
    o, dd = data_dir, str(data_dir.data)
    out = tmp_path / "now.img"
    r = run("journal", "restore", "dom3/xvdb", "--at", "now", "--to", str(out), "--data-dir", dd)
    assert r.returncode == 0, r.stderr
    assert "restoring the latest point" in r.stderr
    assert out.read_bytes() == o.snap[o.seq - 1]
    r = run("journal", "restore", "dom3/xvdb", "--at", "2099-01-01T00:00:00Z", "--to",
            str(tmp_path / "future.img"), "--data-dir", dd)
    assert r.returncode == 1 and "outside the history window" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "future.img").exists()


def test_restores_from_a_reader_while_the_writer_trims(tmp_path):
    """A reader (what `xentap journal restore` is) restores while the appliance
    appends and trims: a trim waits for the base copy, and every restore of a
    point still in the window equals the disk at that point."""
    import threading

    o = Oracle(tmp_path / "j", segment_bytes=16 << 10, retention_bytes=48 << 10)
    points: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()
    checked = []

    def reader():
        r = Journal.open(tmp_path / "j")
        try:
            while not done.is_set():
                if not points:
                    time.sleep(0.001)
                    continue
                s = points[-1]
                out = tmp_path / "reader.img"
                try:
                    r.restore(out, seq=s)
                except OutOfWindow:
                    continue  # trimmed away meanwhile: refused, never wrong
                assert out.read_bytes() == o.snap[s], s
                checked.append(s)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            r.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(40):
            o.random_writes(4)
            o.event(Kind.FLUSH)
            o.j.commit()
            points.append(o.seq - 1)
            time.sleep(0.002)
    finally:
        done.set()
        t.join()
    o.j.settle()
    assert not errors, errors
    assert checked and o.j.base_seq > 0 and o.j.stats["trims"] > 0
    o.j.close()
