"""NTFS boot sector, update sequence arrays, and $LogFile page headers.

$LogFile starts with two restart pages ('RSTR') followed by log record pages
('RCRD'); every such page (and every MFT 'FILE' record) is protected by an
update sequence array: the last two bytes of each 512-byte stride hold the
update sequence number, the real bytes are kept in the array.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Const, Int8sl, Int8ul, Int16sl, Int16ul, Int32ul, Int64sl, Int64ul, Padding, Struct

from ._common import safe_parse

OEM_ID = b"NTFS    "
USA_STRIDE = 512
MAX_PAGE = 65536  # bound on any multi-sector structure we fix up

BootSector = Struct(
    "jump" / Bytes(3),
    "oem_id" / Const(OEM_ID),
    "bytes_per_sector" / Int16ul,  # 0x0B
    "sectors_per_cluster" / Int8ul,  # 0x0D (>0x80: 2**(256-x))
    "reserved_sectors" / Int16ul,
    "fats" / Int8ul,
    "root_entries" / Int16ul,
    "sectors16" / Int16ul,
    "media_type" / Int8ul,  # 0x15
    "sectors_per_fat" / Int16ul,
    "sectors_per_track" / Int16ul,
    "heads" / Int16ul,
    "hidden_sectors" / Int32ul,  # 0x1C
    "large_sectors" / Int32ul,
    "physical_drive" / Int8ul,  # 0x24
    "current_head" / Int8ul,
    "ext_boot_signature" / Int8ul,
    "reserved2" / Int8ul,
    "total_sectors" / Int64ul,  # 0x28
    "mft_lcn" / Int64ul,  # 0x30
    "mftmirr_lcn" / Int64ul,  # 0x38
    "clusters_per_mft_record" / Int8sl,  # 0x40
    Padding(3),
    "clusters_per_index_record" / Int8sl,  # 0x44
    Padding(3),
    "volume_serial_number" / Int64ul,  # 0x48
    "checksum" / Int32ul,  # 0x50
    "bootstrap" / Bytes(426),
    "end_of_sector_marker" / Const(b"\x55\xaa"),  # 0x1FE
)
assert BootSector.sizeof() == 512

MultiSectorHeader = Struct(
    "magic" / Bytes(4),
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
)

RestartPageHeader = Struct(
    "magic" / Const(b"RSTR"),  # also 'CHKD' after chkdsk
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
    "chkdsk_lsn" / Int64ul,
    "system_page_size" / Int32ul,  # 0x10
    "log_page_size" / Int32ul,
    "restart_area_offset" / Int16ul,  # 0x18
    "minor_ver" / Int16sl,
    "major_ver" / Int16sl,
)

RestartArea = Struct(
    "current_lsn" / Int64ul,
    "log_clients" / Int16ul,
    "client_free_list" / Int16ul,
    "client_in_use_list" / Int16ul,
    "flags" / Int16ul,  # 0x2: volume is clean (RESTART_VOLUME_IS_CLEAN)
    "seq_number_bits" / Int32ul,
    "restart_area_length" / Int16ul,
    "client_array_offset" / Int16ul,
    "file_size" / Int64sl,
    "last_lsn_data_length" / Int32ul,
    "log_record_header_length" / Int16ul,
    "log_page_data_offset" / Int16ul,
    "restart_log_open_count" / Int32ul,
    "reserved" / Int32ul,
)

RecordPageHeader = Struct(
    "magic" / Const(b"RCRD"),
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
    "last_lsn" / Int64ul,  # or file offset
    "flags" / Int32ul,  # 0x1: LOG_PAGE_LOG_RECORD_END
    "page_count" / Int16ul,
    "page_position" / Int16ul,
    "next_record_offset" / Int16ul,  # 0x18
    Padding(6),
    "last_end_lsn" / Int64ul,  # 0x20
)

FileRecordHeader = Struct(
    "magic" / Const(b"FILE"),
    "usa_ofs" / Int16ul,
    "usa_count" / Int16ul,
    "lsn" / Int64ul,
    "sequence_number" / Int16ul,
    "link_count" / Int16ul,
    "attrs_offset" / Int16ul,
    "flags" / Int16ul,  # 0x1 in use, 0x2 directory
    "bytes_in_use" / Int32ul,
    "bytes_allocated" / Int32ul,
    "base_mft_record" / Int64ul,
    "next_attr_instance" / Int16ul,
    "reserved" / Int16ul,
    "mft_record_number" / Int32ul,
)

RESTART_VOLUME_IS_CLEAN = 0x2


@dataclass(frozen=True)
class NTFSBoot:
    bytes_per_sector: int
    sectors_per_cluster: int
    cluster_size: int
    total_sectors: int
    mft_lcn: int
    mftmirr_lcn: int
    mft_record_size: int
    index_record_size: int
    volume_serial_number: int

    @property
    def mft_offset(self) -> int:
        return self.mft_lcn * self.cluster_size

    @property
    def size_bytes(self) -> int:
        return self.total_sectors * self.bytes_per_sector


@dataclass(frozen=True)
class RestartPage:
    magic: str  # 'RSTR' or 'CHKD'
    chkdsk_lsn: int
    system_page_size: int
    log_page_size: int
    restart_area_offset: int
    major_ver: int
    minor_ver: int
    usa_ok: bool | None  # None: page not fully in the buffer
    current_lsn: int | None  # restart area (when fixed up page is available)
    log_clients: int | None
    flags: int | None
    file_size: int | None
    seq_number_bits: int | None

    @property
    def clean(self) -> bool | None:
        return None if self.flags is None else bool(self.flags & RESTART_VOLUME_IS_CLEAN)


@dataclass(frozen=True)
class RecordPage:
    last_lsn: int
    flags: int
    page_count: int
    page_position: int
    next_record_offset: int
    last_end_lsn: int
    usa_ok: bool | None


@dataclass(frozen=True)
class FileRecord:
    lsn: int
    sequence_number: int
    link_count: int
    flags: int
    bytes_in_use: int
    bytes_allocated: int
    base_mft_record: int
    mft_record_number: int
    usa_ok: bool | None

    @property
    def in_use(self) -> bool:
        return bool(self.flags & 0x1)

    @property
    def is_directory(self) -> bool:
        return bool(self.flags & 0x2)


def _record_size(v: int, cluster_size: int) -> int | None:
    if v > 0:
        return v * cluster_size
    if -31 <= v < 0:
        return 1 << -v
    return None


def parse_boot_sector(buf: bytes, offset: int = 0) -> NTFSBoot | None:
    c = safe_parse(BootSector, buf, offset)
    if c is None:
        return None
    bps = c.bytes_per_sector
    if bps not in (256, 512, 1024, 2048, 4096):
        return None
    spc = c.sectors_per_cluster
    if spc > 0x80:
        spc = 1 << (256 - spc)
    if spc == 0 or spc & (spc - 1) or spc > (1 << 20):
        return None
    cs = bps * spc
    mft_rs = _record_size(c.clusters_per_mft_record, cs)
    idx_rs = _record_size(c.clusters_per_index_record, cs)
    if mft_rs is None or idx_rs is None or c.fats != 0:
        return None
    return NTFSBoot(bps, spc, cs, c.total_sectors, c.mft_lcn, c.mftmirr_lcn,
                    mft_rs, idx_rs, c.volume_serial_number)


def apply_fixups(page: bytes) -> bytes | None:
    """Undo the update sequence array of a multi-sector structure.

    ``page`` is the whole structure (a multiple of 512 bytes, at most 64 KiB).
    Returns the fixed-up bytes, or ``None`` when the header is bad or any
    sector's tail does not hold the update sequence number (torn write).
    """
    h = safe_parse(MultiSectorHeader, page)
    if h is None or not page or len(page) % USA_STRIDE or len(page) > MAX_PAGE:
        return None
    n = h.usa_count - 1  # first entry is the update sequence number itself
    if n < 1 or n * USA_STRIDE > len(page) or h.usa_ofs % 2 or h.usa_ofs < 8:
        return None
    if h.usa_ofs + 2 * (n + 1) > USA_STRIDE:
        return None
    out = bytearray(page)
    usn = out[h.usa_ofs:h.usa_ofs + 2]
    for i in range(n):
        end = (i + 1) * USA_STRIDE
        if out[end - 2:end] != usn:
            return None
        p = h.usa_ofs + 2 * (i + 1)
        out[end - 2:end] = out[p:p + 2]
    return bytes(out)


def _usa_span(buf: bytes, offset: int) -> int | None:
    h = safe_parse(MultiSectorHeader, buf, offset)
    if h is None or h.usa_count < 2 or (h.usa_count - 1) * USA_STRIDE > MAX_PAGE:
        return None
    return (h.usa_count - 1) * USA_STRIDE


def parse_restart_page(buf: bytes, offset: int = 0) -> RestartPage | None:
    """A $LogFile restart page at ``buf[offset:]`` (magic 'RSTR' or 'CHKD')."""
    raw = bytes(buf[offset:offset + 32])
    if raw[:4] == b"CHKD":
        raw = b"RSTR" + raw[4:]
    c = safe_parse(RestartPageHeader, raw)
    if c is None:
        return None
    sps, lps = c.system_page_size, c.log_page_size
    for v in (sps, lps):
        if not (512 <= v <= MAX_PAGE) or v & (v - 1):
            return None
    magic = bytes(buf[offset:offset + 4]).decode("ascii")
    usa_ok = fixed = None
    if offset + sps <= len(buf):
        fixed = apply_fixups(bytes(buf[offset:offset + sps]))
        usa_ok = fixed is not None
    area = None
    if fixed is not None and c.restart_area_offset + RestartArea.sizeof() <= sps:
        area = safe_parse(RestartArea, fixed, c.restart_area_offset)
    return RestartPage(
        magic=magic, chkdsk_lsn=c.chkdsk_lsn, system_page_size=sps, log_page_size=lps,
        restart_area_offset=c.restart_area_offset, major_ver=c.major_ver, minor_ver=c.minor_ver,
        usa_ok=usa_ok,
        current_lsn=area.current_lsn if area else None,
        log_clients=area.log_clients if area else None,
        flags=area.flags if area else None,
        file_size=area.file_size if area else None,
        seq_number_bits=area.seq_number_bits if area else None,
    )


def parse_record_page(buf: bytes, offset: int = 0, page_size: int | None = None) -> RecordPage | None:
    """A $LogFile record page header ('RCRD') at ``buf[offset:]``."""
    c = safe_parse(RecordPageHeader, buf, offset)
    if c is None:
        return None
    span = page_size or _usa_span(buf, offset)
    usa_ok = None
    if span and offset + span <= len(buf):
        usa_ok = apply_fixups(bytes(buf[offset:offset + span])) is not None
    return RecordPage(c.last_lsn, c.flags, c.page_count, c.page_position,
                      c.next_record_offset, c.last_end_lsn, usa_ok)


def parse_file_record(buf: bytes, offset: int = 0, record_size: int | None = None) -> FileRecord | None:
    """An MFT 'FILE' record header at ``buf[offset:]``."""
    c = safe_parse(FileRecordHeader, buf, offset)
    if c is None:
        return None
    span = record_size or _usa_span(buf, offset)
    usa_ok = None
    if span and offset + span <= len(buf):
        usa_ok = apply_fixups(bytes(buf[offset:offset + span])) is not None
    return FileRecord(c.lsn, c.sequence_number, c.link_count, c.flags, c.bytes_in_use,
                      c.bytes_allocated, c.base_mft_record, c.mft_record_number, usa_ok)


def detect(buf: bytes, offset: int = 0) -> NTFSBoot | None:
    """The NTFS boot sector at ``buf[offset:]`` (start of the volume), else None."""
    try:
        return parse_boot_sector(buf, offset)
    except Exception:
        return None


def detect_logfile_page(buf: bytes, offset: int = 0):
    """A :class:`RestartPage` or :class:`RecordPage` at ``buf[offset:]``, else None."""
    try:
        magic = bytes(buf[offset:offset + 4])
        if magic in (b"RSTR", b"CHKD"):
            return parse_restart_page(buf, offset)
        if magic == b"RCRD":
            return parse_record_page(buf, offset)
    except Exception:
        pass
    return None


