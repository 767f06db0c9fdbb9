"""`xentap bench mirror`'s result with tiny sizes: the shape of --json, the
appliance's journal on its own storage, the CPU of each part per side."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from xentap import bench_datapath as bd
from xentap import bench_mirror as bm

MiB = 1 << 20


@pytest.mark.slow
def test_bench_mirror_result_shape(tmp_path):
    r = bm.run(str(tmp_path), 32 * MiB, 0.3, 2, 4 * MiB, lambda m: None)
    json.dumps(r)       # what --json prints
    for job in bm.JOBS:
        x = r[job.name]
        assert x["ratio"] > 0 and x["ratio_min"] <= x["ratio"] <= x["ratio_max"]
        assert len(x["pair_ratios"]) == 2
        assert x["off_iops"] > 0 and x["on_iops"] > 0
        assert set(x["lag_ms"]) == {"p50", "p99", "max"}
        assert x["overflows"] >= 0 and x["spilled_mib"] >= 0
        for side in ("off", "on"):
            assert set(x["cpu"][side]) == {*bm.PARTS, "total"}
            assert all(v >= 0 for v in x["cpu"][side].values())
        assert x["cpu"]["on"]["drainer"] > 0      # the drainer's thread is measured
        assert {"polls", "woken_by_shim", "eventfd_writes", "frames"} <= set(x["drainer_wakes_per_s"])
        if bd.DiskMeter(str(tmp_path)).stat:    # the images on a block device: its figures
            for side in ("off", "on"):
                d = x["disk"][side]
                assert d["ios_per_s"] > 0 and d["us_per_io"] > 0 and d["at_device"] >= 0, d
        for side in ("off", "on"):
            t = x["time_us"][side]
            assert t["at_engine"] > 0 and t["round_trip"] == pytest.approx(
                t["to_engine"] + t["at_engine"] + t["to_answer"] + t["guest"], abs=0.2), t
    assert r["replica_equals_source"] is True
    j = r["appliance_journal"]
    assert {"path", "fs", "device", "why", "same_device_as_images"} <= set(j)
    if j["fs"] == "tmpfs":      # the default when /dev/shm has room
        assert j["same_device_as_images"] is False
    assert not glob.glob(j["path"])             # cleaned up after
    assert r["spill_log"]["same_device_as_images"] is True     # beside the images by default
    t = r["transport_alone"]     # one stream by itself, with CurveZMQ and without
    for mode in ("curve", "plain"):
        assert t[mode]["mb_s"] > 0 and t[mode]["cores"] > 0, t
    table = bm.format_table(r)
    assert "the transport alone" in table
    assert "appliance journal and replica: " + j["path"] in table
    assert "CPU in cores" in table
    assert "a write's time, us" in table
    if bd.DiskMeter(str(tmp_path)).stat:
        assert "the images' disk" in table


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_images_are_written_whole_and_alike_side_by_side(tmp_path, where):
    """Both images fully allocated and the same bytes, on a file system that
    takes O_DIRECT (written interleaved) and on tmpfs (which does not)."""
    d = tmp_path if where == "tmp" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        paths = [str(d / "a.img"), str(d / "b.img")]
        bd.prepare_images(paths, 8 << 20)
        a, b = (Path(p).read_bytes() for p in paths)
        assert len(a) == 8 << 20 and a == b and a[:1 << 20] == a[-(1 << 20):]
        assert len(set(a[:4096])) > 200                     # random bytes, not zeroes
        for p in paths:
            assert os.stat(p).st_blocks * 512 >= 8 << 20     # not sparse
    finally:
        if where == "shm":
            shutil.rmtree(d)


def test_time_figures_add_up_to_the_median_round_trip():
    """Medians part by part, with the guest's part what the median round trip
    leaves, so that the printed sum holds; fio's side is a round trip only."""
    runs = [{"time_us": {"round_trip": rt, "to_engine": a, "at_engine": b, "to_answer": c,
                         "guest": rt - a - b - c}}
            for rt, a, b, c in ((400, 40, 300, 10), (380, 50, 280, 5), (500, 30, 330, 20))]
    t = bd.median_times(runs)
    assert t == {"round_trip": 400, "to_engine": 40, "at_engine": 300, "to_answer": 10, "guest": 50}
    line = bd.time_line("4 KiB", {"round_trip": 300.0}, t)
    assert line.split() == ["4", "KiB", "fio", "300", "shim", "400", "=", "40", "+", "300", "+",
                            "10", "+", "50"]
    assert bd.time_line("4 KiB", None, t) is None
    assert bd.median_times([{"time_us": None}]) is None
    # the sim guest's wake-up, when the runs have it, follows the guest's part
    woke = bd.time_line("4 KiB", {"round_trip": 300.0}, {**t, "wake": 41.0, "ios_per_wake": 31.5})
    assert woke.endswith("+     50 (wake-up 41, 1 per 32 I/Os)"), woke


