"""GUID Partition Table: header at LBA 1 (CRC32 checked) and entries array."""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ._common import crc32, safe_parse, uuid_le

SIGNATURE = b"EFI PART"
MAX_ENTRIES_BYTES = 1 << 20  # refuse larger entry arrays (spec minimum is 16 KiB)

Header = Struct(
    "signature" / Const(SIGNATURE),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "partition_entry_lba" / Int64ul,
    "num_partition_entries" / Int32ul,
    "partition_entry_size" / Int32ul,
    "partition_entries_crc32" / Int32ul,
)
HEADER_SIZE = Header.sizeof()  # 92

Entry = Struct(
    "type_guid" / Bytes(16),
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / Bytes(72),  # UTF-16LE
)
assert Entry.sizeof() == 128

# Partition type GUIDs (lower case, as uuid.UUID prints them)
LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
LINUX_LVM = "e6d6d379-f507-44c2-a23c-238f2a3df928"
LINUX_SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
LINUX_LUKS = "ca7d7ccb-63ed-4c53-861c-1742536059cc"
LINUX_RAID = "a19d880f-05fc-4d3b-a006-743f0f84911e"
LINUX_HOME = "933ac7e1-2eb4-4f13-b844-0e14e2aef915"
LINUX_ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
EFI_SYSTEM = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
MS_BASIC_DATA = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"
MS_RESERVED = "e3c9e316-0b5c-4db8-817d-f92df00215ae"
MS_RECOVERY = "de94bba4-06d1-4d40-a16a-bfd50179d6ac"
UNUSED = "00000000-0000-0000-0000-000000000000"

TYPE_NAMES = {
    LINUX_FS: "Linux filesystem",
    LINUX_LVM: "Linux LVM",
    LINUX_SWAP: "Linux swap",
    LINUX_LUKS: "Linux LUKS",
    LINUX_RAID: "Linux RAID",
    LINUX_HOME: "Linux /home",
    LINUX_ROOT_X86_64: "Linux root (x86-64)",
    EFI_SYSTEM: "EFI System",
    BIOS_BOOT: "BIOS boot",
    MS_BASIC_DATA: "Microsoft basic data",
    MS_RESERVED: "Microsoft reserved",
    MS_RECOVERY: "Windows recovery",
}


@dataclass(frozen=True)
class GPTHeader:
    revision: int
    header_size: int
    header_crc32: int
    crc_ok: bool
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    partition_entry_lba: int
    num_partition_entries: int
    partition_entry_size: int
    partition_entries_crc32: int

    @property
    def entries_bytes(self) -> int:
        return self.num_partition_entries * self.partition_entry_size


@dataclass(frozen=True)
class GPTPartition:
    index: int
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int  # inclusive
    attributes: int
    name: str

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type_guid, "unknown")


@dataclass(frozen=True)
class GPT:
    header: GPTHeader
    partitions: tuple[GPTPartition, ...] | None  # None: entries not in buffer
    entries_crc_ok: bool | None  # None: entries not in buffer


def parse_header(buf: bytes, offset: int = 0) -> GPTHeader | None:
    """Parse a GPT header at ``buf[offset:]``; ``None`` if no signature.

    The result's ``crc_ok`` says whether the header CRC32 matched; a header
    with a nonsensical size or entry geometry is rejected (``None``).
    """
    c = safe_parse(Header, buf, offset)
    if c is None:
        return None
    hs = c.header_size
    if hs < HEADER_SIZE or hs > 4096 or len(buf) < offset + hs:
        return None
    if not (128 <= c.partition_entry_size <= 4096) or c.partition_entry_size % 8:
        return None
    if c.num_partition_entries * c.partition_entry_size > MAX_ENTRIES_BYTES:
        return None
    raw = bytearray(buf[offset:offset + hs])
    raw[16:20] = b"\0\0\0\0"
    return GPTHeader(
        revision=c.revision,
        header_size=hs,
        header_crc32=c.header_crc32,
        crc_ok=crc32(bytes(raw)) == c.header_crc32,
        my_lba=c.my_lba,
        alternate_lba=c.alternate_lba,
        first_usable_lba=c.first_usable_lba,
        last_usable_lba=c.last_usable_lba,
        disk_guid=uuid_le(c.disk_guid),
        partition_entry_lba=c.partition_entry_lba,
        num_partition_entries=c.num_partition_entries,
        partition_entry_size=c.partition_entry_size,
        partition_entries_crc32=c.partition_entries_crc32,
    )


def parse_entries(hdr: GPTHeader, data: bytes) -> tuple[tuple[GPTPartition, ...], bool] | None:
    """Parse the entries array ``data`` described by ``hdr``.

    Returns (used partitions, entries CRC32 matched) or ``None`` when
    ``data`` is shorter than the array.
    """
    n, size = hdr.num_partition_entries, hdr.partition_entry_size
    total = n * size
    if total > MAX_ENTRIES_BYTES or len(data) < total:
        return None
    arr = bytes(data[:total])
    crc_ok = crc32(arr) == hdr.partition_entries_crc32
    parts = []
    for i in range(n):
        e = safe_parse(Entry, arr, i * size)
        if e is None:
            return None
        if e.type_guid == b"\0" * 16:
            continue
        name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(
            GPTPartition(i, uuid_le(e.type_guid), uuid_le(e.unique_guid),
                         e.first_lba, e.last_lba, e.attributes, name)
        )
    return tuple(parts), crc_ok


def detect(buf: bytes, sector_size: int | None = None) -> GPT | None:
    """Find the primary GPT in ``buf``, which starts at LBA 0 of the disk.

    With ``sector_size`` None, 512 then 4096 are tried.  Entries are parsed
    when the array lies inside ``buf``.  Returns ``None`` without a header
    whose CRC32 matches.
    """
    sizes = (sector_size,) if sector_size else (512, 4096)
    for ss in sizes:
        try:
            hdr = parse_header(buf, ss)
        except Exception:
            hdr = None
        if hdr is None or not hdr.crc_ok:
            continue
        parts = crc_ok = None
        start = hdr.partition_entry_lba * ss
        if start + hdr.entries_bytes <= len(buf):
            r = parse_entries(hdr, buf[start:start + hdr.entries_bytes])
            if r is not None:
                parts, crc_ok = r
        return GPT(hdr, parts, crc_ok)
    return None
