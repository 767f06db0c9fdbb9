"""Crash safety of the journal: torn and corrupt tails are cut by checksum on
open, and SIGKILL at any instant of ingest (the engine alone, and the whole
appliance process) loses nothing that was made durable / acknowledged."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from engines import journal as jm
from engines.journal import Journal, Kind
from xentap import wire

DISK = 256 * 1024


def _build(path: Path, frames: int = 12):
    """A journal of ``frames`` commits (one frame each) in one segment; returns
    (snapshots by seq, frame index entries)."""
    rnd = random.Random(11)
    j = Journal.create(path, vbd_uuid=str(uuid.uuid4()), size_bytes=DISK)
    disk = bytearray(DISK)
    snaps = {0: bytes(disk)}
    seq, t = 1, time.time_ns() - 10**12
    for _ in range(frames):
        recs = []
        for _ in range(rnd.randrange(1, 6)):
            sector = rnd.randrange(0, DISK // 512 - 8)
            data = rnd.randbytes(4096)
            t += 1000
            recs.append(wire.WriteRecord(seq + len(recs), t, sector, 4096, 0, data))
        j.append_writes(seq, recs)
        for r in recs:
            disk[r.sector * 512:r.sector * 512 + 4096] = r.data
            snaps[seq] = bytes(disk)
            seq += 1
        j.append_event(seq, Kind.FLUSH, t)
        snaps[seq] = bytes(disk)
        seq += 1
        j.commit()
    (seg,) = j.segments
    ents = j._idx_entries(seg)
    j.close()
    return snaps, ents, seg.xjs.name


def _reopen_and_check(jdir: Path, snaps: dict, want_last: int, tmp: Path) -> None:
    j = Journal.open(jdir, writable=True)
    try:
        assert j.last_seq == want_last
        out = tmp / "restored.img"
        j.restore(out, seq=want_last)
        assert out.read_bytes() == snaps[want_last]
        # the journal goes on from there
        rec = wire.WriteRecord(want_last + 1, time.time_ns(), 0, 512, 0, b"n" * 512)
        j.append_writes(want_last + 1, [rec])
        j.commit()
        j.restore(out, seq=want_last + 1)
        assert out.read_bytes()[:512] == b"n" * 512
        assert j.verify()["ok"]
        assert all(c.seq <= want_last + 1 for c in j.checkpoints())
    finally:
        j.close()


def test_torn_tail_is_cut_after_the_last_whole_frame(tmp_path):
    src = tmp_path / "src"
    snaps, ents, seg = _build(src)
    rnd = random.Random(2)
    cuts = [ents[-1][4] + 1, ents[-1][4] + jm.FRAME_HDR.size - 1,
            ents[-1][4] + ents[-1][5] - 1, ents[3][4], jm.SEG_HDR.size]
    cuts += [rnd.randrange(jm.SEG_HDR.size, ents[-1][4] + ents[-1][5]) for _ in range(8)]
    for cut in cuts:
        d = tmp_path / f"cut-{cut}"
        shutil.copytree(src, d)
        os.truncate(d / seg, cut)
        whole = [e for e in ents if e[4] + e[5] <= cut]
        _reopen_and_check(d, snaps, whole[-1][1] if whole else 0, tmp_path)


def test_bit_flip_in_the_tail_drops_that_frame_and_what_follows(tmp_path):
    src = tmp_path / "src"
    snaps, ents, seg = _build(src)
    rnd = random.Random(3)
    for k in [len(ents) - 1, len(ents) - 1, len(ents) - 2, len(ents) - 4]:
        e = ents[k]
        off = rnd.randrange(e[4], e[4] + e[5])
        d = tmp_path / f"flip-{k}-{off}"
        shutil.copytree(src, d)
        with open(d / seg, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))
        _reopen_and_check(d, snaps, ents[k - 1][1], tmp_path)


def test_a_segment_whose_header_never_made_it_is_dropped(tmp_path):
    src = tmp_path / "src"
    snaps, ents, seg = _build(src)
    j = Journal.open(src, writable=True)
    last = j.last_seq
    j.close()
    (src / f"{jm._seg_name(last + 1)}.xjs").write_bytes(b"XTJS\x01")  # torn header
    _reopen_and_check(src, snaps, last, tmp_path)


# --------------------------------------------------------------------------- SIGKILL

_CHILD = textwrap.dedent("""
    import random, sys, time
    from engines.journal import Journal, Kind
    from xentap import wire
    path, disk = sys.argv[1], int(sys.argv[2])
    try:
        j = Journal.open(path, writable=True, segment_bytes=256 << 10,
                         retention_bytes=1 << 40)
    except OSError:
        j = Journal.create(path, vbd_uuid="00000000-0000-0000-0000-00000000abcd",
                           size_bytes=disk, segment_bytes=256 << 10)
    seq = j.last_seq + 1
    while True:
        n = random.randrange(1, 40)
        recs = []
        for s in range(seq, seq + n):
            r = random.Random(s)
            recs.append(wire.WriteRecord(s, time.time_ns(), r.randrange(disk // 4096) * 8,
                                         4096, 0, r.randbytes(4096)))
        j.append_writes(seq, recs)
        seq += n
        if random.random() < 0.3:
            j.append_event(seq, Kind.FLUSH, time.time_ns())
            seq += 1
        if random.random() < 0.5:
            print(j.commit(), flush=True)   # durable: the child's "ACK"
""")


def _oracle(upto: int, flushes: set, disk: int) -> bytes:
    img = bytearray(disk)
    for s in range(1, upto + 1):
        if s in flushes:
            continue
        r = random.Random(s)
        off = r.randrange(disk // 4096) * 4096
        img[off:off + 4096] = r.randbytes(4096)
    return bytes(img)


@pytest.mark.slow
def test_sigkill_during_ingest_loses_nothing_durable(tmp_path):
    disk = 1 << 20
    jdir = tmp_path / "j"
    rnd = random.Random(5)
    acked = 0
    root = os.path.dirname(os.path.dirname(__file__))
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, "-c", _CHILD, str(jdir), str(disk)], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3 + rnd.random())
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, err
        lines = out.split()
        if lines:
            acked = max(acked, int(lines[-1]))
        j = Journal.open(jdir, writable=True, segment_bytes=256 << 10)
        try:
            assert j.last_seq >= acked, f"round {round_}: acked {acked}, journal {j.last_seq}"
            flushes = {c.seq for c in j.checkpoints()}
            for s in {acked, j.last_seq, rnd.randrange(0, j.last_seq + 1)}:
                j.restore(tmp_path / "r.img", seq=s)
                assert (tmp_path / "r.img").read_bytes() == _oracle(s, flushes, disk), s
            assert j.verify()["ok"]
        finally:
            j.close()
    assert acked > 0


@pytest.mark.slow
def test_sigkill_appliance_every_acked_write_restorable(tmp_path):
    """The whole appliance (`xentap appliance serve`) killed mid-stream, repeatedly:
    every ACKed write is in the journal and restores to what dom0 wrote."""
    from tests.test_receiver import DISK as RDISK, Dom0, _serve, random_batch

    ep = f"ipc://{tmp_path}/app.sock"
    data = tmp_path / "data"
    rnd = random.Random(9)
    vbd = uuid.uuid4()
    model = bytearray(RDISK)
    steps: list[tuple[int, list, bytes]] = []  # (last seq, [records], image after the flush)
    acked, epoch = 0, 0

    def send_step(d, recs, flush_seq):
        d.send(wire.Writes(stream_id=1, epoch=d.epoch, first_seq=recs[0].seq, records=recs))
        d.send(wire.Flush(stream_id=1, epoch=d.epoch, seq=flush_seq, timestamp_ns=recs[-1].timestamp_ns))

    def drain(d):
        nonlocal acked
        while (a := d.recv(0)) is not None:
            if isinstance(a, wire.Ack):
                acked = max(acked, a.acked_seq)

    for round_ in range(4):
        p = _serve(tmp_path, "--listen", ep, "--data-dir", str(data), "--insecure")
        d = Dom0(ep, None, vbd_uuid=vbd)
        try:
            epoch += 1
            todo = [st for st in steps if st[0] > acked]
            d.seq = todo[0][1][0].seq if todo else (steps[-1][0] + 1 if steps else 1)
            acked = max(acked, d.hello(epoch=epoch).acked_seq)
            for last, recs, _img in todo:  # re-send what was not acknowledged, unchanged
                send_step(d, recs, last)
            seq = steps[-1][0] + 1 if steps else 1
            for _ in range(30):
                recs = []
                for sector, *rest in random_batch(rnd, RDISK, 8):
                    if len(rest) == 1:
                        data_ = rest[0]
                        recs.append(wire.WriteRecord(seq, time.time_ns(), sector, len(data_), 0,
                                                     data_))
                        model[sector * 512:sector * 512 + len(data_)] = data_
                    else:
                        length, flags = rest
                        recs.append(wire.WriteRecord(seq, time.time_ns(), sector, length, flags,
                                                     b""))
                        model[sector * 512:sector * 512 + length] = bytes(length)
                    seq += 1
                send_step(d, recs, seq)
                steps.append((seq, recs, bytes(model)))
                seq += 1
                drain(d)
            time.sleep(rnd.random() * 0.05)
            drain(d)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
            d.close()
        st = json.loads((data / str(vbd) / "state.json").read_bytes())
        assert st["high_water"] >= acked  # nothing ACKed was lost ...
        j = Journal.open(data / str(vbd) / "journal")
        try:
            assert j.durable_seq >= acked  # ... from the journal either
            done = [x for x in steps if x[0] <= acked]
            for last, _recs, img in done[-2:] + rnd.sample(done, min(3, len(done))):
                j.restore(tmp_path / "r.img", seq=last)
                assert (tmp_path / "r.img").read_bytes() == img, (round_, last)
            assert {c.seq for c in j.checkpoints()} >= {x[0] for x in done if x[0] > j.base_seq}
        finally:
            j.close()
    assert acked > 0
