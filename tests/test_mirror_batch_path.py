"""The appliance's batch path: WRITES decoded as arrays (wire.Records), checked,
journaled and applied without a Python object per record must behave exactly
like the record-by-record path it shortcuts."""
from __future__ import annotations

import json
import os
import random
import time
import uuid

import pytest

from appliance_domu import replica as replica_mod
from appliance_domu.replica import Replica
from engines import journal as jm
from xentap import wire

DISK = 4 << 20
SID = 7


def _hello(size=DISK, ls=512, features=7):
    return wire.Hello(stream_id=SID, epoch=1, host_id=uuid.uuid4(), vbd_uuid=uuid.uuid4(),
                      domid=1, devid=51712, vdev="xvda", size_bytes=size,
                      logical_sector_size=ls, physical_sector_size=4096, next_seq=1,
                      features=features)


def _checker(h):
    c = wire.StreamChecker(SID)
    c.feed(wire.encode(h))
    return c


def _recs(rnd, first, n, length, *, flags=0, disk=DISK):
    return [wire.WriteRecord(first + i, time.time_ns() + i, rnd.randrange(disk // length)
                             * length // 512, length, flags,
                             b"" if flags & wire.NO_DATA_FLAGS else rnd.randbytes(length))
            for i in range(n)]


def _writes(first, recs):
    return wire.Writes(stream_id=SID, epoch=1, first_seq=first, records=recs)


def test_uniform_batch_decodes_to_arrays_equal_to_the_records():
    rnd = random.Random(1)
    recs = _recs(rnd, 5, 50, 4096)
    m = wire.decode(wire.encode(_writes(5, recs)))
    assert type(m.records) is wire.Records
    assert m.records == recs and list(m.records) == recs
    assert m.records[-1] == recs[-1] and m.records[10:20] == recs[10:20]
    assert wire.payload_bytes(m) == 50 * 4096
    assert [bytes(d) for d in m.records.data_views()] == [r.data for r in recs]
    assert m.records.seq.tolist() == list(range(5, 55))
    # records of different sizes: the record-by-record decode
    recs[3] = wire.WriteRecord(8, 0, 0, 512, 0, b"x" * 512)
    m = wire.decode(wire.encode(_writes(5, recs)))
    assert type(m.records) is list and m.records == recs
    # discards only: no data, any lengths
    d = [wire.WriteRecord(1 + i, 0, i * 8, 4096 * (i + 1), int(wire.WriteFlags.DISCARD), b"")
         for i in range(4)]
    m = wire.decode(wire.encode(_writes(1, d)))
    assert type(m.records) is wire.Records and m.records == d


def test_a_batch_whose_layout_only_looks_uniform_is_not_misread():
    # record 0 carries 4096 bytes; the rest are DISCARDs (0 bytes) whose total
    # happens to fill the body as if each carried 4096: the arrays must not be used
    rnd = random.Random(2)
    recs = [wire.WriteRecord(1, 0, 0, 4096, 0, rnd.randbytes(4096))]
    recs += [wire.WriteRecord(2 + i, 0, 8, 512, int(wire.WriteFlags.DISCARD), b"")
             for i in range(129)]  # 129 * 32 = 4128 = 4096 + 32
    frame = wire.encode(_writes(1, recs))
    m = wire.decode(frame)
    assert m.records == recs


BAD = [
    ("seq", wire.SequenceDisorder),
    ("misaligned", wire.Misaligned),
    ("zero", wire.Misaligned),
    ("past_end", wire.OutOfRange),
    ("huge_sector", wire.OutOfRange),
    ("flag", wire.RecordError),
    ("fua", wire.RecordError),  # FUA without the HELLO feature
    ("fua_ok", None),
]


@pytest.mark.parametrize("what,exc", BAD)
def test_checks_on_arrays_reject_what_the_record_checks_reject(what, exc):
    rnd = random.Random(3)
    h = _hello(ls=4096, features=7 if what == "fua_ok" else 0)
    recs = _recs(rnd, 1, 20, 4096)
    i = rnd.randrange(20)
    r = recs[i]
    if what == "seq":
        recs[i] = wire.WriteRecord(r.seq + 1, r.timestamp_ns, r.sector, r.length, r.flags, r.data)
    elif what == "misaligned":
        recs[i] = wire.WriteRecord(r.seq, r.timestamp_ns, r.sector + 1, r.length, r.flags, r.data)
    elif what == "zero":
        recs = [wire.WriteRecord(x.seq, 0, x.sector, 0, 0, b"") for x in recs]
    elif what == "past_end":
        recs[i] = wire.WriteRecord(r.seq, 0, DISK // 512, r.length, r.flags, r.data)
    elif what == "huge_sector":
        recs[i] = wire.WriteRecord(r.seq, 0, (1 << 64) - 8, r.length, r.flags, r.data)
    elif what == "flag":  # ZEROES without the HELLO feature (and carrying no data)
        recs = [wire.WriteRecord(x.seq, 0, x.sector, x.length, int(wire.WriteFlags.ZEROES), b"")
                for x in recs]
    elif what in ("fua", "fua_ok"):
        recs = [wire.WriteRecord(x.seq, 0, x.sector, x.length, int(wire.WriteFlags.FUA), x.data)
                for x in recs]
    frame = wire.encode(_writes(1, recs))
    fast = wire.decode(frame)
    assert type(fast.records) is wire.Records
    slow = _writes(1, list(recs))
    results = []
    for msg in (fast, slow):
        c = _checker(h)
        try:
            out = c.check(msg)
        except wire.WireError as e:
            results.append((type(e), str(e)))
        else:
            results.append((None, out.last_seq))
    assert results[0] == results[1]
    assert results[0][0] is exc


def _journal_restore(tmp_path, name, batches, to_seq):
    j = jm.Journal.create(tmp_path / name, vbd_uuid=str(uuid.uuid4()), size_bytes=DISK)
    try:
        for first, recs in batches:
            j.append_writes(first, recs)
            j.commit()
        out = tmp_path / f"{name}.img"
        j.restore(out, seq=to_seq)
        return out.read_bytes()
    finally:
        j.close()


def test_journal_of_arrays_restores_like_the_journal_of_records(tmp_path):
    rnd = random.Random(4)
    model = bytearray(DISK)
    batches, decoded, first = [], [], 1
    for k in range(12):
        length = rnd.choice((4096, 8192, 65536, 512))
        recs = _recs(rnd, first, rnd.randrange(1, 40), length)
        m = wire.decode(wire.encode(_writes(first, recs)))
        assert type(m.records) is wire.Records
        batches.append((first, recs))
        decoded.append((first, m.records))
        for r in recs:
            model[r.sector * 512:r.sector * 512 + r.length] = r.data
        first += len(recs)
    a = _journal_restore(tmp_path, "records", batches, first - 1)
    b = _journal_restore(tmp_path, "arrays", decoded, first - 1)
    assert a == b == bytes(model)


def test_restore_writes_each_block_with_its_last_write(tmp_path):
    """Overlapping writes of mixed sizes, discards and zeroes, restored at every
    point: the block-once replay must equal the oracle at each seq."""
    rnd = random.Random(5)
    j = jm.Journal.create(tmp_path / "j", vbd_uuid=str(uuid.uuid4()), size_bytes=DISK)
    model = bytearray(DISK)
    states = {0: bytes(model)}
    seq = 1
    try:
        for _ in range(30):
            recs = []
            for _ in range(rnd.randrange(1, 8)):
                length = rnd.choice((512, 1024, 4096, 12288, 65536))
                sector = rnd.randrange(0, 256)  # a small region: many overlaps
                fl = rnd.choice((0, 0, 0, int(wire.WriteFlags.DISCARD),
                                 int(wire.WriteFlags.ZEROES)))
                data = b"" if fl else rnd.randbytes(length)
                recs.append(wire.WriteRecord(seq, 0, sector, length, fl, data))
                off = sector * 512
                model[off:off + length] = data or bytes(length)
                states[seq] = bytes(model)
                seq += 1
            j.append_writes(recs[0].seq, recs)
            j.commit()
        for s in sorted(rnd.sample(sorted(states), 12)) + [seq - 1]:
            out = tmp_path / "r.img"
            j.restore(out, seq=s)
            assert out.read_bytes() == states[s], s
    finally:
        j.close()


def test_replica_image_catches_up_from_the_journal(tmp_path, monkeypatch):
    monkeypatch.setattr(replica_mod, "IMAGE_SYNC_INTERVAL", 3600.0)
    h = _hello()
    rep = Replica.create(tmp_path, h)
    rnd = random.Random(6)
    model = bytearray(DISK)
    first = 1
    for _ in range(5):
        recs = _recs(rnd, first, 20, 4096)
        rep.apply(wire.decode(wire.encode(_writes(first, recs))))
        for r in recs:
            model[r.sector * 512:r.sector * 512 + 4096] = r.data
        first += 20
    assert rep.image_behind
    rep.sync()
    assert rep.durable_seq == first - 1 and rep.image_applied == 0  # journaled only
    assert rep.catch_up() == first - 1 and not rep.image_behind
    assert rep.read(0, DISK) == bytes(model)
    rep.close()


def test_state_lagging_the_journal_after_a_crash_takes_the_journals_high_water(
        tmp_path, monkeypatch):
    """Group commits write state.json without fsync; if a crash loses that write, the
    journal's last whole record is the high water (nothing acknowledged is lost)."""
    monkeypatch.setattr(replica_mod, "IMAGE_SYNC_INTERVAL", 3600.0)
    h = _hello()
    rep = Replica.create(tmp_path, h)
    old_state = rep.state_path.read_bytes()  # high_water 0, as if the later writes were lost
    rnd = random.Random(7)
    recs = _recs(rnd, 1, 10, 4096)
    rep.apply(_writes(1, recs))
    assert rep.sync() == 10
    assert json.loads(rep.state_path.read_bytes())["high_water"] == 10
    # the crash: nothing closed, the quick state write lost
    rep.journal._writer_fd, fd_w = -1, rep.journal._writer_fd
    os.close(fd_w)
    rep.state_path.write_bytes(old_state)
    rep2 = Replica.open(tmp_path, h.vbd_uuid)
    try:
        assert rep2.durable_seq == 10 and rep2.checker(SID).high_water == 10
        model = bytearray(DISK)
        for r in recs:
            model[r.sector * 512:r.sector * 512 + 4096] = r.data
        assert rep2.read(0, DISK) == bytes(model)  # redone from the journal
    finally:
        rep2.close()
        rep.fd = -1
