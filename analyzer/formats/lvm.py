"""LVM2 physical volume label, PV header and metadata area header.

The label ('LABELONE' ... 'LVM2 001') lives in one of the first four
512-byte sectors; the PV header follows it in the same sector.  Each metadata
area starts with a 512-byte header (magic ' LVM2 x[5A%r0N*>') whose raw
locations point at the text metadata.  Checksums use LVM2's ``calc_crc``:
CRC-32 without final inversion, seeded with 0xf597a6cf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ._common import crc32_raw, safe_parse

SECTOR = 512
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
LVM2_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
MDA_HEADER_SIZE = 512
MAX_METADATA_TEXT = 16 << 20  # refuse to checksum more than this

LabelHeader = Struct(
    "id" / Const(LABEL_ID),
    "sector_xl" / Int64ul,
    "crc_xl" / Int32ul,  # over offset_xl .. end of sector
    "offset_xl" / Int32ul,  # of the PV header, from the label sector start
    "type" / Bytes(8),
)

DiskLocn = Struct("offset" / Int64ul, "size" / Int64ul)

MdaHeader = Struct(
    "checksum_xl" / Int32ul,  # over magic .. end of the 512-byte header
    "magic" / Const(MDA_MAGIC),
    "version" / Int32ul,
    "start" / Int64ul,  # absolute offset of this mda on the PV
    "size" / Int64ul,
)
RawLocn = Struct("offset" / Int64ul, "size" / Int64ul, "checksum" / Int32ul, "flags" / Int32ul)
RAW_LOCN_IGNORED = 0x1


@dataclass(frozen=True)
class PVLabel:
    sector: int  # which of the first 4 sectors holds the label
    crc_ok: bool
    type: str
    pv_uuid: str  # 32 chars as stored; see pv_uuid_dashed
    device_size: int
    data_areas: tuple[tuple[int, int], ...]  # (offset, size) in bytes
    metadata_areas: tuple[tuple[int, int], ...]
    ext_version: int | None
    ext_flags: int | None

    @property
    def pv_uuid_dashed(self) -> str:
        u = self.pv_uuid
        parts = (u[0:6], u[6:10], u[10:14], u[14:18], u[18:22], u[22:26], u[26:32])
        return "-".join(parts)


@dataclass(frozen=True)
class MdaRawLocn:
    offset: int  # relative to the mda start
    size: int
    checksum: int
    flags: int


@dataclass(frozen=True)
class MdaHeaderInfo:
    checksum: int
    checksum_ok: bool
    version: int
    start: int
    size: int
    raw_locns: tuple[MdaRawLocn, ...]


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    return crc32_raw(initial, data)


def _read_locns(sector: bytes, pos: int, limit: int = 64) -> tuple[list[tuple[int, int]], int] | None:
    """A zero-terminated disk_locn list starting at ``pos``; None if unterminated."""
    out = []
    for _ in range(limit):
        d = safe_parse(DiskLocn, sector, pos)
        if d is None:
            return None
        pos += DiskLocn.sizeof()
        if d.offset == 0 and d.size == 0:
            return out, pos
        out.append((d.offset, d.size))
    return None


def parse_label_sector(sector: bytes, index: int) -> PVLabel | None:
    """A label in ``sector`` (512 bytes), which is sector ``index`` of the PV."""
    sector = bytes(sector[:SECTOR])
    lh = safe_parse(LabelHeader, sector)
    if lh is None or lh.sector_xl != index or not (32 <= lh.offset_xl <= SECTOR - 48):
        return None
    crc_ok = lvm_crc(sector[20:]) == lh.crc_xl
    pos = lh.offset_xl
    uuid = sector[pos:pos + 32]
    if len(uuid) < 32:
        return None
    pos += 32
    dev = safe_parse(Int64ul, sector, pos)
    if dev is None:
        return None
    pos += 8
    r = _read_locns(sector, pos)
    if r is None:
        return None
    das, pos = r
    r = _read_locns(sector, pos)
    if r is None:
        return None
    mdas, pos = r
    ext_v = ext_f = None
    ext = sector[pos:pos + 8]
    if len(ext) == 8:
        ext_v = int.from_bytes(ext[:4], "little")
        ext_f = int.from_bytes(ext[4:], "little")
    return PVLabel(
        sector=index, crc_ok=crc_ok, type=lh.type.decode("ascii", "replace"),
        pv_uuid=uuid.decode("ascii", "replace"), device_size=dev,
        data_areas=tuple(das), metadata_areas=tuple(mdas),
        ext_version=ext_v, ext_flags=ext_f,
    )


def detect(buf: bytes, offset: int = 0) -> PVLabel | None:
    """Look for an LVM2 label in the first 4 sectors of ``buf[offset:]``.

    Only labels of type 'LVM2 001' whose CRC matches are returned.
    """
    try:
        for i in range(LABEL_SCAN_SECTORS):
            s = buf[offset + i * SECTOR:offset + (i + 1) * SECTOR]
            if len(s) < SECTOR or s[:8] != LABEL_ID:
                continue
            lab = parse_label_sector(s, i)
            if lab is not None and lab.crc_ok and lab.type == LVM2_TYPE.decode():
                return lab
    except Exception:
        pass
    return None


def parse_mda_header(buf: bytes, offset: int = 0) -> MdaHeaderInfo | None:
    """A metadata area header (512 bytes) at ``buf[offset:]``."""
    try:
        raw = bytes(buf[offset:offset + MDA_HEADER_SIZE])
        if len(raw) < MDA_HEADER_SIZE:
            return None
        h = safe_parse(MdaHeader, raw)
        if h is None:
            return None
        locns = []
        pos = MdaHeader.sizeof()
        while pos + RawLocn.sizeof() <= MDA_HEADER_SIZE:
            r = RawLocn.parse(raw[pos:pos + RawLocn.sizeof()])
            if r.offset == 0 and r.size == 0 and r.checksum == 0 and r.flags == 0:
                break
            locns.append(MdaRawLocn(r.offset, r.size, r.checksum, r.flags))
            pos += RawLocn.sizeof()
        return MdaHeaderInfo(
            checksum=h.checksum_xl,
            checksum_ok=lvm_crc(raw[4:]) == h.checksum_xl,
            version=h.version, start=h.start, size=h.size, raw_locns=tuple(locns),
        )
    except Exception:
        return None


def read_metadata_text(mda: bytes, hdr: MdaHeaderInfo, locn: MdaRawLocn | None = None) -> tuple[str, bool] | None:
    """The VG text metadata pointed to by ``locn`` (default: first raw locn).

    ``mda`` is the whole metadata area (starting at its header).  Returns
    ``(text, checksum_ok)`` or None when it is not in ``mda``.  Handles the
    circular-buffer wrap after the end of the area.
    """
    try:
        if locn is None:
            if not hdr.raw_locns:
                return None
            locn = hdr.raw_locns[0]
        if locn.size == 0 or locn.size > MAX_METADATA_TEXT or locn.size > hdr.size:
            return None
        end = locn.offset + locn.size
        if end <= hdr.size:
            data = bytes(mda[locn.offset:end])
        else:  # wraps around to just after the header
            first = bytes(mda[locn.offset:hdr.size])
            data = first + bytes(mda[MDA_HEADER_SIZE:MDA_HEADER_SIZE + locn.size - len(first)])
        if len(data) != locn.size:
            return None
        ok = lvm_crc(data) == locn.checksum
        return data.split(b"\0", 1)[0].decode("utf-8", "replace"), ok
    except Exception:
        return None


_VG_NAME = re.compile(r"^([A-Za-z0-9+_.\-]+) \{", re.M)


def vg_name(text: str) -> str | None:
    """The VG name from text metadata (its first top-level section)."""
    m = _VG_NAME.search(text[:65536])
    return m.group(1) if m else None
