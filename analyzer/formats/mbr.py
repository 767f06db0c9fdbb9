"""MBR (DOS) partition table: 4 primary entries and the 0x55AA signature."""

from __future__ import annotations

from dataclasses import dataclass

from construct import Array, Bytes, Const, Int8ul, Int32ul, Struct

from ._common import safe_parse

SECTOR = 512

PartitionEntry = Struct(
    "status" / Int8ul,  # 0x80 bootable, 0x00 not
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,
    "num_sectors" / Int32ul,
)

MBRSector = Struct(
    "bootstrap" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Bytes(2),
    "partitions" / Array(4, PartitionEntry),
    "signature" / Const(b"\x55\xaa"),
)
assert MBRSector.sizeof() == SECTOR

TYPE_EMPTY = 0x00
TYPE_EXTENDED = frozenset({0x05, 0x0F, 0x85})
TYPE_GPT_PROTECTIVE = 0xEE
TYPE_EFI_SYSTEM = 0xEF
TYPE_NAMES = {
    0x00: "empty",
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "extended (CHS)",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "extended (LBA)",
    0x27: "hidden NTFS WinRE",
    0x42: "Windows dynamic",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xEE: "GPT protective",
    0xEF: "EFI system",
    0xFD: "Linux raid autodetect",
}


@dataclass(frozen=True)
class Partition:
    index: int  # 0..3
    bootable: bool
    type: int
    lba_first: int
    num_sectors: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"unknown 0x{self.type:02x}")

    @property
    def is_extended(self) -> bool:
        return self.type in TYPE_EXTENDED

    @property
    def lba_end(self) -> int:  # exclusive
        return self.lba_first + self.num_sectors


@dataclass(frozen=True)
class MBR:
    disk_signature: int
    partitions: tuple[Partition, ...]  # non-empty entries only

    @property
    def protective(self) -> bool:
        """True when this is a GPT protective MBR (an 0xEE entry)."""
        return any(p.type == TYPE_GPT_PROTECTIVE for p in self.partitions)


def detect(buf: bytes, offset: int = 0) -> MBR | None:
    """Parse the MBR (or an EBR) at ``buf[offset:offset+512]``.

    Returns ``None`` without the 0x55AA signature or when an entry is not
    plausible (status byte other than 0x00/0x80 on a used entry, or a used
    entry starting at LBA 0), which rules out most boot sectors of
    unpartitioned filesystems.  A valid MBR may have no partitions.
    """
    c = safe_parse(MBRSector, buf, offset)
    if c is None:
        return None
    parts = []
    for i, e in enumerate(c.partitions):
        if e.type == TYPE_EMPTY:
            continue
        if e.status not in (0x00, 0x80) or e.num_sectors == 0 or e.lba_first == 0:
            return None
        parts.append(Partition(i, e.status == 0x80, e.type, e.lba_first, e.num_sectors))
    return MBR(c.disk_signature, tuple(parts))
