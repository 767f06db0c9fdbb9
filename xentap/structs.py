"""Fast fixed-size records from their construct declarations.

Every binary format is declared once, with construct.  Where a record is
packed or unpacked per write (wire frames, journal frames, traces), parsing
it through construct would cost more than the work itself, so the hot path
uses a :class:`struct.Struct` *derived* from the declaration: the layout
still lives in one place, and the derivation checks that the two agree.
"""
from __future__ import annotations

import struct

from construct import Bytes, FormatField, Padded, Pass, Renamed, Struct


def derive_struct(con: Struct) -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct.Struct equivalent to a fixed-size, little-endian construct
    Struct of plain fields (integers, fixed-length bytes, padding); and the
    names of its fields in order (padding has none)."""
    fmt, names = "<", []
    for sc in con.subcons:
        inner = sc.subcon if isinstance(sc, Renamed) else sc
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            fmt += inner.fmtstr[1:]
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            fmt += f"{inner.length}s"
        elif isinstance(inner, Padded) and inner.subcon is Pass and isinstance(inner.length, int):
            fmt += f"{inner.length}x"
            continue
        else:  # pragma: no cover - a declaration error
            raise TypeError(f"{sc!r} is not a fixed-size little-endian field")
        names.append(sc.name)
    st = struct.Struct(fmt)
    assert st.size == con.sizeof(), (fmt, con)
    return st, tuple(names)
