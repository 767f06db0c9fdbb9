"""ext2/3/4 superblock (1024 bytes at byte offset 1024 of the filesystem)."""

from __future__ import annotations

from dataclasses import dataclass

from construct import Array, Bytes, Const, Int8ul, Int16sl, Int16ul, Int32ul, Int64ul, Padding, Struct

from ._common import crc32c_raw, cstr, flag_names, safe_parse, uuid_be

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53

Superblock = Struct(
    "s_inodes_count" / Int32ul,  # 0x00
    "s_blocks_count_lo" / Int32ul,
    "s_r_blocks_count_lo" / Int32ul,
    "s_free_blocks_count_lo" / Int32ul,
    "s_free_inodes_count" / Int32ul,  # 0x10
    "s_first_data_block" / Int32ul,
    "s_log_block_size" / Int32ul,
    "s_log_cluster_size" / Int32ul,
    "s_blocks_per_group" / Int32ul,  # 0x20
    "s_clusters_per_group" / Int32ul,
    "s_inodes_per_group" / Int32ul,
    "s_mtime" / Int32ul,
    "s_wtime" / Int32ul,  # 0x30
    "s_mnt_count" / Int16ul,
    "s_max_mnt_count" / Int16sl,
    "s_magic" / Const(MAGIC, Int16ul),  # 0x38
    "s_state" / Int16ul,
    "s_errors" / Int16ul,
    "s_minor_rev_level" / Int16ul,
    "s_lastcheck" / Int32ul,  # 0x40
    "s_checkinterval" / Int32ul,
    "s_creator_os" / Int32ul,
    "s_rev_level" / Int32ul,
    "s_def_resuid" / Int16ul,  # 0x50
    "s_def_resgid" / Int16ul,
    "s_first_ino" / Int32ul,
    "s_inode_size" / Int16ul,
    "s_block_group_nr" / Int16ul,
    "s_feature_compat" / Int32ul,  # 0x5C
    "s_feature_incompat" / Int32ul,  # 0x60
    "s_feature_ro_compat" / Int32ul,
    "s_uuid" / Bytes(16),  # 0x68
    "s_volume_name" / Bytes(16),  # 0x78
    "s_last_mounted" / Bytes(64),  # 0x88
    "s_algorithm_usage_bitmap" / Int32ul,  # 0xC8
    "s_prealloc_blocks" / Int8ul,
    "s_prealloc_dir_blocks" / Int8ul,
    "s_reserved_gdt_blocks" / Int16ul,
    "s_journal_uuid" / Bytes(16),  # 0xD0
    "s_journal_inum" / Int32ul,  # 0xE0
    "s_journal_dev" / Int32ul,
    "s_last_orphan" / Int32ul,
    "s_hash_seed" / Bytes(16),  # 0xEC
    "s_def_hash_version" / Int8ul,  # 0xFC
    "s_jnl_backup_type" / Int8ul,
    "s_desc_size" / Int16ul,
    "s_default_mount_opts" / Int32ul,  # 0x100
    "s_first_meta_bg" / Int32ul,
    "s_mkfs_time" / Int32ul,
    "s_jnl_blocks" / Array(17, Int32ul),  # 0x10C
    "s_blocks_count_hi" / Int32ul,  # 0x150
    "s_r_blocks_count_hi" / Int32ul,
    "s_free_blocks_count_hi" / Int32ul,
    "s_min_extra_isize" / Int16ul,  # 0x15C
    "s_want_extra_isize" / Int16ul,
    "s_flags" / Int32ul,  # 0x160
    "s_raid_stride" / Int16ul,
    "s_mmp_interval" / Int16ul,
    "s_mmp_block" / Int64ul,  # 0x168
    "s_raid_stripe_width" / Int32ul,  # 0x170
    "s_log_groups_per_flex" / Int8ul,
    "s_checksum_type" / Int8ul,  # 0x175
    Padding(2),
    "s_kbytes_written" / Int64ul,  # 0x178
    Padding(0x270 - 0x180),
    "s_checksum_seed" / Int32ul,  # 0x270
    Padding(0x3FC - 0x274),
    "s_checksum" / Int32ul,  # 0x3FC
)
assert Superblock.sizeof() == SUPERBLOCK_SIZE

# s_state
STATE_VALID = 0x0001  # cleanly unmounted
STATE_ERROR = 0x0002  # errors detected
STATE_ORPHAN = 0x0004

COMPAT = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
    0x10: "resize_inode", 0x20: "dir_index", 0x40: "lazy_bg", 0x80: "exclude_inode",
    0x100: "exclude_bitmap", 0x200: "sparse_super2", 0x400: "fast_commit",
    0x800: "stable_inodes", 0x1000: "orphan_file",
}
INCOMPAT = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev",
    0x10: "meta_bg", 0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg",
    0x400: "ea_inode", 0x1000: "dirdata", 0x2000: "metadata_csum_seed",
    0x4000: "large_dir", 0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold",
}
RO_COMPAT = {
    0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file",
    0x10: "uninit_bg", 0x20: "dir_nlink", 0x40: "extra_isize", 0x80: "snapshot",
    0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum", 0x800: "replica",
    0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks",
    0x8000: "verity", 0x10000: "orphan_present",
}
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_64BIT = 0x80
INCOMPAT_CSUM_SEED = 0x2000
RO_COMPAT_METADATA_CSUM = 0x400
CHECKSUM_TYPE_CRC32C = 1


