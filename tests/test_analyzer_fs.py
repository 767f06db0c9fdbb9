"""The analyzer on ordered write traces of a real kernel.

Each test runs a real tool or a mounted filesystem on a loop device whose
writes and flushes fusetrace records in order (analyzer/capture), feeds the
trace to the analyzer, and checks its events: every point it tags
filesystem-consistent, rebuilt as an image, passes the filesystem's own
check after journal/log replay; ransomware-style encryption of the files
raises the alarm with a recovery point before it whose files are intact;
benign high-entropy writes raise nothing.
"""
from __future__ import annotations

import os

import pytest

from analyzer import workloads as wl
from analyzer.capture import Capture, available
from analyzer.checks import (MIN_SIZE, analyze_trace, benign, fs_workload, fsck_clean, images_at,
                             populate, records_so_far, ransom, run)

pytestmark = pytest.mark.slow

_why = available()
need_capture = pytest.mark.skipif(_why is not None, reason=f"capture unavailable: {_why}")


def _disk(tmp_path, fstype="ext4"):
    img, trace_path, mnt = tmp_path / "disk.img", tmp_path / "trace.bin", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(MIN_SIZE[fstype])
    return img, trace_path, mnt


@need_capture
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_every_consistent_point_passes_the_filesystem_check(tmp_path, fstype):
    img, trace_path, mnt = _disk(tmp_path, fstype)
    with Capture(img, trace_path) as dev:
        fs_workload(dev, mnt, fstype)
    a, evs = analyze_trace(trace_path)
    kinds = [e.kind for e in evs]
    assert any(e.kind == "fs_identified" and e.fstype == fstype and e.offset == 0 for e in evs), evs
    assert "mount" in kinds and "unmount" in kinds
    points = [e for e in evs if e.consistent]
    assert len(points) >= 3, evs
    assert points[-1].detail["reason"] == "clean_unmount"
    assert a.alarm is None
    bad = []
    for seq, image in images_at(trace_path, [p.seq for p in points], tmp_path, MIN_SIZE[fstype]):
        ok, out = fsck_clean(fstype, image, tmp_path)
        if not ok:
            bad.append((seq, out[-400:]))
    assert not bad, f"{len(bad)}/{len(points)} consistent points fail fsck: {bad[:2]}"


@need_capture
@pytest.mark.parametrize("mode", wl.MODES)
def test_ransomware_raises_alarm_with_a_clean_recovery_point(tmp_path, mode):
    img, trace_path, mnt = _disk(tmp_path)
    nfiles, size = (96, 1 << 20) if mode == "first5" else (40, 256 << 10)
    with Capture(img, trace_path) as dev:
        run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        run("mount", "-o", "commit=1", dev, str(mnt))
        try:
            files = populate(mnt, nfiles, size, seed=7)
            run("sync")
            start = records_so_far(trace_path)
            ransom(mnt, sorted(files), mode)
            run("sync")
        finally:
            run("umount", str(mnt), check=False)
    a, evs = analyze_trace(trace_path)
    assert a.alarm is not None, a.state()["encryption"]
    d = a.alarm.detail
    assert d["first_seq"] >= start, (d, start)
    assert d["recommended_seq"] is not None and d["recommended_seq"] < d["first_seq"]
    (seq, image), = list(images_at(trace_path, [d["recommended_seq"]], tmp_path, MIN_SIZE["ext4"]))
    ok, out = fsck_clean("ext4", image, tmp_path)
    assert ok, out[-600:]
    got = run("debugfs", "-R", "cat /docs/f000.txt", str(tmp_path / "check.img"), text=False).stdout
    assert got == files["docs/f000.txt"]


@need_capture
def test_benign_high_entropy_writes_raise_no_alarm(tmp_path):
    img, trace_path, mnt = _disk(tmp_path)
    with Capture(img, trace_path) as dev:
        fs_workload(dev, mnt, "ext4", between=benign)
    a, evs = analyze_trace(trace_path)
    st = a.state()["encryption"]
    assert a.alarm is None, st
    assert st["totals"]["random"] > 16 << 20  # it did see lots of random-looking data


@need_capture
def test_luks_volume_is_recognised_and_not_alarmed_on(tmp_path):
    img, trace_path, mnt = _disk(tmp_path)
    with Capture(img, trace_path) as dev:
        # structured data first (an old filesystem), then a LUKS volume over it
        run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        run("mount", dev, str(mnt))
        populate(mnt, 40, 256 << 10)
        run("umount", str(mnt))
        p = run("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                "--pbkdf-force-iterations", "1000", dev, "-", input="pw", check=False)
        if p.returncode:
            pytest.skip(f"cryptsetup luksFormat: {p.stderr.strip()}")
        # what dm-crypt writes to the payload for filesystem activity inside
        # (dm-crypt itself needs device-mapper, which this host may lack)
        fd = os.open(dev, os.O_WRONLY)
        try:
            for rnd in range(3):
                for blk in range(0, 12 << 20, 256 << 10):
                    off = (16 << 20) + blk
                    os.pwrite(fd, wl.luks_sector_data(wl.text(256 << 10, blk + rnd), sector=off // 512), off)
                os.fsync(fd)
        finally:
            os.close(fd)
    a, evs = analyze_trace(trace_path)
    assert any(e.kind == "volume_encrypted" for e in evs), evs
    assert a.alarm is None, a.state()["encryption"]
