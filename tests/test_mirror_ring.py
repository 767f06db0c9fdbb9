"""The tap in the shim: the mirror ring, its markers, overflow, GAP and resync."""
from __future__ import annotations

import struct

import pytest

from tests.test_shim import Guest, assert_clean
from xentap import shim, wire
from xentap.shim import ffi

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    return path


def mirrored(tmp_path, image, ring=4 * MiB, chunk=64 << 10, **kw):
    g = Guest(tmp_path, image, **kw)
    g.vbd.disconnect()
    g.vbd.mirror_enable(ring, chunk)
    g.vbd.connect(g.transport, g.front.params)
    return g


def drain(vbd):
    """Every record and marker in the ring, decoded through the wire codec."""
    out = []
    while (b := vbd.mirror_peek()) is not None:
        if b.kind == shim.MK_WRITES:
            frame = wire.encode_writes_raw(1, 1, b.first_seq, b.count, b.data)
            out.extend(("write", r.seq, r.sector, r.length, r.flags, bytes(r.data))
                       for r in wire.decode(frame).records)
        else:
            out.append((b.kind, b.first_seq, b.sector, b.payload()))
        vbd.mirror_release(b.nbytes)
    return out


def test_ring_records_are_wire_records():
    assert ffi.sizeof("struct xt_mirror_rec") == wire.RECORD_HEADER_SIZE == 32
    for name, off in (("seq", 0), ("timestamp_ns", 8), ("sector", 16), ("length", 24), ("flags", 28)):
        assert ffi.offsetof("struct xt_mirror_rec", name) == off
    assert wire.RecordHeader.sizeof() == 32
    assert (shim.lib.XT_MREC_FUA, shim.lib.XT_MREC_DISCARD, shim.lib.XT_MREC_ZEROES) == \
        (wire.WriteFlags.FUA, wire.WriteFlags.DISCARD, wire.WriteFlags.ZEROES)


def test_every_write_becomes_a_record_in_completion_order(tmp_path, image):
    g = mirrored(tmp_path, image, ring=16 * MiB)
    try:
        res = g.front.run(block_size=4096, queue_depth=8, read_pct=30, max_ios=1000,
                          flush_every=50, size=4 * MiB, verify=True)
        assert_clean(res)
        recs = drain(g.vbd)
        writes = [r for r in recs if r[0] == "write"]
        flushes = [r for r in recs if r[0] == shim.MK_FLUSH]
        assert len(writes) == res["writes"] and len(flushes) == res["flushes"]
        assert [r[1] for r in recs] == list(range(1, len(recs) + 1))     # gap-free seqs
        # Replaying the records in order gives the image.
        replica = bytearray(32 * MiB)
        for _, seq, sector, length, flags, data in writes:
            replica[sector * 512:sector * 512 + length] = data
        assert bytes(replica) == image.read_bytes()
        st = g.vbd.mirror_stats()
        assert st["overflows"] == 0 and st["used_bytes"] == 0
    finally:
        g.close()


def test_discards_flushes_barriers_and_checkpoints_are_in_the_stream(tmp_path, image):
    g = mirrored(tmp_path, image)
    try:
        assert_clean(g.front.run(block_size=65536, queue_depth=4, discard_pct=30, barrier_every=5,
                                 max_ios=300, size=8 * MiB, verify=True))
        g.vbd.mirror_checkpoint("before-upgrade")
        recs = drain(g.vbd)
        assert any(r[0] == "write" and r[4] & wire.WriteFlags.DISCARD and r[5] == b"" for r in recs)
        assert any(r[0] == shim.MK_FLUSH for r in recs)
        assert recs[-1][0] == shim.MK_CHECKPOINT and recs[-1][3] == b"before-upgrade"
    finally:
        g.close()


def test_an_all_zero_write_is_a_zeroes_record_without_its_data(tmp_path, image):
    """mkfs.xfs writes its 64 MiB log as zeroes: such a write costs the ring
    and the link a record header, not its bytes."""
    import os
    g = mirrored(tmp_path, image)
    try:
        almost = bytearray(4096)
        almost[-1] = 1                                  # one byte short of zeroes
        rnd = os.urandom(8192)
        ops = [("write", 0, bytes(1 << 20)), ("write", 4096, bytes(almost)),
               ("write", 8192, rnd), ("write", 2048, bytes(512)), ("flush", 0, b"")]
        assert_clean(g.front.replay(ops, queue_depth=1))
        writes = [r for r in drain(g.vbd) if r[0] == "write"]
        assert [(r[2], r[3], r[4], len(r[5])) for r in writes] == [
            (0, 1 << 20, wire.WriteFlags.ZEROES, 0), (4096, 4096, 0, 4096),
            (8192, 8192, 0, 8192), (2048, 512, wire.WriteFlags.ZEROES, 0)]
        assert writes[1][5] == bytes(almost) and writes[2][5] == rnd
        assert g.vbd.mirror_stats()["bytes"] == (1 << 20) + 4096 + 8192 + 512
    finally:
        g.close()


