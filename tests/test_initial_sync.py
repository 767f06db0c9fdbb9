"""A new stream's initial sync: a disk that already holds data when it is
first protected reaches the appliance's replica whole (GAP(INITIAL), a
RESYNC of each chunk with data, RESYNC_END), and a new sparse disk costs
nothing."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from engines.journal import Journal
from tests.test_mirror_e2e import MiB, Mirrored, appliance, assert_replica_equals_source  # noqa: F401
from tests.test_shim import Guest
from xentap import wire
from xentap.drainer import RESYNC_CHUNK, Drainer, VbdIdentity
from xentap.sparse import data_chunks


def _state(appliance, vbd_uuid) -> dict:
    return json.loads((appliance.dir / str(vbd_uuid) / "state.json").read_text())


def test_data_chunks_are_the_chunks_seek_data_finds(tmp_path):
    p = tmp_path / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(32 * MiB)
        for off, n in ((0, 3 * MiB), (20 * MiB + 512 * 1024, 100 * 1024),
                       (28 * MiB - 4096, 8192), (32 * MiB - 4096, 4096)):
            f.seek(off)
            f.write(os.urandom(n))
    fd = os.open(p, os.O_RDONLY)
    try:
        runs = data_chunks(fd, 32 * MiB, MiB)
        # a run across a chunk boundary takes both chunks; the last chunk counts
        assert runs == [(0, 3), (20, 1), (27, 2), (31, 1)]
        assert data_chunks(fd, 0, MiB) == []
    finally:
        os.close(fd)
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(8 * MiB)
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert data_chunks(fd, 8 * MiB, MiB) == []
    finally:
        os.close(fd)


def test_a_disk_with_data_reaches_the_replica_whole_through_its_initial_sync(tmp_path, appliance):
    """Without the initial sync the replica held only what the guest wrote
    after protection: every block written before it read as zeroes."""
    prefill = [(0, os.urandom(3 * MiB)), (20 * MiB, os.urandom(256 * 1024)),
               (28 * MiB, bytes(MiB))]    # allocated, all zero: sent as ZEROES
    m = Mirrored(tmp_path, appliance, prefill=prefill)
    try:
        m.run(block_size=4096, queue_depth=8, max_ios=2000, flush_every=64, size=24 * MiB, seed=4)
        assert_replica_equals_source(m, appliance)
        d = m.drainer
        st = d.stats()
        assert d.initial_syncs == 1 and st["gaps"] == 0 and st["overflows"] == 0
        # the chunks with data: 0-3 MiB, 20 MiB, 28 MiB (4 MiB chunks: 0, 5, 7)
        assert (d.resync_first, d.resync_last) == (1, 1 + 3 + 1)
        state = _state(appliance, m.ident.vbd_uuid)
        assert state["last_gap_seq"] == 1
        assert state["last_gap_reason"] == wire.GapReason.INITIAL
        assert not state["in_resync"]
        j = Journal.open(appliance.dir / str(m.ident.vbd_uuid) / "journal")
        out = tmp_path / "restored.img"
        assert j.restore(out, seq=j.last_seq)["write_ordered"]
        assert out.read_bytes() == m.image.read_bytes()
        # inside the initial sync there is no point in time to restore
        assert not j.restore(out, seq=3)["write_ordered"]
    finally:
        m.close()


def test_a_new_sparse_disk_needs_no_initial_sync(tmp_path, appliance):
    m = Mirrored(tmp_path, appliance)
    try:
        m.run(block_size=65536, queue_depth=4, max_ios=200, seed=5)
        assert_replica_equals_source(m, appliance)
        assert m.drainer.initial_syncs == 0 and m.drainer.resync_last == 0
        assert _state(appliance, m.ident.vbd_uuid)["last_gap_seq"] == 0
    finally:
        m.close()


def test_nothing_counts_as_acknowledged_before_the_initial_sync(tmp_path):
    """An appliance that never answers: the disk's data is not at the
    appliance, so wait_acked must not say it is."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(MiB))
    g = Guest(tmp_path, image)
    g.vbd.disconnect()
    g.vbd.mirror_enable(4 * MiB)
    g.vbd.connect(g.transport, g.front.params)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=3, devid=51712, vdev="xvda",
                        size_bytes=8 * MiB)
    d = Drainer(g.vbd, ident, f"tcp://127.0.0.1:{port}", image_path=str(image),
                spill_dir=str(tmp_path / "spill"), spill_limit=8 * MiB).start()
    try:
        assert d.takeover and d.data_runs == [(0, 1)] and RESYNC_CHUNK >= MiB
        assert not d.wait_acked(0.5)
    finally:
        d.stop()
        g.close()


