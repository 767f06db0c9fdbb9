"""analyzer.formats.ext4 against filesystems made by mkfs.ext4, checked with dumpe2fs."""

import random
import shutil
import subprocess

import pytest

from analyzer.formats import ext4

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def dumpe2fs(img):
    out = {}
    for line in run("dumpe2fs", "-h", str(img)).splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def mkfs(tmp_path, name, *opts, size="32M"):
    img = tmp_path / name
    run("mkfs.ext4", "-q", "-F", *opts, str(img), size)
    return img


VARIANTS = {
    "ext4_csum_64bit": ("-O", "metadata_csum,64bit", "-L", "root"),
    "ext4_nocsum_32bit": ("-O", "^metadata_csum,^64bit", "-b", "1024"),
    "ext4_csum_seed": ("-O", "metadata_csum,metadata_csum_seed", "-b", "4096"),
    "ext3": ("-t", "ext3",),
    "ext2": ("-t", "ext2", "-L", "old"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dumpe2fs(tmp_path, variant):
    img = mkfs(tmp_path, variant + ".img", *VARIANTS[variant])
    sb = ext4.detect(img.read_bytes()[:4096])
    d = dumpe2fs(img)
    assert sb is not None
    assert sb.kind == variant.split("_")[0]
    assert sb.block_size == int(d["Block size"])
    assert sb.blocks_count == int(d["Block count"])
    assert sb.free_blocks_count == int(d["Free blocks"])
    assert sb.inodes_count == int(d["Inode count"])
    assert sb.inode_size == int(d["Inode size"])
    assert sb.blocks_per_group == int(d["Blocks per group"])
    assert sb.first_data_block == int(d["First block"])
    assert sb.uuid == d["Filesystem UUID"]
    assert sb.volume_name == ("" if d["Filesystem volume name"] == "<none>" else d["Filesystem volume name"])
    assert sb.features == set(d["Filesystem features"].split())
    assert sb.clean and d["Filesystem state"] == "clean"
    assert sb.has_journal == ("Journal inode" in d)
    if sb.has_journal:
        assert sb.journal_inum == int(d["Journal inode"]) == 8
    if "metadata_csum" in sb.features:
        assert sb.metadata_csum and sb.checksum_ok is True
        assert sb.checksum == int(d["Checksum"], 16)
        assert d["Checksum type"] == "crc32c" and sb.checksum_type == ext4.CHECKSUM_TYPE_CRC32C
    else:
        assert sb.checksum_ok is None
    if "metadata_csum_seed" in sb.features:
        assert sb.checksum_seed == int(d["Checksum seed"], 16)
    assert sb.is_64bit == ("64bit" in sb.features)


def test_error_state_and_checksum(tmp_path):
    img = mkfs(tmp_path, "err.img", "-O", "metadata_csum")
    run("debugfs", "-w", "-R", "ssv state 2", str(img))
    sb = ext4.detect(img.read_bytes()[:4096])
    assert sb.has_errors and not sb.clean
    assert sb.checksum_ok is True  # debugfs rewrote the checksum
    assert "errors" in dumpe2fs(img)["Filesystem state"]
    raw = bytearray(img.read_bytes()[:4096])
    raw[1024 + 0x78] ^= 0x20  # volume name byte, checksum now stale
    sb = ext4.detect(bytes(raw))
    assert sb is not None and sb.checksum_ok is False


def test_offset_and_backup(tmp_path):
    img = mkfs(tmp_path, "b.img", "-b", "1024", "-O", "metadata_csum")
    data = img.read_bytes()
    sb = ext4.detect(b"\xAA" * 8192 + data[:2048], offset=8192)
    assert sb is not None and sb.checksum_ok
    # first backup superblock at the start of group 1 (sparse_super)
    backup = (sb.first_data_block + sb.blocks_per_group) * sb.block_size
    b = ext4.parse_superblock(data, backup)
    assert b is not None and b.uuid == sb.uuid and b.checksum_ok


def test_not_ext4():
    assert ext4.detect(b"") is None
    assert ext4.detect(b"\0" * 4096) is None
    raw = bytearray(4096)
    raw[1024 + 0x38:1024 + 0x3A] = b"\x53\xef"
    raw[1024 + 0x18] = 200  # absurd block size
    assert ext4.detect(bytes(raw)) is None


def test_fuzz(tmp_path):
    seed = mkfs(tmp_path, "f.img", "-O", "metadata_csum,64bit").read_bytes()[:2048]
    rng = random.Random(3)
    for _ in range(300):
        r = ext4.detect(rng.randbytes(rng.choice((0, 1100, 2048))))
        assert r is None
    for _ in range(1500):
        raw = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            raw[1024 + rng.randrange(1024)] = rng.randrange(256)
        raw = raw[: rng.choice((2048, 2048, 2047, 1500))]
        r = ext4.detect(bytes(raw))
        assert r is None or isinstance(r, ext4.Ext4Superblock)
        if r is not None:
            r.features, r.kind, r.clean  # properties never raise
