"""`xentap bench datapath`: fio and the shim on the same file, side by side.

For each workload, fio (io_uring, O_DIRECT) runs on the image file, then the
sim blkfront drives the same job through the shim (sim transport, io_uring,
O_DIRECT) on the same file; the pair is repeated and alternated, and the
ratio shim/fio of the medians is reported.  The blkfront runs in a child
process (a guest is another domain), so the shim's process holds only what
dom0 would: its resident memory is measured there.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

from xentap import shim

MiB = 1 << 20


@dataclass(frozen=True)
class Job:
    name: str
    label: str
    rw: str            # fio's rw
    bs: int
    qd: int

    @property
    def read_pct(self) -> int:
        return 100 if "read" in self.rw else 0

    @property
    def sequential(self) -> bool:
        return not self.rw.startswith("rand")


JOBS = (
    Job("randwrite_4k_qd32", "4 KiB random write QD32", "randwrite", 4096, 32),
    Job("randread_4k_qd32", "4 KiB random read QD32", "randread", 4096, 32),
    Job("seqwrite_1m_qd8", "1 MiB sequential write QD8", "write", MiB, 8),
)


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process (the shim's queue threads; the guest is a child)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_fio(path: str, job: Job, size: int, seconds: float | None) -> dict:
    """fio's job on `path`, for `seconds` (None: one pass over `size`)."""
    cmd = ["fio", "--name=bench", f"--filename={path}", "--ioengine=io_uring", "--direct=1",
           f"--rw={job.rw}", f"--bs={job.bs}", f"--iodepth={job.qd}", f"--size={size}",
           "--norandommap", "--randrepeat=0", "--output-format=json"]
    if seconds is not None:
        cmd += [f"--runtime={seconds}", "--time_based"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if job.read_pct else j["write"]
    return {"iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6,
            "cpu": (j["usr_cpu"] + j["sys_cpu"]) / 100, "seconds": j["job_runtime"] / 1000,
            "time_us": {"round_trip": side["lat_ns"]["mean"] / 1e3}}


class DiskMeter:
    """What the image's block device did, from its /sys/dev/block/<maj:min>/stat
    (the kernel's Documentation/block/stat.rst): per I/O, the device's own
    time, and how many requests were at it on average.  Side by side, these
    say whether a side lost at the disk or on the way to it (Little's law:
    throughput = requests at the disk / time per request).  None where the
    image is on no block device (tmpfs, overlay)."""

    # the stat file's fields: I/Os completed and ms spent, per direction
    FIELDS = {"read": (0, 3), "write": (4, 7)}
    TIME_IN_QUEUE = 10

    def __init__(self, path: str) -> None:
        dev = os.stat(path).st_dev
        stat = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
        self.stat = stat if os.major(dev) and os.path.exists(stat) else None

    def sample(self) -> tuple[float, list[int]] | None:
        if self.stat is None:
            return None
        try:
            with open(self.stat) as f:
                return time.monotonic(), [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None

    @classmethod
    def between(cls, a, b, kind: str, seconds: float | None = None) -> dict | None:
        """``kind`` ("read" or "write") I/Os per second, the device's time per
        I/O (ms spent / I/Os completed), and the requests at the device on
        average (time in queue, all directions, / time).  ``seconds``: how
        long the workload ran between the two samples (fio's process starts
        and ends around its run: a tenth of a 2 s run here), else the time
        between them."""
        if a is None or b is None or min(len(a[1]), len(b[1])) <= cls.TIME_IN_QUEUE:
            return None
        wall_ms = (seconds if seconds else b[0] - a[0]) * 1000
        n, ms = cls.FIELDS[kind]
        ios, io_ms = b[1][n] - a[1][n], b[1][ms] - a[1][ms]
        queued = b[1][cls.TIME_IN_QUEUE] - a[1][cls.TIME_IN_QUEUE]
        return {"ios_per_s": round(ios * 1000 / wall_ms, 1) if wall_ms > 0 else 0.0,
                "us_per_io": round(io_ms * 1000 / ios, 1) if ios else 0.0,
                "at_device": round(queued / wall_ms, 2) if wall_ms > 0 else 0.0}


def disk_line(label: str, sides: dict[str, dict | None]) -> str | None:
    """One workload's line of the disk table: each side's time per I/O and
    requests at the disk (None when a side has no figures)."""
    if not all(sides.values()):
        return None
    return f"  {label:<27} " + "   ".join(
        f"{name} {d['us_per_io']:>7,.0f} us {d['at_device']:>5.1f} at the disk"
        for name, d in sides.items())


def median_figures(runs: list[dict], key: str) -> dict | None:
    """The median of each of the runs' figures under `key` (DiskMeter's "disk",
    "time_us"); None where no run has them."""
    figs = [r[key] for r in runs if r.get(key)]
    return ({k: round(statistics.median(d[k] for d in figs), 1) for k in figs[0]}
            if figs else None)


#: the shim's parts of a request's time (xt_stats' ns_<part>), in order
SHIM_PARTS = ("to_engine", "at_engine", "to_answer")


def _with_guest(t: dict) -> dict:
    """`t` with its "guest" part: what its round trip leaves after the shim's."""
    t["guest"] = t["round_trip"] - sum(t[k] for k in SHIM_PARTS)
    return t


def shim_times(before: dict, after: dict, round_trip_us: float) -> dict | None:
    """Where a request's time went, in us per request, between two Vbd.stats():
    the guest's round trip (its mean), and of it the shim's three parts (see
    xt_stats: taken -> handed to the engine, at the engine, seen done ->
    answered); the rest is the guest's and the hand-offs between them (the
    guest issuing and reaping, its wake-ups, the shim noticing new requests)."""
    n = after["timed"] - before["timed"]
    if n <= 0:
        return None
    part = {k: (after[f"ns_{k}"] - before[f"ns_{k}"]) / n / 1e3 for k in SHIM_PARTS}
    return _with_guest({"round_trip": round_trip_us, **part})


def guest_wake(t: dict | None, res: dict) -> dict | None:
    """`t` with the sim guest's wake-up after the shim's event (the median,
    us; its events carry their send time) and how many requests it reaped
    per wake-up: in a queue that moves as one convoy, every request of the
    round waits for it."""
    if t is not None:
        t["wake"] = res["wake_us_p50"]
        t["ios_per_wake"] = round(res["ios"] / res["wakes"], 1) if res["wakes"] else 0.0
    return t


def median_times(runs: list[dict]) -> dict | None:
    """The median of the runs' shim_times, part by part; the guest's part is
    what the median round trip leaves (medians taken apart do not add up)."""
    t = median_figures(runs, "time_us")
    if t and SHIM_PARTS[0] in t:
        t = _with_guest(t)
        t["guest"] = round(t["guest"], 1)
    return t


def _split(t: dict) -> str:
    if SHIM_PARTS[0] not in t:
        return f"{t['round_trip']:>7,.0f}"
    wake = (f" (wake-up {t['wake']:,.0f}, 1 per {t['ios_per_wake']:,.0f} I/Os)"
            if t.get("wake") else "")
    return (f"{t['round_trip']:>7,.0f} = {t['to_engine']:>5,.0f} + {t['at_engine']:>7,.0f}"
            f" + {t['to_answer']:>5,.0f} + {t['guest']:>6,.0f}{wake}")


def time_line(label: str, a: dict | None, b: dict | None,
              names: tuple[str, str] = ("fio", "shim")) -> str | None:
    """One workload's line of the time table: each side's round trip, split
    where the shim timed it (None when a side has no figures)."""
    if not (a and b):
        return None
    return f"  {label:<27} {names[0]} {_split(a)}   {names[1]} {_split(b)}"


def _guest(simdir: str, sectors: int, conn) -> None:
    """The child: a sim domain and its blkfront, running the jobs it is sent."""
    dom = shim.SimDomain(simdir, domid=1)
    front = shim.SimFront(simdir, sectors=sectors, nr_queues=1, ring_order=1,
                          max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
    conn.send(front.params)
    while True:
        w = conn.recv()
        if w is None:
            break
        try:
            conn.send(front.run(w))
        except OSError as e:
            conn.send(e)
    front.close()
    dom.close()


class ShimSide:
    """The shim serving `path` to a sim guest in a child process."""

    def __init__(self, path: str, workdir: str, mirror_bytes: int = 0):
        self.simdir = os.path.join(workdir, "guest")
        os.makedirs(workdir, exist_ok=True)
        self.rss_before = _rss_anon_kib()
        self.vbd = shim.Vbd(path, direct=True)
        if mirror_bytes:
            self.vbd.mirror_enable(mirror_bytes)
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_guest, args=(self.simdir, self.vbd.sectors, child), daemon=True)
        self.proc.start()
        params = self.conn.recv()
        self.transport = shim.Transport.sim(self.simdir)
        self.vbd.connect(self.transport, params)

    def run(self, job: Job, size: int, seconds: float) -> dict:
        w = shim.Workload(block_size=job.bs, queue_depth=job.qd, read_pct=job.read_pct,
                          sequential=job.sequential, size=size, seconds=seconds)
        cpu0, st0 = _cpu_seconds(), self.vbd.stats()
        self.conn.send(w)
        r = self.conn.recv()
        cpu, st1 = _cpu_seconds() - cpu0, self.vbd.stats()
        if isinstance(r, Exception):
            raise r
        if r["errors"]:
            raise RuntimeError(f"{r['errors']} I/O errors through the shim")
        nbytes = r["bytes_read"] + r["bytes_written"]
        return {"iops": r["ios"] / r["seconds"], "mb_s": nbytes / r["seconds"] / 1e6,
                "cpu": cpu / r["seconds"], "seconds": r["seconds"],
                "lat_us_p50": r["lat_us_p50"], "lat_us_p99": r["lat_us_p99"],
                "time_us": guest_wake(shim_times(st0, st1, r["lat_us_mean"]), r)}

    def rss_mib(self) -> tuple[float, float]:
        """(resident anonymous memory the VBD added, of which request buffers), MiB."""
        st = self.vbd.stats()
        grown = (_rss_anon_kib() - self.rss_before) / 1024
        return grown, st["buffer_bytes"] / MiB

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        self.vbd.close()
        self.transport.close()


def same_file(a: str, b: str) -> bool:
    """Byte for byte, without holding either in memory."""
    if not (os.path.exists(a) and os.path.exists(b)) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def open_direct(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open with O_DIRECT where the file system takes it (tmpfs does not:
    then without)."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError:
        return os.open(path, flags, mode)


def prepare_images(paths: list[str], size: int) -> None:
    """Fully written (not sparse) images, so that no side pays for allocation,
    written side by side: a MiB of each in turn, with O_DIRECT where the file
    system takes it, so that each file's blocks are allocated as it is
    written and the files interleave on the disk.

    Two images written one after the other land on different regions of the
    disk, and on this project's VM they differed by themselves: fio's 4 KiB
    random writes ran at 0.70-0.75 on the second image of what they did on
    the first, round after round and after the second was written again.
    Written side by side, the two were within 1-8 % of each other, neither
    steadily ahead (2026-11-27).
    """
    chunk = mmap.mmap(-1, MiB)          # page aligned, as O_DIRECT needs
    chunk.write(os.urandom(MiB))
    fds = []
    try:
        for p in paths:                 # (tmpfs: no O_DIRECT, nor a layout to share)
            fds.append(open_direct(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        for i in range(size // MiB):
            for fd in fds:
                if os.pwritev(fd, [chunk], i * MiB) != MiB:
                    raise OSError(f"short write preparing {size // MiB} MiB images")
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        chunk.close()


WARMUP_SECONDS = 1.0


def warm_image(path: str, size: int) -> None:
    """One sequential direct read of the whole image.

    A freshly written image is served, at first, from wherever the host put
    it; measured here, fio's 4 KiB random reads went from 5,000 to 50,000 IOPS
    over the first minute of reading it.  Whichever side ran first in that
    minute lost, and the ratio measured the host, not the shim.
    """
    run_fio(path, Job("warm", "warm", "read", MiB, 8), size, None)


def run(directory: str | None, size: int, seconds: float, repeat: int, progress) -> dict:
    if not shutil.which("fio"):
        raise RuntimeError("fio is not installed (apt-get install fio)")
    workdir = tempfile.mkdtemp(prefix="xentap-bench-", dir=directory)
    try:
        path = os.path.join(workdir, "disk.img")
        progress(f"preparing a {size // MiB} MiB image in {workdir}")
        prepare_images([path], size)
        progress("reading the image once, so that both sides start from the same cache state")
        warm_image(path, size)
        side = ShimSide(path, workdir)
        disk = DiskMeter(path)
        results: dict = {}
        try:
            for job in JOBS:
                progress(f"{job.label}: a short unmeasured run of each side")
                run_fio(path, job, size, WARMUP_SECONDS)
                side.run(job, size, WARMUP_SECONDS)
                fio_runs, shim_runs = [], []
                for i in range(repeat):
                    # A pair back to back, in alternating order, so that the
                    # machine's drift (a VM's neighbours) falls on both sides.
                    for name in (("fio", "shim") if i % 2 == 0 else ("shim", "fio")):
                        progress(f"{job.label}: {name} run {i + 1}/{repeat}")
                        d0 = disk.sample()
                        if name == "fio":
                            fio_runs.append(run_fio(path, job, size, seconds))
                        else:
                            shim_runs.append(side.run(job, size, seconds))
                        last = (fio_runs if name == "fio" else shim_runs)[-1]
                        last["disk"] = DiskMeter.between(d0, disk.sample(),
                                                         "read" if job.read_pct else "write",
                                                         last["seconds"])
                f_iops = statistics.median(r["iops"] for r in fio_runs)
                s_iops = statistics.median(r["iops"] for r in shim_runs)
                pair_ratios = [s["iops"] / f["iops"] for f, s in zip(fio_runs, shim_runs) if f["iops"]]
                results[job.name] = {
                    "label": job.label,
                    "fio_iops": round(f_iops),
                    "shim_iops": round(s_iops),
                    "fio_mb_s": round(statistics.median(r["mb_s"] for r in fio_runs), 1),
                    "shim_mb_s": round(statistics.median(r["mb_s"] for r in shim_runs), 1),
                    "shim_lat_us_p99": statistics.median(r["lat_us_p99"] for r in shim_runs),
                    "fio_cpu": round(statistics.median(r["cpu"] for r in fio_runs), 2),
                    "shim_cpu": round(statistics.median(r["cpu"] for r in shim_runs), 2),
                    # The median of the pairs' ratios: each pair ran under the same conditions.
                    "ratio": round(statistics.median(pair_ratios), 3) if pair_ratios else 0.0,
                    "ratio_min": round(min(pair_ratios), 3) if pair_ratios else 0.0,
                    "ratio_max": round(max(pair_ratios), 3) if pair_ratios else 0.0,
                    # the image's disk per side (median per run; None: no block device)
                    "disk": {"fio": median_figures(fio_runs, "disk"),
                             "shim": median_figures(shim_runs, "disk")},
                    # a request's time, us (shim_times; fio: its round trip only)
                    "time_us": {"fio": median_times(fio_runs), "shim": median_times(shim_runs)},
                }
            grown, buffers = side.rss_mib()
        finally:
            side.close()
        results["rss_mib_per_vbd"] = round(max(grown - buffers, 0.0), 2)
        results["request_buffers_mib"] = round(buffers, 2)
        results["engine"] = "io_uring, O_DIRECT"
        results["poll_us"] = shim.DEFAULT_POLL_US
        results["seconds_per_run"] = seconds
        results["repeat"] = repeat
        results["image_mib"] = size // MiB
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def format_table(r: dict) -> str:
    lines = [f"{'workload':<30} {'fio':>16} {'shim':>16} {'shim/fio':>9} {'(pairs)':>13} "
             f"{'CPU fio/shim':>13}"]
    for job in JOBS:
        x = r[job.name]
        unit = "MB/s" if job.bs >= MiB else "IOPS"
        f = x["fio_mb_s"] if unit == "MB/s" else x["fio_iops"]
        s = x["shim_mb_s"] if unit == "MB/s" else x["shim_iops"]
        pairs = f"{x['ratio_min']:.2f}-{x['ratio_max']:.2f}"
        lines.append(f"{job.label:<30} {f:>11,.0f} {unit:<4} {s:>11,.0f} {unit:<4} {x['ratio']:>9.3f}"
                     f" {pairs:>13} {x['fio_cpu']:>8.2f}/{x['shim_cpu']:<4.2f}")
    if any(r[job.name].get("disk", {}).get("fio") for job in JOBS):
        lines.append("the image's disk, median per run: its time per I/O, and the requests at it "
                     "on average")
        for job in JOBS:
            d = r[job.name].get("disk", {})
            line = disk_line(job.label, {"fio": d.get("fio"), "shim": d.get("shim")})
            if line:
                lines.append(line)
    times = [time_line(job.label, r[job.name].get("time_us", {}).get("fio"),
                       r[job.name].get("time_us", {}).get("shim")) for job in JOBS]
    if any(times):
        lines.append("a request's time, us, median per run: its round trip, and the shim's as "
                     "taken -> engine + at the engine (the disk, the kernel) + done -> answered "
                     "+ the guest and the hand-offs (of them, the guest's wake-up after the "
                     "shim's event, and how often it slept)")
        lines += [t for t in times if t]
    lines.append(f"shim resident memory per VBD: {r['rss_mib_per_vbd']:.2f} MiB "
                 f"(beyond {r['request_buffers_mib']:.2f} MiB of request buffers)")
    lines.append(f"({r['engine']}; {r['image_mib']} MiB image; {r['repeat']} pairs of runs of "
                 f"{r['seconds_per_run']} s, back to back in alternating order; shim/fio is the median "
                 f"of the pairs' ratios, IOPS and MB/s the medians of each side; CPU in cores: fio's "
                 f"process, the shim's queue threads polling up to {r['poll_us']} us, not the guest's)")
    return "\n".join(lines)
