"""analyzer.formats.gpt against tables written by sgdisk, checked with sfdisk."""

import json
import random
import shutil
import subprocess

import pytest

from analyzer.formats import gpt

pytestmark = pytest.mark.skipif(
    shutil.which("sgdisk") is None or shutil.which("sfdisk") is None, reason="needs gdisk and fdisk"
)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img = tmp_path_factory.mktemp("gpt") / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run("sgdisk", "-n1:2048:+8M", "-t1:ef00", "-c1:EFI system", "-n2:0:+16M", "-t2:8300", "-c2:root",
        "-n3:0:+8M", "-t3:8e00", "-n4:0:+8M", "-t4:8200", "-n5:0:0", "-t5:0700", "-c5:données",
        str(img))
    return img


def head(img):
    with open(img, "rb") as f:
        return f.read(34 * 512)


def test_matches_sfdisk(image):
    g = gpt.detect(head(image))
    assert g is not None and g.header.crc_ok and g.entries_crc_ok
    table = json.loads(run("sfdisk", "--json", str(image)))["partitiontable"]
    assert g.header.disk_guid == table["id"].lower()
    assert g.header.first_usable_lba == table["firstlba"]
    assert g.header.last_usable_lba == table["lastlba"]
    assert g.header.my_lba == 1 and g.header.alternate_lba == (64 << 20) // 512 - 1
    assert g.header.num_partition_entries == 128 and g.header.partition_entry_size == 128
    assert len(g.partitions) == len(table["partitions"]) == 5
    for p, t in zip(g.partitions, table["partitions"]):
        assert p.type_guid == t["type"].lower()
        assert p.unique_guid == t["uuid"].lower()
        assert p.first_lba == t["start"]
        assert p.last_lba - p.first_lba + 1 == t["size"]
        assert p.name == t.get("name", "")
    assert [p.type_guid for p in g.partitions] == [
        gpt.EFI_SYSTEM, gpt.LINUX_FS, gpt.LINUX_LVM, gpt.LINUX_SWAP, gpt.MS_BASIC_DATA]
    assert [p.type_name for p in g.partitions][:4] == [
        "EFI System", "Linux filesystem", "Linux LVM", "Linux swap"]


def test_backup_header(image):
    data = image.read_bytes()
    g = gpt.detect(head(image))
    h = gpt.parse_header(data, g.header.alternate_lba * 512)
    assert h is not None and h.crc_ok
    assert h.my_lba == g.header.alternate_lba and h.alternate_lba == 1
    start = h.partition_entry_lba * 512
    parts, ok = gpt.parse_entries(h, data[start:start + h.entries_bytes])
    assert ok and parts == g.partitions


def test_header_only(image):
    g = gpt.detect(head(image)[:1024])
    assert g is not None and g.partitions is None and g.entries_crc_ok is None


def test_corruption(image):
    raw = bytearray(head(image))
    raw[512 + 40] ^= 1  # first_usable_lba
    assert gpt.detect(bytes(raw)) is None
    assert gpt.parse_header(bytes(raw), 512).crc_ok is False
    raw = bytearray(head(image))
    raw[1024 + 129] ^= 0xFF  # second entry's type GUID
    g = gpt.detect(bytes(raw))
    assert g.header.crc_ok and g.entries_crc_ok is False


def test_4k_sectors(tmp_path):
    """A 4Kn disk: header at byte 4096.  Needs a loop device with 4 KiB sectors."""
    img = tmp_path / "4k.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    try:
        dev = run("losetup", "-f", "--show", "-b", "4096", str(img)).strip()
    except (subprocess.CalledProcessError, OSError):
        pytest.skip("no loop device")
    try:
        run("sgdisk", "-n1:0:+4M", "-t1:8300", dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    data = img.read_bytes()[:64 << 10]
    assert gpt.detect(data, sector_size=512) is None
    g = gpt.detect(data)
    assert g is not None and g.entries_crc_ok and g.header.partition_entry_lba == 2
    assert g.partitions[0].type_guid == gpt.LINUX_FS


def test_fuzz(image):
    rng = random.Random(2)
    for _ in range(300):
        r = gpt.detect(rng.randbytes(rng.choice((0, 600, 1024, 17408))))
        assert r is None or isinstance(r, gpt.GPT)
    seed = head(image)
    for _ in range(1000):
        raw = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(512, 512 + 92)] = rng.randrange(256)
        r = gpt.detect(bytes(raw))
        assert r is None or isinstance(r, gpt.GPT)
        h = gpt.parse_header(bytes(raw), 512)
        assert h is None or isinstance(h, gpt.GPTHeader)
    # a forged header with a valid CRC but absurd geometry must not allocate or loop
    import struct, zlib
    hdr = bytearray(seed[512:1024])
    struct.pack_into("<II", hdr, 80, 0xFFFFFFFF, 0x80)
    hdr[16:20] = b"\0" * 4
    struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr[:92])))
    assert gpt.detect(seed[:512] + bytes(hdr) + seed[1024:]) is None
