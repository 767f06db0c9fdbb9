"""Replaying a write trace through the analyzer and checking what it tags:
shared by the tests and `xentap bench analyzer`."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import trace as tr
from . import workloads as wl
from .stream import VbdAnalyzer

MIN_SIZE = {"ext4": 160 << 20, "xfs": 320 << 20}  # mkfs.xfs wants 300 MB at least


def run(*cmd, check=True, **kw):
    kw.setdefault("text", True)
    return subprocess.run(cmd, check=check, capture_output=True, **kw)


def analyze_records(records, **kw):
    """(analyzer, events, CPU seconds of this process spent in it) after feeding records."""
    import time
    a = VbdAnalyzer(**kw)
    evs = []
    t0 = time.process_time()
    for r in records:
        evs += a.feed(r.seq, r.time_ns, r.sector, r.data) if r.kind == tr.WRITE else a.flush(r.seq, r.time_ns)
    evs += a.finish()
    return a, evs, time.process_time() - t0


def analyze_trace(trace_path, **kw):
    """(analyzer, events) after feeding a whole trace."""
    a, evs, _ = analyze_records(tr.read(trace_path), **kw)
    return a, evs


def records_so_far(trace_path) -> int:
    """Records in a trace being written (fusetrace flushes its file at every fsync)."""
    n = 0
    try:
        for _ in tr.read(trace_path):
            n += 1
    except tr.TraceError:
        pass
    return n


def images_at(trace_path, seqs, workdir, size):
    """Yield (seq, image path) for each seq: the disk with every write of seq <= it.

    The image is rebuilt once along the trace; it is only valid until the
    next item is asked for."""
    want = sorted(set(seqs))
    img = Path(workdir) / "replay.img"
    with open(img, "wb") as f:
        f.truncate(size)
        i = 0
        for r in tr.read(trace_path):
            while i < len(want) and r.seq > want[i]:
                f.flush()
                yield want[i], img
                i += 1
            if i == len(want):
                return
            if r.kind == tr.WRITE:
                f.seek(r.offset)
                f.write(r.data)
        f.flush()
        while i < len(want):
            yield want[i], img
            i += 1


def fsck_clean(fstype, img, workdir) -> tuple[bool, str]:
    """Replay the journal/log on a copy of ``img`` then run the fs's own read-only check.

    ext*: e2fsck -E journal_only then e2fsck -fn.  xfs: mount (replays the
    log) and umount, then xfs_repair -n.  The copy is left as
    ``workdir/check.img``."""
    chk = Path(workdir) / "check.img"
    run("cp", "--sparse=always", str(img), str(chk))
    if fstype.startswith("ext"):
        run("e2fsck", "-E", "journal_only", "-y", str(chk), check=False)
        p = run("e2fsck", "-fn", str(chk), check=False)
        return p.returncode == 0, p.stdout + p.stderr
    mnt = Path(workdir) / "replay-mnt"
    mnt.mkdir(exist_ok=True)
    p = run("mount", "-o", "loop,nouuid", str(chk), str(mnt), check=False)
    if p.returncode == 0:
        run("umount", str(mnt), check=False)
    q = run("xfs_repair", "-n", str(chk), check=False)
    return q.returncode == 0 and p.returncode == 0, p.stderr + q.stdout + q.stderr


def populate(root: Path, nfiles: int, size: int, seed: int = 0, sub: str = "docs") -> dict[str, bytes]:
    files = {}
    d = root / sub
    d.mkdir(exist_ok=True)
    for i in range(nfiles):
        data = wl.text(size, seed + i)
        (d / f"f{i:03d}.txt").write_bytes(data)
        files[f"{sub}/f{i:03d}.txt"] = data
    return files


def fs_workload(dev, mnt: Path, fstype: str, between=None) -> None:
    """mkfs, mount, a small mixed workload (files, a directory tree, an fsync'd
    log, unlink, rename), ``between(mnt)``, umount."""
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        run("mount", "-o", "commit=1", dev, str(mnt))
    else:
        run("mkfs.xfs", "-q", "-f", dev)
        run("mount", dev, str(mnt))
    try:
        populate(mnt, 12, 256 << 10)
        run("sync")
        shutil.copytree(Path(os.__file__).parent / "json", mnt / "json")
        (mnt / "docs" / "f000.txt").unlink()
        with open(mnt / "log", "ab") as f:
            for i in range(20):
                f.write(wl.text(8192, 100 + i))
                f.flush()
                os.fsync(f.fileno())
        os.rename(mnt / "docs", mnt / "docs2")
        run("sync")
        if between:
            between(mnt)
    finally:
        run("umount", str(mnt), check=False)


def busy(mnt: Path, seconds: float, seed: int = 5) -> int:
    """A busy guest for ``seconds``: files of 4-128 KiB written about 50 a second,
    every 5th fsync'd, old ones deleted and renamed; returns files written."""
    import random
    import time
    rnd = random.Random(seed)
    d = mnt / "busy"
    d.mkdir(exist_ok=True)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        p = d / f"b{n:06d}"
        with open(p, "wb") as f:
            f.write(wl.text(rnd.randrange(1, 33) * 4096, seed + n))
            if n % 5 == 0:
                f.flush()
                os.fsync(f.fileno())
        if n >= 100 and n % 3 == 0:
            (d / f"b{n - 100:06d}").unlink(missing_ok=True)
        if n % 17 == 0 and n:
            os.replace(p, d / f"r{n:06d}")
        n += 1
        time.sleep(0.02)
    return n


