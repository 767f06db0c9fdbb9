"""Per-filesystem trackers: where the journal / log lives and which writes
make a filesystem-consistent point.

Each tracker is told about every write (``on_write``) and flush
(``on_flush``) and appends :class:`~analyzer.events.Event` objects to the
list it is given.  A tracker only looks at writes that touch the regions it
knows (the journal, the log, the superblock); everything else costs one
range comparison.
"""
from __future__ import annotations

import struct

from . import events as ev
from .formats import ext4, jbd2, ntfs, xfs

MAX_PENDING_BYTES = 64 << 20  # journal blocks kept while their transaction is open
MAX_PENDING_TX = 256


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class Tracker:
    fstype = "?"

    def __init__(self, offset: int):
        self.offset = offset
        self.mounted: bool | None = None
        self.regions: list[tuple[int, int]] = []  # byte ranges not to count as file data

    def on_write(self, seq, t, off, data, out) -> None: ...

    def on_flush(self, seq, t, out) -> None: ...

    def _ev(self, kind, seq, t, label, **detail) -> ev.Event:
        return ev.Event(kind, seq, t, self.offset, self.fstype, label, detail)


# ----------------------------------------------------------------- ext2/3/4
def journal_extents(sb: ext4.Ext4Superblock) -> list[tuple[int, int, int]] | None:
    """(logical, physical, length) of the internal journal from s_jnl_blocks (depth-0 extents)."""
    words = sb.jnl_blocks[:15]
    if len(words) < 15:
        return None
    raw = struct.pack("<15I", *words)
    magic, entries, _max, depth = struct.unpack_from("<HHHH", raw, 0)
    if magic != 0xF30A or depth != 0 or not 1 <= entries <= 4:
        return None
    out = []
    for i in range(entries):
        lblk, ln, hi, lo = struct.unpack_from("<IHHI", raw, 12 + 12 * i)
        if ln > 32768:  # uninitialised extent
            ln -= 32768
        out.append((lblk, (hi << 32) | lo, ln))
    return out


