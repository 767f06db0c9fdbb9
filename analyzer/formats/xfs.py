"""XFS superblock ('XFSB', big-endian) and log record header (0xFEEDBABE)."""

from __future__ import annotations

from dataclasses import dataclass

from construct import Array, Bytes, Const, Int8ub, Int16ub, Int32ub, Int32ul, Int64ub, Struct

from ._common import FastStruct, crc32c, cstr, safe_parse, uuid_be

SB_MAGIC = b"XFSB"
LOG_MAGIC = 0xFEEDBABE
BBSIZE = 512
HEADER_CYCLE_SIZE = 32 * 1024
SB_CRC_OFF = 224
VERSION_NUMBITS = 0x000F
VERSION_5 = 5

Superblock = Struct(
    "sb_magicnum" / Const(SB_MAGIC),
    "sb_blocksize" / Int32ub,
    "sb_dblocks" / Int64ub,
    "sb_rblocks" / Int64ub,
    "sb_rextents" / Int64ub,
    "sb_uuid" / Bytes(16),  # 32
    "sb_logstart" / Int64ub,  # 48
    "sb_rootino" / Int64ub,
    "sb_rbmino" / Int64ub,
    "sb_rsumino" / Int64ub,
    "sb_rextsize" / Int32ub,  # 80
    "sb_agblocks" / Int32ub,
    "sb_agcount" / Int32ub,
    "sb_rbmblocks" / Int32ub,
    "sb_logblocks" / Int32ub,  # 96
    "sb_versionnum" / Int16ub,  # 100
    "sb_sectsize" / Int16ub,
    "sb_inodesize" / Int16ub,
    "sb_inopblock" / Int16ub,
    "sb_fname" / Bytes(12),  # 108
    "sb_blocklog" / Int8ub,  # 120
    "sb_sectlog" / Int8ub,
    "sb_inodelog" / Int8ub,
    "sb_inopblog" / Int8ub,
    "sb_agblklog" / Int8ub,
    "sb_rextslog" / Int8ub,
    "sb_inprogress" / Int8ub,
    "sb_imax_pct" / Int8ub,
    "sb_icount" / Int64ub,  # 128
    "sb_ifree" / Int64ub,
    "sb_fdblocks" / Int64ub,
    "sb_frextents" / Int64ub,
    "sb_uquotino" / Int64ub,  # 160
    "sb_gquotino" / Int64ub,
    "sb_qflags" / Int16ub,  # 176
    "sb_flags" / Int8ub,
    "sb_shared_vn" / Int8ub,
    "sb_inoalignmt" / Int32ub,  # 180
    "sb_unit" / Int32ub,
    "sb_width" / Int32ub,
    "sb_dirblklog" / Int8ub,  # 192
    "sb_logsectlog" / Int8ub,
    "sb_logsectsize" / Int16ub,
    "sb_logsunit" / Int32ub,  # 196
    "sb_features2" / Int32ub,  # 200
    "sb_bad_features2" / Int32ub,
    "sb_features_compat" / Int32ub,  # 208
    "sb_features_ro_compat" / Int32ub,
    "sb_features_incompat" / Int32ub,
    "sb_features_log_incompat" / Int32ub,
    "sb_crc" / Int32ul,  # 224, little-endian like every XFS crc
    "sb_spino_align" / Int32ub,
    "sb_pquotino" / Int64ub,  # 232
    "sb_lsn" / Int64ub,  # 240
    "sb_meta_uuid" / Bytes(16),  # 248
)
assert Superblock.sizeof() == 264