def ransom(mnt: Path, names, mode: str) -> None:
    """Encrypt files in place, as ransomware does (read, write back encrypted, fsync)."""
    for name in names:
        p = mnt / name
        data = p.read_bytes()
        with open(p, "r+b") as f:
            f.write(wl.encrypt(data, mode)[:wl.encrypted_extent(data, mode)])
            f.flush()
            os.fsync(f.fileno())


def compile_tree(root: Path, nsrc: int = 8, rounds: int = 2) -> bool:
    """A compile in ``root``: C sources built to objects and linked, ``rounds``
    times (a rebuild rewrites the objects); False without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    src = root / "build"
    src.mkdir(exist_ok=True)
    for i in range(nsrc):
        body = "".join(f"int f{i}_{k}(int x) {{ int s = {k}; for (int j = 0; j < x; j++) s = s * 31 + j ^ {i}; "
                       f"return s; }}\n" for k in range(60))
        (src / f"m{i}.c").write_text(body + (f"int f{i}(int x) {{ return f{i}_0(x); }}\n"))
    (src / "main.c").write_text("".join(f"int f{i}(int);\n" for i in range(nsrc))
                                + "int main(void) { return " + " + ".join(f"f{i}(3)" for i in range(nsrc)) + "; }\n")
    for r in range(rounds):
        objs = []
        for c in sorted(src.glob("*.c")):
            o = c.with_suffix(".o")
            run(cc, f"-O{1 + r % 2}", "-g", "-c", str(c), "-o", str(o))
            objs.append(str(o))
        run(cc, "-o", str(src / "prog"), *objs)
        run("sync")
    return True


def benign(mnt: Path) -> None:
    """Archives, media, an encrypted video, compressed database logs, a package
    upgrade, a compile."""
    (mnt / "arch").mkdir()
    (mnt / "arch" / "a.zip").write_bytes(wl.zip_file(4 << 20))
    (mnt / "arch" / "b.tar.xz").write_bytes(wl.xz_file(4 << 20))
    (mnt / "arch" / "c.zst").write_bytes(wl.zstd_file(4 << 20))
    for i in range(8):
        (mnt / "arch" / f"p{i}.jpg").write_bytes(wl.jpeg_file(512 << 10))
    (mnt / "arch" / "movie.mp4").write_bytes(wl.mp4_file(4 << 20))
    (mnt / "arch" / "movie.enc").write_bytes(wl.encrypted_video(6 << 20))
    run("sync")
    with open(mnt / "arch" / "db.log.gz", "ab") as f:
        for i in range(40):
            f.write(wl.gzip_log(64 << 10, i))
            f.flush()
            os.fsync(f.fileno())
    for p in sorted((mnt / "docs2").glob("*.txt")):
        with open(p, "r+b") as f:
            f.write(wl.text(256 << 10, 999))
    run("sync")
    compile_tree(mnt)
