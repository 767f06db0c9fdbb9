"""blkif ring entries as a guest lays them out, byte for byte, in both ABIs.

Used by the hostile-guest tests (tests/test_hostile.py) to write raw
requests into a sim domain's ring, and by make_seeds.py for the fuzzer's
seed corpus.  Offsets follow Xen's xen/include/public/io/blkif.h: the native
(x86_64) structs, and the x86_32 ABI's 4-byte packing ("x86_32-abi").
"""
from __future__ import annotations

import struct

OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE = 0, 1, 2, 3
OP_DISCARD, OP_INDIRECT = 5, 6
RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP = 0, -1, -2
MAX_SEGMENTS = 11               # BLKIF_MAX_SEGMENTS_PER_REQUEST
MAX_INDIRECT_PAGES = 8          # BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
SEGS_PER_INDIRECT_PAGE = 512    # 4096 / sizeof(struct blkif_request_segment)
SRING_HEADER = 64               # req_prod, req_event, rsp_prod, rsp_event, pad

NATIVE, X86_32 = 0, 1           # XT_PROTO_*


class Layout:
    def __init__(self, entry, rsp, id_, sector, seg, nr_sectors, ind_nr, ind_id, ind_sector,
                 ind_handle, ind_grefs):
        self.entry, self.rsp = entry, rsp
        self.id, self.sector, self.seg, self.nr_sectors = id_, sector, seg, nr_sectors
        self.ind_nr, self.ind_id, self.ind_sector = ind_nr, ind_id, ind_sector
        self.ind_handle, self.ind_grefs = ind_handle, ind_grefs


LAYOUTS = {
    NATIVE: Layout(112, 16, 8, 16, 24, 24, 2, 8, 16, 24, 28),
    X86_32: Layout(108, 12, 4, 12, 20, 20, 2, 4, 12, 20, 24),
}


def ring_slots(protocol: int, pages: int = 1) -> int:
    """Slots in a ring of `pages` pages (a power of two, as __RING_SIZE)."""
    fit = (4096 * pages - SRING_HEADER) // LAYOUTS[protocol].entry
    n = 1
    while n * 2 <= fit:
        n *= 2
    return n


def segment(gref: int, first: int = 0, last: int = 7) -> bytes:
    """struct blkif_request_segment: gref, first_sect, last_sect, pad."""
    return struct.pack("<IBBH", gref & 0xFFFFFFFF, first & 0xFF, last & 0xFF, 0)


def rw(protocol: int, op: int, id_: int, sector: int, segs=(), nr_segments: int | None = None,
       handle: int = 0) -> bytes:
    """A read, write, flush or barrier (blkif_request)."""
    lo = LAYOUTS[protocol]
    b = bytearray(lo.entry)
    b[0] = op
    b[1] = (len(segs) if nr_segments is None else nr_segments) & 0xFF
    struct.pack_into("<H", b, 2, handle)
    struct.pack_into("<QQ", b, lo.id, id_ & (1 << 64) - 1, sector & (1 << 64) - 1)
    for i, s in enumerate(segs[:MAX_SEGMENTS]):
        b[lo.seg + 8 * i: lo.seg + 8 * i + 8] = s
    return bytes(b)


def indirect(protocol: int, op: int, id_: int, sector: int, nr_segments: int, grefs=(),
             handle: int = 0) -> bytes:
    """A BLKIF_OP_INDIRECT request: its segments live in the pages `grefs`."""
    lo = LAYOUTS[protocol]
    b = bytearray(lo.entry)
    b[0] = OP_INDIRECT
    b[1] = op
    struct.pack_into("<H", b, lo.ind_nr, nr_segments & 0xFFFF)
    struct.pack_into("<QQ", b, lo.ind_id, id_ & (1 << 64) - 1, sector & (1 << 64) - 1)
    struct.pack_into("<H", b, lo.ind_handle, handle)
    for i, g in enumerate(list(grefs)[:MAX_INDIRECT_PAGES]):
        struct.pack_into("<I", b, lo.ind_grefs + 4 * i, g & 0xFFFFFFFF)
    return bytes(b)