@dataclass(frozen=True)
class Ext4Superblock:
    block_size: int
    blocks_count: int
    free_blocks_count: int
    inodes_count: int
    free_inodes_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    rev_level: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: str
    volume_name: str
    last_mounted: str
    state: int
    errors_behavior: int
    mnt_count: int
    mtime: int
    wtime: int
    journal_inum: int
    journal_dev: int
    journal_uuid: str
    jnl_blocks: tuple[int, ...]
    desc_size: int
    checksum_type: int
    checksum_seed: int
    checksum: int
    checksum_ok: bool | None  # None: no metadata_csum, nothing to check

    @property
    def features(self) -> frozenset[str]:
        return (flag_names(self.feature_compat, COMPAT)
                | flag_names(self.feature_incompat, INCOMPAT)
                | flag_names(self.feature_ro_compat, RO_COMPAT))

    @property
    def has_journal(self) -> bool:
        return bool(self.feature_compat & COMPAT_HAS_JOURNAL)

    @property
    def needs_recovery(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_RECOVER)

    @property
    def is_64bit(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_64BIT)

    @property
    def metadata_csum(self) -> bool:
        return bool(self.feature_ro_compat & RO_COMPAT_METADATA_CSUM)

    @property
    def clean(self) -> bool:
        """Cleanly unmounted (or never mounted) and no errors recorded."""
        return bool(self.state & STATE_VALID) and not self.state & STATE_ERROR

    @property
    def has_errors(self) -> bool:
        return bool(self.state & STATE_ERROR)

    @property
    def kind(self) -> str:
        """'ext2', 'ext3' or 'ext4', the way blkid tells them apart."""
        if self.feature_incompat & INCOMPAT_JOURNAL_DEV:
            return "jbd"
        ext4_incompat = self.feature_incompat & ~(0x2 | 0x4 | 0x10)  # filetype, recover, meta_bg
        ext4_ro = self.feature_ro_compat & ~(0x1 | 0x2 | 0x4)  # sparse_super, large_file, btree_dir
        if ext4_incompat or ext4_ro:
            return "ext4"
        return "ext3" if self.has_journal else "ext2"

    @property
    def size_bytes(self) -> int:
        return self.blocks_count * self.block_size


def superblock_checksum(raw: bytes) -> int:
    """ext4 superblock checksum: crc32c(~0, sb[0:0x3FC]) in the kernel's form."""
    return crc32c_raw(0xFFFFFFFF, bytes(raw[:0x3FC]))


def parse_superblock(raw: bytes, offset: int = 0) -> Ext4Superblock | None:
    """Parse a superblock at ``raw[offset:offset+1024]`` (magic checked)."""
    c = safe_parse(Superblock, raw, offset)
    if c is None or c.s_log_block_size > 6:  # 1 KiB .. 64 KiB
        return None
    inc = c.s_feature_incompat
    blocks = c.s_blocks_count_lo
    free = c.s_free_blocks_count_lo
    if inc & INCOMPAT_64BIT:
        blocks |= c.s_blocks_count_hi << 32
        free |= c.s_free_blocks_count_hi << 32
    ok = None
    if c.s_feature_ro_compat & RO_COMPAT_METADATA_CSUM:
        ok = superblock_checksum(raw[offset:offset + 0x3FC]) == c.s_checksum
    return Ext4Superblock(
        block_size=1024 << c.s_log_block_size,
        blocks_count=blocks,
        free_blocks_count=free,
        inodes_count=c.s_inodes_count,
        free_inodes_count=c.s_free_inodes_count,
        first_data_block=c.s_first_data_block,
        blocks_per_group=c.s_blocks_per_group,
        inodes_per_group=c.s_inodes_per_group,
        inode_size=c.s_inode_size if c.s_rev_level else 128,
        rev_level=c.s_rev_level,
        feature_compat=c.s_feature_compat,
        feature_incompat=inc,
        feature_ro_compat=c.s_feature_ro_compat,
        uuid=uuid_be(c.s_uuid),
        volume_name=cstr(c.s_volume_name, "utf-8"),
        last_mounted=cstr(c.s_last_mounted, "utf-8"),
        state=c.s_state,
        errors_behavior=c.s_errors,
        mnt_count=c.s_mnt_count,
        mtime=c.s_mtime,
        wtime=c.s_wtime,
        journal_inum=c.s_journal_inum,
        journal_dev=c.s_journal_dev,
        journal_uuid=uuid_be(c.s_journal_uuid),
        jnl_blocks=tuple(c.s_jnl_blocks),
        desc_size=c.s_desc_size,
        checksum_type=c.s_checksum_type,
        checksum_seed=c.s_checksum_seed,
        checksum=c.s_checksum,
        checksum_ok=ok,
    )


def detect(buf: bytes, offset: int = 0) -> Ext4Superblock | None:
    """Find an ext2/3/4 superblock in ``buf``.

    ``offset`` is where the filesystem starts in ``buf``; the superblock is
    read 1024 bytes after it.  A superblock whose metadata_csum checksum does
    not match is still returned (``checksum_ok`` False) so callers can tell a
    torn or forged write from garbage.
    """
    try:
        return parse_superblock(buf, offset + SUPERBLOCK_OFFSET)
    except Exception:
        return None
