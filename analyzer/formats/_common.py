"""Helpers shared by the format parsers (checksums, safe parsing, strings)."""

from __future__ import annotations

import uuid as _uuid
import zlib

import crc32c as _crc32c_mod

M32 = 0xFFFFFFFF


def safe_parse(struct, buf, offset: int = 0):
    """Parse ``struct`` from ``buf[offset:]``; ``None`` on any failure.

    Only fixed-size structures are parsed through here, so the work done is
    bounded by the structure, never by values read from ``buf``.
    """
    try:
        if offset < 0:
            return None
        size = struct.sizeof()
        chunk = bytes(buf[offset:offset + size])
        if len(chunk) < size:
            return None
        return struct.parse(chunk)
    except Exception:  # construct raises a zoo of errors on garbage
        return None


def crc32c(data: bytes, value: int = 0) -> int:
    """Standard CRC-32C (Castagnoli): init ~0, final xor ~0 (iSCSI, XFS)."""
    return _crc32c_mod.crc32c(data, value)


def crc32c_raw(seed: int, data: bytes) -> int:
    """The Linux kernel's ``crc32c(seed, data)``: no pre/post inversion.

    ext4 and jbd2 chain checksums with this form (``ext4_chksum``,
    ``jbd2_chksum``).
    """
    return crc32c(data, (~seed) & M32) ^ M32


def crc32(data: bytes) -> int:
    """Standard (zlib / IEEE 802.3) CRC-32, as used by GPT."""
    return zlib.crc32(data) & M32


def crc32_raw(seed: int, data: bytes) -> int:
    """CRC-32 (reflected 0xEDB88320) without pre/post inversion (LVM2's calc_crc)."""
    return zlib.crc32(data, (~seed) & M32) ^ M32


def uuid_be(b: bytes) -> str:
    """16 raw bytes (big-endian / RFC 4122 order) as a UUID string."""
    return str(_uuid.UUID(bytes=bytes(b)))


def uuid_le(b: bytes) -> str:
    """16 raw bytes in Microsoft mixed-endian order (GPT GUIDs)."""
    return str(_uuid.UUID(bytes_le=bytes(b)))


def cstr(b: bytes, encoding: str = "ascii") -> str:
    """A NUL-terminated, fixed-size field as text (undecodable bytes replaced)."""
    b = bytes(b).split(b"\0", 1)[0]
    return b.decode(encoding, "replace")


def flag_names(flags: int, table: dict[int, str]) -> frozenset[str]:
    """Names of the set bits of ``flags``; unknown bits as ``bit_<n>``."""
    out = set()
    for bit in range(32 if flags < (1 << 32) else 64):
        m = 1 << bit
        if flags & m:
            out.add(table.get(m, f"bit_{bit}"))
    return frozenset(out)


class FastStruct:
    """A fixed-size construct ``Struct`` of plain fields parsed with one
    ``struct.unpack``: the same declaration, ~50x less time, for headers
    parsed on the analyzer's hot path (XFS log records in every log write).

    Supports integer fields of either byte order (mixed in one struct),
    ``Const`` integers (a mismatch gives None, as construct's ConstError),
    ``Bytes(n)``, ``Array(n, integer)`` and ``Padding(n)``.  ``parse`` returns
    a namespace with the construct field names, or None."""

    def __init__(self, con) -> None:
        import struct

        from construct import Array, Bytes, Const, FormatField, Padded, Pass, Renamed

        fmt = ">"
        plan: list[tuple] = []  # (name, kind, count, extra)
        for sc in con.subcons:
            inner = sc.subcon if isinstance(sc, Renamed) else sc
            name = sc.name
            const = None
            if isinstance(inner, Const):
                const = inner.value
                inner = inner.subcon
            if isinstance(inner, FormatField):
                order, ch = inner.fmtstr[0], inner.fmtstr[1:]
                size = struct.calcsize(">" + ch)
                if order == "<" and size > 1:
                    fmt += f"{size}s"
                    plan.append((name, "le", 1, (ch, const)))
                else:
                    fmt += ch
                    plan.append((name, "int", 1, const))
            elif isinstance(inner, Bytes) and isinstance(inner.length, int):
                fmt += f"{inner.length}s"
                plan.append((name, "bytes", 1, None))
            elif (isinstance(inner, Array) and isinstance(inner.count, int)
                  and isinstance(inner.subcon, FormatField) and inner.subcon.fmtstr[0] == ">"):
                fmt += f"{inner.count}{inner.subcon.fmtstr[1:]}"
                plan.append((name, "array", inner.count, None))
            elif isinstance(inner, Padded) and inner.subcon is Pass and isinstance(inner.length, int):
                fmt += f"{inner.length}x"
            else:  # pragma: no cover - a declaration this helper does not support
                raise TypeError(f"{sc!r} is not a plain fixed-size field")
        self._st = struct.Struct(fmt)
        self._plan = plan
        self.size = self._st.size
        assert self.size == con.sizeof(), (fmt, con)

    def parse(self, buf, offset: int = 0):
        import struct
        from types import SimpleNamespace

        if offset < 0 or len(buf) - offset < self.size:
            return None
        vals = self._st.unpack_from(buf, offset)
        out = {}
        i = 0
        for name, kind, count, extra in self._plan:
            if kind == "array":
                v = list(vals[i:i + count])
                i += count
            else:
                v = vals[i]
                i += 1
                if kind == "le":
                    v = struct.unpack("<" + extra[0], v)[0]
                    extra = extra[1]
                if kind in ("int", "le") and extra is not None and v != extra:
                    return None
            if name:
                out[name] = v
        return SimpleNamespace(**out)
