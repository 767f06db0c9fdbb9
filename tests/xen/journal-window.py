"""Helper of cases/appliance-domu.sh: the GAP..RESYNC_END windows of a journal.

Usage: journal-window.py JOURNAL_DIR

Reads every frame of the journal (engines.journal's on-disk format: each
RECORDS frame's table has one entry per seq with its kind) and prints, per
window in which dom0 lost the write order,
``WINDOW <gap seq> <resync_end seq> resync_records=N resync_bytes=B reason=R``,
then ``RECORDS writes=W flushes=F gaps=G resyncs=R resync_ends=E``.  A
window still open at the end prints ``-1`` as its end; GAPs inside an open
window (the ring overflowed again before RESYNC_END) extend it.  Exit 1 when the
journal cannot be read.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from engines.journal import FT_RECORDS, REC, Journal, Kind, _scan_frames
    from engines.journal import SEG_HDR

    j = Journal.open(Path(argv[0]))
    counts = {k: 0 for k in ("writes", "flushes", "gaps", "resyncs", "resync_ends")}
    windows = []
    cur = None
    try:
        for s in j.segments:
            with open(s.xjs, "rb") as f:
                for _off, h, table, _payload, err in _scan_frames(f, SEG_HDR.size):
                    if err:
                        break
                    if h[1] != FT_RECORDS:
                        continue
                    for i in range(h[8]):
                        _ts, sector, length, _flags, kind, _ = REC.unpack_from(table, i * REC.size)
                        seq = h[4] + i
                        if kind == Kind.WRITE:
                            counts["writes"] += 1
                        elif kind == Kind.FLUSH:
                            counts["flushes"] += 1
                        elif kind == Kind.GAP:
                            counts["gaps"] += 1
                            if cur is None:      # a GAP inside an open window extends it
                                cur = dict(gap=seq, end=-1, n=0, nbytes=0, reason=sector, gaps=0)
                                windows.append(cur)
                            cur["gaps"] += 1
                        elif kind == Kind.RESYNC:
                            counts["resyncs"] += 1
                            if cur is not None:
                                cur["n"] += 1
                                cur["nbytes"] += length
                        elif kind == Kind.RESYNC_END:
                            counts["resync_ends"] += 1
                            if cur is not None:
                                cur["end"] = seq
                            cur = None
    finally:
        j.close()
    for w in windows:
        print(f"WINDOW {w['gap']} {w['end']} resync_records={w['n']} resync_bytes={w['nbytes']} "
              f"reason={w['reason']} gaps={w['gaps']}")
    print("RECORDS " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
