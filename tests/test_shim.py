"""The shim's data path through the sim transport: the real ring protocol,
real io_uring (and the thread fallback) on a real image file."""
from __future__ import annotations

import dataclasses

import errno
import os
import struct
from pathlib import Path

import pytest

from xentap import bench_datapath
from xentap.shim import (DEFAULT_POLL_US, MAX_INDIRECT_SEGMENTS, MAX_PERSISTENT_GRANTS, RingParams,
                         set_persistent_grants_limit, SimDomain, SimFront, Transport,
                         Vbd, VbdBusyError)

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(128 * MiB)
    return path


class Guest:
    """A sim domain with its blkfront, served by a VBD on `image`."""

    def __init__(self, tmp_path, image, *, domid=3, queues=1, order=0,
                 indirect=MAX_INDIRECT_SEGMENTS, engine="auto", direct=False, readonly=False,
                 poll_us=DEFAULT_POLL_US, persistent=True):
        self.dom = SimDomain(tmp_path / f"dom{domid}", domid=domid)
        self.vbd = Vbd(image, engine=engine, direct=direct, readonly=readonly,
                       max_indirect_segments=indirect, poll_us=poll_us)
        self.transport = Transport.sim(self.dom.path)
        self.front = SimFront(self.dom.path, sectors=self.vbd.sectors, nr_queues=queues,
                              ring_order=order, max_indirect_segments=indirect)
        # The sim blkfront grants its pages for good, as Linux blkfront does
        # with feature-persistent; persistent=False connects as if it had not asked.
        self.params = dataclasses.replace(self.front.params, persistent=persistent)
        self.vbd.connect(self.transport, self.params)

    def close(self):
        self.vbd.close()
        self.front.close()
        self.transport.close()
        self.dom.close()