def test_disk_figures_are_the_devices_time_per_io_and_requests_at_it():
    """Documentation/block/stat.rst: fields 1 and 4 (reads completed, ms reading),
    5 and 8 (writes completed, ms writing), 11 (ms of time in queue, summed
    over the requests)."""
    before = (10.0, [0, 0, 0, 0, 1000, 0, 8000, 500, 0, 0, 4000])
    after = (12.0, [500, 0, 40, 100, 21000, 0, 168000, 8500, 0, 900, 44000])
    d = bd.DiskMeter.between(before, after, "write")
    assert d == {"ios_per_s": 10000.0, "us_per_io": 400.0, "at_device": 20.0}
    assert bd.DiskMeter.between(before, after, "read") == \
        {"ios_per_s": 250.0, "us_per_io": 200.0, "at_device": 20.0}
    assert bd.DiskMeter.between(before, after, "write", 1.6) == \
        {"ios_per_s": 12500.0, "us_per_io": 400.0, "at_device": 25.0}   # the run's own time
    assert bd.DiskMeter.between(None, after, "write") is None
    assert bd.DiskMeter.between(before, (12.0, after[1][:4]), "write") is None
    assert bd.DiskMeter.between(before, (12.0, before[1]), "write")["us_per_io"] == 0.0


def test_bench_mirror_appliance_dir_is_chosen_and_named(tmp_path):
    adir = tmp_path / "appl"
    adir.mkdir()
    bm.JOBS, jobs = bm.JOBS[:1], bm.JOBS
    try:
        r = bm.run(str(tmp_path), 32 * MiB, 0.2, 1, 4 * MiB, lambda m: None,
                   appliance_dir=str(adir), spill_dir=str(adir))
    finally:
        bm.JOBS = jobs
    j = r["appliance_journal"]
    assert j["path"].startswith(str(adir)) and "--appliance-dir" in j["why"]
    assert j["same_device_as_images"] is True       # tmp_path holds both
    assert r["spill_log"]["path"].startswith(str(adir))
    assert "THE SAME DEVICE" in bm.format_table(r)
    assert list(adir.iterdir()) == []


def test_cpu_lists_are_read_as_taskset_writes_them():
    assert bm.parse_cpus("2") == {2}
    assert bm.parse_cpus("0,2-3") == {0, 2, 3}
    for bad in ("", "x", "3-1", "-1", "1,", "1-"):
        with pytest.raises(ValueError, match="a CPU list expected"):
            bm.parse_cpus(bad)


def test_the_appliance_cannot_take_every_cpu_nor_one_that_is_not_there():
    allowed = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="leave some for the guest"):
        bm.split_cpus(set(allowed))
    with pytest.raises(ValueError, match="not among this process's CPUs"):
        bm.split_cpus({max(allowed) + 1})
    if len(allowed) > 1:
        one = {max(allowed)}
        assert bm.split_cpus(one) == allowed - one


def test_bench_mirror_cli_refuses_a_bad_cpu_list_in_one_line():
    from click.testing import CliRunner

    from xentap.cli import cli
    r = CliRunner().invoke(cli, ["bench", "mirror", "--appliance-cpus", "9999"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        f"xentap: --appliance-cpus 9999: not among this process's CPUs "
        f"({bm._cpu_list(os.sched_getaffinity(0))})"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_appliance_runs_on_its_cpus_and_the_rest_on_the_others(tmp_path, monkeypatch):
    allowed = os.sched_getaffinity(0)
    mine = {max(allowed)}
    seen = {}
    real_run = bm._Side.run

    def queue_threads() -> dict:
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:                            # other threads come and go meanwhile
                with open(f"/proc/self/task/{t}/comm") as f:
                    if f.read().startswith("xt-d"):
                        out[t] = os.sched_getaffinity(int(t))
            except (FileNotFoundError, ProcessLookupError):
                pass
        return out

    def run(self, job, size, seconds):     # during a run: where each part may go
        seen.setdefault("appliance", os.sched_getaffinity(self.appliance_pid))
        seen.setdefault("guest", os.sched_getaffinity(self.side.proc.pid))
        seen.setdefault("queue threads", queue_threads())
        return real_run(self, job, size, seconds)

    monkeypatch.setattr(bm._Side, "run", run)
    monkeypatch.setattr(bm, "JOBS", bm.JOBS[:1])
    r = bm.run(str(tmp_path), 32 * MiB, 0.2, 1, 4 * MiB, lambda m: None, appliance_cpus=mine)
    assert seen["appliance"] == mine
    assert seen["guest"] == allowed - mine
    assert seen["queue threads"] and all(c == allowed - mine for c in seen["queue threads"].values())
    assert os.sched_getaffinity(0) == allowed        # given back after
    assert r["appliance_cpus"] == sorted(mine) and r["other_cpus"] == sorted(allowed - mine)
    assert "--appliance-cpus" in bm.format_table(r)
    assert r["replica_equals_source"] is True
