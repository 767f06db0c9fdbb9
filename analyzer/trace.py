"""Ordered write traces: what a block backend saw, write by write.

A trace is ``b"XTTRACE1"`` then records (:data:`TraceRecord`: kind, length,
seq, time_ns, byte offset) each followed by ``length`` bytes of data; kind 1 is a
write, kind 2 a flush marker (length 0).  ``analyzer/capture/fusetrace.c``
writes them from a real kernel's I/O; files may be gzip-, xz- or
zstd-compressed (by suffix).
"""
from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from construct import Int8ul, Int32ul, Int64ul, Padding, Struct

from xentap.structs import derive_struct

MAGIC = b"XTTRACE1"
TraceRecord = Struct(
    "kind" / Int8ul,
    Padding(3),
    "length" / Int32ul,
    "seq" / Int64ul,
    "time_ns" / Int64ul,
    "offset" / Int64ul,     # bytes
)
REC, _ = derive_struct(TraceRecord)
WRITE, FLUSH = 1, 2
MAX_RECORD = 64 << 20  # refuse records larger than this (a corrupt file)


class TraceError(ValueError):
    """A file that is not a well-formed trace."""


@dataclass(frozen=True)
class Record:
    kind: int
    seq: int
    time_ns: int
    offset: int  # bytes
    data: bytes

    @property
    def sector(self) -> int:
        return self.offset // 512


def _open(path: str | Path) -> BinaryIO:
    p = str(path)
    if p.endswith(".gz"):
        return gzip.open(p, "rb")
    if p.endswith(".xz"):
        return lzma.open(p, "rb")
    if p.endswith(".zst"):
        import zstandard  # optional
        return zstandard.open(p, "rb")
    return open(p, "rb")


def read(path: str | Path) -> Iterator[Record]:
    """Yield the records of a trace file in order; raises TraceError on garbage."""
    with _open(path) as f:
        if f.read(8) != MAGIC:
            raise TraceError(f"{path}: not a write trace (no XTTRACE1 magic)")
        while True:
            hdr = f.read(REC.size)
            if not hdr:
                return
            if len(hdr) != REC.size:
                raise TraceError(f"{path}: truncated record header")
            kind, length, seq, t, off = REC.unpack(hdr)
            if kind not in (WRITE, FLUSH) or length > MAX_RECORD:
                raise TraceError(f"{path}: bad record at seq {seq}")
            data = f.read(length) if length else b""
            if len(data) != length:
                raise TraceError(f"{path}: truncated record data at seq {seq}")
            yield Record(kind, seq, t, off, data)


class Writer:
    """Write a trace (uncompressed, or gzip with a .gz suffix)."""

    def __init__(self, path: str | Path):
        self._f = gzip.open(path, "wb", compresslevel=6) if str(path).endswith(".gz") else open(path, "wb")
        self._f.write(MAGIC)
        self.seq = 0

    def write(self, offset: int, data: bytes, time_ns: int = 0) -> int:
        s = self.seq
        self._f.write(REC.pack(WRITE, len(data), s, time_ns, offset))
        self._f.write(data)
        self.seq += 1
        return s

    def flush(self, time_ns: int = 0) -> int:
        s = self.seq
        self._f.write(REC.pack(FLUSH, 0, s, time_ns, 0))
        self.seq += 1
        return s

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
