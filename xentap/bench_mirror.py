"""`xentap bench mirror`: what mirroring costs the guest, measured side by side.

Two VBDs on two identical, fully written images, each served by the shim
(this process: its queue threads and the drainer's thread) to a simulated
guest in a child process (a guest is another domain): one with mirroring
off, one mirrored through the drainer to a local appliance (its own process,
CurveZMQ on loopback) that journals every write.  For each workload, after
a short unmeasured run of each side, runs go in pairs back to back, in
alternating order, so that the machine's drift falls on both sides; the
ratio on/off is the median of the pairs' ratios, with their range.

What the guest pays, and what it does not:

- The appliance's journal and replica go on their own storage (default: a
  directory on tmpfs, /dev/shm), as a separate appliance domain's journal
  disk or a remote appliance would be.  On the guest's own disk the disk
  absorbs every byte twice and the journal's fdatasyncs queue behind the
  guest's writes: that measures the disk, not the mirror.  `appliance_dir`
  chooses another place; the output says where the journal was and on what.
- The appliance still runs on this machine's CPUs, beside the guest and the
  shim; a separate appliance domain would have its own vCPUs.  The CPU each
  part used (guest child, shim's queue threads, drainer thread, appliance
  process) is measured per side so that a reader sees how much of the
  machine each took.
- The drainer's wake-ups are counted (without changing it): how often the
  shim's eventfd woke it, how many eventfd writes the shim made, how many
  frames it sent.
- Before the runs, with nothing else running, the transport is measured by
  itself (transport_alone): what one CurveZMQ stream carries on loopback,
  and at what CPU, so that a reader sees how much of the machine mirroring
  the guest's rate takes before the appliance does anything with it.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid

import zmq

from xentap import bench_datapath as bd
from xentap import keys, shim
from xentap.demo import LocalAppliance
from xentap.drainer import Drainer, VbdIdentity

MiB = 1 << 20
JOBS = (
    bd.Job("randwrite_4k_qd32", "4 KiB random write QD32", "randwrite", 4096, 32),
    bd.Job("seqwrite_1m_qd8", "1 MiB sequential write QD8", "write", MiB, 8),
)
WARMUP_SECONDS = 1.0
TICK = os.sysconf("SC_CLK_TCK")
SHM = "/dev/shm"


# ---------------------------------------------------------------- where things are

def _mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, filesystem type, source) of the mount holding `path`."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                fstype, source = right.split()[:2]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, source)
    except OSError:
        pass
    return best


def _storage(path: str) -> dict:
    mnt, fstype, source = _mount_of(path)
    return {"path": path, "fs": fstype, "device": source if fstype != "tmpfs" else "tmpfs",
            "mount": mnt, "st_dev": os.stat(path).st_dev}


def _default_appliance_parent(need: int) -> str | None:
    """/dev/shm when it is tmpfs with room for the replica and the journal."""
    if not os.path.isdir(SHM) or _mount_of(SHM)[1] != "tmpfs":
        return None
    st = os.statvfs(SHM)
    return SHM if st.f_bavail * st.f_frsize >= need else None


# ---------------------------------------------------------------- CPU

def _ticks(stat_path: str) -> int:
    try:
        with open(stat_path) as f:
            s = f.read()
    except OSError:
        return 0
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])       # utime, stime


def _zmq_ticks() -> int:
    """CPU of this process's libzmq background threads (CurveZMQ encryption,
    TCP): they send the drainer's frames."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("ZMQbg"):
                    total += _ticks(f"/proc/self/task/{tid}/stat")
        except OSError:
            pass
    return total


PARTS = ("guest", "shim", "drainer", "zmq", "appliance")


class CpuMeter:
    """CPU seconds of the parts, read from /proc: a guest child; the shim's
    process without the drainer's thread and libzmq's threads (its queue
    threads: serving and the tap's copy into the ring); the drainer's thread;
    libzmq's I/O threads; the appliance's process."""

    def __init__(self, appliance_pid: int):
        self.appliance_pid = appliance_pid
        self.drainer_tid: int | None = None

    def sample(self, guest_pid: int) -> dict:
        drainer = _ticks(f"/proc/self/task/{self.drainer_tid}/stat") if self.drainer_tid else 0
        zmq_ = _zmq_ticks()
        return {"guest": _ticks(f"/proc/{guest_pid}/stat") / TICK,
                "shim": (_ticks("/proc/self/stat") - drainer - zmq_) / TICK,
                "drainer": drainer / TICK,
                "zmq": zmq_ / TICK,
                "appliance": _ticks(f"/proc/{self.appliance_pid}/stat") / TICK}


