"""Linux swap area header: 'SWAPSPACE2' in the last 10 bytes of the first page."""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int32ub, Int32ul, Struct

from ._common import cstr, safe_parse, uuid_be

MAGIC2 = b"SWAPSPACE2"
MAGIC1 = b"SWAP-SPACE"  # old v0 format, no header fields
PAGE_SIZES = (4096, 8192, 16384, 65536)
INFO_OFFSET = 1024  # after the boot bits


def _info(u32):
    return Struct(
        "version" / u32,
        "last_page" / u32,
        "nr_badpages" / u32,
        "sws_uuid" / Bytes(16),
        "sws_volume" / Bytes(16),
    )


InfoLE = _info(Int32ul)
InfoBE = _info(Int32ub)


@dataclass(frozen=True)
class SwapHeader:
    page_size: int
    version: int
    last_page: int
    nr_badpages: int
    uuid: str
    label: str
    big_endian: bool

    @property
    def size_bytes(self) -> int:
        return (self.last_page + 1) * self.page_size


def detect(buf: bytes, offset: int = 0, page_size: int | None = None) -> SwapHeader | None:
    """A swap header at ``buf[offset:]``; tries the usual page sizes if not given.

    Old v0 ('SWAP-SPACE') areas have no header and are reported as None.
    """
    try:
        for ps in (page_size,) if page_size else PAGE_SIZES:
            if bytes(buf[offset + ps - 10:offset + ps]) != MAGIC2:
                continue
            for be, st in ((False, InfoLE), (True, InfoBE)):
                c = safe_parse(st, buf, offset + INFO_OFFSET)
                if c is None or c.version != 1:
                    continue
                return SwapHeader(ps, c.version, c.last_page, c.nr_badpages,
                                  uuid_be(c.sws_uuid), cstr(c.sws_volume, "utf-8"), be)
    except Exception:
        pass
    return None
