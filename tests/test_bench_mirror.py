"""`xentap bench mirror`'s result with tiny sizes: the shape of --json, the
appliance's journal on its own storage, the CPU of each part per side."""
from __future__ import annotations

import glob
import json

import pytest

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
    assert r["replica_equals_source"] is True
    j = r["appliance_journal"]
    assert {"path", "fs", "device", "why", "same_device_as_images"} <= set(j)
    if j["fs"] == "tmpfs":      # the default when /dev/shm has room
        assert j["same_device_as_images"] is False
    assert not glob.glob(j["path"])             # cleaned up after
    assert r["spill_log"]["same_device_as_images"] is True     # beside the images by default
    table = bm.format_table(r)
    assert "appliance journal and replica: " + j["path"] in table
    assert "CPU in cores" in table


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
