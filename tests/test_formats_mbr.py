"""analyzer.formats.mbr against tables written by sfdisk and sgdisk."""

import json
import random
import shutil
import subprocess

import pytest

from analyzer.formats import mbr

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs fdisk (sfdisk)")


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


@pytest.fixture(scope="module")
def dos_image(tmp_path_factory):
    img = tmp_path_factory.mktemp("mbr") / "dos.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run("sfdisk", "-q", str(img), input="label: dos\nlabel-id: 0x12345678\n,8M,83,*\n,8M,82\n,8M,8e\n,,7\n")
    return img


def test_matches_sfdisk(dos_image):
    m = mbr.detect(dos_image.read_bytes()[:512])
    assert m is not None and not m.protective
    table = json.loads(run("sfdisk", "--json", str(dos_image)))["partitiontable"]
    assert m.disk_signature == int(table["id"], 16) == 0x12345678
    assert len(m.partitions) == len(table["partitions"]) == 4
    for p, t in zip(m.partitions, table["partitions"]):
        assert p.lba_first == t["start"]
        assert p.num_sectors == t["size"]
        assert p.type == int(t["type"], 16)
        assert p.bootable == bool(t.get("bootable"))
    assert [p.type_name for p in m.partitions] == ["Linux", "Linux swap", "Linux LVM", "HPFS/NTFS/exFAT"]


def test_extended_partition(tmp_path):
    img = tmp_path / "ext.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    run("sfdisk", "-q", str(img), input="label: dos\n,4M,83\n,,5\n,4M,83\n")
    m = mbr.detect(img.read_bytes()[:512])
    assert [p.is_extended for p in m.partitions] == [False, True]
    # the first EBR sits at the start of the extended partition, same layout
    ebr_lba = m.partitions[1].lba_first
    e = mbr.detect(img.read_bytes()[ebr_lba * 512:(ebr_lba + 1) * 512])
    assert e is not None and e.partitions[0].type == 0x83


@pytest.mark.skipif(shutil.which("sgdisk") is None, reason="needs gdisk")
def test_protective_mbr(tmp_path):
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    run("sgdisk", "-n1:2048:0", str(img))
    m = mbr.detect(img.read_bytes()[:512])
    assert m.protective
    assert m.partitions[0].type == mbr.TYPE_GPT_PROTECTIVE
    assert m.partitions[0].lba_first == 1


def test_not_an_mbr(dos_image):
    assert mbr.detect(b"\0" * 512) is None
    assert mbr.detect(b"") is None
    raw = bytearray(dos_image.read_bytes()[:512])
    raw[511] = 0
    assert mbr.detect(bytes(raw)) is None
    raw = bytearray(dos_image.read_bytes()[:512])
    raw[446] = 0x42  # bad status byte on a used entry
    assert mbr.detect(bytes(raw)) is None


def test_fuzz(dos_image):
    rng = random.Random(1)
    for _ in range(500):
        r = mbr.detect(rng.randbytes(rng.choice((0, 1, 100, 510, 512, 600))))
        assert r is None or isinstance(r, mbr.MBR)
    seed = dos_image.read_bytes()[:512]
    for _ in range(2000):
        raw = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(446, 512)] = rng.randrange(256)
        raw = raw[: rng.choice((512, 512, 511, 447))]
        r = mbr.detect(bytes(raw))
        assert r is None or isinstance(r, mbr.MBR)
