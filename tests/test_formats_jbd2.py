"""analyzer.formats.jbd2 against journals made by mkfs.ext4 and written by the kernel.

Transactions come from the real ext4/jbd2 code: the image is loop-mounted,
files are written and removed with a sync after each step, and the backing
file is copied while still mounted (so the journal is not yet checkpointed:
needs_recovery, s_start != 0).  Every block is checked against
``debugfs -R logdump``.  Without loop devices / mount the live tests skip.
"""

import contextlib
import os
import random
import re
import shutil
import struct
import subprocess

import pytest

from analyzer.formats import ext4, jbd2

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def dump_journal(img, out):
    run("debugfs", "-R", f"dump <8> {out}", str(img))
    return out.read_bytes()


def dumpe2fs(img):
    out = {}
    for line in run("dumpe2fs", "-h", str(img)).splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def logdump(img):
    """[(block, sequence, type)] as debugfs logdump finds them."""
    out = subprocess.run(["debugfs", "-R", "logdump", str(img)], capture_output=True, text=True).stdout
    return [(int(b), int(s), int(t)) for s, t, b in
            re.findall(r"Found expected sequence (\d+), type (\d+) \([\w ]+\) at block (\d+)", out)]


@contextlib.contextmanager
def mounted(img, mnt, opts=""):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("mounting needs root and loop devices")
    mnt.mkdir(exist_ok=True)
    args = ["mount", "-t", "ext4", "-o", "loop" + ("," + opts if opts else ""), str(img), str(mnt)]
    if subprocess.run(args, capture_output=True).returncode != 0:
        pytest.skip("cannot loop-mount in this sandbox")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def live_image(tmp_path, name, mkfs_opts, mount_opts=""):
    """An ext4 image whose journal holds committed, unchecked-pointed transactions."""
    img = tmp_path / name
    run("mkfs.ext4", "-q", "-F", *mkfs_opts, str(img), "16M")
    snap = tmp_path / ("live-" + name)
    with mounted(img, tmp_path / "mnt", mount_opts) as m:
        for i in range(3):
            (m / f"f{i}").write_text("x" * 5000 * (i + 1))
            os.sync()
        d = m / "dir"
        d.mkdir()
        for i in range(60):
            (d / f"name-{i:03d}-padding-padding").write_text("y")
        os.sync()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        os.sync()
        shutil.copyfile(img, snap)
    return snap


def check_journal(tmp_path, img):
    j = dump_journal(img, tmp_path / "journal.bin")
    jsb = jbd2.detect(j)
    assert jsb is not None
    found = list(jbd2.walk(j, jsb))
    expected = logdump(img)
    assert expected, "logdump found no transactions"
    got = [(i, b.sequence, {jbd2.DescriptorBlock: 1, jbd2.CommitBlock: 2, jbd2.RevokeBlock: 5}[type(b)])
           for i, b in found]
    assert got == expected
    bs = jsb.blocksize
    for i, b in found:
        if jsb.csum_v2v3:
            assert b.checksum_ok is True, (i, b)
        else:
            assert b.checksum_ok is None
        if isinstance(b, jbd2.DescriptorBlock):
            # the first tag carries a UUID (the kernel writes zeros there), the rest SAME_UUID
            assert b.tags and b.tags[-1].last and b.tags[0].uuid is not None
            assert all(t.uuid is None for t in b.tags[1:])
            for k, tag in enumerate(b.tags):
                data = j[(i + 1 + k) * bs:(i + 2 + k) * bs]
                assert jbd2.verify_data_block(jsb, b.sequence, tag, data) is (True if jsb.csum_v2v3 else None)
        if isinstance(b, jbd2.CommitBlock):
            assert b.commit_sec > 1_600_000_000
    return jsb, j, found