@pytest.fixture
def guest_factory(tmp_path, image):
    made = []

    def make(**kw):
        g = Guest(tmp_path, image, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def assert_clean(res):
    assert res["errors"] == 0, res
    assert res["verify_failures"] == 0, res
    assert res["flush_order_violations"] == 0, res
    assert res["ios"] > 0


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
@pytest.mark.parametrize("queues,order", [(1, 0), (2, 2), (4, 4)])
def test_random_mixed_workload_reads_back_what_it_wrote(guest_factory, engine, queues, order):
    g = guest_factory(engine=engine, queues=queues, order=order)
    assert g.vbd.engine == engine
    # Mixed sizes, one region: later runs read and overwrite earlier data.
    for bs, seed in ((4096, 1), (16384, 2), (65536, 3), (4096, 4)):
        res = g.front.run(block_size=bs, queue_depth=16, read_pct=40, size=16 * MiB,
                          max_ios=3000, verify=True, flush_every=50, seed=seed)
        assert_clean(res)
    # A final read-only pass checks every sector the oracle knows.
    res = g.front.run(block_size=65536, queue_depth=8, read_pct=100, sequential=True,
                      size=16 * MiB, max_ios=256, verify=True)
    assert_clean(res)
    st = g.vbd.stats()
    assert st["err_bad_request"] == st["err_io"] == st["err_grant"] == 0
    assert st["in_flight"] == 0


@pytest.mark.parametrize("poll_us", [0, 50, DEFAULT_POLL_US])
def test_sleeping_and_polling_queues_serve_the_same(guest_factory, poll_us):
    g = guest_factory(engine="io_uring", queues=2, poll_us=poll_us)
    for qd in (1, 32):
        res = g.front.run(block_size=4096, queue_depth=qd, read_pct=50, size=8 * MiB,
                          max_ios=4000, verify=True, flush_every=100, seed=qd)
        assert_clean(res)


def test_an_idle_polling_queue_sleeps(guest_factory):
    """After a busy spell has grown the polling window, an idle ring stops
    costing CPU: the queue threads poll at most one window, then sleep."""
    import resource
    g = guest_factory(engine="io_uring", queues=2)
    res = g.front.run(block_size=4096, queue_depth=32, read_pct=0, size=8 * MiB, max_ios=20000)
    assert_clean(res)

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    import time
    before = cpu()
    time.sleep(1.0)
    assert cpu() - before < 0.05
    res = g.front.run(block_size=4096, queue_depth=4, read_pct=50, size=8 * MiB, max_ios=1000,
                      verify=True)
    assert_clean(res)


def test_ring_wraps_around_many_times(guest_factory):
    g = guest_factory(order=0)      # 32 slots
    res = g.front.run(block_size=4096, queue_depth=32, read_pct=50, size=4 * MiB,
                      max_ios=40000, verify=True)
    assert_clean(res)
    assert res["ios"] >= 40000     # > 1000 trips around a 32-slot ring


def test_indirect_segments_carry_large_requests(guest_factory):
    g = guest_factory(order=1, indirect=256)
    res = g.front.run(block_size=MiB, queue_depth=4, read_pct=50, size=64 * MiB,
                      max_ios=200, verify=True)
    assert_clean(res)
    st = g.vbd.stats()
    assert st["reqs_indirect"] == res["ios"]
    # 44 KiB still fits a plain request; 48 KiB needs indirect pages.
    before = st["reqs_indirect"]
    assert_clean(g.front.run(block_size=44 * 1024, queue_depth=4, max_ios=50, verify=True, size=8 * MiB))
    assert g.vbd.stats()["reqs_indirect"] == before
    assert_clean(g.front.run(block_size=48 * 1024, queue_depth=4, max_ios=50, verify=True, size=8 * MiB))
    assert g.vbd.stats()["reqs_indirect"] == before + 50


def test_without_indirect_large_blocks_are_refused_by_the_front(guest_factory):
    g = guest_factory(indirect=0)
    with pytest.raises(OSError, match="segments"):
        g.front.run(block_size=MiB, queue_depth=1, max_ios=1)


def test_counters_match_what_the_guest_did(guest_factory):
    g = guest_factory(queues=2, order=1)
    res = g.front.run(block_size=8192, queue_depth=8, read_pct=30, size=8 * MiB,
                      max_ios=2000, flush_every=100, seed=9)
    st = g.vbd.stats()
    assert st["reqs_read"] == res["reads"]
    assert st["reqs_write"] == res["writes"]
    assert st["reqs_flush"] == res["flushes"] > 0
    assert st["bytes_read"] == res["bytes_read"]
    assert st["bytes_written"] == res["bytes_written"]
    assert st["state"] == "connected" and st["nr_queues"] == 2


def test_the_shims_time_per_request_fits_in_the_guests_round_trip(guest_factory):
    """Every read and write answered is timed, in three parts (xt_stats), and
    the parts of each fit in what the guest measured from issuing it to
    reaping its answer (both on CLOCK_MONOTONIC); flushes are not timed."""
    g = guest_factory(queues=2, order=1)
    before = g.vbd.stats()
    res = g.front.run(block_size=4096, queue_depth=16, read_pct=50, size=8 * MiB,
                      max_ios=3000, flush_every=200, seed=4)
    after = g.vbd.stats()
    assert after["timed"] - before["timed"] == res["reads"] + res["writes"]
    n = res["reads"] + res["writes"]
    parts = {k: (after[f"ns_{k}"] - before[f"ns_{k}"]) / n / 1e3
             for k in ("to_engine", "at_engine", "to_answer")}
    assert all(v >= 0 for v in parts.values()) and parts["at_engine"] > 0, parts
    assert 0 < res["lat_us_p50"] <= res["lat_us_max"] and res["lat_us_mean"] <= res["lat_us_max"]
    # the guest's mean includes the flushes' (longer) round trips: a bound, not an equality
    assert sum(parts.values()) <= res["lat_us_mean"] * (res["ios"] / n), (parts, res)
    t = bench_datapath.shim_times(before, after, res["lat_us_mean"])
    assert t["guest"] == pytest.approx(res["lat_us_mean"] - sum(parts.values()))
    assert bench_datapath.shim_times(after, after, 1.0) is None
    # The guest slept between answers (a queue of 16 against a disk) and its
    # wake-ups, timed from the shim's event, are each within a round trip.
    assert 0 < res["wakes"] < res["ios"]
    assert 0 < res["wake_us_p50"] <= res["lat_us_max"]


def test_the_guests_wake_up_counts_only_events_that_found_it_asleep(guest_factory):
    """At queue depth 1 the guest sleeps for every answer; its wake-up is
    part of each round trip, so below the round trip's median."""
    g = guest_factory()
    res = g.front.run(block_size=4096, queue_depth=1, read_pct=100, size=MiB, max_ios=2000)
    assert res["wakes"] >= 0.9 * res["ios"], res
    assert 0 < res["wake_us_p50"] <= res["lat_us_p50"], res


def test_a_rate_holds_the_guest_to_that_many_ios_a_second(guest_factory):
    """rate_iops paces the sim guest as fio's rate_iops does (tests that need
    a guest at a known pace, not at disk speed)."""
    g = guest_factory(queues=2)
    res = g.front.run(block_size=4096, queue_depth=8, size=8 * MiB, seconds=1.0,
                      rate_iops=2000, verify=True)
    assert res["errors"] == 0 and res["verify_failures"] == 0
    assert 1700 <= res["ios"] <= 2010, res
    fast = g.front.run(block_size=4096, queue_depth=8, size=8 * MiB, seconds=0.3)
    assert fast["ios"] > 3 * 0.3 * 2000, fast      # unpaced it goes well beyond


def test_flush_answers_after_every_earlier_write(guest_factory):
    g = guest_factory(order=2)
    res = g.front.run(block_size=4096, queue_depth=64, read_pct=0, size=32 * MiB,
                      max_ios=20000, flush_every=7, verify=True)
    assert_clean(res)
    assert res["flushes"] > 1000


def test_writes_land_at_their_sectors_in_the_image(guest_factory, image):
    g = guest_factory(queues=2, order=1)
    res = g.front.run(block_size=4096, queue_depth=16, size=8 * MiB, offset=4 * MiB,
                      sequential=True, max_ios=2048, verify=True)
    assert_clean(res)
    g.vbd.disconnect()
    data = image.read_bytes()
    # Each written sector starts with its own sector number, then its version.
    for sector in range(8192, 8192 + 16384):
        num, version = struct.unpack_from("<QQ", data, sector * 512)
        assert num == sector and version > 0, sector
    assert data[:4 * MiB].count(0) == 4 * MiB        # nothing before the region


def test_direct_io(guest_factory):
    g = guest_factory(direct=True, order=1)
    assert_clean(g.front.run(block_size=4096, queue_depth=16, read_pct=50, size=8 * MiB,
                             max_ios=2000, verify=True, flush_every=64))


@pytest.mark.parametrize("engine", ["io_uring", "threads", "sync"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "copy"])
def test_reads_go_straight_into_the_guests_pages_with_persistent_grants(guest_factory, engine,
                                                                         persistent):
    g = guest_factory(engine=engine, direct=True, order=1, persistent=persistent)
    assert_clean(g.front.run(block_size=4096, queue_depth=16, read_pct=0, size=8 * MiB,
                             max_ios=2048, sequential=True, verify=True))
    g.vbd.disconnect()          # a fresh connection: no bounce buffer yet
    g.vbd.connect(g.transport, g.params)
    for bs, qd in ((4096, 16), (65536, 4), (12288, 8)):     # one page, indirect, three
        assert_clean(g.front.run(block_size=bs, queue_depth=qd, read_pct=100, size=8 * MiB,
                                 max_ios=1000, verify=True))
    st = g.vbd.stats()
    if persistent:
        # Every read went into the guest's pages: no bounce buffer was needed.
        assert st["buffer_bytes"] == 0
        assert 16 <= st["grants_mapped"] <= MAX_PERSISTENT_GRANTS
    else:
        assert st["buffer_bytes"] > 0 and st["grants_mapped"] == 0
    g.vbd.disconnect()
    assert g.vbd.stats()["grants_mapped"] == 0      # unmapped with the rings


def test_persistent_grants_past_the_limit_are_served_by_copy(guest_factory):
    """1 MiB reads at QD8 name 2048 pages: the first MAX_PERSISTENT_GRANTS are
    kept mapped, reads naming others are copied, all read back right."""
    g = guest_factory(order=1)
    assert_clean(g.front.run(block_size=MiB, queue_depth=8, read_pct=0, size=64 * MiB,
                             max_ios=64, sequential=True, verify=True))
    assert_clean(g.front.run(block_size=MiB, queue_depth=8, read_pct=100, size=64 * MiB,
                             max_ios=256, verify=True))
    st = g.vbd.stats()
    assert st["grants_mapped"] == MAX_PERSISTENT_GRANTS
    assert st["buffer_bytes"] > 0


def test_persistent_grants_of_the_whole_process_stay_under_its_limit(guest_factory, tmp_path):
    """Past the process's limit reads are copied; pages unmapped at disconnect
    count no more."""
    assert set_persistent_grants_limit() == int(Path("/proc/sys/vm/max_map_count").read_text()) // 2
    assert set_persistent_grants_limit(100) == 100
    try:
        g = guest_factory(order=1)
        assert_clean(g.front.run(block_size=MiB, queue_depth=4, read_pct=0, size=16 * MiB,
                                 max_ios=16, sequential=True, verify=True))
        assert_clean(g.front.run(block_size=MiB, queue_depth=4, read_pct=100, size=16 * MiB,
                                 max_ios=64, verify=True))
        assert g.vbd.stats()["grants_mapped"] == 100
        g.vbd.disconnect()
        g.vbd.connect(g.transport, g.params)     # the 100 were given back
        assert_clean(g.front.run(block_size=4096, queue_depth=8, read_pct=100, size=16 * MiB,
                                 max_ios=500, verify=True))
        assert 0 < g.vbd.stats()["grants_mapped"] <= 100
    finally:
        set_persistent_grants_limit()


def test_read_only_vbd_refuses_writes_and_keeps_the_image(guest_factory, image):
    g = guest_factory(readonly=True)
    res = g.front.run(block_size=4096, queue_depth=4, read_pct=0, max_ios=20, size=MiB)
    assert res["errors"] == 20
    assert g.vbd.stats()["err_bad_request"] == 20
    assert image.read_bytes().count(0) == 128 * MiB
    res = g.front.run(block_size=4096, queue_depth=4, read_pct=100, max_ios=20, size=MiB)
    assert res["errors"] == 0


def test_disconnect_and_reconnect_keeps_serving(guest_factory):
    g = guest_factory(order=1)
    assert_clean(g.front.run(block_size=4096, queue_depth=8, size=4 * MiB, max_ios=500, verify=True))
    g.vbd.disconnect()
    assert g.vbd.stats()["state"] == "open"
    g.vbd.connect(g.transport, g.front.params)
    res = g.front.run(block_size=4096, queue_depth=8, read_pct=100, size=4 * MiB,
                      max_ios=1024, sequential=True, verify=True)
    assert_clean(res)
    # Counters survive the reconnect.
    assert g.vbd.stats()["reqs_write"] == 500


def test_two_guests_at_once(tmp_path):
    imgs = []
    for i in range(2):
        p = tmp_path / f"d{i}.img"
        with open(p, "wb") as f:
            f.truncate(16 * MiB)
        imgs.append(p)
    g1 = Guest(tmp_path, imgs[0], domid=7, queues=2, order=1)
    g2 = Guest(tmp_path, imgs[1], domid=8)
    try:
        assert_clean(g1.front.run(block_size=4096, queue_depth=8, read_pct=50, max_ios=2000, verify=True))
        assert_clean(g2.front.run(block_size=4096, queue_depth=8, read_pct=50, max_ios=2000, verify=True))
    finally:
        g1.close()
        g2.close()


# ---- the API's errors are clear Python exceptions ----

def test_missing_image_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot open image .*nope.img"):
        Vbd(tmp_path / "nope.img")


def test_empty_image_is_refused(tmp_path):
    p = tmp_path / "empty.img"
    p.write_bytes(b"")
    with pytest.raises(OSError, match="empty") as e:
        Vbd(p)
    assert e.value.errno == errno.EINVAL


def test_an_image_served_twice_is_busy(image):
    with Vbd(image):
        with pytest.raises(VbdBusyError, match="busy"):
            Vbd(image)
    Vbd(image).close()      # free again once closed


def test_connecting_twice_is_busy(guest_factory):
    g = guest_factory()
    with pytest.raises(VbdBusyError, match="already connected"):
        g.vbd.connect(g.transport, g.front.params)


def test_unknown_engine_and_bad_limits(image):
    with pytest.raises(ValueError, match="unknown I/O engine"):
        Vbd(image, engine="aio")
    with pytest.raises(OSError, match="over the limit"):
        Vbd(image, max_indirect_segments=100000)
    with pytest.raises(ValueError, match="poll_us"):
        Vbd(image, poll_us=-1)


def test_bad_ring_params_are_refused(tmp_path, image):
    with SimDomain(tmp_path / "dom", domid=4) as dom, Vbd(image) as v, \
            Transport.sim(dom.path) as t:
        good = SimFront(dom.path, sectors=v.sectors)
        p = good.params
        bad_ref = RingParams(domid=4, nr_queues=1, ring_order=0, ring_refs=[[1 << 30]],
                             evtchns=p.evtchns)
        with pytest.raises(PermissionError, match="grant ref"):
            v.connect(t, bad_ref)
        bad_port = RingParams(domid=4, nr_queues=1, ring_order=0, ring_refs=p.ring_refs,
                              evtchns=[999])
        with pytest.raises(OSError, match="port 999 .* does not exist"):
            v.connect(t, bad_port)
        wrong_dom = RingParams(domid=9, nr_queues=1, ring_order=0, ring_refs=p.ring_refs,
                               evtchns=p.evtchns)
        with pytest.raises(OSError):
            v.connect(t, wrong_dom)
        too_big = RingParams(domid=4, nr_queues=1, ring_order=5, ring_refs=[[0]], evtchns=[1])
        with pytest.raises(OSError, match="order 5"):
            v.connect(t, too_big)
        # After all that, the good parameters still connect and serve.
        v.connect(t, p)
        assert_clean(good.run(block_size=4096, queue_depth=4, max_ios=100, verify=True, size=MiB))
        v.disconnect()
        good.close()


def test_missing_sim_domain_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sim domain"):
        Transport.sim(tmp_path / "none")


def test_xen_transport_without_xen_is_a_clear_error():
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("running on Xen")
    with pytest.raises(OSError, match="grant device"):
        Transport.xen()


def test_replayed_kernel_trace_lands_byte_for_byte(guest_factory, image, tmp_path):
    """A real kernel's mkfs/mount/write/umount (a recorded ext4 trace) replayed
    through the shim gives the image the trace itself describes."""
    from analyzer import trace
    recs = list(trace.read(Path(__file__).parent / "data" / "ext4-small.trace.gz"))
    ops = [("flush", 0, b"") if r.kind == trace.FLUSH else ("write", r.sector, r.data) for r in recs]
    g = guest_factory(queues=1, order=1)
    res = g.front.replay(ops, queue_depth=16)
    assert res["errors"] == 0 and res["flush_order_violations"] == 0, res
    assert res["flushes"] == sum(1 for o in ops if o[0] == "flush")
    assert res["bytes_written"] == sum(len(o[2]) for o in ops)
    expect = bytearray(image.stat().st_size)
    for r in recs:
        if r.kind == trace.WRITE:
            expect[r.offset:r.offset + len(r.data)] = r.data
    assert image.read_bytes() == bytes(expect)


def test_replay_rejects_ops_past_the_disk_or_not_whole_sectors(guest_factory):
    g = guest_factory()
    with pytest.raises(OSError, match="past the end"):
        g.front.replay([("write", g.vbd.sectors, b"x" * 512)])
    with pytest.raises(OSError, match="whole sectors"):
        g.front.replay([("write", 0, b"x" * 100)])
    assert g.front.replay([("write", 0, b"y" * 512), ("flush", 0, b"")])["writes"] == 1


@pytest.fixture
def mount_4k_sectors(tmp_path):
    """An ext4 filesystem on a loop device with 4096-byte logical sectors:
    direct I/O of 512-byte sectors is refused there (EINVAL)."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, losetup and mkfs.ext4")
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    p = subprocess.run(["losetup", "-f", "--show", "-b", "4096", str(backing)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"no loop device: {p.stderr.strip()}")
    dev = p.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], check=False).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_direct_auto_falls_back_where_sector_sized_direct_io_is_refused(tmp_path, mount_4k_sectors):
    img = mount_4k_sectors / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    with pytest.raises(OSError, match="does not take direct I/O of 512-byte sectors"):
        Vbd(img, direct=True)
    with Vbd(img, direct="auto") as v:
        assert v.info()["direct"] == 0
    # Where the guest's sectors are as large as the device's, direct I/O is used.
    with Vbd(img, direct="auto", sector_size=4096) as v:
        assert v.info()["direct"] == 1
    with Vbd(img, direct=False) as v:
        assert v.info()["direct"] == 0


def test_direct_auto_serves_a_guest(tmp_path, mount_4k_sectors):
    img = mount_4k_sectors / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    g = Guest(tmp_path, img, direct="auto")
    try:
        res = g.front.run(block_size=4096, queue_depth=8, read_pct=50, size=8 * MiB,
                          max_ios=2000, verify=True, flush_every=50)
        assert_clean(res)
    finally:
        g.close()


def test_unknown_direct_mode_is_refused(image):
    with pytest.raises(ValueError, match="direct must be"):
        Vbd(image, direct="sometimes")


def test_queue_threads_are_named_for_their_guest_and_queue(guest_factory):
    """`top -H` and `ps -L` in dom0 say which guest's queue a busy thread serves."""
    import os
    guest_factory(domid=7, queues=2)
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert sorted(n for n in names if n.startswith("xt-")) == ["xt-d7-q0", "xt-d7-q1"]