class Ext4(Tracker):
    def __init__(self, offset: int, sb: ext4.Ext4Superblock):
        super().__init__(offset)
        self.fstype = sb.kind
        self.sb = sb
        self.bs = sb.block_size
        self.jsb: jbd2.JournalSuperblock | None = None
        self.jext = (journal_extents(sb) or []) if sb.has_journal and sb.journal_inum else []
        # physical byte ranges of the journal: (start, end, first logical block)
        self.jranges = [(offset + p * self.bs, offset + (p + n) * self.bs, lg) for lg, p, n in self.jext]
        self.regions = [(s, e) for s, e, _ in self.jranges]
        self.blocks: dict[int, tuple[int, bytes]] = {}  # journal block -> (write seq, content)
        self.pending_bytes = 0
        self.commits: dict[int, int] = {}  # tid -> journal block of its commit
        self.open_tx: dict[int, int] = {}  # tid -> commit position, awaiting its blocks
        self.start_hint: tuple[int, int] | None = None  # (tid, block) from the journal superblock
        self.ready: list[tuple[int, int]] = []  # (tid, seq of its last block) complete, awaiting a flush
        self.clean_pending: int | None = None
        self.last_tid: int | None = None
        self.mounted = None if sb.needs_recovery is None else sb.needs_recovery

    @property
    def uuid(self) -> str:
        return self.sb.uuid

    def update_sb(self, seq, t, sb: ext4.Ext4Superblock, out) -> None:
        was = self.mounted
        self.sb = sb
        now = sb.needs_recovery
        if now and was is not True:
            out.append(self._ev(ev.MOUNT, seq, t, f"{self.fstype} mounted", uuid=sb.uuid))
        elif not now and was:
            out.append(self._ev(ev.UNMOUNT, seq, t, f"{self.fstype} unmounted cleanly", uuid=sb.uuid))
            if sb.clean:
                self.clean_pending = seq
        self.mounted = now

    # journal geometry
    def _next(self, p: int) -> int:
        p += 1
        j = self.jsb
        return j.first if j and p >= j.maxlen else p

    def on_write(self, seq, t, off, data, out) -> None:
        end = off + len(data)
        for s, e, lg in self.jranges:
            if not _overlap(off, end, s, e):
                continue
            lo = max(off, s)
            hi = min(end, e)
            first = lo - (lo - s) % self.bs
            touched = False
            for b in range(first, hi, self.bs):
                if b < off or b + self.bs > end:
                    continue  # partial journal block: ignore
                jb = lg + (b - s) // self.bs
                blk = bytes(data[b - off:b - off + self.bs])
                self._journal_block(seq, t, jb, blk, out)
                touched = True
            if touched:
                self._retry(out)

    def _journal_block(self, seq, t, jb, blk, out) -> None:
        if jb == 0:
            js = jbd2.detect(blk)
            if js is not None and js.checksum_ok is not False:
                self.jsb = js
                if js.start:
                    self.start_hint = (js.sequence, js.start)
                if not js.start and self.clean_pending is None and self.mounted is False:
                    self.clean_pending = seq
            return
        old = self.blocks.get(jb)
        if old is not None:
            self.pending_bytes -= len(old[1])
        self.blocks[jb] = (seq, blk)
        self.pending_bytes += len(blk)
        if self.jsb is None or blk[:4] != b"\xc0\x3b\x39\x98":
            self._trim()
            return
        parsed = jbd2.parse_block(blk, self.jsb)
        if isinstance(parsed, jbd2.CommitBlock) and parsed.checksum_ok is not False:
            self.commits[parsed.sequence] = jb
            self.open_tx[parsed.sequence] = jb
            if len(self.open_tx) > MAX_PENDING_TX:
                self.open_tx.pop(min(self.open_tx))
        self._trim()

    def _trim(self) -> None:
        if self.pending_bytes <= MAX_PENDING_BYTES:
            return
        for jb in sorted(self.blocks, key=lambda k: self.blocks[k][0]):
            self.pending_bytes -= len(self.blocks.pop(jb)[1])
            if self.pending_bytes <= MAX_PENDING_BYTES // 2:
                break

    def _tx_start(self, tid: int, commit_pos: int) -> int | None:
        """Journal block where transaction ``tid`` starts, if we can know it.

        Either right after the commit of ``tid - 1``, itself verified (journal
        recovery stops at the first transaction that does not verify, so a
        later one is only replayable when the chain before it holds), or where
        the journal superblock says recovery starts."""
        if self.start_hint and self.start_hint[0] == tid:
            return self.start_hint[1]
        prev = self.commits.get(tid - 1)
        if prev is not None and self.last_tid == tid - 1:
            return self._next(prev)
        return None

    def _verify(self, tid: int, commit_pos: int) -> int | None:
        """Seq of the last write of a complete transaction, or None while incomplete.

        Complete: from its start to its commit, every descriptor and revoke
        block of this tid is present with a valid checksum and every logged
        block a descriptor announces is present (and matches its tag's
        checksum with csum v2/v3).
        """
        j = self.jsb
        p = self._tx_start(tid, commit_pos)
        if j is None or p is None:
            return None
        last = self.blocks[commit_pos][0] if commit_pos in self.blocks else None
        if last is None:
            return None
        for _ in range(j.maxlen):
            if p == commit_pos:
                return last
            got = self.blocks.get(p)
            if got is None:
                return None
            last = max(last, got[0])
            b = jbd2.parse_block(got[1], j)
            if getattr(b, "sequence", None) != tid or getattr(b, "checksum_ok", None) is False:
                return None
            if isinstance(b, jbd2.DescriptorBlock):
                for tag in b.tags:
                    p = self._next(p)
                    d = self.blocks.get(p)
                    if d is None or jbd2.verify_data_block(j, tid, tag, d[1]) is False:
                        return None
                    last = max(last, d[0])
            elif not isinstance(b, jbd2.RevokeBlock):
                return None
            p = self._next(p)
        return None

    def _retry(self, out) -> None:
        for tid in sorted(self.open_tx):
            last = self._verify(tid, self.open_tx[tid])
            if last is None:
                continue
            del self.open_tx[tid]
            self.ready.append((tid, last))
            self.last_tid = tid
            # the transaction's blocks are no longer needed
            j = self.jsb
            p = self._tx_start(tid, self.commits[tid])
            while p is not None and p != self.commits[tid]:
                got = self.blocks.pop(p, None)
                if got is not None:
                    self.pending_bytes -= len(got[1])
                p = self._next(p)
            if j is not None:
                self.start_hint = (tid + 1, self._next(self.commits[tid]))
            for old in [k for k in self.commits if k < tid - 1]:
                del self.commits[old]

    def on_flush(self, seq, t, out) -> None:
        done = [r for r in self.ready if r[1] < seq]
        if done:
            self.ready = [r for r in self.ready if r[1] >= seq]
            tids = [d[0] for d in done]
            out.append(self._ev(ev.FS_CONSISTENT, seq, t, f"{self.fstype} jbd2 commit tid {tids[-1]}",
                                reason="jbd2_commit", tids=tids, uuid=self.sb.uuid))
        elif self.clean_pending is not None and self.clean_pending < seq:
            out.append(self._ev(ev.FS_CONSISTENT, seq, t, f"{self.fstype} clean unmount",
                                reason="clean_unmount", uuid=self.sb.uuid))
        if self.clean_pending is not None and self.clean_pending < seq:
            self.clean_pending = None