def test_fresh_journal_superblock(tmp_path):
    img = tmp_path / "fresh.img"
    run("mkfs.ext4", "-q", "-F", "-O", "metadata_csum,64bit", str(img), "32M")
    jsb = jbd2.detect(dump_journal(img, tmp_path / "j.bin"))
    d = dumpe2fs(img)
    assert jsb.version == 2 and jsb.blocksize == int(d["Block size"])
    assert jsb.maxlen == int(d["Total journal blocks"])
    assert jsb.sequence == int(d["Journal sequence"], 16)
    assert jsb.start == int(d["Journal start"]) == 0 and not jsb.needs_recovery
    assert jsb.first == 1
    # mkfs leaves journal checksums off; the kernel turns csum v3 on at mount
    assert not jsb.csum_v2v3 and jsb.checksum_ok is None and "Journal checksum" not in d
    names = {"revoke": "journal_incompat_revoke", "64bit": "journal_64bit"}
    assert {names[f] for f in jsb.features} == set(d["Journal features"].split()) - {"(none)"}
    sb = ext4.detect(img.read_bytes()[:4096])
    # the ext4 superblock keeps a copy of the journal inode's i_size (s_jnl_blocks[16])
    assert sb.jnl_blocks[16] == jsb.maxlen * jsb.blocksize and sb.journal_inum == 8


def test_live_csum_v3(tmp_path):
    img = live_image(tmp_path, "v3.img", ["-O", "metadata_csum,64bit"])
    jsb, j, found = check_journal(tmp_path, img)
    assert jsb.csum_v3 and jsb.is_64bit and jsb.tag_bytes == 16 and jsb.needs_recovery
    assert ext4.detect(img.read_bytes()[:4096]).needs_recovery
    d = dumpe2fs(img)
    assert jsb.start == int(d["Journal start"]) and jsb.sequence == int(d["Journal sequence"], 16)
    assert any(isinstance(b, jbd2.RevokeBlock) and b.blocks for _, b in found)
    # tamper: one bit in a descriptor, in a commit, in a logged data block
    bs = jsb.blocksize
    di = next(i for i, b in found if isinstance(b, jbd2.DescriptorBlock))
    ci = next(i for i, b in found if isinstance(b, jbd2.CommitBlock))
    blk = bytearray(j[di * bs:(di + 1) * bs])
    blk[20] ^= 1
    assert jbd2.parse_block(bytes(blk), jsb).checksum_ok is False
    blk = bytearray(j[ci * bs:(ci + 1) * bs])
    blk[0x33] ^= 1  # commit time
    assert jbd2.parse_block(bytes(blk), jsb).checksum_ok is False
    desc = jbd2.parse_block(j[di * bs:(di + 1) * bs], jsb)
    data = bytearray(j[(di + 1) * bs:(di + 2) * bs])
    data[100] ^= 1
    assert jbd2.verify_data_block(jsb, desc.sequence, desc.tags[0], bytes(data)) is False
    sbraw = bytearray(j[:1024])
    sbraw[0x18] ^= 1
    assert jbd2.detect(bytes(sbraw)).checksum_ok is False


def test_live_no_csum_64bit(tmp_path):
    img = live_image(tmp_path, "n64.img", ["-O", "^metadata_csum,64bit"])
    jsb, _, _ = check_journal(tmp_path, img)
    assert not jsb.csum_v2v3 and jsb.is_64bit and jsb.tag_bytes == 12 and jsb.checksum_ok is None


def test_live_no_csum_32bit(tmp_path):
    img = live_image(tmp_path, "n32.img", ["-O", "^metadata_csum,^64bit"])
    jsb, _, _ = check_journal(tmp_path, img)
    assert not jsb.csum_v2v3 and not jsb.is_64bit and jsb.tag_bytes == 8


def test_live_journal_checksum_v1(tmp_path):
    """mount -o journal_checksum without metadata_csum: v1, a crc32 in each commit block."""
    img = live_image(tmp_path, "jc.img", ["-O", "^metadata_csum,^64bit"], "journal_checksum")
    jsb, _, found = check_journal(tmp_path, img)
    assert jsb.feature_compat & jbd2.COMPAT_CHECKSUM and not jsb.csum_v2v3
    assert "checksum" in jsb.features
    commits = [b for _, b in found if isinstance(b, jbd2.CommitBlock)]
    assert commits and all(c.chksum_type == jbd2.CSUM_CRC32 and c.chksum_size == 4 for c in commits)
    # v1 checksums cover a whole transaction's blocks: not verified block by block
    assert all(c.checksum_ok is None for c in commits)


