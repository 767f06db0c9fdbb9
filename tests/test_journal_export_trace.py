"""`xentap journal export-trace`: an appliance journal, made by the real ingest
path (wire frames from a dom0 sender to the appliance's Receiver, which
journals them), written back out as an analyzer write trace: the same writes
and flushes in the same order, the journal's seqs and times, discards and
tags left out, ZEROES as zero writes; bad input is one line."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from analyzer import trace as tr
from analyzer.checks import MIN_SIZE, analyze_records
from appliance_domu.receiver import Receiver
from engines import journal as jm
from tests.test_receiver import Dom0
from xentap import wire

XENTAP = [sys.executable, "-m", "xentap.cli"]
DATA = Path(__file__).parent / "data"
EXT4 = DATA / "ext4-small.trace.gz"  # a real kernel's mkfs.ext4 + files + umount


def run(*args):
    return subprocess.run([*XENTAP, *args], capture_output=True, text=True, timeout=120)


def journal_of(tmp_path, size, send) -> tuple[Path, uuid.UUID]:
    """Start a Receiver, let ``send(dom0)`` stream to it, wait until all is
    acknowledged (durable in the journal), stop it: (data dir, vbd uuid)."""
    data = tmp_path / "data"
    r = Receiver("tcp://127.0.0.1:0", data, insecure=True, sync_interval=0.002).start()
    try:
        d = Dom0(r.endpoint, None, size=size)
        try:
            d.hello()
            send(d)
            d.wait_ack(d.seq - 1, timeout=30)
        finally:
            d.close()
    finally:
        r.stop()
    return data, d.vbd_uuid


def send_trace(d: Dom0, records, batch: int = 8) -> dict[int, int]:
    """Send a trace's records (writes in batches, flushes one by one, an ACK
    wait now and then for credit); returns {journal seq: trace seq}."""
    seqs, pending = {}, []

    def push():
        if pending:
            d.writes([(r.offset // 512, r.data) for r in pending])
            pending.clear()

    for n, r in enumerate(records):
        if r.kind == tr.WRITE:
            seqs[d.seq + len(pending)] = r.seq
            pending.append(r)
            if len(pending) == batch:
                push()
        else:
            push()
            seqs[d.seq] = r.seq
            d.flush()
        if n % 32 == 31:
            push()
            d.wait_ack(d.seq - 1, timeout=30)
    push()
    return seqs


def test_a_journal_of_a_real_ext4_trace_exports_to_the_same_writes_and_flushes(tmp_path):
    src = list(tr.read(EXT4))
    seqmap = {}
    data, vbd = journal_of(tmp_path, MIN_SIZE["ext4"],
                           lambda d: seqmap.update(send_trace(d, src)))
    out = tmp_path / "export.trace.gz"
    r = run("journal", "export-trace", str(vbd), "-o", str(out), "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    assert "exporting" in r.stderr  # the progress bar
    assert f"exported seqs 1..{len(src)} of {vbd}" in r.stdout, r.stdout
    got = list(tr.read(out))
    assert len(got) == len(src)
    for g, s in zip(got, src):
        assert (g.kind, g.offset, g.data) == (s.kind, s.offset, s.data), (g.seq, s.seq)
        assert seqmap[g.seq] == s.seq  # the journal's seqs, in order
    assert all(g.time_ns > 0 for g in got)  # the times the appliance journaled
    # the analyzer sees in the export what it sees in the original, seq for seq
    _, ev_src, _ = analyze_records(src)
    _, ev_got, _ = analyze_records(got)
    assert [(e.kind, e.consistent, e.fstype) for e in ev_got] == \
        [(e.kind, e.consistent, e.fstype) for e in ev_src]
    assert [seqmap[e.seq] for e in ev_got] == [e.seq for e in ev_src]
    assert sum(e.consistent for e in ev_got) >= 8
    # --json, --to-seq, an uncompressed file
    raw = tmp_path / "part.trace"
    r = run("journal", "export-trace", str(vbd)[:8], "-o", str(raw), "--to-seq", "20",
            "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stderr
    fig = json.loads(r.stdout)
    assert fig["first_seq"] == 1 and fig["last_seq"] == 20 and fig["output"] == str(raw)
    assert fig["writes"] + fig["flushes"] == 20 and fig["discards"] == 0
    assert raw.read_bytes()[:8] == tr.MAGIC
    assert [(g.kind, g.offset, g.data) for g in tr.read(raw)] == \
        [(g.kind, g.offset, g.data) for g in got[:20]]


def test_zeroes_discards_tags_and_a_gap_window(tmp_path):
    size = 8 << 20
    rnd = random.Random(11)
    image = bytearray(size)  # what replaying the trace must give: discards left as they were

    def send(d: Dom0):
        for i in range(12):
            recs = []
            for _ in range(rnd.randrange(1, 12)):
                nsect = rnd.choice((1, 8, 16, 64))
                sector = rnd.randrange(0, size // 512 - nsect)
                k = rnd.random()
                if k < 0.15:
                    recs.append((sector, nsect * 512, int(wire.WriteFlags.DISCARD)))
                elif k < 0.3:
                    recs.append((sector, nsect * 512, int(wire.WriteFlags.ZEROES)))
                    image[sector * 512:(sector + nsect) * 512] = bytes(nsect * 512)
                else:
                    b = rnd.randbytes(nsect * 512)
                    recs.append((sector, b))
                    image[sector * 512:(sector + nsect) * 512] = b
            d.writes(recs)
            d.flush()
            if i == 5:
                d.send(wire.Checkpoint(stream_id=1, epoch=d.epoch, seq=d.seq, timestamp_ns=1,
                                       kind=wire.CheckpointKind.USER, label="tag"))
                d.seq += 1
        d.send(wire.Gap(stream_id=1, epoch=d.epoch, seq=d.seq, timestamp_ns=1,
                        reason=wire.GapReason.RING_OVERFLOW, dirty_regions=2))
        d.seq += 1
        d.send(wire.Resync(stream_id=1, epoch=d.epoch, seq=d.seq, sector=64, length=4096,
                           flags=0, data=b"r" * 4096))
        image[64 * 512:64 * 512 + 4096] = b"r" * 4096
        d.seq += 1
        d.send(wire.Resync(stream_id=1, epoch=d.epoch, seq=d.seq, sector=128, length=8192,
                           flags=int(wire.WriteFlags.ZEROES), data=b""))
        image[128 * 512:128 * 512 + 8192] = bytes(8192)
        d.seq += 1
        d.send(wire.ResyncEnd(stream_id=1, epoch=d.epoch, seq=d.seq, timestamp_ns=2,
                              regions=2))
        d.seq += 1
        d.writes([(256, b"z" * 4096)])
        image[256 * 512:257 * 512 + 3584] = b"z" * 4096

    data, vbd = journal_of(tmp_path, size, send)
    out = tmp_path / "t.trace.zst"
    r = run("journal", "export-trace", str(vbd), "-o", str(out), "--data-dir", str(data),
            "--json")
    assert r.returncode == 0, r.stderr
    fig = json.loads(r.stdout)
    assert fig["discards"] > 0 and fig["zero_bytes"] > 0 and fig["tags"] == 1
    assert fig["gaps"] == 1 and fig["resyncs"] == 2 and fig["flushes"] == 12
    replay = bytearray(size)
    seqs = []
    for rec in tr.read(out):
        seqs.append(rec.seq)
        if rec.kind == tr.WRITE:
            replay[rec.offset:rec.offset + len(rec.data)] = rec.data
    assert seqs == sorted(seqs) and seqs[-1] == fig["last_seq"]
    assert bytes(replay) == bytes(image)
    r = run("journal", "export-trace", str(vbd), "-o", str(tmp_path / "t2.trace"),
            "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    assert "discards" in r.stderr and "left out" in r.stderr
    assert "GAP..RESYNC" in r.stderr and "not in write order" in r.stderr


@pytest.fixture
def small_journal(tmp_path):
    data, vbd = journal_of(tmp_path, 1 << 20, lambda d: (d.writes([(0, b"a" * 4096)]),
                                                         d.flush(),
                                                         d.writes([(8, b"b" * 4096)])))
    return data, vbd


def _one_line_error(r, message, after_progress=False):
    """Exit 1, no traceback, the error on one line (the last, after the
    progress bar's label when the export had begun)."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    if after_progress:
        assert lines[0].startswith("exporting "), r.stderr
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("xentap: "), r.stderr
    assert message in lines[0], r.stderr


@pytest.mark.parametrize("args,message", [
    (("nosuchvbd", "-o", "{tmp}/x.trace"), "unknown VBD 'nosuchvbd'"),
    (("{vbd}", "-o", "{tmp}/exists.trace"), "exists (use --force"),
    (("{vbd}", "-o", "{tmp}/no/such/dir/x.trace"), "no directory"),
    (("{vbd}", "-o", "{tmp}/x.trace", "--to-seq", "99"), "after the newest journaled seq 3"),
    (("{vbd}", "-o", "/proc/xentap-export.trace"), "/proc/xentap-export.trace"),
])
def test_bad_input_is_one_line(small_journal, tmp_path, args, message):
    data, vbd = small_journal
    (tmp_path / "exists.trace").write_bytes(b"keep me")
    args = [a.format(tmp=tmp_path, vbd=vbd) for a in args]
    _one_line_error(run("journal", "export-trace", *args, "--data-dir", str(data)), message)
    assert (tmp_path / "exists.trace").read_bytes() == b"keep me"
    assert not (tmp_path / "x.trace").exists()


def test_a_corrupt_or_trimmed_journal_is_one_line_and_leaves_no_file(small_journal, tmp_path):
    data, vbd = small_journal
    jdir = data / str(vbd) / "journal"
    out = tmp_path / "x.trace.gz"
    seg = jdir / f"{jm._seg_name(1)}.xjs"
    good = seg.read_bytes()
    b = bytearray(good)
    b[jm.SEG_HDR.size + jm.FRAME_HDR.size + 5] ^= 0x40  # inside the first frame
    seg.write_bytes(bytes(b))
    _one_line_error(run("journal", "export-trace", str(vbd), "-o", str(out),
                        "--data-dir", str(data)), "checksum mismatch", after_progress=True)
    assert not out.exists() and not list(tmp_path.glob(".part.*"))
    seg.write_bytes(good)
    meta = json.loads((jdir / "meta.json").read_bytes())
    (jdir / "meta.json").write_text(json.dumps(dict(meta, base_seq=1)))
    _one_line_error(run("journal", "export-trace", str(vbd), "-o", str(out),
                        "--data-dir", str(data)), "starts after seq 1")
    assert not out.exists()
