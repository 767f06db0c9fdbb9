"""The streaming analyzer of one VBD: feed it the mirrored writes in order.

    a = VbdAnalyzer()
    for rec in stream:
        events = a.feed(seq, time_ns, sector, data) if write else a.flush(seq, time_ns)

It learns the layout from the writes themselves (a partition table, with the
logical partitions of an MBR extended partition, then the superblocks at each
partition start, then where the jbd2 journal or the XFS log lives; an LVM PV's
VG metadata, then the filesystem in each linear LV, tracked in LV offsets:
:mod:`analyzer.lvm_layout`), so it is useful from the first write; ``learn(read)`` lets it
also look at the disk as it was before the stream (the replica), and
``read_old`` lets the encryption detector compare a write with what the same
block held before.  Events are :class:`analyzer.events.Event`.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import replace

from . import events as ev
from . import lvm_layout
from .detector import DetectorConfig, EncryptionDetector
from .formats import ext4, gpt, luks, lvm, mbr, ntfs, swap, xfs
from .fstrack import NTFS, XFS, Ext4

HEAD = 64 << 10  # bytes watched at the start of the disk and of every partition
MAX_PARTITIONS = 128  # partitions watched (a hostile table may list thousands)
MAX_PVS = 16  # LVM PVs watched (at the disk start and partition starts)
MAX_NOTES = 32
MAX_EBRS = 64  # logical partitions followed in an MBR's extended partition


class VbdAnalyzer:
    def __init__(self, name: str = "vbd", *, sector_size: int = 512, size: int | None = None,
                 detector: DetectorConfig | None = None, read_old=None):
        self.name = name
        self.sector_size = sector_size
        self.size = size
        self.detector = EncryptionDetector(detector, read_old)
        self.heads: dict[int, bytearray] = {0: bytearray(HEAD)}  # start -> first HEAD bytes seen
        self.head_end: dict[int, int | None] = {0: size}
        self.found: dict[int, tuple[str, str]] = {}  # start -> (type, identity)
        self.trackers: dict[int, object] = {}
        self.partitions: list[dict] = []
        self._primary: tuple[str, list] = ("mbr", [])
        self._logical: list[tuple[int, int, str]] = []
        # MBR extended partition: its start, the EBRs of its chain as written, and
        # recent sectors that looked like boot records (an EBR may come before the MBR)
        self.ext_base: int | None = None
        self.ebrs: dict[int, bytearray] = {}
        self._bootsecs: dict[int, bytes] = {}
        self.consistent: list[tuple[int, int, str]] = []  # (seq, time_ns, label)
        self._cseqs: list[int] = []
        # LVM: PVs whose metadata area is watched, and the LVs it maps ("vg/lv" -> LvSpace)
        self.pvs: dict[int, lvm_layout.PvWatch] = {}
        self.lvs: dict[str, lvm_layout.LvSpace] = {}
        self.lvm_notes: list[str] = []
        self.lvm_stats = {"metadata_parsed": 0, "metadata_bad": 0, "metadata_checksum_bad": 0,
                          "mda_unsupported": 0, "lv_limit": 0}
        self.alarm: ev.Event | None = None
        self.last_seq = -1
        self.writes = 0
        self.bytes = 0
        self.flushes = 0

    # ------------------------------------------------------------ input
    def feed(self, seq: int, time_ns: int, sector: int, data) -> list[ev.Event]:
        """One completed write, in stream order; returns the events it caused."""
        out: list[ev.Event] = []
        off = sector * self.sector_size
        end = off + len(data)
        self.last_seq = seq
        self.writes += 1
        self.bytes += len(data)
        if data[510:512] == b"\x55\xaa" and off < (1 << 62):
            self._bootsecs[off] = bytes(data[:512])
            if len(self._bootsecs) > MAX_EBRS:
                self._bootsecs.pop(next(iter(self._bootsecs)))
        if self.ebrs:
            for e0 in list(self.ebrs):
                buf = self.ebrs.get(e0)
                if buf is not None and off < e0 + 512 and e0 < end:
                    lo, hi = max(off, e0), min(end, e0 + 512)
                    buf[lo - e0:hi - e0] = data[lo - off:hi - off]
                    self._ebr_chain(seq, time_ns, out)
        for start in list(self.heads):
            if off < start + HEAD and start < end:
                self._update_head(seq, time_ns, start, off, data, out)
        if self.pvs:
            for pw in list(self.pvs.values()):
                if pw.on_write(off, data):
                    self._lvm_layout(seq, time_ns, pw, out)
        for tr in self.trackers.values():
            tr.on_write(seq, time_ns, off, data, out)
        if self.lvs:
            for lv in list(self.lvs.values()):
                ps = lv.pieces(off, len(data))
                if ps:
                    self._lv_write(seq, time_ns, lv, ps, data, out)
        s = self.detector.add(seq, time_ns, off, data)
        if s is not None:
            self._alarm(s, seq, time_ns, out)
        return out

    def flush(self, seq: int, time_ns: int) -> list[ev.Event]:
        """A flush marker: everything written before it is durable."""
        out: list[ev.Event] = []
        self.last_seq = seq
        self.flushes += 1
        if self.detector._nblocks >= 64:
            s = self.detector.process()
            if s is not None:
                self._alarm(s, seq, time_ns, out)
        for tr in self.trackers.values():
            tr.on_flush(seq, time_ns, out)
        for lv in self.lvs.values():
            if lv.tracker is not None:
                sub: list[ev.Event] = []
                lv.tracker.on_flush(seq, time_ns, sub)
                if sub:
                    out += self._lv_events(lv, sub)
        for e in out:
            if e.consistent:
                self.consistent.append((e.seq, e.time_ns, e.label))
                self._cseqs.append(e.seq)
        return out

    def finish(self) -> list[ev.Event]:
        """Analyse what is still queued (end of a trace, or idle)."""
        out: list[ev.Event] = []
        s = self.detector.process()
        if s is not None:
            self._alarm(s, self.last_seq, 0, out)
        return out

    def learn(self, read) -> list[ev.Event]:
        """Look at the disk as it is (``read(offset, length) -> bytes``) before the stream."""
        out: list[ev.Event] = []
        done: set[int] = set()
        while True:
            todo = [s for s in self.heads if s not in done]
            ebrs = [e for e in self.ebrs if -1 - e not in done]
            if not todo and not ebrs:
                break
            for e0 in ebrs:
                done.add(-1 - e0)
                if e0 in self.ebrs:  # (still in the chain)
                    self.ebrs[e0][:] = (read(e0, 512) or b"").ljust(512, b"\0")[:512]
                    self._ebr_chain(-1, 0, out)
            for start in todo:
                done.add(start)
                buf = read(start, HEAD) or b""
                self._update_head(-1, 0, start, start, buf, out)
        for pw in list(self.pvs.values()):
            if pw.mda is not None:
                m0, m1 = pw.mda
                if pw.on_write(m0, (read(m0, m1 - m0) or b"").ljust(m1 - m0, b"\0")):
                    self._lvm_layout(-1, 0, pw, out)
        for lv in list(self.lvs.values()):
            sub: list[ev.Event] = []
            lv.head[:] = lv.read(read, 0, HEAD)
            self._identify_lv(-1, 0, lv, sub)
            if isinstance(lv.tracker, Ext4):
                self._learn_jsb(lambda o, n, lv=lv: lv.read(read, o, n), lv.tracker, sub)
            out += self._lv_events(lv, sub)
        for tr in list(self.trackers.values()):
            self._learn_jsb(read, tr, out)
        return out

    @staticmethod
    def _learn_jsb(read, tr, out) -> None:
        if isinstance(tr, Ext4) and tr.jranges:
            s, _e, lg = tr.jranges[0]
            if lg == 0:
                blk = read(s, tr.bs) or b""
                tr._journal_block(-1, 0, 0, bytes(blk), out)

    # ------------------------------------------------------------ layout
    def _update_head(self, seq, t, start, off, data, out) -> None:
        head = self.heads[start]
        lo = max(off, start)
        hi = min(off + len(data), start + HEAD)
        head[lo - start:hi - start] = data[lo - off:hi - off]
        self._identify(seq, t, start, bytes(head), out)

    @staticmethod
    def _probe(buf):
        """(kind, parsed header) of what starts ``buf``, or (None, None)."""
        for name, probe in (("luks", luks.detect), ("lvm2_pv", lvm.detect), ("swap", swap.detect),
                            ("xfs", xfs.detect), ("ext4", ext4.detect), ("ntfs", ntfs.detect)):
            try:
                obj = probe(buf, 0)
            except Exception:
                obj = None
            if obj is None:
                continue
            if getattr(obj, "checksum_ok", None) is False or getattr(obj, "crc_ok", None) is False:
                continue
            return (obj.kind if name == "ext4" else name), obj
        return None, None

    @staticmethod
    def _ident(kind, obj) -> str:
        if kind == "ntfs":
            return f"{obj.volume_serial_number:016x}"
        return getattr(obj, "uuid", None) or ""

    @staticmethod
    def _tracker(kind, obj, start):
        """(tracker or None, event detail) for a filesystem found at ``start``."""
        detail = {}
        tr = None
        if kind in ("ext2", "ext3", "ext4", "jbd"):
            tr = Ext4(start, obj)
            detail.update(block_size=obj.block_size, size=obj.size_bytes, journal=bool(tr.jranges),
                          journal_offset=tr.jranges[0][0] if tr.jranges else None)
        elif kind == "xfs":
            tr = XFS(start, obj)
            detail.update(block_size=obj.blocksize, size=obj.dblocks * obj.blocksize,
                          log_offset=tr.log[0] if tr.log else None)
        elif kind == "ntfs":
            tr = NTFS(start, obj)
            detail.update(cluster_size=obj.cluster_size, size=obj.size_bytes)
        elif kind == "luks":
            detail.update(version=type(obj).__name__)
        return tr, detail

    def _identify(self, seq, t, start, buf, out) -> None:
        if start == 0:
            g = gpt.detect(buf, self.sector_size)
            m = None if g else mbr.detect(buf)
            parts = []
            if g is not None and g.partitions:
                parts = [(p.first_lba * self.sector_size, (p.last_lba + 1) * self.sector_size, p.type_name)
                         for p in g.partitions]
            elif m is not None and not m.protective:
                parts = [(p.lba_first * self.sector_size, p.lba_end * self.sector_size, p.type_name)
                         for p in m.partitions if not p.is_extended]
                ext = next((p for p in m.partitions if p.is_extended), None)
                base = None if ext is None else ext.lba_first * self.sector_size
                if base != self.ext_base:
                    self.ext_base = base
                    self.ebrs = {} if base is None else {base: bytearray(self._bootsecs.get(base, bytes(512)))}
                    self._logical = []
                    if base is not None:
                        self._ebr_chain(seq, t, None)
            if parts or self._logical:
                self._primary = ("gpt" if g else "mbr", parts)
                self._partitions(seq, t, "gpt" if g else "mbr", parts + self._logical, out)
        kind, obj = self._probe(buf)
        if kind is None:
            return
        ident = self._ident(kind, obj)
        prev = self.found.get(start)
        if prev == (kind, ident):
            tr = self.trackers.get(start)
            if tr is not None:
                tr.update_sb(seq, t, obj, out)
            return
        self.found[start] = (kind, ident)
        tr, detail = self._tracker(kind, obj, start)
        detail = {"uuid": ident, **detail}
        if start in self.pvs:
            self._drop_pv(start)
        if kind == "lvm2_pv" and len(self.pvs) < MAX_PVS:
            self.pvs[start] = lvm_layout.PvWatch(start, obj, self.lvm_stats)
            detail.update(pv_uuid=obj.pv_uuid_dashed, pe_start=start + obj.data_areas[0][0] if obj.data_areas
                          else None)
        if kind == "luks":
            end = self.head_end.get(start)
            self.detector.exclude(start, end if end is not None else 1 << 62)
            out.append(ev.Event(ev.VOLUME_ENCRYPTED, seq, t, start, kind,
                                f"LUKS volume at {start}: encrypted as a whole, not alarmed on", detail))
        if tr is not None:
            self.trackers[start] = tr
            for s, e in tr.regions:
                self.detector.exclude(s, e)
        else:
            self.trackers.pop(start, None)
        out.append(ev.Event(ev.FS_IDENTIFIED, seq, t, start, kind, f"{kind} at byte {start}", detail))
        if tr is not None and tr.mounted:
            out.append(ev.Event(ev.MOUNT, seq, t, start, kind, f"{kind} mounted", {"uuid": ident}))

    # ------------------------------------------------------------ LVM
    def _drop_pv(self, start) -> None:
        self.pvs.pop(start, None)
        for name in [n for n, lv in self.lvs.items() if lv.pv == start]:
            del self.lvs[name]

    def _lvm_layout(self, seq, t, pw, out) -> None:
        """The PV's metadata changed: map its LVs again (new, extended, removed)."""
        _vg, _seqno, maps, notes = pw.layout
        self.lvm_notes = (self.lvm_notes + notes)[-MAX_NOTES:]
        gone = {}  # disk start -> LV no longer under its name (removed, or renamed)
        for name in [n for n, lv in self.lvs.items() if lv.pv == pw.start and n not in maps]:
            lv = self.lvs.pop(name)
            gone[lv.disk_start] = lv
        for name, segs in maps.items():
            lv = self.lvs.get(name)
            first = next(d for a, _b, d in segs if a == 0)
            if lv is None and first in gone:  # lvrename: the same LV, its filesystem kept
                lv = gone.pop(first)
                lv.name = name
                self.lvs[name] = lv
            if lv is not None and lv.pv == pw.start and lv.disk_start == first:
                if segs != sorted(lv.segs):
                    lv.set_segments(segs)  # lvextend, lvreduce: same filesystem, more room
                    if lv.tracker is not None:
                        self._exclude_lv(lv)
                continue
            if lv is None and len(self.lvs) >= lvm_layout.MAX_LVS:
                self.lvm_stats["lv_limit"] += 1
                continue
            lv = lvm_layout.LvSpace(name, segs, HEAD)
            lv.pv = pw.start
            self.lvs[name] = lv
            read = self.detector.read_old
            if read is not None and seq >= 0:  # what the LV already holds, from the replica
                try:
                    lv.head[:] = lv.read(read, 0, HEAD)
                except Exception:  # noqa: BLE001 - a replica read error: learnt from the writes only
                    continue
                sub: list[ev.Event] = []
                self._identify_lv(seq, t, lv, sub)
                out += self._lv_events(lv, sub)

    def _exclude_lv(self, lv) -> None:
        for s, e in lv.tracker.regions:
            for ds, de in lv.to_disk(s, e):
                self.detector.exclude(ds, de)

    def _lv_write(self, seq, t, lv, pieces, data, out) -> None:
        sub: list[ev.Event] = []
        for lo, i, n in pieces:
            if lo < HEAD:
                k = min(n, HEAD - lo)
                lv.head[lo:lo + k] = data[i:i + k]
                self._identify_lv(seq, t, lv, sub)
        tr = lv.tracker
        if tr is not None:
            for lo, i, n in pieces:
                tr.on_write(seq, t, lo, data[i:i + n] if (i, n) != (0, len(data)) else data, sub)
        if sub:
            out += self._lv_events(lv, sub)

    def _lv_events(self, lv, sub) -> list[ev.Event]:
        """Events of an LV's tracker, in LV offsets, as the VBD's: the LV's disk offset and name."""
        at = lv.disk_start
        return [replace(e, offset=at if e.offset is not None else None,
                        label=f"{e.label} (LV {lv.name})", detail={**e.detail, "lv": lv.name}) for e in sub]

    def _identify_lv(self, seq, t, lv, out) -> None:
        kind, obj = self._probe(bytes(lv.head))
        if kind is None:
            return
        ident = self._ident(kind, obj)
        if lv.found == (kind, ident):
            if lv.tracker is not None:
                lv.tracker.update_sb(seq, t, obj, out)
            return
        lv.found = (kind, ident)
        tr, detail = self._tracker(kind, obj, 0)
        detail = {"uuid": ident, **detail}
        for k in ("journal_offset", "log_offset"):  # on the disk, as a partition's
            if detail.get(k) is not None:
                at = lv.to_disk(detail[k], detail[k] + 1)
                detail[k] = at[0][0] if at else None
        lv.tracker = tr
        if tr is not None:
            self._exclude_lv(lv)
        if kind == "luks":
            for ds, de in lv.to_disk(0, lv.size):
                self.detector.exclude(ds, de)
            out.append(ev.Event(ev.VOLUME_ENCRYPTED, seq, t, 0, kind, "LUKS volume: encrypted as a whole, "
                                "not alarmed on", detail))
        out.append(ev.Event(ev.FS_IDENTIFIED, seq, t, 0, kind, f"{kind} at byte {lv.disk_start}", detail))
        if tr is not None and tr.mounted:
            out.append(ev.Event(ev.MOUNT, seq, t, 0, kind, f"{kind} mounted", {"uuid": ident}))

    def _ebr_chain(self, seq, t, out) -> None:
        """Walk the extended partition's EBR chain: its logical partitions (5, 6, ...)."""
        base, ss = self.ext_base, self.sector_size
        logical, at, seen = [], base, set()
        while at is not None and at not in seen and len(seen) < MAX_EBRS:
            seen.add(at)
            if at not in self.ebrs:
                self.ebrs[at] = bytearray(self._bootsecs.get(at, bytes(512)))
            e = mbr.detect(bytes(self.ebrs[at]))
            at2 = None
            for p in e.partitions if e is not None else ():
                if p.is_extended:
                    at2 = base + p.lba_first * ss if at2 is None else at2
                elif not logical or logical[-1][0] != at + p.lba_first * ss:
                    logical.append((at + p.lba_first * ss, at + p.lba_end * ss, p.type_name))
            at = at2
        for e0 in [e0 for e0 in self.ebrs if e0 not in seen]:
            del self.ebrs[e0]  # no longer in the chain
        if logical != self._logical:
            self._logical = logical
            if out is not None:
                scheme, parts = self._primary
                self._partitions(seq, t, scheme, parts + logical, out)

    def _partitions(self, seq, t, scheme, parts, out) -> None:
        new = [{"scheme": scheme, "start": s, "end": e, "type": ty} for s, e, ty in parts]
        if new == self.partitions:
            return
        self.partitions = new
        for s, e, _ in parts[:MAX_PARTITIONS]:
            if s not in self.heads and len(self.heads) <= MAX_PARTITIONS:
                self.heads[s] = bytearray(HEAD)
                self.head_end[s] = e

    # ------------------------------------------------------------ alarm
    def _alarm(self, s, seq, t, out) -> None:
        rec = self.recovery_point(s.first_seq)
        detail = {
            "first_seq": s.first_seq, "first_time_ns": s.first_time_ns, "first_sector": s.first_sector,
            "suspicious_bytes": s.suspicious_bytes, "share": s.share, "baseline": s.baseline,
            "recommended_seq": rec[0] if rec else None,
            "recommended_time_ns": rec[1] if rec else None,
            "recommended_label": rec[2] if rec else None,
        }
        label = (f"mass encryption suspected from write {s.first_seq}; recover to "
                 + (f"seq {rec[0]} ({rec[2]})" if rec else "no consistent point before it"))
        e = ev.Event(ev.ENCRYPTION_SUSPECTED, s.seq, s.time_ns, None, None, label, detail)
        self.alarm = e
        out.append(e)

    def recovery_point(self, before_seq: int) -> tuple[int, int, str] | None:
        """The last filesystem-consistent point strictly before ``before_seq``."""
        i = bisect_right(self._cseqs, before_seq - 1) - 1
        return self.consistent[i] if i >= 0 else None

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        """The VBD's current data state (what goes to xenstore and `xentap analyze`)."""
        fss = []
        for start, (kind, ident) in sorted(self.found.items()):
            tr = self.trackers.get(start)
            fss.append({"offset": start, "type": kind, "uuid": ident,
                        "mounted": None if tr is None else tr.mounted})
        for name, lv in sorted(self.lvs.items()):
            if lv.found is not None:
                fss.append({"offset": lv.disk_start, "type": lv.found[0], "uuid": lv.found[1], "lv": name,
                            "mounted": None if lv.tracker is None else lv.tracker.mounted})
        last = self.consistent[-1] if self.consistent else None
        d = self.detector
        return {
            "vbd": self.name,
            "writes": self.writes, "bytes": self.bytes, "flushes": self.flushes, "last_seq": self.last_seq,
            "partitions": self.partitions,
            "lvm": {"volumes": [{"lv": n, "segments": [list(s) for s in sorted(lv.segs)]}
                                for n, lv in sorted(self.lvs.items())],
                    "notes": list(self.lvm_notes), "counters": dict(self.lvm_stats)},
            "filesystems": fss,
            "consistent_points": len(self.consistent),
            "last_consistent": None if last is None else {"seq": last[0], "time_ns": last[1], "label": last[2]},
            "encryption": {
                "alarm": None if self.alarm is None else self.alarm.as_dict(),
                "baseline_share": round(d.baseline, 4),
                "recent_share": round(d.recent_susp / d.recent_data, 4) if d.recent_data else 0.0,
                "totals": dict(d.totals),
            },
            "data_state": ("encryption_suspected" if self.alarm else
                           "consistent" if last else "unknown" if not fss else "identified"),
        }
