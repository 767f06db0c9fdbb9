"""Where a disk image holds data: SEEK_DATA/SEEK_HOLE, nothing else imported
(the daemon asks when a protected VBD opens, on its main loop)."""
from __future__ import annotations

import errno
import os


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges [start, end) of the first `size` bytes of open file `fd`
    that hold data (holes read as zeroes); None where the file cannot say (a
    block device, a file system without SEEK_DATA): all of it may."""
    out: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after off
                break
            return None
        if start >= size:
            break
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        if end <= start:
            return None
        out.append((start, end))
        off = end
    return out


def chunk_runs(extents: list[tuple[int, int]] | None, size: int,
               chunk: int) -> list[tuple[int, int]]:
    """The chunks of `chunk` bytes that `extents` touch, as runs (first chunk,
    count); every chunk of `size` bytes when the extents are not known."""
    if extents is None:
        return [(0, -(-size // chunk))] if size > 0 else []
    runs: list[tuple[int, int]] = []
    for start, end in extents:
        c0, c1 = start // chunk, -(-end // chunk)
        if runs and runs[-1][0] + runs[-1][1] >= c0:
            runs[-1] = (runs[-1][0], max(runs[-1][0] + runs[-1][1], c1) - runs[-1][0])
        else:
            runs.append((c0, c1 - c0))
    return runs


def data_chunks(fd: int, size: int, chunk: int) -> list[tuple[int, int]]:
    """The chunks of the first `size` bytes of open file `fd` that hold data
    now, as runs (first chunk, count); every chunk where the file cannot say."""
    return chunk_runs(data_extents(fd, size), size, chunk)