def test_synthetic_csum_v2_tags(tmp_path):
    """The csum v2 tag layout (no tool writes it any more): 14/10-byte tags, 16-bit csums."""
    img = tmp_path / "s.img"
    run("mkfs.ext4", "-q", "-F", "-O", "metadata_csum", str(img), "16M")
    base = jbd2.detect(dump_journal(img, tmp_path / "j.bin"))
    for inc, tag_bytes in ((jbd2.INCOMPAT_CSUM_V2, 10), (jbd2.INCOMPAT_CSUM_V2 | jbd2.INCOMPAT_64BIT, 14)):
        jsb = jbd2.JournalSuperblock(**{**base.__dict__, "feature_incompat": inc})
        assert jsb.tag_bytes == tag_bytes
        bs = jsb.blocksize
        payload = [bytes([n]) * bs for n in (1, 2)]
        blk = bytearray(bs)
        struct.pack_into(">III", blk, 0, jbd2.MAGIC, jbd2.DESCRIPTOR_BLOCK, 7)
        pos = 12
        for n, (nr, data) in enumerate(((500, payload[0]), ((1 << 33) + 9, payload[1]))):
            csum = jbd2.data_block_checksum(jsb, 7, data)
            flags = (jbd2.FLAG_SAME_UUID if n else 0) | (jbd2.FLAG_LAST_TAG if n == 1 else 0)
            struct.pack_into(">IHH", blk, pos, nr & 0xFFFFFFFF, csum, flags)
            if jsb.is_64bit:
                struct.pack_into(">I", blk, pos + 8, nr >> 32)
            pos += tag_bytes
            if not n:
                blk[pos:pos + 16] = jsb.uuid_bytes
                pos += 16
        from analyzer.formats._common import crc32c_raw
        struct.pack_into(">I", blk, bs - 4, crc32c_raw(jsb.csum_seed, bytes(blk)))
        d = jbd2.parse_block(bytes(blk), jsb)
        assert d.checksum_ok is True and len(d.tags) == 2
        assert d.tags[0].blocknr == 500
        assert d.tags[1].blocknr == ((1 << 33) + 9 if jsb.is_64bit else 9)
        assert all(jbd2.verify_data_block(jsb, 7, t, p) for t, p in zip(d.tags, payload))


def test_fuzz(tmp_path):
    img = tmp_path / "f.img"
    run("mkfs.ext4", "-q", "-F", "-O", "metadata_csum,64bit", str(img), "16M")
    j = dump_journal(img, tmp_path / "j.bin")
    jsb = jbd2.detect(j)
    bs = jsb.blocksize
    rng = random.Random(4)
    hdr = struct.pack(">I", jbd2.MAGIC)
    for _ in range(1500):
        btype = rng.randrange(0, 7)
        blk = hdr + struct.pack(">II", btype, rng.randrange(1 << 32)) + rng.randbytes(bs - 12)
        blk = blk[: rng.choice((bs, bs, bs - 1, 40, 12, 5))]
        for ctx in (jsb, None):
            r = jbd2.parse_block(blk, ctx)
            assert r is None or isinstance(
                r, (jbd2.JournalSuperblock, jbd2.DescriptorBlock, jbd2.CommitBlock, jbd2.RevokeBlock))
        raw = bytearray(j[:1024])
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(12, 1024)] = rng.randrange(256)
        r = jbd2.detect(bytes(raw))
        assert r is None or isinstance(r, jbd2.JournalSuperblock)
    assert jbd2.detect(b"") is None and jbd2.parse_block(b"", jsb) is None
    # revoke count pointing past the block, and descriptor without a last tag
    rv = hdr + struct.pack(">IIi", jbd2.REVOKE_BLOCK, 1, 1 << 30) + bytes(bs - 16)
    assert jbd2.parse_block(rv, jsb) is None
    dsc = hdr + struct.pack(">II", jbd2.DESCRIPTOR_BLOCK, 1) + b"\0\0\0\1\0\0\0\2" * (bs // 8)
    d = jbd2.parse_block(dsc[:bs], jsb)
    assert d.checksum_ok is None and len(d.tags) <= bs // jsb.tag_bytes
    v3 = jbd2.JournalSuperblock(**{**jsb.__dict__, "feature_incompat": jbd2.INCOMPAT_CSUM_V3})
    d = jbd2.parse_block(dsc[:bs], v3)
    assert d.checksum_ok is False and len(d.tags) <= bs // 16
    assert list(jbd2.walk(b"\0" * 8192)) == []