# ----------------------------------------------------------------- XFS
XLOG_COMMIT_TRANS = 0x02
XLOG_UNMOUNT_TRANS = 0x20
_LOG_MAGIC = b"\xfe\xed\xba\xbe"


def _unstamp(buf: bytes, rec_off: int, r: xfs.LogRecord) -> bytearray | None:
    """The record's data with the cycle-stamped first word of every 512-byte block restored."""
    start = rec_off + r.header_blocks * 512
    data = bytearray(buf[start:start + r.len])
    if len(data) != r.len:
        return None
    for i in range(0, (r.len + 511) // 512):
        if i < 64:
            at = rec_off + 44 + 4 * i
        else:
            j, k = divmod(i, 64)
            at = rec_off + j * 512 + 4 + 4 * k
            if j >= r.header_blocks:
                return None
        data[i * 512:i * 512 + 4] = buf[at:at + 4]
    return data


def log_ops(data: bytes, n: int) -> list[tuple[int, int, int]]:
    """(tid, clientid, flags) of the op headers in a record's data (at most ``n``)."""
    ops, pos = [], 0
    while pos + 12 <= len(data) and len(ops) < n:
        tid, ln, cid, flags = struct.unpack_from(">IIBB", data, pos)
        ops.append((tid, cid, flags))
        pos += 12 + ln
    return ops


class XFS(Tracker):
    fstype = "xfs"

    def __init__(self, offset: int, sb: xfs.XFSSuperblock):
        super().__init__(offset)
        self.sb = sb
        lo = sb.log_offset
        self.log = (offset + lo, offset + lo + sb.log_size) if lo is not None else None
        self.regions = [self.log] if self.log else []
        self.partial: dict[int, bytearray] = {}  # record byte offset -> assembled bytes so far
        self.commit_pending: int | None = None  # seq of the write with the last commit record
        self.broken = False  # a record failed its CRC: commits are not recoverable past it
        self.unmount_pending: int | None = None
        self.records = 0

    @property
    def uuid(self) -> str:
        return self.sb.uuid

    def update_sb(self, seq, t, sb, out) -> None:
        self.sb = sb

    def on_write(self, seq, t, off, data, out) -> None:
        if not self.log or not _overlap(off, off + len(data), *self.log):
            return
        buf = bytes(data)
        # continue records split over several writes
        for roff in list(self.partial):
            part = self.partial[roff]
            if off == roff + len(part):
                part += buf
                r = xfs.detect_log_record(bytes(part), 0)
                if r is not None and r.crc_ok is not None:
                    del self.partial[roff]
                    self._record(seq, t, bytes(part), 0, r, out)
                elif len(part) > xfs.MAX_LOG_RECORD + xfs.HEADER_CYCLE_SIZE:
                    del self.partial[roff]
                return
        pos = buf.find(_LOG_MAGIC)
        while pos != -1:
            if pos % 512 == 0:
                r = xfs.detect_log_record(buf, pos)
                if r is not None and r.cycle:
                    if r.crc_ok is None and r.crc != 0:
                        self.partial[off + pos] = bytearray(buf[pos:])
                        if len(self.partial) > 16:
                            self.partial.pop(next(iter(self.partial)))
                        return
                    self._record(seq, t, buf, pos, r, out)
                    pos += r.header_blocks * 512 + ((r.len + 511) // 512) * 512
                    pos = buf.find(_LOG_MAGIC, pos)
                    continue
            pos = buf.find(_LOG_MAGIC, pos + 4)

    def _record(self, seq, t, buf, pos, r, out) -> None:
        if r.crc_ok is False:
            # log recovery fails on a bad record before the head: no commit is
            # consistent again until a clean unmount record
            self.broken = True
            self.commit_pending = None
            return
        if r.crc_ok is None and self.sb.has_crc:
            return  # an unchecksummed record on a v5 log: mkfs's, not the kernel's
        data = _unstamp(buf, pos, r)
        if data is None:
            return
        self.records += 1
        flags = 0
        for _tid, _cid, f in log_ops(data, r.num_logops):
            flags |= f
        if self.mounted is not True and not flags & XLOG_UNMOUNT_TRANS:
            self.mounted = True
            out.append(self._ev(ev.MOUNT, seq, t, "xfs mounted (log active)", uuid=self.sb.uuid))
        if flags & XLOG_UNMOUNT_TRANS:
            self.unmount_pending = seq
            self.broken = False
            if self.mounted is not False:
                out.append(self._ev(ev.UNMOUNT, seq, t, "xfs unmount record", uuid=self.sb.uuid))
            self.mounted = False
        elif flags & XLOG_COMMIT_TRANS and not self.broken:
            self.commit_pending = seq

    def on_flush(self, seq, t, out) -> None:
        if self.unmount_pending is not None and self.unmount_pending < seq:
            out.append(self._ev(ev.FS_CONSISTENT, seq, t, "xfs clean unmount",
                                reason="clean_unmount", uuid=self.sb.uuid))
            self.unmount_pending = self.commit_pending = None
        elif self.commit_pending is not None and self.commit_pending < seq:
            out.append(self._ev(ev.FS_CONSISTENT, seq, t, "xfs log commit",
                                reason="xfs_log_commit", uuid=self.sb.uuid))
            self.commit_pending = None


# ----------------------------------------------------------------- NTFS
class NTFS(Tracker):
    fstype = "ntfs"

    def __init__(self, offset: int, boot: ntfs.NTFSBoot):
        super().__init__(offset)
        self.boot = boot
        self.end = offset + boot.size_bytes
        self.restart_pending: int | None = None
        self.clean: bool | None = None

    @property
    def uuid(self) -> str:
        return f"{self.boot.volume_serial_number:016x}"

    def update_sb(self, seq, t, boot, out) -> None:
        self.boot = boot

    def on_write(self, seq, t, off, data, out) -> None:
        if not _overlap(off, off + len(data), self.offset, self.end):
            return
        buf = bytes(data)
        for magic in (b"RSTR", b"CHKD"):
            pos = buf.find(magic)
            while pos != -1:
                if (off + pos - self.offset) % 512 == 0:
                    pg = ntfs.detect_logfile_page(buf, pos)
                    if isinstance(pg, ntfs.RestartPage) and pg.usa_ok:
                        self.restart_pending = seq
                        if pg.clean is not None and pg.clean != self.clean:
                            kind = ev.UNMOUNT if pg.clean else ev.MOUNT
                            out.append(self._ev(kind, seq, t, f"ntfs {'clean' if pg.clean else 'in use'}"))
                            self.clean = pg.clean
                pos = buf.find(magic, pos + 4)

    def on_flush(self, seq, t, out) -> None:
        if self.restart_pending is not None and self.restart_pending < seq:
            out.append(self._ev(ev.FS_CONSISTENT, seq, t, "ntfs restart area update",
                                reason="ntfs_restart", clean=self.clean))
            self.restart_pending = None
