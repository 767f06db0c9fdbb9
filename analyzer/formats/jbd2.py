"""jbd2 journal blocks (ext3/ext4 journal), all fields big-endian.

Every journal metadata block starts with a 12-byte header (magic 0xC03B3998,
block type, transaction sequence).  Checksums follow the kernel's ext4
journal documentation: with the csum v2/v3 features every checksum is
crc32c seeded with ``crc32c(~0, s_uuid)``; the superblock's is crc32c(~0)
over the 1024-byte superblock with ``s_checksum`` zeroed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Array, Bytes, Const, Int8ub, Int16ub, Int32sb, Int32ub, Int64ub, Padding, Struct

from ._common import FastStruct, crc32c_raw, flag_names, safe_parse, uuid_be

MAGIC = 0xC03B3998

DESCRIPTOR_BLOCK = 1
COMMIT_BLOCK = 2
SUPERBLOCK_V1 = 3
SUPERBLOCK_V2 = 4
REVOKE_BLOCK = 5
BLOCKTYPE_NAMES = {1: "descriptor", 2: "commit", 3: "superblock_v1", 4: "superblock_v2", 5: "revoke"}

COMPAT_CHECKSUM = 0x1
INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
COMPAT = {0x1: "checksum"}
INCOMPAT = {0x1: "revoke", 0x2: "64bit", 0x4: "async_commit", 0x8: "csum_v2",
            0x10: "csum_v3", 0x20: "fast_commit"}

CSUM_CRC32 = 1
CSUM_MD5 = 2
CSUM_SHA1 = 3
CSUM_CRC32C = 4

# descriptor tag flags
FLAG_ESCAPE = 0x1
FLAG_SAME_UUID = 0x2
FLAG_DELETED = 0x4
FLAG_LAST_TAG = 0x8

Header = Struct(
    "h_magic" / Const(MAGIC, Int32ub),
    "h_blocktype" / Int32ub,
    "h_sequence" / Int32ub,
)

Superblock = Struct(
    "header" / Header,
    "s_blocksize" / Int32ub,  # 0x0C
    "s_maxlen" / Int32ub,
    "s_first" / Int32ub,
    "s_sequence" / Int32ub,  # 0x18
    "s_start" / Int32ub,
    "s_errno" / Int32sb,  # 0x20
    "s_feature_compat" / Int32ub,
    "s_feature_incompat" / Int32ub,
    "s_feature_ro_compat" / Int32ub,
    "s_uuid" / Bytes(16),  # 0x30
    "s_nr_users" / Int32ub,  # 0x40
    "s_dynsuper" / Int32ub,
    "s_max_transaction" / Int32ub,
    "s_max_trans_data" / Int32ub,
    "s_checksum_type" / Int8ub,  # 0x50
    Padding(3),
    "s_num_fc_blks" / Int32ub,  # 0x54
    "s_head" / Int32ub,  # 0x58
    Padding(160),
    "s_checksum" / Int32ub,  # 0xFC
    "s_users" / Bytes(16 * 48),  # 0x100
)
SUPERBLOCK_SIZE = Superblock.sizeof()
assert SUPERBLOCK_SIZE == 1024

CommitHeader = Struct(
    "header" / Header,
    "h_chksum_type" / Int8ub,  # 0x0C
    "h_chksum_size" / Int8ub,
    Padding(2),
    "h_chksum" / Array(8, Int32ub),  # 0x10
    "h_commit_sec" / Int64ub,  # 0x30
    "h_commit_nsec" / Int32ub,  # 0x38
)

RevokeHeader = Struct(
    "header" / Header,
    "r_count" / Int32sb,  # bytes used in the block, header included
)

# descriptor tags: csum v3 layout, and the older layout (csum v2 / none)
Tag3 = Struct(
    "t_blocknr" / Int32ub,
    "t_flags" / Int32ub,
    "t_blocknr_high" / Int32ub,
    "t_checksum" / Int32ub,
)
Tag = Struct(
    "t_blocknr" / Int32ub,
    "t_checksum" / Int16ub,  # low 16 bits of the crc32c with csum v2
    "t_flags" / Int16ub,
    "t_blocknr_high" / Int32ub,  # only present with the 64bit feature
)
# the same declarations, parsed with one struct.unpack (every journal block is looked at)
_HEADER, _TAG3, _TAG = FastStruct(Header), FastStruct(Tag3), FastStruct(Tag)


@dataclass(frozen=True)
class JournalSuperblock:
    blocktype: int
    sequence_header: int
    blocksize: int
    maxlen: int
    first: int
    sequence: int
    start: int  # 0: journal empty (clean)
    errno: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: str
    uuid_bytes: bytes
    nr_users: int
    max_transaction: int
    max_trans_data: int
    checksum_type: int
    num_fc_blks: int
    checksum: int
    checksum_ok: bool | None  # None: no csum v2/v3, superblock unchecksummed

    @property
    def version(self) -> int:
        return 2 if self.blocktype == SUPERBLOCK_V2 else 1

    @property
    def features(self) -> frozenset[str]:
        return flag_names(self.feature_compat, COMPAT) | flag_names(self.feature_incompat, INCOMPAT)

    @property
    def csum_v2v3(self) -> bool:
        return bool(self.feature_incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))

    @property
    def csum_v3(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_CSUM_V3)

    @property
    def is_64bit(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_64BIT)

    @property
    def needs_recovery(self) -> bool:
        return self.start != 0

    @property
    def csum_seed(self) -> int:
        return crc32c_raw(0xFFFFFFFF, self.uuid_bytes)

    @property
    def tag_bytes(self) -> int:
        """Size of one descriptor tag (``journal_tag_bytes`` in the kernel)."""
        if self.csum_v3:
            return 16
        sz = 12
        if self.feature_incompat & INCOMPAT_CSUM_V2:
            sz += 2
        return sz if self.is_64bit else sz - 4

    @property
    def tail_bytes(self) -> int:
        return 4 if self.csum_v2v3 else 0


@dataclass(frozen=True)
class BlockTag:
    blocknr: int
    flags: int
    checksum: int  # 32 bits with csum v3, 16 bits with v2, else unused
    uuid: str | None  # only on tags without SAME_UUID

    @property
    def escaped(self) -> bool:
        return bool(self.flags & FLAG_ESCAPE)

    @property
    def last(self) -> bool:
        return bool(self.flags & FLAG_LAST_TAG)


@dataclass(frozen=True)
class DescriptorBlock:
    sequence: int
    tags: tuple[BlockTag, ...]
    tail_checksum: int | None
    checksum_ok: bool | None


@dataclass(frozen=True)
class CommitBlock:
    sequence: int
    chksum_type: int
    chksum_size: int
    chksum: tuple[int, ...]
    commit_sec: int
    commit_nsec: int
    checksum_ok: bool | None  # csum v2/v3 only; v1 crc32 covers data blocks


@dataclass(frozen=True)
class RevokeBlock:
    sequence: int
    count: int
    blocks: tuple[int, ...]
    checksum_ok: bool | None


def _valid_blocksize(bs: int) -> bool:
    return 1024 <= bs <= 65536 and bs & (bs - 1) == 0


def parse_header(buf: bytes, offset: int = 0):
    """(blocktype, sequence) of a journal block, or ``None`` without magic."""
    c = _HEADER.parse(buf, offset)
    return None if c is None else (c.h_blocktype, c.h_sequence)


def parse_superblock(buf: bytes, offset: int = 0) -> JournalSuperblock | None:
    c = safe_parse(Superblock, buf, offset)
    if c is None or c.header.h_blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        return None
    if not _valid_blocksize(c.s_blocksize):
        return None
    ok = None
    if c.s_feature_incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3):
        raw = bytearray(buf[offset:offset + SUPERBLOCK_SIZE])
        raw[0xFC:0x100] = b"\0\0\0\0"
        ok = crc32c_raw(0xFFFFFFFF, bytes(raw)) == c.s_checksum
    return JournalSuperblock(
        blocktype=c.header.h_blocktype,
        sequence_header=c.header.h_sequence,
        blocksize=c.s_blocksize,
        maxlen=c.s_maxlen,
        first=c.s_first,
        sequence=c.s_sequence,
        start=c.s_start,
        errno=c.s_errno,
        feature_compat=c.s_feature_compat,
        feature_incompat=c.s_feature_incompat,
        feature_ro_compat=c.s_feature_ro_compat,
        uuid=uuid_be(c.s_uuid),
        uuid_bytes=bytes(c.s_uuid),
        nr_users=c.s_nr_users,
        max_transaction=c.s_max_transaction,
        max_trans_data=c.s_max_trans_data,
        checksum_type=c.s_checksum_type,
        num_fc_blks=c.s_num_fc_blks,
        checksum=c.s_checksum,
        checksum_ok=ok,
    )


def _block_csum_ok(jsb: JournalSuperblock, block: bytes, at: int) -> tuple[int, bool]:
    """Checksum stored at ``block[at:at+4]`` vs crc32c(seed, block w/ it zeroed)."""
    stored = struct.unpack_from(">I", block, at)[0]
    raw = bytearray(block)
    raw[at:at + 4] = b"\0\0\0\0"
    return stored, crc32c_raw(jsb.csum_seed, bytes(raw)) == stored


def _parse_descriptor(block: bytes, seq: int, jsb: JournalSuperblock) -> DescriptorBlock:
    tag_bytes = jsb.tag_bytes
    end = len(block) - jsb.tail_bytes
    tags = []
    pos = 12
    while pos + tag_bytes <= end:
        if jsb.csum_v3:
            t = _TAG3.parse(block, pos)
            flags, csum = t.t_flags, t.t_checksum
        else:
            t = _TAG.parse(block[pos:pos + 12].ljust(12, b"\0"))
            flags, csum = t.t_flags, t.t_checksum
        nr = t.t_blocknr | ((t.t_blocknr_high << 32) if jsb.is_64bit else 0)
        pos += tag_bytes
        uuid = None
        if not flags & FLAG_SAME_UUID:
            if pos + 16 > end:
                break
            uuid = uuid_be(block[pos:pos + 16])
            pos += 16
        tags.append(BlockTag(nr, flags, csum, uuid))
        if flags & FLAG_LAST_TAG:
            break
    tail = ok = None
    if jsb.csum_v2v3:
        tail, ok = _block_csum_ok(jsb, block, len(block) - 4)
    return DescriptorBlock(seq, tuple(tags), tail, ok)


def _parse_commit(block: bytes, seq: int, jsb: JournalSuperblock | None) -> CommitBlock | None:
    c = safe_parse(CommitHeader, block)
    if c is None:
        return None
    ok = None
    if jsb is not None and jsb.csum_v2v3:
        _, ok = _block_csum_ok(jsb, block, 0x10)
    return CommitBlock(seq, c.h_chksum_type, c.h_chksum_size, tuple(c.h_chksum),
                       c.h_commit_sec, c.h_commit_nsec, ok)


def _parse_revoke(block: bytes, seq: int, jsb: JournalSuperblock | None) -> RevokeBlock | None:
    c = safe_parse(RevokeHeader, block)
    if c is None:
        return None
    tail = jsb.tail_bytes if jsb is not None else 0
    count = c.r_count
    if count < 16 or count > len(block) - tail:
        return None
    blocks: tuple[int, ...] = ()
    if jsb is not None:
        rsize = 8 if jsb.is_64bit else 4
        fmt = ">Q" if rsize == 8 else ">I"
        blocks = tuple(struct.unpack_from(fmt, block, p)[0]
                       for p in range(16, count - rsize + 1, rsize))
    ok = None
    if jsb is not None and jsb.csum_v2v3:
        _, ok = _block_csum_ok(jsb, block, len(block) - 4)
    return RevokeBlock(seq, count, blocks, ok)


def parse_block(block: bytes, jsb: JournalSuperblock | None = None):
    """Parse one journal block (exactly one journal block size long).

    Returns a :class:`JournalSuperblock`, :class:`DescriptorBlock`,
    :class:`CommitBlock` or :class:`RevokeBlock`, or ``None`` when ``block``
    is not a journal metadata block (data blocks and garbage).  ``jsb`` (the
    journal's superblock) is needed to parse descriptor tags and revoke
    records and to verify checksums; without it descriptors have no tags.
    """
    try:
        block = bytes(block)
        if jsb is not None and len(block) != jsb.blocksize:
            return None
        h = parse_header(block)
        if h is None:
            return None
        btype, seq = h
        if btype in (SUPERBLOCK_V1, SUPERBLOCK_V2):
            return parse_superblock(block)
        if btype == DESCRIPTOR_BLOCK:
            if jsb is None:
                return DescriptorBlock(seq, (), None, None)
            return _parse_descriptor(block, seq, jsb)
        if btype == COMMIT_BLOCK:
            return _parse_commit(block, seq, jsb)
        if btype == REVOKE_BLOCK:
            return _parse_revoke(block, seq, jsb)
        return None
    except Exception:
        return None


def data_block_checksum(jsb: JournalSuperblock, sequence: int, data: bytes) -> int:
    """The checksum a descriptor tag holds for ``data`` in transaction ``sequence``.

    crc32c(seed, be32 sequence) then over the block; a csum v2 tag keeps the
    low 16 bits only.
    """
    csum = crc32c_raw(jsb.csum_seed, struct.pack(">I", sequence & 0xFFFFFFFF))
    csum = crc32c_raw(csum, bytes(data))
    return csum if jsb.csum_v3 else csum & 0xFFFF


def verify_data_block(jsb: JournalSuperblock, sequence: int, tag: BlockTag, data: bytes) -> bool | None:
    """Whether ``data`` (as logged, still escaped) matches ``tag``; None without csum v2/v3."""
    if not jsb.csum_v2v3:
        return None
    try:
        return data_block_checksum(jsb, sequence, data) == tag.checksum
    except Exception:
        return False


def detect(buf: bytes, offset: int = 0) -> JournalSuperblock | None:
    """A jbd2 journal superblock at ``buf[offset:]`` (the journal's first block), else None."""
    try:
        return parse_superblock(buf, offset)
    except Exception:
        return None


def walk(journal: bytes, jsb: JournalSuperblock | None = None, max_blocks: int = 1 << 20):
    """Yield ``(block_index, parsed)`` for the metadata blocks of a journal image.

    ``journal`` holds the whole journal (superblock first).  Scans linearly
    (not log-ordered) and skips data blocks that follow each descriptor,
    bounded by the journal length and ``max_blocks``.
    """
    if jsb is None:
        jsb = detect(journal)
        if jsb is None:
            return
    bs = jsb.blocksize
    n = min(len(journal) // bs, jsb.maxlen or 0, max_blocks)
    i = max(jsb.first, 1)
    while i < n:
        blk = parse_block(journal[i * bs:(i + 1) * bs], jsb)
        if blk is not None:
            yield i, blk
            if isinstance(blk, DescriptorBlock):
                i += len(blk.tags)
        i += 1