# ---------------------------------------------------------------- the drainer, counted

class _CountingPoller:
    """The drainer's poller, counting why it returned.  It reads the shim's
    eventfd itself (the counter is the number of eventfd writes the shim made
    since the last read); the drainer's own read then finds it empty, which
    it expects."""

    def __init__(self, poller: zmq.Poller, wake_fd: int, counts: dict):
        self._poller, self._wake_fd, self._c = poller, wake_fd, counts

    def poll(self, timeout=None):
        ready = self._poller.poll(timeout)
        c = self._c
        c["polls"] += 1
        if timeout:
            c["sleeps"] += 1
        fds = [what for what, _ in ready]
        if self._wake_fd in fds:
            try:
                c["eventfd_writes"] += int.from_bytes(os.read(self._wake_fd, 8), "little")
            except BlockingIOError:
                pass
            if timeout:
                c["woken_by_shim"] += 1
        elif timeout and fds:
            c["woken_by_appliance"] += 1
        elif timeout:
            c["timeouts"] += 1
        return ready

    def __getattr__(self, name):
        return getattr(self._poller, name)


COUNTS = ("polls", "sleeps", "woken_by_shim", "woken_by_appliance", "timeouts", "eventfd_writes",
          "spilled_bytes")


class CountingDrainer(Drainer):
    """The drainer as the daemon runs it, with its wake-ups counted."""

    def __init__(self, *a, **kw):
        self.counts = dict.fromkeys(COUNTS, 0)
        super().__init__(*a, **kw)

    def _connect(self) -> None:
        super()._connect()
        self._poller = _CountingPoller(self._poller, self.wake_fd, self.counts)

    def _spill_from_ring(self) -> bool:
        before = self.spill.size
        did = super()._spill_from_ring()
        self.counts["spilled_bytes"] += max(self.spill.size - before, 0)
        return did

    def snapshot(self) -> dict:
        return {**self.counts, "frames": self.frames_sent, "sent_mb": self.bytes_sent / 1e6}


# ---------------------------------------------------------------- the run

def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset and cpusets write it ("2", "2-3", "0,2-3") as a set."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{text!r}: a CPU list expected, e.g. 2-3 or 0,2") from None
        if a < 0 or b < a:
            raise ValueError(f"{text!r}: a CPU list expected, e.g. 2-3 or 0,2")
        cpus.update(range(a, b + 1))
    return cpus


def split_cpus(appliance_cpus: set[int]) -> set[int]:
    """The CPUs left for the guest, the shim and the drainer when the
    appliance takes `appliance_cpus`; ValueError unless both get some."""
    allowed = os.sched_getaffinity(0)
    if not appliance_cpus <= allowed:
        raise ValueError(f"{_cpu_list(appliance_cpus - allowed)}: not among this process's "
                         f"CPUs ({_cpu_list(allowed)})")
    rest = allowed - appliance_cpus
    if not rest:
        raise ValueError(f"{_cpu_list(appliance_cpus)}: every CPU of this process; leave "
                         "some for the guest and the shim")
    return rest


