"""The rest of blkif: the x86_32 ABI, WRITE_BARRIER, DISCARD, 4 KiB logical
sectors and what a VBD says it can do."""
from __future__ import annotations

import os

import pytest

from tests.test_shim import Guest, assert_clean, guest_factory as guest  # noqa: F401 (a fixture)
from xentap.shim import SimDomain, SimFront, Transport, Vbd

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


class ProtoGuest(Guest):
    """A Guest whose blkfront speaks a given ring protocol."""

    def __init__(self, tmp_path, image, protocol, **kw):
        self.dom = SimDomain(tmp_path / "dom32", domid=11)
        self.vbd = Vbd(image, **kw)
        self.transport = Transport.sim(self.dom.path)
        self.front = SimFront(self.dom.path, sectors=self.vbd.sectors, nr_queues=2, ring_order=1,
                              max_indirect_segments=256, protocol=protocol)
        self.vbd.connect(self.transport, self.front.params)


def test_x86_32_abi_guest_reads_back_what_it_wrote(tmp_path, image):
    g = ProtoGuest(tmp_path, image, "x86_32-abi")
    try:
        for bs in (4096, 45056, MiB):      # plain, 11 segments, indirect
            assert_clean(g.front.run(block_size=bs, queue_depth=8, read_pct=50, size=32 * MiB,
                                     max_ios=600, verify=True, flush_every=20, seed=bs))
        assert g.vbd.stats()["reqs_indirect"] > 0
    finally:
        g.close()


def test_unknown_protocol_is_refused(tmp_path, image):
    with pytest.raises(ValueError, match="protocol"):
        ProtoGuest(tmp_path, image, "arm-abi")


def test_barriers_order_writes_on_both_sides(guest):
    g = guest(order=2)
    res = g.front.run(block_size=4096, queue_depth=32, read_pct=20, size=16 * MiB,
                      max_ios=20000, barrier_every=9, verify=True)
    assert_clean(res)
    assert res["barriers"] > 1000
    assert g.vbd.stats()["reqs_barrier"] == res["barriers"]


def test_discard_punches_holes_that_read_as_zeroes(guest, image):
    g = guest(order=1)
    info = g.vbd.info()
    assert info["feature_discard"] == 1 and info["discard_granularity"] >= 512
    blocks_before = os.stat(image).st_blocks
    res = g.front.run(block_size=65536, queue_depth=8, read_pct=0, size=32 * MiB, sequential=True,
                      max_ios=512, verify=True)
    assert_clean(res)
    assert os.stat(image).st_blocks > blocks_before
    res = g.front.run(block_size=65536, queue_depth=8, read_pct=40, discard_pct=40, size=32 * MiB,
                      max_ios=3000, verify=True, seed=5)
    assert_clean(res)
    assert res["discards"] > 500
    assert g.vbd.stats()["reqs_discard"] == res["discards"]
    # Everything read back (discarded = zeroes) once more, in order.
    assert_clean(g.front.run(block_size=65536, queue_depth=8, read_pct=100, sequential=True,
                             size=32 * MiB, max_ios=512, verify=True))
    full = 32 * MiB // 512
    assert os.stat(image).st_blocks < full      # holes really punched


def test_discard_on_a_read_only_disk_is_refused(guest):
    g = guest(readonly=True)
    assert g.vbd.info()["feature_discard"] == 0
    res = g.front.run(block_size=4096, queue_depth=4, discard_pct=100, size=MiB, max_ios=10)
    assert res["errors"] == 10


def test_files_default_to_512_byte_logical_sectors(guest):
    g = guest(order=1)
    # Default on a file: 512-byte logical sectors, the file's block size as physical.
    assert g.vbd.info()["sector_size"] == 512


def test_4k_logical_sector_vbd_takes_aligned_io_and_refuses_the_rest(tmp_path, image):
    g = Guest(tmp_path, image)
    g.vbd.close()
    g.vbd = Vbd(image, sector_size=4096)
    info = g.vbd.info()
    assert info["sector_size"] == 4096 and info["physical_sector_size"] >= 4096
    assert info["sectors"] == 64 * MiB // 512           # always 512-byte units
    g.vbd.connect(g.transport, g.front.params)
    try:
        assert_clean(g.front.run(block_size=8192, queue_depth=8, read_pct=50, size=8 * MiB,
                                 max_ios=500, verify=True))
        res = g.front.run(block_size=512, queue_depth=4, read_pct=50, size=MiB, max_ios=200)
        assert res["errors"] > 0        # odd 512-byte sectors are not whole 4 KiB sectors
        assert g.vbd.stats()["err_bad_request"] == res["errors"]
    finally:
        g.close()


def test_sector_size_must_be_512_or_4096(image):
    with pytest.raises(OSError, match="512 or 4096"):
        Vbd(image, sector_size=1024)


def test_info_reports_what_the_shim_supports(image):
    with Vbd(image, max_indirect_segments=128) as v:
        info = v.info()
    assert info["feature_flush"] == info["feature_barrier"] == 1
    assert info["max_indirect_segments"] == 128
    assert info["max_ring_order"] == 4 and info["max_queues"] == 8
    assert info["discard_secure"] == 0
    assert info["is_blockdev"] == 0
