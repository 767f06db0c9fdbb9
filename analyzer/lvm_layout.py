"""LVM2 layouts learnt from the writes: the VG text metadata and where each LV lives.

A PV (found by its label, :mod:`analyzer.formats.lvm`) has a metadata area
whose header points at the newest copy of the VG's text metadata in a
circular buffer.  :class:`PvWatch` keeps that area as the guest writes it,
and each time the header points at a new copy whose checksum verifies, it
parses the text (:func:`parse_text`: bounded and iterative, the text is
guest-written) and maps every LV's linear segments on this PV to byte ranges
of the disk (:func:`lv_maps`).  An :class:`LvSpace` translates disk writes
into LV-relative writes, so the filesystem inside an LV is tracked exactly as
a partition's; the VBD analyzer maps the LVs again on every new metadata
(lvextend: same filesystem, more segments; lvrename: same LV; lvremove: no
longer followed; lvcreate: a new LV, its start read from the replica when
the analyzer can read it).  Only the PV's first metadata area is watched (a
PV without one, or with it marked ignored, gives no layout).

Supported: linear LVs (``type = "striped"`` with ``stripe_count = 1``), in
any number of segments, all on this PV.  Not supported, ignored with a note:
striped over several stripes, thin pools and thin LVs, raid/mirror, cache,
vdo, snapshots, and LVs with a segment on another PV (a VG spanning disks).
"""
from __future__ import annotations

import re
from bisect import bisect_right

from .formats import lvm

MAX_TEXT = 512 << 10  # metadata text parsed at most (about 1500 LVs)
MAX_TOKENS = 60_000  # (parsing that many takes about 0.15 s)
MAX_DEPTH = 8  # vg > logical_volumes > lv > segment is 4 deep
MAX_ARRAY = 4096
MAX_LVS = 256
MAX_SEGMENTS = 64  # per LV
MAX_MDA = 8 << 20  # metadata area bytes buffered per PV
SECTOR = 512


class MetadataError(ValueError):
    """Text metadata this module will not use (malformed, too big, too deep)."""


_TOKEN = re.compile(r'''
    (?P<ws>[ \t\r\n\f\v]+|\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<word>[A-Za-z0-9_.+\-]+)
  | (?P<punct>[{}\[\]=,])
''', re.X)
_INT = re.compile(r"[-+]?[0-9]+\Z")
_FLOAT = re.compile(r"[-+]?[0-9]+\.[0-9]+\Z")
_UNESC = re.compile(r"\\(.)")