def _cpu_list(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


TRANSPORT_FRAME = MiB  #: frame size of the transport probe (the drainer's frames: up to 4 MiB)


def _sink(server, conn, cpus) -> None:  # pragma: no cover - a child process
    """The transport probe's receiving end: a ROUTER on a free loopback port
    (sent back first) that counts bytes until b"end", then sends the count;
    on `cpus` when given (the appliance's)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    auth = keys.configure_server(s, server) if server else None
    s.bind("tcp://127.0.0.1:*")
    conn.send(s.last_endpoint.decode())
    n = 0
    while True:
        _route, frame = s.recv_multipart(copy=False)
        if frame.bytes == b"end":
            break
        n += len(frame)
    conn.send(n)
    s.close(0)
    if auth:
        auth.stop()
    ctx.term()


def transport_alone(appliance: LocalAppliance, seconds: float = 1.0,
                    cpus: set[int] | None = None) -> dict:
    """What the mirror's transport carries by itself on this machine, with
    nothing else running: one DEALER -> ROUTER stream on loopback, frames of
    TRANSPORT_FRAME bytes, with CurveZMQ (the appliance's keys) and without.
    MB/s and the CPU both ends took, in cores: the ceiling a mirror of one
    VBD meets before any journaling, and what encryption adds to it.  The
    receiving end runs on `cpus` when given (the appliance's)."""
    out = {}
    frame = zmq.Frame(os.urandom(TRANSPORT_FRAME))
    for name, curve in (("curve", True), ("plain", False)):
        server = keys.CurveServer.from_dir(appliance.keys, appliance.allowed) if curve else None
        conn, child = multiprocessing.Pipe()
        p = multiprocessing.get_context("fork").Process(target=_sink, args=(server, child, cpus),
                                                        daemon=True)
        p.start()
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.sndhwm, s.linger = 16, 0
        try:
            if not conn.poll(30):
                raise RuntimeError("the transport probe's receiver did not start")
            if curve:
                appliance.socket_setup(s)
            s.connect(conn.recv())
            cpu0, ticks0, t0 = time.process_time(), _ticks(f"/proc/{p.pid}/stat"), time.monotonic()
            while time.monotonic() - t0 < seconds:
                s.send(frame, copy=False)
            s.send(b"end")
            if not conn.poll(60):
                raise RuntimeError("the transport probe's receiver did not answer")
            nbytes = conn.recv()
            wall = time.monotonic() - t0
            cpu = time.process_time() - cpu0 + (_ticks(f"/proc/{p.pid}/stat") - ticks0) / TICK
        finally:
            s.close(0)
            ctx.term()
            p.join(10)
            if p.is_alive():    # it failed above: the receiver waits for an "end" in vain
                p.kill()
                p.join()
        out[name] = {"mb_s": round(nbytes / wall / 1e6, 1), "cores": round(cpu / wall, 2)}
    return out


def warm_image(path: str, size: int) -> None:
    """One sequential O_DIRECT read of the whole image (see bench_datapath.warm_image)."""
    buf = mmap.mmap(-1, 4 * MiB)
    fd = bd.open_direct(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)
        buf.close()


def _wait_quiet(pid: int, limit: float = 10.0) -> float:
    """Waits (at most `limit` s) until process `pid` uses under 5 % of a core
    over 0.2 s (the appliance applying its replica after the last ACK); the
    seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        a = _ticks(f"/proc/{pid}/stat")
        time.sleep(0.2)
        if (_ticks(f"/proc/{pid}/stat") - a) / TICK < 0.01:
            break
    return time.monotonic() - t0


class _Side:
    def __init__(self, name: str, shim_side: bd.ShimSide, meter: CpuMeter,
                 drainer: CountingDrainer | None, appliance_pid: int, disk: bd.DiskMeter):
        self.name, self.side, self.meter, self.drainer = name, shim_side, meter, drainer
        self.appliance_pid, self.disk = appliance_pid, disk

    def run(self, job: bd.Job, size: int, seconds: float) -> dict:
        guest = self.side.proc.pid
        d = self.drainer
        if d:
            over0 = self.side.vbd.mirror_stats()["overflows"]
            d.reset_figures()
            w0 = d.snapshot()
        c0, d0, t0 = self.meter.sample(guest), self.disk.sample(), time.monotonic()
        r = self.side.run(job, size, seconds)
        c1, d1, t1 = self.meter.sample(guest), self.disk.sample(), time.monotonic()
        wall = t1 - t0
        r["disk"] = bd.DiskMeter.between(d0, d1, "write", r["seconds"])
        w_end = d.snapshot() if d else None
        r["cpu"] = {k: (c1[k] - c0[k]) / wall for k in c0}
        if d:
            # After the run, not in it: everything acknowledged, then the
            # appliance idle, so that the next run (of either side) starts
            # on a quiet machine.  Its CPU until then is counted as its cost.
            if not d.wait_acked(120):
                raise RuntimeError("the appliance did not catch up within 120 s")
            r["catch_up_s"] = time.monotonic() - t1
            r["settle_s"] = _wait_quiet(self.appliance_pid)
            c2 = self.meter.sample(guest)
            r["appliance_after_cpu_s"] = c2["appliance"] - c1["appliance"]
            r["drainer_after_cpu_s"] = c2["drainer"] - c1["drainer"]
            w1 = d.snapshot()
            # rates during the run; what was spilled, until the appliance caught up
            r["wakes"] = {k: (w_end[k] - w0[k]) / wall for k in w1 if k != "spilled_bytes"}
            r["spilled_mib"] = (w1["spilled_bytes"] - w0["spilled_bytes"]) / MiB
            r["overflows"] = self.side.vbd.mirror_stats()["overflows"] - over0
            r["lag_ms"] = d.stats(lag_window=None)["lag_ms"]     # the whole run
        return r


def _med(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def _summary(job: bd.Job, offs: list[dict], ons: list[dict]) -> dict:
    key = "mb_s" if job.bs >= MiB else "iops"
    pairs = [n[key] / f[key] for f, n in zip(offs, ons) if f[key]]
    cpu = {side: {k: round(_med(r["cpu"][k] for r in runs), 3)
                  for k in PARTS}
           for side, runs in (("off", offs), ("on", ons))}
    for side in cpu.values():
        side["total"] = round(sum(side.values()), 3)
    wakes = {k: round(_med(r["wakes"][k] for r in ons), 1) for k in ons[0]["wakes"]}
    return {
        "label": job.label,
        "off_iops": round(_med(r["iops"] for r in offs)),
        "on_iops": round(_med(r["iops"] for r in ons)),
        "off_mb_s": round(_med(r["mb_s"] for r in offs), 1),
        "on_mb_s": round(_med(r["mb_s"] for r in ons), 1),
        "off_lat_us_p99": _med(r["lat_us_p99"] for r in offs),
        "on_lat_us_p99": _med(r["lat_us_p99"] for r in ons),
        # the median of the pairs' ratios: each pair ran under the same conditions
        "ratio": round(_med(pairs), 3),
        "ratio_min": round(min(pairs), 3) if pairs else 0.0,
        "ratio_max": round(max(pairs), 3) if pairs else 0.0,
        "pair_ratios": [round(p, 3) for p in pairs],
        "overflows": sum(r["overflows"] for r in ons),
        # moved from the ring to the drainer's spill log (beside the images) while the
        # appliance fell behind, all runs
        "spilled_mib": round(sum(r["spilled_mib"] for r in ons), 1),
        "lag_ms": {"p50": round(_med(r["lag_ms"]["p50"] for r in ons), 1),
                   "p99": round(_med(r["lag_ms"]["p99"] for r in ons), 1),
                   "max": round(max(r["lag_ms"]["max"] for r in ons), 1)},
        # CPU in cores (CPU seconds per second of run) of each part, per side
        "cpu": cpu,
        # the images' disk during the runs, per side (median per run; None: no block device)
        "disk": {side: bd.median_figures(runs, "disk") for side, runs in (("off", offs), ("on", ons))},
        # a request's time per side, us (bench_datapath.shim_times): the tap's share is in
        # to_answer, a slower disk's in at_engine, the guest's wake-ups in guest
        "time_us": {side: bd.median_times(runs) for side, runs in (("off", offs), ("on", ons))},
        # after each mirrored run: until every write was acknowledged, then
        # until the appliance was idle (CPU seconds it used then, per run)
        "catch_up_s": round(_med(r["catch_up_s"] for r in ons), 2),
        "settle_s": round(_med(r["settle_s"] for r in ons), 2),
        "appliance_after_cpu_s": round(_med(r["appliance_after_cpu_s"] for r in ons), 2),
        # per second of a mirrored run
        "drainer_wakes_per_s": wakes,
        "writes_per_s": round(_med(r["iops"] for r in ons)),
    }


def run(directory: str | None, size: int, seconds: float, repeat: int, ring_bytes: int,
        progress, appliance_dir: str | None = None, spill_dir: str | None = None,
        appliance_cpus: set[int] | None = None) -> dict:
    """`appliance_dir`: where the appliance keeps its journal and replica (a
    fresh directory is made in it and removed after); default a directory
    on tmpfs (/dev/shm) when it has room, else beside the images (and the
    output says so).  `spill_dir`: where the drainer's spill log goes (a
    fresh directory in it, removed after); default beside the images, as
    the daemon's state dir on a one-disk dom0.  `appliance_cpus`: the
    appliance runs on these CPUs and everything else (this process's threads
    from here on, the guests) on the others, as an appliance domain with
    vCPUs of its own would; default all share every CPU."""
    allowed = os.sched_getaffinity(0)
    others = split_cpus(appliance_cpus) if appliance_cpus else None
    workdir = tempfile.mkdtemp(prefix="xentap-bench-mirror-", dir=directory)
    appliance = adir = sdir = None
    try:
        if others:      # inherited by the threads and processes started below
            os.sched_setaffinity(0, others)
        paths = [os.path.join(workdir, n) for n in ("off.img", "on.img")]
        images = _storage(workdir)
        if appliance_dir:
            parent, why = appliance_dir, "chosen with --appliance-dir"
        else:
            # the replica, plus room for the journal (compressed, a few GiB at most here)
            parent = _default_appliance_parent(size + 4 * (1 << 30))
            why = ("default: tmpfs, its own storage, as a separate appliance domain's "
                   "journal disk or a remote appliance would be" if parent else
                   "default, but /dev/shm is missing or too small: beside the guest's images")
        adir = tempfile.mkdtemp(prefix="xentap-bench-appliance-", dir=parent or workdir)
        where = _storage(adir)
        shared = where["st_dev"] == images["st_dev"] or \
            (where["device"] == images["device"] and where["fs"] != "tmpfs")
        journal = {"path": adir, "fs": where["fs"], "device": where["device"], "why": why,
                   "same_device_as_images": shared}
        progress(f"preparing two {size // MiB} MiB images in {workdir} ({images['device']}, "
                 f"{images['fs']}); the appliance's journal in {adir} ({where['device']})")
        # both written and synced the same way, side by side so that they share the
        # disk's regions (bench_datapath.prepare_images); not a copy: copy_file_range
        # leaves the second one's data dirty in the page cache or its extents
        # shared/unwritten, and the shim's O_DIRECT writes to it then go through
        # io_uring's workers -- 10x slower, whatever the mirror does
        bd.prepare_images(paths, size)
        progress("reading both images once, so that both sides start from the same cache state")
        for p in paths:
            warm_image(p, size)
        appliance = LocalAppliance(workdir, data_dir=adir, cpus=appliance_cpus)
        meter = CpuMeter(appliance.proc.pid)
        off = bd.ShimSide(paths[0], os.path.join(workdir, "off"))
        on = bd.ShimSide(paths[1], os.path.join(workdir, "on"), mirror_bytes=ring_bytes)
        ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=1, devid=51712, vdev="xvda",
                            size_bytes=size)
        sdir = tempfile.mkdtemp(prefix="xentap-bench-spill-", dir=spill_dir or workdir)
        spill = _storage(sdir)
        drainer = CountingDrainer(on.vbd, ident, appliance.endpoint, image_path=paths[1],
                                  spill_dir=sdir, spill_limit=1 << 30,
                                  socket_setup=appliance.socket_setup).start()
        while drainer._thread.native_id is None:      # noqa: SLF001 - set once it runs
            time.sleep(0.001)
        # the images hold data: a new stream starts with the initial sync of the disk
        progress(f"initial sync of the mirrored image ({size // MiB} MiB) to the appliance")
        t_sync = time.monotonic()
        if not drainer.wait_acked(600):
            raise RuntimeError("the initial sync did not finish within 600 s")
        initial = {"mib": round(drainer.bytes_sent / MiB, 1),
                   "seconds": round(time.monotonic() - t_sync, 2)}
        meter.drainer_tid = drainer._thread.native_id  # noqa: SLF001
        progress("the transport alone: one CurveZMQ stream on loopback, then plain TCP")
        transport = transport_alone(appliance, cpus=appliance_cpus)
        disk = bd.DiskMeter(paths[0])
        sides = {"off": _Side("off", off, meter, None, appliance.proc.pid, disk),
                 "on": _Side("on", on, meter, drainer, appliance.proc.pid, disk)}
        results: dict = {}
        try:
            for job in JOBS:
                progress(f"{job.label}: a short unmeasured run of each side")
                for s in sides.values():
                    s.run(job, size, min(WARMUP_SECONDS, seconds))
                runs: dict[str, list] = {"off": [], "on": []}
                for i in range(repeat):
                    for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        progress(f"{job.label}: pair {i + 1}/{repeat}, mirroring {name}")
                        runs[name].append(sides[name].run(job, size, seconds))
                results[job.name] = _summary(job, runs["off"], runs["on"])
            results["sessions"] = drainer.stats()["sessions"]
        finally:
            drainer.stop()
            off.close()
            on.close()
        replica = appliance.replica(ident.vbd_uuid)
        results["replica_equals_source"] = bd.same_file(replica, paths[1])
        results["initial_sync"] = initial
        results["transport_alone"] = transport
        results["appliance_journal"] = journal
        results["images"] = {"path": workdir, "fs": images["fs"], "device": images["device"]}
        results["spill_log"] = {"path": sdir, "fs": spill["fs"], "device": spill["device"],
                                "same_device_as_images": spill["st_dev"] == images["st_dev"]}
        results["cpus"] = os.cpu_count()
        results["appliance_cpus"] = sorted(appliance_cpus) if appliance_cpus else None
        results["other_cpus"] = sorted(others) if others else None
        results["ring_mib"] = ring_bytes // MiB
        results["seconds_per_run"] = seconds
        results["warmup_seconds"] = min(WARMUP_SECONDS, seconds)
        results["repeat"] = repeat
        results["image_mib"] = size // MiB
        results["poll_us"] = shim.DEFAULT_POLL_US
        return results
    finally:
        if others:
            os.sched_setaffinity(0, allowed)
        if appliance:
            appliance.stop()
        for d in (adir, sdir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _jobs(r: dict) -> list:
    return [job for job in JOBS if job.name in r]


def format_table(r: dict) -> str:
    lines = [f"{'workload':<27} {'mirror off':>14} {'mirror on':>14} {'on/off':>6} {'(pairs)':>11}"
             f" {'lag p50/p99/max ms':>20} {'overflows':>9}"]
    for job in _jobs(r):
        x = r[job.name]
        unit = "MB/s" if job.bs >= MiB else "IOPS"
        a = x["off_mb_s"] if unit == "MB/s" else x["off_iops"]
        b = x["on_mb_s"] if unit == "MB/s" else x["on_iops"]
        lag = x["lag_ms"]
        pairs = f"{x['ratio_min']:.2f}-{x['ratio_max']:.2f}"
        lag_s = f"{lag['p50']:.0f}/{lag['p99']:.0f}/{lag['max']:.0f}"
        lines.append(f"{job.label:<27} {a:>9,.0f} {unit:<4} {b:>9,.0f} {unit:<4} {x['ratio']:>6.3f}"
                     f" {pairs:>11} {lag_s:>20} {x['overflows']:>9}")
    lines.append("")
    lines.append(f"CPU in cores, median per run ({r['cpus']} CPUs here)"
                 "    guest   shim  drainer   zmq  appliance  total")
    for job in _jobs(r):
        for side in ("off", "on"):
            c = r[job.name]["cpu"][side]
            lines.append(f"  {job.label:<27} mirror {side:<3}    {c['guest']:>5.2f}  {c['shim']:>5.2f}"
                         f"  {c['drainer']:>7.2f}  {c['zmq']:>4.2f}  {c['appliance']:>9.2f}"
                         f"  {c['total']:>5.2f}")
    t = r.get("transport_alone")
    if t:
        c, p = t["curve"], t["plain"]
        lines.append("")
        lines.append(f"the transport alone, nothing else running (one stream on loopback, "
                     f"{TRANSPORT_FRAME // MiB} MiB frames): CurveZMQ {c['mb_s']:,.0f} MB/s using "
                     f"{c['cores']:.2f} cores (both ends), plain TCP {p['mb_s']:,.0f} MB/s using "
                     f"{p['cores']:.2f}; at that cost, carrying what the guest wrote with mirroring "
                     "off would take")
        for job in _jobs(r):
            mb = r[job.name]["off_mb_s"]
            need = mb / c["mb_s"] * c["cores"] if c["mb_s"] else float("inf")
            lines.append(f"  {job.label:<27} {mb:>9,.0f} MB/s: {need:.2f} cores of the "
                         f"{r['cpus']} for the transport alone")
    if any(r[job.name].get("disk", {}).get("off") for job in _jobs(r)):
        lines.append("")
        lines.append(f"the images' disk ({r['images']['device']}), median per run: its time per "
                     "write, and the requests at it on average")
        for job in _jobs(r):
            d = r[job.name]["disk"]
            line = bd.disk_line(job.label, {"mirror off": d["off"], "mirror on": d["on"]})
            if line:
                lines.append(line)
    times = [bd.time_line(job.label, r[job.name]["time_us"]["off"], r[job.name]["time_us"]["on"],
                          ("mirror off", "mirror on")) for job in _jobs(r)]
    if any(times):
        lines.append("")
        lines.append("a write's time, us, median per run: its round trip, as taken -> engine + at the "
                     "engine (the disk, the kernel) + done -> answered (the tap) + the guest and the "
                     "hand-offs")
        lines += [t for t in times if t]
    lines.append("")
    lines.append("drainer, per second of a mirrored run: loop turns / sleeps / woken by the shim's "
                 "eventfd / by the appliance / eventfd writes by the shim / frames sent / MB sent")
    for job in _jobs(r):
        x = r[job.name]
        w = x["drainer_wakes_per_s"]
        lines.append(f"  {job.label:<27} {w['polls']:>8,.0f} / {w['sleeps']:,.0f} / {w['woken_by_shim']:,.0f}"
                     f" / {w['woken_by_appliance']:,.0f} / {w['eventfd_writes']:,.0f} / {w['frames']:,.0f}"
                     f" / {w['sent_mb']:,.0f}"
                     f"   ({x['writes_per_s']:,} writes/s; after each run: acked in "
                     f"{x['catch_up_s']:.2f} s, appliance idle after {x['settle_s']:.2f} s, "
                     f"{x['appliance_after_cpu_s']:.2f} CPU s; spilled {x['spilled_mib']:,.0f} MiB)")
    j = r["appliance_journal"]
    lines.append("")
    i = r.get("initial_sync")
    if i:
        lines.append(f"initial sync before the runs: {i['mib']:,.0f} MiB sent in {i['seconds']:.1f} s "
                     f"({i['mib'] / max(i['seconds'], 1e-3):,.0f} MiB/s, until acknowledged)")
    lines.append(f"replica equals source: {r['replica_equals_source']}; ring {r['ring_mib']} MiB; "
                 f"{r['image_mib']} MiB images on {r['images']['device']} ({r['images']['fs']}); "
                 f"{r['repeat']} pairs of runs of {r['seconds_per_run']} s back to back in "
                 f"alternating order after {r['warmup_seconds']} s unmeasured per side; on/off is the "
                 f"median of the pairs' ratios; CurveZMQ on loopback")
    note = (" -- THE SAME DEVICE as the guest's images: the disk takes every byte twice and the "
            "journal's fdatasyncs wait behind the guest's writes; this measures the disk, not the "
            "mirror" if j["same_device_as_images"] else "")
    lines.append(f"appliance journal and replica: {j['path']} on {j['device']} ({j['fs']}; "
                 f"{j['why']}){note}")
    sp = r["spill_log"]
    lines.append(f"drainer's spill log (written while the ring is over a quarter full): {sp['path']} on "
                 f"{sp['device']} ({sp['fs']})" + (", the guest's disk: what it spills competes "
                                                    "with the guest's writes"
                                                    if sp["same_device_as_images"] else ""))
    if r.get("appliance_cpus"):
        where = (f"the appliance ran on CPUs {_cpu_list(r['appliance_cpus'])} (--appliance-cpus, "
                 f"as an appliance domain's own vCPUs), the guest, the shim and the drainer on "
                 f"CPUs {_cpu_list(r['other_cpus'])}")
    else:
        where = (f"the appliance runs on this machine's {r['cpus']} CPUs beside the guest and the "
                 "shim (its own domain would have its own vCPUs: --appliance-cpus)")
    lines.append(f"{where}: the CPU table shows what each part took; guest = the simulated "
                 "guest's process, shim = the shim's queue "
                 f"threads (polling up to {r['poll_us']} us; on: with the tap's copy into the ring), "
                 "drainer = its Python thread, zmq = libzmq's I/O thread (CurveZMQ, TCP), both in "
                 "the shim's process")
    return "\n".join(lines)