LogRecordHeader = Struct(
    "h_magicno" / Const(LOG_MAGIC, Int32ub),
    "h_cycle" / Int32ub,
    "h_version" / Int32ub,
    "h_len" / Int32ub,
    "h_lsn" / Int64ub,
    "h_tail_lsn" / Int64ub,
    "h_crc" / Int32ul,  # offset 32, little-endian
    "h_prev_block" / Int32ub,
    "h_num_logops" / Int32ub,
    "h_cycle_data" / Array(HEADER_CYCLE_SIZE // BBSIZE, Int32ub),
    "h_fmt" / Int32ub,  # 300
    "h_fs_uuid" / Bytes(16),
    "h_size" / Int32ub,  # 320
)
assert LogRecordHeader.sizeof() == 324
_LOG_HEADER = FastStruct(LogRecordHeader)  # parsed for every record of every log write
LOG_CRC_OFF = 32
EXT_HEADER_SIZE = 4 + 4 * (HEADER_CYCLE_SIZE // BBSIZE)  # xlog_rec_ext_header
MAX_LOG_RECORD = 256 * 1024  # XLOG_MAX_RECORD_BSIZE

FMT_LINUX_LE = 1
FMT_LINUX_BE = 2
FMT_IRIX_BE = 3


@dataclass(frozen=True)
class XFSSuperblock:
    blocksize: int
    dblocks: int
    uuid: str
    meta_uuid: str
    logstart: int  # fsblock of the internal log; 0 = external log device
    logblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    sectsize: int
    inodesize: int
    label: str
    version: int  # 4 or 5
    icount: int
    ifree: int
    fdblocks: int
    features_compat: int
    features_ro_compat: int
    features_incompat: int
    features_log_incompat: int
    inprogress: bool
    lsn: int
    crc: int
    crc_ok: bool | None  # None on v4 (no CRCs)

    @property
    def has_crc(self) -> bool:
        return self.version == VERSION_5

    @property
    def internal_log(self) -> bool:
        return self.logstart != 0

    def fsb_to_byte(self, fsbno: int) -> int:
        """Byte offset (within the filesystem) of filesystem block ``fsbno``."""
        agno = fsbno >> self.agblklog
        agbno = fsbno & ((1 << self.agblklog) - 1)
        return (agno * self.agblocks + agbno) * self.blocksize

    @property
    def log_offset(self) -> int | None:
        return self.fsb_to_byte(self.logstart) if self.logstart else None

    @property
    def log_size(self) -> int:
        return self.logblocks * self.blocksize


@dataclass(frozen=True)
class LogRecord:
    cycle: int
    version: int
    len: int  # bytes of log data after the header block(s)
    lsn: int
    tail_lsn: int
    crc: int
    prev_block: int
    num_logops: int
    fmt: int
    fs_uuid: str
    size: int  # in-core log buffer size (v2 logs)
    header_blocks: int  # 512-byte blocks before the data
    crc_ok: bool | None  # None: data not in the buffer, cannot check

    @property
    def lsn_cycle(self) -> int:
        return self.lsn >> 32

    @property
    def lsn_block(self) -> int:
        return self.lsn & 0xFFFFFFFF


def parse_superblock(buf: bytes, offset: int = 0) -> XFSSuperblock | None:
    c = safe_parse(Superblock, buf, offset)
    if c is None:
        return None
    bs, ss = c.sb_blocksize, c.sb_sectsize
    if not (512 <= bs <= 65536 and bs & (bs - 1) == 0 and bs == 1 << c.sb_blocklog):
        return None
    if not (512 <= ss <= 32768 and ss & (ss - 1) == 0) or c.sb_agblklog > 31:
        return None
    version = c.sb_versionnum & VERSION_NUMBITS
    ok = None
    if version == VERSION_5:
        raw = bytearray(buf[offset:offset + ss])
        if len(raw) == ss:
            raw[SB_CRC_OFF:SB_CRC_OFF + 4] = b"\0\0\0\0"
            ok = crc32c(bytes(raw)) == c.sb_crc
        else:
            ok = False
    return XFSSuperblock(
        blocksize=bs,
        dblocks=c.sb_dblocks,
        uuid=uuid_be(c.sb_uuid),
        meta_uuid=uuid_be(c.sb_meta_uuid) if version == VERSION_5 else uuid_be(c.sb_uuid),
        logstart=c.sb_logstart,
        logblocks=c.sb_logblocks,
        agblocks=c.sb_agblocks,
        agcount=c.sb_agcount,
        agblklog=c.sb_agblklog,
        sectsize=ss,
        inodesize=c.sb_inodesize,
        label=cstr(c.sb_fname, "utf-8"),
        version=version,
        icount=c.sb_icount,
        ifree=c.sb_ifree,
        fdblocks=c.sb_fdblocks,
        features_compat=c.sb_features_compat,
        features_ro_compat=c.sb_features_ro_compat,
        features_incompat=c.sb_features_incompat,
        features_log_incompat=c.sb_features_log_incompat,
        inprogress=bool(c.sb_inprogress),
        lsn=c.sb_lsn,
        crc=c.sb_crc,
        crc_ok=ok,
    )


def _log_crc(buf: bytes, offset: int, hdr_size: int, xheads: int, data: bytes) -> int:
    """xlog_cksum(): crc32c over header (crc zeroed), extended headers, data."""
    raw = bytearray(buf[offset:offset + hdr_size])
    raw[LOG_CRC_OFF:LOG_CRC_OFF + 4] = b"\0\0\0\0"
    crc = crc32c(bytes(raw)) ^ 0xFFFFFFFF  # running (uninverted) value
    for i in range(1, xheads):
        p = offset + i * BBSIZE
        crc = crc32c(bytes(buf[p:p + EXT_HEADER_SIZE]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return crc32c(data, crc ^ 0xFFFFFFFF)


def parse_log_record(buf: bytes, offset: int = 0) -> LogRecord | None:
    """Parse an XFS log record header at ``buf[offset:]`` (a 512-byte block).

    When the record's data (``h_len`` bytes after its header blocks) is in
    ``buf``, ``crc_ok`` tells whether ``h_crc`` matches.  The CRC covers the
    header as laid out by the compiler: 328 bytes on 64-bit hosts, 324 on
    i386; both are accepted, as the kernel's log recovery does.  ``h_crc`` 0
    means "not checksummed" (mkfs.xfs writes such headers) and gives
    ``crc_ok`` None, as the kernel only warns about those.
    """
    c = _LOG_HEADER.parse(buf, offset)
    if c is None or c.h_version not in (1, 2) or c.h_len > MAX_LOG_RECORD:
        return None
    hblks = 1
    if c.h_version == 2 and c.h_size > HEADER_CYCLE_SIZE:
        if c.h_size > MAX_LOG_RECORD:
            return None
        hblks = -(-c.h_size // HEADER_CYCLE_SIZE)
    ok = None
    start = offset + hblks * BBSIZE
    if c.h_crc != 0 and start + c.h_len <= len(buf):
        data = bytes(buf[start:start + c.h_len])
        xheads = -(-c.h_len // HEADER_CYCLE_SIZE) if c.h_version == 2 else 1
        xheads = min(xheads, hblks)
        ok = any(_log_crc(buf, offset, n, xheads, data) == c.h_crc for n in (328, 324))
    return LogRecord(
        cycle=c.h_cycle, version=c.h_version, len=c.h_len, lsn=c.h_lsn,
        tail_lsn=c.h_tail_lsn, crc=c.h_crc, prev_block=c.h_prev_block,
        num_logops=c.h_num_logops, fmt=c.h_fmt, fs_uuid=uuid_be(c.h_fs_uuid),
        size=c.h_size, header_blocks=hblks, crc_ok=ok,
    )


def detect(buf: bytes, offset: int = 0) -> XFSSuperblock | None:
    """The primary XFS superblock at ``buf[offset:]`` (start of the fs), else None."""
    try:
        return parse_superblock(buf, offset)
    except Exception:
        return None


def detect_log_record(buf: bytes, offset: int = 0) -> LogRecord | None:
    try:
        return parse_log_record(buf, offset)
    except Exception:
        return None


def iter_log_records(log: bytes, max_records: int = 4096):
    """Yield ``(offset, LogRecord)`` walking a log region record after record.

    Stops at the first block that is not a record header, at the first
    empty header (cycle 0, as mkfs.xfs fills the log with), or after
    ``max_records``.
    """
    off = 0
    for _ in range(max_records):
        r = detect_log_record(log, off)
        if r is None or r.cycle == 0:
            return
        yield off, r
        off += r.header_blocks * BBSIZE + ((r.len + BBSIZE - 1) // BBSIZE) * BBSIZE