def test_a_full_ring_never_blocks_the_guest_and_resyncs_what_it_lost(tmp_path, image):
    g = mirrored(tmp_path, image, ring=1 * MiB)
    try:
        res = g.front.run(block_size=16384, queue_depth=16, max_ios=2000, size=16 * MiB, verify=True)
        assert_clean(res)           # the guest saw nothing
        st = g.vbd.mirror_stats()
        assert st["overflows"] > 0 and st["dirty_chunks"] > 0 and st["gap_pending"]
        # The drainer's part: drain, ask for GAP + RESYNC markers until clean.
        recs = drain(g.vbd)
        while True:
            rc = g.vbd.mirror_resync_step()
            if rc == 0:
                break
            recs += drain(g.vbd)
        kinds = [r[0] for r in recs]
        assert kinds.count(shim.MK_GAP) == 1
        resyncs = [r for r in recs if r[0] == shim.MK_RESYNC]
        assert len(resyncs) == st["dirty_chunks"]
        assert kinds[-1] == shim.MK_RESYNC_END
        assert [r[1] for r in recs] == list(range(1, len(recs) + 1))
        # Records + dirty chunks re-read from disk rebuild the image.
        replica = bytearray(32 * MiB)
        disk = image.read_bytes()
        for r in recs:
            if r[0] == "write":
                replica[r[2] * 512:r[2] * 512 + r[3]] = r[5]
            elif r[0] == shim.MK_RESYNC:
                (length,) = struct.unpack("<Q", r[3])
                replica[r[2] * 512:r[2] * 512 + length] = disk[r[2] * 512:r[2] * 512 + length]
        assert bytes(replica) == disk
        st = g.vbd.mirror_stats()
        assert st["dirty_chunks"] == 0 and st["gaps"] == 1 and st["resyncs"] == 1
    finally:
        g.close()


def test_mirror_enable_errors(tmp_path, image):
    g = Guest(tmp_path, image)
    try:
        with pytest.raises(shim.VbdBusyError, match="not connected"):
            g.vbd.mirror_enable()
        g.vbd.disconnect()
        with pytest.raises(OSError, match="power of two"):
            g.vbd.mirror_enable(3 * MiB)
        g.vbd.mirror_enable(MiB)
        with pytest.raises(OSError, match="already on"):
            g.vbd.mirror_enable(MiB)
    finally:
        g.close()


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


def _clear(fd: int) -> None:
    import os
    while _readable(fd):
        os.read(fd, 8)


def test_an_armed_wake_fires_on_the_next_record_while_records_wait_for_their_ack(tmp_path, image):
    """The drainer keeps what it sent until the appliance acknowledges it, so
    the ring is rarely empty: without arming, a new record would wait for the
    next ACK or the drainer's timeout."""
    g = mirrored(tmp_path, image)
    try:
        fd = g.vbd.mirror_wake_fd()
        assert_clean(g.front.run(block_size=4096, queue_depth=1, read_pct=0, max_ios=1, size=MiB))
        assert _readable(fd)                      # empty -> non-empty
        _clear(fd)
        sent = g.vbd.mirror_peek().nbytes         # sent, not yet acknowledged
        assert_clean(g.front.run(block_size=4096, queue_depth=1, read_pct=0, max_ios=1, size=MiB))
        assert not _readable(fd)                  # no wake: the ring was not empty
        assert g.vbd.mirror_arm_wake(sent)        # more than sent is there: not armed
        assert_clean(g.front.run(block_size=4096, queue_depth=1, read_pct=0, max_ios=1, size=MiB))
        assert not _readable(fd)                  # (a consumer short of credit sleeps on)
        sent = g.vbd.mirror_stats()["used_bytes"]
        _clear(fd)
        assert not g.vbd.mirror_arm_wake(sent)    # everything sent: armed
        assert not _readable(fd)
        assert_clean(g.front.run(block_size=4096, queue_depth=1, read_pct=0, max_ios=2, size=MiB))
        assert _readable(fd)                      # the next record woke it
        _clear(fd)
        sent = g.vbd.mirror_stats()["used_bytes"]
        assert_clean(g.front.run(block_size=4096, queue_depth=1, read_pct=0, max_ios=1, size=MiB))
        assert not _readable(fd)                  # one wake per arming, not per record
    finally:
        g.close()


def test_arming_a_vbd_without_mirroring_is_an_error(tmp_path, image):
    g = Guest(tmp_path, image)
    try:
        with pytest.raises(OSError, match="mirroring is off"):
            g.vbd.mirror_arm_wake(0)
    finally:
        g.close()
