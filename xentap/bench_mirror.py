"""`xentap bench mirror`: what mirroring costs the guest, measured side by side.

Two VBDs on two identical, fully written images: one with mirroring off,
one mirrored through the drainer to a local appliance (its own process,
CurveZMQ on loopback).  Runs alternate between them; for each workload the
ratio on/off of the medians is reported, with the lag from write completion
to the appliance's acknowledgement and the ring's overflows.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import uuid

from xentap import bench_datapath as bd
from xentap import shim
from xentap.demo import LocalAppliance
from xentap.drainer import Drainer, VbdIdentity

MiB = 1 << 20
JOBS = (
    bd.Job("randwrite_4k_qd32", "4 KiB random write QD32", "randwrite", 4096, 32),
    bd.Job("seqwrite_1m_qd8", "1 MiB sequential write QD8", "write", MiB, 8),
)


def run(directory: str | None, size: int, seconds: float, repeat: int, ring_bytes: int,
        progress) -> dict:
    workdir = tempfile.mkdtemp(prefix="xentap-bench-mirror-", dir=directory)
    appliance = None
    try:
        paths = [os.path.join(workdir, n) for n in ("off.img", "on.img")]
        progress(f"preparing two {size // MiB} MiB images in {workdir}")
        # both written and synced the same way: a copy (copy_file_range) leaves the
        # second one's data dirty in the page cache or its extents shared/unwritten,
        # and the shim's O_DIRECT writes to it then go through io_uring's workers --
        # 10x slower, whatever the mirror does
        for p in paths:
            bd.prepare_image(p, size)
        appliance = LocalAppliance(workdir)
        off = bd.ShimSide(paths[0], os.path.join(workdir, "off"))
        on = bd.ShimSide(paths[1], os.path.join(workdir, "on"), mirror_bytes=ring_bytes)
        ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=1, devid=51712, vdev="xvda",
                            size_bytes=size)
        drainer = Drainer(on.vbd, ident, appliance.endpoint, image_path=paths[1],
                          spill_dir=os.path.join(workdir, "spill"), spill_limit=1 << 30,
                          socket_setup=appliance.socket_setup).start()
        results: dict = {}
        try:
            for job in JOBS:
                offs, ons, lags, overflows = [], [], [], 0
                for i in range(repeat):
                    progress(f"{job.label}: mirroring off, run {i + 1}/{repeat}")
                    offs.append(off.run(job, size, seconds))
                    progress(f"{job.label}: mirroring on, run {i + 1}/{repeat}")
                    before = on.vbd.mirror_stats()["overflows"]
                    drainer.reset_figures()
                    ons.append(on.run(job, size, seconds))
                    if not drainer.wait_acked(120):
                        raise RuntimeError("the appliance did not catch up within 120 s")
                    overflows += on.vbd.mirror_stats()["overflows"] - before
                    lags.append(drainer.stats()["lag_ms"])
                f_iops = statistics.median(r["iops"] for r in offs)
                n_iops = statistics.median(r["iops"] for r in ons)
                results[job.name] = {
                    "label": job.label,
                    "off_iops": round(f_iops), "on_iops": round(n_iops),
                    "off_mb_s": round(statistics.median(r["mb_s"] for r in offs), 1),
                    "on_mb_s": round(statistics.median(r["mb_s"] for r in ons), 1),
                    "ratio": round(n_iops / f_iops, 3) if f_iops else 0.0,
                    "overflows": overflows,
                    "lag_ms": {k: round(statistics.median(x[k] for x in lags), 1)
                               for k in ("p50", "p99", "max")},
                }
            results["sessions"] = drainer.stats()["sessions"]
        finally:
            drainer.stop()
            off.close()
            on.close()
        replica = appliance.replica(ident.vbd_uuid)
        results["replica_equals_source"] = bd.same_file(replica, paths[1])
        results["ring_mib"] = ring_bytes // MiB
        results["seconds_per_run"] = seconds
        results["repeat"] = repeat
        results["image_mib"] = size // MiB
        return results
    finally:
        if appliance:
            appliance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def format_table(r: dict) -> str:
    lines = [f"{'workload':<28} {'mirror off':>14} {'mirror on':>14} {'on/off':>7}"
             f" {'lag p50/p99/max ms':>22} {'overflows':>9}"]
    for job in JOBS:
        x = r[job.name]
        unit = "MB/s" if job.bs >= MiB else "IOPS"
        a = x["off_mb_s"] if unit == "MB/s" else x["off_iops"]
        b = x["on_mb_s"] if unit == "MB/s" else x["on_iops"]
        lag = x["lag_ms"]
        lines.append(f"{job.label:<28} {a:>9,.0f} {unit:<4} {b:>9,.0f} {unit:<4} {x['ratio']:>7.3f}"
                     f" {lag['p50']:>8.1f}/{lag['p99']:.1f}/{lag['max']:.1f} {x['overflows']:>9}")
    lines.append(f"replica equals source: {r['replica_equals_source']}; ring {r['ring_mib']} MiB; "
                 f"{r['image_mib']} MiB images; median of {r['repeat']} alternating runs of "
                 f"{r['seconds_per_run']} s; CurveZMQ on loopback")
    return "\n".join(lines)
