"""analyzer.formats.xfs against filesystems made by mkfs.xfs, checked with xfs_db / xfs_logprint.

Log records with real CRCs come from the kernel: the image is loop-mounted,
written to and synced, and the backing file copied while still mounted.
"""

import contextlib
import os
import random
import re
import shutil
import subprocess

import pytest

from analyzer.formats import xfs

pytestmark = pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="needs xfsprogs")


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def mkfs(tmp_path, name, *opts):
    img = tmp_path / name
    with open(img, "wb") as f:
        f.truncate(300 << 20)  # mkfs.xfs minimum; sparse
    run("mkfs.xfs", "-q", *opts, str(img))
    return img


def xfs_db(img, *fields):
    out = run("xfs_db", "-r", "-c", "sb 0", "-c", "p " + " ".join(fields), str(img))
    return dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)


def read(img, off, n):
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return mkfs(tmp_path_factory.mktemp("xfs"), "x.img", "-L", "xlabel")


def test_superblock_matches_xfs_db(image):
    sb = xfs.detect(read(image, 0, 4096))
    d = xfs_db(image, "uuid", "logstart", "logblocks", "blocksize", "agblocks", "agcount",
               "dblocks", "sectsize", "inodesize", "fname", "crc", "icount", "versionnum")
    assert sb is not None and sb.version == 5 and sb.crc_ok is True
    assert sb.uuid == d["uuid"]
    assert sb.logstart == int(d["logstart"]) and sb.internal_log
    assert sb.logblocks == int(d["logblocks"])
    assert sb.blocksize == int(d["blocksize"])
    assert sb.agblocks == int(d["agblocks"]) and sb.agcount == int(d["agcount"])
    assert sb.dblocks == int(d["dblocks"]) and sb.sectsize == int(d["sectsize"])
    assert sb.inodesize == int(d["inodesize"]) and sb.icount == int(d["icount"])
    assert sb.label == d["fname"].strip('"').split("\\000")[0] == "xlabel"
    # xfs_db prints the little-endian crc field as a big-endian number
    assert sb.crc == int.from_bytes(int(d["crc"].split()[0], 16).to_bytes(4, "big"), "little")


def test_log_location_and_mkfs_record(image):
    sb = xfs.detect(read(image, 0, 4096))
    out = run("xfs_logprint", "-d", str(image))
    daddr = int(re.search(r"daddr: (\d+)", out).group(1))
    assert sb.log_offset == daddr * 512
    recs = list(xfs.iter_log_records(read(image, sb.log_offset, 1 << 20)))
    printed = re.findall(r"HEADER Cycle (\d+) tail \d+:\d+ len\s+(\d+) ops (\d+)", out)
    assert [(str(r.cycle), str(r.len), str(r.num_logops)) for _, r in recs] == printed
    r = recs[0][1]
    assert r.fs_uuid == sb.uuid and r.crc == 0 and r.crc_ok is None  # mkfs writes no CRC
    assert r.fmt == xfs.FMT_LINUX_LE


@contextlib.contextmanager
def mounted(img, mnt):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("mounting needs root and loop devices")
    mnt.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "xfs", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot loop-mount xfs in this sandbox")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_kernel_log_records(tmp_path):
    img = mkfs(tmp_path, "live.img")
    snap = tmp_path / "snap.img"
    with mounted(img, tmp_path / "mnt") as m:
        for i in range(3):
            (m / f"f{i}").write_text(str(i))
            os.sync()
        (m / "d").mkdir()
        for i in range(40):
            (m / "d" / f"entry-{i}").touch()
        os.sync()
        subprocess.run(["cp", "--sparse=always", str(img), str(snap)], check=True)
    sb = xfs.detect(read(snap, 0, 4096))
    log = read(snap, sb.log_offset, 4 << 20)
    recs = [r for _, r in xfs.iter_log_records(log)]
    assert len(recs) >= 3
    kernel = [r for r in recs if r.crc != 0]
    assert kernel and all(r.crc_ok is True for r in kernel)
    assert all(r.fs_uuid == sb.uuid and r.cycle == 1 for r in recs)
    out = run("xfs_logprint", "-d", str(snap))
    printed = re.findall(r"HEADER Cycle (\d+) tail \d+:\d+ len\s+(\d+) ops (\d+)", out)
    assert [(str(r.cycle), str(r.len), str(r.num_logops)) for r in recs] == printed[: len(recs)]
    # one flipped bit in a record's payload breaks its CRC
    off, r = next((o, r) for o, r in xfs.iter_log_records(log) if r.crc)
    bad = bytearray(log)
    bad[off + 512 + 40] ^= 4
    assert xfs.detect_log_record(bytes(bad), off).crc_ok is False
    assert xfs.detect_log_record(log[off:off + 512], 0).crc_ok is None  # data not in buffer


def test_v4_no_crc(tmp_path):
    img = mkfs(tmp_path, "v4.img", "-m", "crc=0,finobt=0,rmapbt=0,reflink=0")
    sb = xfs.detect(read(img, 0, 4096))
    assert sb.version == 4 and sb.crc_ok is None and not sb.has_crc


def test_corruption_and_fuzz(image):
    raw = bytearray(read(image, 0, 512))
    raw[100] ^= 1
    sb = xfs.detect(bytes(raw))
    assert sb is not None and sb.crc_ok is False
    assert xfs.detect(b"") is None and xfs.detect(b"XFSB" + bytes(600)) is None
    sb = xfs.detect(read(image, 0, 4096))
    rec = read(image, sb.log_offset, 1024)
    rng = random.Random(5)
    seed_sb = read(image, 0, 512)
    for _ in range(1500):
        a = bytearray(seed_sb)
        b = bytearray(rec)
        for _ in range(rng.randint(1, 6)):
            a[rng.randrange(4, 264)] = rng.randrange(256)
            b[rng.randrange(4, 330)] = rng.randrange(256)
        r = xfs.detect(bytes(a))
        assert r is None or isinstance(r, xfs.XFSSuperblock)
        if r is not None:
            r.log_offset
        r = xfs.detect_log_record(bytes(b))
        assert r is None or isinstance(r, xfs.LogRecord)
        assert xfs.detect(rng.randbytes(rng.choice((0, 264, 512)))) is None
    # absurd h_len / h_size never make it read or loop far
    b = bytearray(rec)
    b[12:16] = (0x7FFFFFFF).to_bytes(4, "big")
    assert xfs.detect_log_record(bytes(b)) is None
    assert len(list(xfs.iter_log_records(rec * 5000, max_records=10))) <= 10
