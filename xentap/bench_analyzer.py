"""`xentap bench analyzer`: the data analyzer's figures, measured in one run.

* throughput: MB/s of writes the analyzer takes on one core, on a mixed
  stream (text, zeros, compressed, random; 64-256 KiB writes, flushes), with
  the appliance's replica reads for blocks never seen written (and, for
  comparison with figures before 2026-11-25 evening, without them); and on
  the busy ext4 and XFS traces below (journal/log tracking on);
* detection: MB of ransomware writes before the alarm (whole-file,
  intermittent every-other-16-bytes, first 5 %) on an ext4 filesystem;
* false alarms on benign workloads (archives, media, encrypted video,
  compressed logs, package upgrade, a compile, LUKS volume activity);
* the fraction of filesystem-consistent tags whose rebuilt image passes
  e2fsck / xfs_repair, and the tags per minute of those workloads.

The filesystem parts record real kernel write traces through
analyzer/capture (root, /dev/fuse, loop devices); without them the
detection and false-alarm parts fall back to synthetic streams and the fsck
fraction is null.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import click

MB = 1 << 20
MODES = ("whole", "intermittent", "first5")


def _imports():
    """numpy and the analyzer load only when the benchmark runs (fast CLI start)."""
    global tr, wl, VbdAnalyzer
    from analyzer import trace as tr
    from analyzer import workloads as wl
    from analyzer.stream import VbdAnalyzer


# ------------------------------------------------------------------ throughput
def throughput(total: int = 512 * MB, seed: int = 1, repeat: int = 3) -> dict:
    rnd = random.Random(seed)
    pool = b"".join([wl.text(8 * MB, seed), bytes(4 * MB), wl.zstd_file(4 * MB, seed)[:4 * MB],
                     os.urandom(4 * MB)])
    mv = memoryview(pool)
    writes = []
    n = 0
    while n < total:
        ln = rnd.choice((16, 32, 64)) * 4096
        src = rnd.randrange(0, len(pool) - ln) & ~4095
        dst = rnd.randrange(0, 1 << 20) * 4096
        writes.append((dst // 512, mv[src:src + ln]))
        n += ln
    # as in the appliance (appliance_domu/analysis.py), blocks the analyzer never
    # saw written are judged against what the disk held before the stream, read
    # with pread from a base image (here a sparse file: zeros)
    with tempfile.TemporaryFile(prefix="xt-bench-base-") as base:
        base.truncate(4 << 30)
        fd = base.fileno()

        def read_old(off: int, ln: int) -> bytes:
            return os.pread(fd, ln, off)

        runs = _runs(writes, n, repeat, read_old)
    bare = _runs(writes, n, repeat, None)
    return {"throughput_mb_s": runs[len(runs) // 2], "throughput_runs_mb_s": runs,
            "throughput_no_replica_mb_s": bare[len(bare) // 2], "throughput_bytes": n}


def _runs(writes, n: int, repeat: int, read_old) -> list[float]:
    """MB/s of CPU time of this process (user + system) feeding ``writes``, sorted."""
    runs = []
    for _ in range(repeat):
        a = VbdAnalyzer("bench", read_old=read_old)
        t0 = time.process_time()
        seq = 0
        for i, (sector, data) in enumerate(writes):
            a.feed(seq, seq, sector, data)
            seq += 1
            if i % 32 == 31:
                a.flush(seq, seq)
                seq += 1
        a.finish()
        runs.append(round(n / MB / (time.process_time() - t0), 1))
    return sorted(runs)


# ------------------------------------------------------------------ synthetic streams
def _files_stream(nfiles: int, size: int, seed: int = 3):
    """Writes of nfiles text files laid out contiguously; yields (sector, data) and None for flushes."""
    files = []
    off = 64 * MB
    for i in range(nfiles):
        data = wl.text(size, seed + i)
        files.append((off, data))
        for j in range(0, size, 256 << 10):
            yield off // 512 + j // 512, data[j:j + (256 << 10)]
        yield None
        off += size + 16 * 4096
    _files_stream.files = files


def _feed(a: VbdAnalyzer, seq: int, item) -> int:
    if item is None:
        a.flush(seq, seq)
    else:
        a.feed(seq, seq, item[0], item[1])
    return seq + 1


def synthetic_detection(mode: str, nfiles: int = 160, size: int = 1 * MB) -> float | None:
    a = VbdAnalyzer("bench")
    seq = 0
    for item in _files_stream(nfiles, size):
        seq = _feed(a, seq, item)
    a.finish()
    written = 0
    for off, data in _files_stream.files:
        enc = wl.encrypt(data, mode)[:wl.encrypted_extent(data, mode)]
        for j in range(0, len(enc), 256 << 10):
            chunk = enc[j:j + (256 << 10)]
            a.feed(seq, seq, off // 512 + j // 512, chunk)
            seq += 1
            written += len(chunk)
            if a.alarm:
                return round(written / MB, 2)
        a.flush(seq, seq)
        seq += 1
        if a.alarm:
            return round(written / MB, 2)
    a.finish()
    return round(written / MB, 2) if a.alarm else None


# benign writes: name -> (content, written in place of the old files?, bytes per write)
BENIGN = {
    "zip": (lambda: wl.zip_file(8 * MB), False, 256 << 10),
    "xz": (lambda: wl.xz_file(8 * MB), False, 256 << 10),
    "zstd": (lambda: wl.zstd_file(8 * MB), False, 256 << 10),
    "gzip_logs": (lambda: wl.gzip_log(8 * MB), False, 256 << 10),
    # separate files, each starting with its signature
    "jpeg": (lambda: b"".join(wl.jpeg_file(512 << 10) for _ in range(16)), False, 512 << 10),
    "mp4": (lambda: wl.mp4_file(8 * MB), False, 256 << 10),
    "encrypted_video": (lambda: wl.encrypted_video(16 * MB), False, 256 << 10),
    # new versions of the files, rewritten in place
    "package_upgrade": (lambda: wl.text(32 * MB, 99), True, 256 << 10),
    # a rebuild: object files and binaries over the previous build's
    "compile": (lambda: wl.compile_output(32 * MB, 5), True, 256 << 10),
}


def benign_alarm(name: str) -> bool:
    """Whether the benign workload ``name`` (see BENIGN) raises the alarm after
    a structured baseline (32 files of 1 MiB)."""
    _imports()
    make, in_place, step = BENIGN[name]
    a = VbdAnalyzer("bench")
    seq = 0
    for item in _files_stream(32, 1 * MB):
        seq = _feed(a, seq, item)
    data = make()
    dst = _files_stream.files[0][0] if in_place else 1024 * MB  # else new files in free space
    for j in range(0, len(data), step):
        a.feed(seq, seq, (dst + j) // 512, data[j:j + step])
        seq += 1
        if j % (4 * MB) == 0:
            a.flush(seq, seq)
            seq += 1
    a.finish()
    return a.alarm is not None


def synthetic_benign() -> dict[str, bool]:
    """name -> alarm raised, for benign writes after a structured baseline."""
    out = {name: benign_alarm(name) for name in BENIGN}
    luks = luks_alarm()
    if luks is not None:
        out["luks_activity"] = luks
    return out


def luks_alarm() -> bool | None:
    """A LUKS volume: its header, then dm-crypt writes over structured data
    (None without cryptsetup)."""
    _imports()
    a = VbdAnalyzer("bench")
    seq = 0
    for item in _files_stream(32, 1 * MB):
        seq = _feed(a, seq, item)
    hdr = _luks_header()
    if hdr is None:
        return None
    a.feed(seq, seq, 0, hdr)
    seq += 1
    for off, data in _files_stream.files:
        a.feed(seq, seq, off // 512, wl.luks_sector_data(data, sector=off // 512))
        seq += 1
    a.finish()
    return a.alarm is not None


def _luks_header() -> bytes | None:
    import shutil
    import subprocess
    if not shutil.which("cryptsetup"):
        return None
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "luks.img"
        with open(img, "wb") as f:
            f.truncate(32 * MB)
        p = subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                            "--pbkdf-force-iterations", "1000", str(img), "-"], input=b"pw",
                           capture_output=True)
        if p.returncode:
            return None
        return img.read_bytes()[:16 * MB]


# ------------------------------------------------------------------ real kernel traces
def _real(progress, busy_seconds: float) -> dict:
    from analyzer.capture import Capture, available
    from analyzer.checks import (MIN_SIZE, analyze_records, analyze_trace, benign, busy, fs_workload, fsck_clean,
                                 images_at, populate, ransom, records_so_far, run)
    why = available()
    if why:
        progress(f"real-trace parts skipped: {why}")
        return {}
    out: dict = {"detection": {}, "benign_alarms": 0, "fsck": {}, "fs_throughput_mb_s": {}}
    with tempfile.TemporaryDirectory(prefix="xt-bench-an-") as d:
        d = Path(d)

        def disk(fstype):
            img, trc, mnt = d / "disk.img", d / "trace.bin", d / "mnt"
            mnt.mkdir(exist_ok=True)
            with open(img, "wb") as f:
                f.truncate(0)
                f.truncate(MIN_SIZE[fstype])
            return img, trc, mnt

        points_total = points_clean = 0
        minutes = 0.0
        for fstype in ("ext4", "xfs"):
            progress(f"{fstype}: busy guest for {busy_seconds:g} s (real kernel trace), "
                     "fsck of every consistent point")
            img, trc, mnt = disk(fstype)
            with Capture(img, trc) as dev:
                fs_workload(dev, mnt, fstype, between=lambda m: busy(m, busy_seconds))
            recs = list(tr.read(trc))  # read first: the CPU time is the analyzer's alone
            a, evs, cpu = analyze_records(recs)
            nbytes = sum(len(r.data) for r in recs)
            del recs
            out["fs_throughput_mb_s"][fstype] = round(nbytes / MB / cpu, 1) if cpu > 0 else None
            pts = [e.seq for e in evs if e.consistent]
            clean = sum(fsck_clean(fstype, im, d)[0] for _s, im in images_at(trc, pts, d, MIN_SIZE[fstype]))
            times = [r.time_ns for r in tr.read(trc) if r.time_ns]
            span = (max(times) - min(times)) / 60e9 if times else 0.0
            out["fsck"][fstype] = {"points": len(pts), "clean": clean, "minutes": round(span, 4)}
            points_total += len(pts)
            points_clean += clean
            minutes += span
        out["consistent_fsck_clean"] = round(points_clean / points_total, 4) if points_total else None
        out["consistent_points"] = points_total
        out["tags_per_minute"] = round(points_total / minutes, 1) if minutes else None
        for mode in MODES:
            progress(f"ransomware on ext4, {mode} (real kernel trace)")
            img, trc, mnt = disk("ext4")
            nfiles, size = (96, 1 * MB) if mode == "first5" else (48, 1 * MB)
            with Capture(img, trc) as dev:
                run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
                run("mount", "-o", "commit=1", dev, str(mnt))
                try:
                    files = populate(mnt, nfiles, size, seed=7)
                    run("sync")
                    start = records_so_far(trc)
                    ransom(mnt, sorted(files), mode)
                    run("sync")
                finally:
                    run("umount", str(mnt), check=False)
            a, _ = analyze_trace(trc)
            if a.alarm is None:
                out["detection"][mode] = None
                continue
            written = sum(len(r.data) for r in tr.read(trc)
                          if r.kind == tr.WRITE and start <= r.seq <= a.alarm.seq)
            out["detection"][mode] = round(written / MB, 2)
        progress("benign workloads on ext4 (real kernel trace)")
        img, trc, mnt = disk("ext4")
        with Capture(img, trc) as dev:
            fs_workload(dev, mnt, "ext4", between=benign)
        a, _ = analyze_trace(trc)
        out["benign_alarms"] = int(a.alarm is not None)
    return out


def run(progress=lambda m: None, total: int = 512 * MB, real: bool = True, busy_seconds: float = 15.0) -> dict:
    _imports()
    progress(f"throughput on {total // MB} MiB of mixed writes, 3 runs with replica reads, 3 without")
    res = throughput(total)
    progress("synthetic detection and benign streams")
    synth = {m: synthetic_detection(m) for m in MODES}
    benign = synthetic_benign()
    res["synthetic_detection_mb"] = synth
    res["benign_workloads"] = benign
    fa = sum(benign.values())
    realr = _real(progress, busy_seconds) if real else {}
    det = realr.get("detection") or synth
    res["detection_source"] = "real ext4 traces" if realr.get("detection") else "synthetic streams"
    res["detection_mb"] = det.get("whole")
    res["intermittent_detection_mb"] = det.get("intermittent")
    res["first5_detection_mb"] = det.get("first5")
    res["false_alarms"] = fa + realr.get("benign_alarms", 0)
    res["consistent_fsck_clean"] = realr.get("consistent_fsck_clean")
    res["consistent_points"] = realr.get("consistent_points")
    res["tags_per_minute"] = realr.get("tags_per_minute")
    res["fsck"] = realr.get("fsck")
    res["fs_throughput_mb_s"] = realr.get("fs_throughput_mb_s")
    return res


def format_table(r: dict) -> str:
    def f(v, unit=""):
        return "-" if v is None else f"{v}{unit}"
    rows = [
        ("analyzer throughput, one core (median)", f(r["throughput_mb_s"], " MB/s"), ">= 500 MB/s"),
        ("... without replica reads", f(r.get("throughput_no_replica_mb_s"), " MB/s"), ""),
        ("detection, whole-file encryption", f(r["detection_mb"], " MB"), "<= 64 MB"),
        ("detection, intermittent (16 B of 32)", f(r["intermittent_detection_mb"], " MB"), "<= 64 MB"),
        ("detection, first 5 % of each file", f(r["first5_detection_mb"], " MB"), "<= 64 MB"),
        ("false alarms on benign workloads", f(r["false_alarms"]), "0"),
        ("consistent tags passing fsck", f(r["consistent_fsck_clean"])
         + (f" of {r['consistent_points']}" if r["consistent_points"] else ""), "1.0"),
        ("consistent tags per minute, busy guest", f(r["tags_per_minute"]), ""),
    ]
    for fs, v in (r.get("fs_throughput_mb_s") or {}).items():
        rows.append((f"analyzer throughput, busy {fs} trace", f(v, " MB/s"), "(journal/log tracking on)"))
    w = max(len(a) for a, _, _ in rows)
    lines = [f"{'measure':{w}}  {'value':>12}  goal"]
    lines += [f"{a:{w}}  {b:>12}  {c}" for a, b, c in rows]
    lines.append(f"(detection from {r['detection_source']}; benign: "
                 + ", ".join(f"{k}{'!' if v else ''}" for k, v in r["benign_workloads"].items()) + ")")
    return "\n".join(lines)


@click.command("analyzer")
@click.option("--size", default="512M", show_default=True, help="Bytes of writes for the throughput run.")
@click.option("--synthetic-only", is_flag=True, help="Skip the parts that record real kernel traces.")
@click.option("--busy-seconds", default=15.0, show_default=True,
              help="Length of the busy-guest run on each filesystem (tags per minute, fsck).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(size, synthetic_only, busy_seconds, as_json) -> None:
    """Analyzer throughput, detection latency, false alarms, fsck of consistent tags."""
    import json

    from xentap.cli import XentapError, _size
    total = _size(size)
    if total < 16 * MB:
        raise XentapError("--size must be at least 16M")
    if not 0 <= busy_seconds <= 3600:
        raise XentapError("--busy-seconds must be between 0 and 3600")
    progress = (lambda m: click.echo(f"bench: {m}", err=True))
    r = run(progress, total, real=not synthetic_only, busy_seconds=busy_seconds)
    click.echo(json.dumps(r, indent=2) if as_json else format_table(r))