def discard(protocol: int, id_: int, sector: int, nr_sectors: int, flag: int = 0) -> bytes:
    lo = LAYOUTS[protocol]
    b = bytearray(lo.entry)
    b[0] = OP_DISCARD
    b[1] = flag
    struct.pack_into("<QQ", b, lo.id, id_ & (1 << 64) - 1, sector & (1 << 64) - 1)
    struct.pack_into("<Q", b, lo.nr_sectors, nr_sectors & (1 << 64) - 1)
    return bytes(b)


def answered_op(req: bytes) -> int:
    """The operation the response to request slot `req` carries, as Linux
    blkback answers (and blkfront checks): an indirect request's indirect_op
    once it is READ or WRITE, else the request's operation byte."""
    if req[0] == OP_INDIRECT and req[1] in (OP_READ, OP_WRITE):
        return req[1]
    return req[0]


def raw(protocol: int, op: int, id_: int, fill: int = 0) -> bytes:
    """Any operation byte with an id, the rest filled with `fill`."""
    lo = LAYOUTS[protocol]
    b = bytearray([fill]) * lo.entry
    b[0] = op
    struct.pack_into("<Q", b, lo.id, id_ & (1 << 64) - 1)
    return bytes(b)


def response(protocol: int, slot: bytes) -> tuple[int, int, int, bytes]:
    """(id, operation, status, padding bytes) of a response slot."""
    lo = LAYOUTS[protocol]
    id_, op, pad1, status = struct.unpack_from("<QBBh", slot, 0)
    padding = bytes([pad1]) + bytes(slot[12:lo.rsp])
    return id_, op, status, padding


# ---- the fuzz harness's input format (ffi/fuzz_ring.c) ----

FUZZ_CONFIGS = [            # (protocol, ring_order, readonly, indirect, sector_size, mirror)
    (NATIVE, 0, 0, 256, 512, 1),
    (X86_32, 0, 0, 256, 512, 1),
    (NATIVE, 1, 1, 32, 512, 0),
    (X86_32, 1, 0, 0, 4096, 1),
    (NATIVE, 0, 0, 17, 4096, 0),
    (X86_32, 0, 1, 256, 4096, 0),
]
FUZZ_RING_FRAMES = 2 * len(FUZZ_CONFIGS)     # data grefs start here
FUZZ_NR_DATA = 36


class FuzzInput:
    """Builds one input for ffi/fuzz_ring.c."""

    def __init__(self, config: int, start: int = 0):
        self.b = bytearray(struct.pack("<BI", config, start & 0xFFFFFFFF))

    def slot(self, index: int, entry: bytes) -> "FuzzInput":
        self.b += bytes([0, index & 0xFF]) + entry
        return self

    def push(self, entry: bytes) -> "FuzzInput":
        self.b += b"\x01" + entry
        return self

    def grant(self, gref: int, flags: int, domid: int, frame: int) -> "FuzzInput":
        self.b += bytes([2, gref & 0xFF]) + struct.pack("<HHI", flags, domid, frame)
        return self

    def page(self, data_frame: int, offset: int, data: bytes) -> "FuzzInput":
        for i in range(0, len(data), 255):
            chunk = data[i:i + 255]
            self.b += bytes([3, data_frame]) + struct.pack("<HB", offset + i, len(chunk)) + chunk
        return self

    def prod(self, value: int) -> "FuzzInput":
        self.b += b"\x04" + struct.pack("<I", value & 0xFFFFFFFF)
        return self

    def step(self, n: int = 0) -> "FuzzInput":
        self.b += bytes([5, n])
        return self

    def event(self, rsp_prod: int, req_event: int) -> "FuzzInput":
        self.b += b"\x06" + struct.pack("<II", rsp_prod & 0xFFFFFFFF, req_event & 0xFFFFFFFF)
        return self

    def run(self) -> "FuzzInput":
        self.b += b"\x07"
        return self

    def drain(self) -> "FuzzInput":
        self.b += b"\x08"
        return self

    def checkpoint(self, label: bytes) -> "FuzzInput":
        self.b += bytes([9, len(label)]) + label
        return self

    def bytes(self) -> bytes:
        return bytes(self.b)