def test_writes_that_overflow_the_ring_during_the_initial_sync_are_resynced(tmp_path, appliance):
    """The ring cannot spill before the initial sync is sent (its records'
    seqs follow it): a guest busy meanwhile overflows it, and its writes come
    from the dirty bitmap's resync after the initial sync."""
    appliance.pause()
    try:
        m = Mirrored(tmp_path, appliance, ring=MiB, prefill=[(0, os.urandom(24 * MiB))])
        m.run(block_size=4096, queue_depth=8, max_ios=2048, size=32 * MiB, seed=8)
        assert m.g.vbd.mirror_stats()["overflows"] > 0
    finally:
        appliance.resume()
    try:
        m.run(block_size=65536, queue_depth=4, max_ios=64, seed=9)
        assert_replica_equals_source(m, appliance)
        st = m.drainer.stats()
        assert m.drainer.initial_syncs == 1 and st["gaps"] >= 1 and st["sync"]["kind"] == ""
    finally:
        m.close()


def test_the_ring_spills_while_the_initial_sync_is_sent(tmp_path, appliance):
    """Once the initial sync is planned (the first session), a guest filling
    the ring past SPILL_AT gets its records spilled, not overflowed, while
    the sync's frames are still going out."""
    from xentap import drainer as dr
    m = Mirrored(tmp_path, appliance, ring=4 * MiB, disk=64 * MiB,
                 prefill=[(0, os.urandom(64 * MiB))])
    try:
        d = m.drainer
        d._stop.set()                   # the test turns the loop by hand
        d._thread.join(10)
        d._stop.clear()
        d._sock = None
        d._connect()
        deadline = time.monotonic() + 20
        while not d.in_session and time.monotonic() < deadline:
            d._poll(0.05)
        assert d.in_session and not d.takeover and d.resync_last == 1 + 64 * MiB // RESYNC_CHUNK + 1
        m.run(block_size=65536, queue_depth=4, max_ios=40, seed=10)     # 2.5 MiB
        assert m.g.vbd.mirror_stats()["used_bytes"] > dr.SPILL_AT * d.ring_size
        d._step()
        assert d.spill.size > 0 and d._resync_unsent()
        d.start()
        # the rest of the sync, beside a busy guest (at a pace a 4 MiB ring absorbs:
        # 16 MB/s overflowed it in 1 of 5 runs of the whole suite)
        m.run(block_size=4096, queue_depth=8, max_ios=2000, size=64 * MiB, seed=11,
              rate_iops=2000)
        assert_replica_equals_source(m, appliance)
        st = d.stats()
        assert st["overflows"] == 0 and st["gaps"] == 0 and d.initial_syncs == 1
    finally:
        m.close()


def test_an_appliance_ahead_of_a_new_stream_gets_the_whole_disk(tmp_path, appliance):
    """dom0 lost its state (or a new sparse disk took an old one's uuid) while
    the appliance kept the stream: its seqs are not this disk's writes, so
    the new drainer resyncs the whole disk after them instead of having its
    own first seqs taken as duplicates."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = Mirrored(tmp_path / "old", appliance)
    try:
        old.run(block_size=65536, queue_depth=4, max_ios=300, seed=12)
        assert_replica_equals_source(old, appliance)
        high = old.drainer.acked_seq
    finally:
        old.close()
    new = Mirrored(tmp_path / "new", appliance, vbd_uuid=old.ident.vbd_uuid)
    try:
        new.run(block_size=4096, queue_depth=4, max_ios=50, seed=13)
        assert_replica_equals_source(new, appliance)
        d = new.drainer
        assert d.restart_gaps == 1 and d.resync_first == high + 1 and d.initial_syncs == 0
    finally:
        new.close()


def test_a_drainer_that_starts_late_does_not_take_the_guests_first_writes_for_old_data(
        tmp_path, appliance):  # noqa: F811
    """The daemon starts a VBD's drainer once its appliance is found, which in
    an emulated dom0 came after the guest's first writes: scanned then, the
    new disk looked as if it had held data, and those writes went out as an
    initial sync (a window not write-ordered) besides the ring.  Where the disk
    held data is taken when the mirror ring is turned on, before the shim
    connects."""
    from xentap import keys
    from xentap import protect as P
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)                                 # new and sparse
    g = Guest(tmp_path, image)
    g.vbd.disconnect()
    m = P.Mirror(vbd_uuid=uuid.uuid4(), domid=3, devid=51712,
                 target=P.Target(appliance.endpoint,
                                 keys.load_public(keys.paths(appliance.keys, keys.APPLIANCE_NAME)[0])),
                 keys_dir=str(appliance.keys), state_dir=str(tmp_path / "state"),
                 ring_bytes=4 * MiB)
    m.enable(g.vbd, str(image))
    g.vbd.connect(g.transport, g.front.params)
    try:
        res = g.front.run(block_size=65536, queue_depth=4, read_pct=0, size=8 * MiB,
                          max_ios=64, seed=21)             # before the drainer starts
        assert res["errors"] == 0
        m.start(g.vbd, str(image))
        d = m.drainer
        assert not d.takeover and d.initial_syncs == 0 and d.data_runs == []
        assert d.wait_acked(30)
        assert appliance.replica(m.vbd_uuid) == image.read_bytes()
    finally:
        m.stop(1.0)
        g.close()
