"""analyzer.formats.ntfs against volumes made by mkntfs, checked with ntfsinfo and blkid.

mkntfs leaves $LogFile filled with 0xFF and no Linux tool writes NTFS log
pages (ntfs-3g resets the log; this kernel has no ntfs3), so the RSTR/RCRD
tests build pages by the documented layout, with real update sequence
arrays, and the FILE record tests use mkntfs's real MFT.
"""

import random
import re
import shutil
import struct
import subprocess

import pytest

from analyzer.formats import ntfs

pytestmark = pytest.mark.skipif(shutil.which("mkntfs") is None, reason="needs ntfs-3g")


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img = tmp_path_factory.mktemp("ntfs") / "n.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    run("mkntfs", "-q", "-F", "-f", "-L", "ntlabel", "-c", "4096", str(img))
    return img


def test_boot_sector_matches_ntfsinfo(image):
    data = image.read_bytes()
    b = ntfs.detect(data[:512])
    info = run("ntfsinfo", "-m", str(image))
    field = lambda name: re.search(re.escape(name) + r":\s*(\S+)", info).group(1)  # noqa: E731
    assert b.bytes_per_sector == int(field("Sector Size"))
    assert b.cluster_size == int(field("Cluster Size")) == 4096
    assert b.mft_record_size == int(field("MFT Record Size"))
    assert b.index_record_size == int(field("Index Block Size"))
    assert b.mft_lcn == int(field("LCN of Data Attribute for FILE_MFT"))
    assert b.mftmirr_lcn == int(field("LCN of Data Attribute for File_MFTMirr"))
    assert b.total_sectors * b.bytes_per_sector // b.cluster_size == int(field("Volume Size in Clusters"))
    uuid = run("blkid", "-o", "value", "-s", "UUID", str(image)).strip()
    assert uuid == f"{b.volume_serial_number:016X}"
    # the backup boot sector is the last sector of the volume
    assert ntfs.detect(data, b.total_sectors * 512) == b


def test_mft_records(image):
    data = image.read_bytes()
    b = ntfs.detect(data)
    for n in range(16):
        off = b.mft_offset + n * b.mft_record_size
        r = ntfs.parse_file_record(data, off, b.mft_record_size)
        if n == 2:  # $LogFile
            assert r is not None and r.in_use and r.usa_ok and r.mft_record_number == 2
        if r is not None:
            assert r.usa_ok is True
    off = b.mft_offset + 5 * b.mft_record_size  # root directory
    assert ntfs.parse_file_record(data, off).is_directory
    torn = bytearray(data[off:off + b.mft_record_size])
    torn[511] ^= 0xFF  # a sector whose write did not land
    assert ntfs.parse_file_record(bytes(torn)).usa_ok is False
    assert ntfs.apply_fixups(bytes(torn)) is None


def protect(page: bytearray, usa_ofs: int, usn: int) -> bytes:
    """Apply an update sequence array the way NTFS does before writing."""
    n = len(page) // 512
    struct.pack_into("<HH", page, 4, usa_ofs, n + 1)
    struct.pack_into("<H", page, usa_ofs, usn)
    for i in range(n):
        end = (i + 1) * 512
        page[usa_ofs + 2 * (i + 1):usa_ofs + 2 * (i + 2)] = page[end - 2:end]
        struct.pack_into("<H", page, end - 2, usn)
    return bytes(page)


def restart_page(clean=True) -> tuple[bytes, bytes]:
    page = bytearray(4096)
    page[0:4] = b"RSTR"
    struct.pack_into("<QIIHhh", page, 8, 0, 4096, 4096, 0x30, 1, 1)
    area = struct.pack("<QHHHHIHHqIHHII", 0x123456, 1, 0xFFFF, 0, 2 if clean else 0, 44, 0x40, 0x30,
                       4 << 20, 0, 0x30, 0x40, 7, 0)
    page[0x30:0x30 + len(area)] = area
    page[0x1FE:0x200] = b"\x11\x22"  # original bytes that the USA must restore
    return bytes(page), protect(page.copy(), 0x1E, 5)


def test_restart_page():
    plain, disk = restart_page()
    assert disk[0x1FE:0x200] == b"\x05\x00"
    assert ntfs.apply_fixups(disk)[:0x1FE] == disk[:0x1FE]
    assert ntfs.apply_fixups(disk)[0x1FE:0x200] == b"\x11\x22"
    r = ntfs.detect_logfile_page(disk)
    assert isinstance(r, ntfs.RestartPage) and r.usa_ok
    assert (r.system_page_size, r.log_page_size, r.major_ver, r.minor_ver) == (4096, 4096, 1, 1)
    assert r.current_lsn == 0x123456 and r.clean and r.file_size == 4 << 20 and r.log_clients == 1
    dirty = ntfs.detect_logfile_page(restart_page(clean=False)[1])
    assert dirty.clean is False
    chkd = ntfs.detect_logfile_page(b"CHKD" + disk[4:])
    assert chkd.magic == "CHKD" and chkd.usa_ok
    torn = bytearray(disk)
    torn[4094] = 6
    r = ntfs.detect_logfile_page(bytes(torn))
    assert r.usa_ok is False and r.current_lsn is None
    assert ntfs.detect_logfile_page(disk[:512]).usa_ok is None


def test_record_page():
    page = bytearray(4096)
    page[0:4] = b"RCRD"
    struct.pack_into("<QIHHH", page, 8, 0x9999, 1, 1, 1, 0x58)
    struct.pack_into("<Q", page, 0x20, 0xAAAA)
    disk = protect(page, 0x28, 9)
    r = ntfs.detect_logfile_page(disk)
    assert isinstance(r, ntfs.RecordPage) and r.usa_ok
    assert (r.last_lsn, r.flags, r.page_count, r.page_position, r.next_record_offset, r.last_end_lsn) == (
        0x9999, 1, 1, 1, 0x58, 0xAAAA)


def test_fuzz(image):
    rng = random.Random(6)
    boot = image.read_bytes()[:512]
    _, rst = restart_page()
    for _ in range(1500):
        a = bytearray(boot)
        for _ in range(rng.randint(1, 4)):
            a[rng.randrange(11, 0x54)] = rng.randrange(256)
        r = ntfs.detect(bytes(a))
        assert r is None or isinstance(r, ntfs.NTFSBoot)
        if r is not None:
            r.mft_offset
        p = bytearray(rst)
        for _ in range(rng.randint(1, 6)):
            p[rng.randrange(4, 0x80)] = rng.randrange(256)
        r = ntfs.detect_logfile_page(bytes(p)[: rng.choice((4096, 4096, 100, 512))])
        assert r is None or isinstance(r, (ntfs.RestartPage, ntfs.RecordPage))
        g = rng.randbytes(rng.choice((0, 8, 512, 1024)))
        assert ntfs.detect(g) is None
        assert ntfs.apply_fixups(g) is None or len(g) >= 512
        ntfs.detect_logfile_page(b"RCRD" + g)
        ntfs.parse_file_record(b"FILE" + g)
    assert ntfs.apply_fixups(b"FILE\x30\x00\xff\xff" + bytes(1016)) is None