def _tokens(text: str):
    pos, n, count = 0, len(text), 0
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise MetadataError(f"unexpected character at {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        count += 1
        if count > MAX_TOKENS:
            raise MetadataError("too many tokens")
        v = m.group()
        if kind == "str":
            yield "v", _UNESC.sub(r"\1", v[1:-1])
        elif kind == "word":
            if _INT.match(v):
                yield "v", int(v)
            elif _FLOAT.match(v):
                yield "v", float(v)
            else:
                yield "w", v
        else:
            yield v, v


def parse_text(text: str) -> dict:
    """LVM's config text format as nested dicts (sections) of values
    (str, int, float, or a flat list of those).

    Iterative, bounded in size, tokens, nesting and array length; raises
    :class:`MetadataError` on anything else."""
    if len(text) > MAX_TEXT:
        raise MetadataError("metadata text too large")
    root: dict = {}
    stack = [root]
    toks = _tokens(text)
    for kind, v in toks:
        if kind == "}":
            if len(stack) == 1:
                raise MetadataError("unbalanced '}'")
            stack.pop()
            continue
        if kind != "w" and not (kind == "v" and isinstance(v, int)):
            raise MetadataError(f"expected a name, got {v!r}")
        key = str(v)
        kind2, _ = next(toks, (None, None))
        if kind2 == "{":
            if len(stack) >= MAX_DEPTH:
                raise MetadataError("sections nested too deep")
            sec: dict = {}
            stack[-1][key] = sec
            stack.append(sec)
            continue
        if kind2 != "=":
            raise MetadataError(f"expected '=' or '{{' after {key!r}")
        kind3, val = next(toks, (None, None))
        if kind3 == "v":
            stack[-1][key] = val
        elif kind3 == "[":
            arr: list = []
            while True:
                k, x = next(toks, (None, None))
                if k == "]":
                    break
                if k == ",":
                    continue
                if k != "v":
                    raise MetadataError("bad array element")
                arr.append(x)
                if len(arr) > MAX_ARRAY:
                    raise MetadataError("array too long")
            stack[-1][key] = arr
        else:
            raise MetadataError(f"expected a value for {key!r}")
    if len(stack) != 1:
        raise MetadataError("unterminated section")
    return root


def _int(d: dict, k: str) -> int:
    v = d.get(k)
    if not isinstance(v, int) or v < 0 or v > 1 << 62:
        raise MetadataError(f"bad {k}")
    return v


def vg_section(tree: dict) -> tuple[str, dict]:
    """(VG name, its section): the top-level section that has physical_volumes."""
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(v.get("physical_volumes"), dict):
            return k, v
    raise MetadataError("no volume group section")


def lv_maps(tree: dict, pv_uuid: str, pv_start: int):
    """Map the LVs of a parsed metadata tree onto the disk.

    ``pv_uuid`` is this PV's uuid (dashed, as in the metadata), ``pv_start``
    the PV's byte offset on the disk.  Returns ``(vg, seqno, lvs, notes)``:
    ``lvs`` maps ``"vg/lv"`` to a sorted list of ``(lv_start, lv_end,
    disk_start)`` byte ranges; ``notes`` lists what was not mapped and why.
    """
    vg, sec = vg_section(tree)
    seqno = sec.get("seqno") if isinstance(sec.get("seqno"), int) else None
    es = _int(sec, "extent_size") * SECTOR
    if es == 0:
        raise MetadataError("extent_size 0")
    pv_name = pe_start = None
    for name, pv in sec["physical_volumes"].items():
        if isinstance(pv, dict) and pv.get("id") == pv_uuid:
            pv_name, pe_start = name, _int(pv, "pe_start") * SECTOR
            break
    if pv_name is None:
        raise MetadataError("this PV is not in the metadata")
    lvs: dict[str, list[tuple[int, int, int]]] = {}
    notes: list[str] = []
    lvsec = sec.get("logical_volumes", {})
    if not isinstance(lvsec, dict):
        raise MetadataError("logical_volumes is not a section")
    for lvname, lv in list(lvsec.items())[:MAX_LVS]:
        if not isinstance(lv, dict):
            continue
        full = f"{vg}/{lvname}"
        segs, why = [], None
        segsecs = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
        if not segsecs:
            why = "no segments"
        if len(segsecs) > MAX_SEGMENTS:
            why = f"more than {MAX_SEGMENTS} segments"
        for seg in segsecs if why is None else ():
            ty = seg.get("type")
            if ty != "striped":
                why = f"segment type {ty!r} not supported"
                break
            if seg.get("stripe_count") != 1:
                why = f"striped over {seg.get('stripe_count')} stripes: not supported"
                break
            stripes = seg.get("stripes")
            if not isinstance(stripes, list) or len(stripes) != 2 or not isinstance(stripes[1], int):
                why = "bad stripes list"
                break
            if stripes[0] != pv_name:
                why = f"a segment lies on another PV ({stripes[0]})"
                break
            start, count = _int(seg, "start_extent"), _int(seg, "extent_count")
            if count == 0 or stripes[1] < 0:
                why = "empty or negative segment"
                break
            segs.append((start * es, (start + count) * es, pv_start + pe_start + stripes[1] * es))
        if why is None:
            segs.sort()
            if segs[0][0] != 0 or any(a[1] != b[0] for a, b in zip(segs, segs[1:])):
                why = "segments do not cover the LV contiguously"
        if why is not None:
            notes.append(f"{full}: {why}; not followed")
            continue
        lvs[full] = segs
    return vg, seqno, lvs, notes


class LvSpace:
    """One LV: translates disk byte ranges to LV-relative ones and back."""

    __slots__ = ("name", "segs", "starts", "lo", "hi", "head", "found", "tracker", "size", "pv")

    def __init__(self, name: str, segs: list[tuple[int, int, int]], head_size: int):
        self.name = name
        self.head = bytearray(head_size)
        self.found: tuple[str, str] | None = None
        self.tracker = None
        self.pv: int | None = None  # disk offset of the PV it lives on
        self.set_segments(segs)

    def set_segments(self, segs) -> None:
        self.segs = sorted(segs, key=lambda s: s[2])  # by disk start
        self.starts = [s[2] for s in self.segs]
        self.lo = min(s[2] for s in segs)
        self.hi = max(s[2] + s[1] - s[0] for s in segs)
        self.size = max(s[1] for s in segs)

    @property
    def disk_start(self) -> int:
        """Disk offset of the LV's first byte."""
        return next(d for a, _b, d in self.segs if a == 0)

    def pieces(self, off: int, n: int):
        """(LV offset, index in the write, length) of the parts of a disk write in this LV."""
        end = off + n
        if end <= self.lo or off >= self.hi:
            return ()
        out = []
        i = max(bisect_right(self.starts, off) - 1, 0)
        for a, b, d in self.segs[i:]:
            if d >= end:
                break
            de = d + b - a
            lo, hi = max(off, d), min(end, de)
            if lo < hi:
                out.append((a + lo - d, lo - off, hi - lo))
        return out

    def to_disk(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Disk byte ranges of LV bytes [lo, hi)."""
        out = []
        for a, b, d in self.segs:
            s, e = max(lo, a), min(hi, b)
            if s < e:
                out.append((d + s - a, d + e - a))
        return out

    def read(self, read, off: int, n: int) -> bytes:
        """LV bytes [off, off+n) through a disk reader ``read(offset, length)``."""
        buf = bytearray(n)
        for a, b, d in self.segs:
            s, e = max(off, a), min(off + n, b)
            if s < e:
                got = read(d + s - a, e - s) or b""
                buf[s - off:s - off + len(got)] = got[:e - s]
        return bytes(buf)


class PvWatch:
    """A PV's metadata area, kept as it is written, and the layout it gives."""

    def __init__(self, start: int, label: lvm.PVLabel, stats: dict):
        self.start = start
        self.label = label
        self.stats = stats
        self.mda = None  # (disk offset, size) of the first metadata area
        self.buf: bytearray | None = None
        self.done: tuple | None = None  # raw locn last tried
        self.failed: tuple | None = None  # raw locn whose text did not verify (yet)
        self.layout: tuple | None = None  # (vg, seqno, lvs, notes) last parsed
        if label.metadata_areas:
            off, size = label.metadata_areas[0]
            if lvm.MDA_HEADER_SIZE < size <= MAX_MDA:
                self.mda = (start + off, start + off + size)
                self.buf = bytearray(size)
            else:
                stats["mda_unsupported"] += 1

    def on_write(self, off: int, data) -> bool:
        """Take a write; True when it gave a new layout (``self.layout``)."""
        m = self.mda
        if m is None or off >= m[1] or off + len(data) <= m[0]:
            return False
        lo, hi = max(off, m[0]), min(off + len(data), m[1])
        self.buf[lo - m[0]:hi - m[0]] = data[lo - off:hi - off]
        return self.refresh()

    def refresh(self) -> bool:
        hdr = lvm.parse_mda_header(self.buf, 0)
        if hdr is None or not hdr.checksum_ok or not hdr.raw_locns:
            return False
        loc = hdr.raw_locns[0]
        key = (loc.offset, loc.size, loc.checksum, loc.flags)
        if key == self.done:
            return False
        if loc.flags & lvm.RAW_LOCN_IGNORED:
            self.done = key
            return False
        if (loc.offset < lvm.MDA_HEADER_SIZE or loc.offset >= len(self.buf) or not 0 < loc.size <= MAX_TEXT
                or hdr.size != len(self.buf)):
            self.done = key
            self.stats["metadata_bad"] += 1
            return False
        got = lvm.read_metadata_text(self.buf, hdr, loc)
        if got is None or not got[1]:
            # not all written yet, or corrupt: tried again on the next write here, counted once
            if key != self.failed:
                self.failed = key
                self.stats["metadata_checksum_bad"] += 1
            return False
        self.done = key
        try:
            tree = parse_text(got[0])
            layout = lv_maps(tree, self.label.pv_uuid_dashed, self.start)
        except (MetadataError, RecursionError, ValueError, TypeError, KeyError, AttributeError):
            self.stats["metadata_bad"] += 1
            return False
        self.stats["metadata_parsed"] += 1
        self.layout = layout
        return True
