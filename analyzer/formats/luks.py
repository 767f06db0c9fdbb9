"""LUKS1 and LUKS2 headers (big-endian).

LUKS1: a 592-byte header (cipher name/mode, hash, payload offset, key
slots).  LUKS2: a 4096-byte binary header followed by a JSON area; the
header's checksum (sha256 by default) covers binary header + JSON area with
the checksum field zeroed; a secondary copy (magic 'SKUL\\xba\\xbe') sits at
``hdr_offset`` = hdr_size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from construct import Array, Bytes, Int16ub, Int32ub, Int64ub, Struct

from ._common import cstr, safe_parse

MAGIC1 = b"LUKS\xba\xbe"
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
LUKS2_BIN_SIZE = 4096
LUKS2_HDR_SIZES = frozenset(1 << n for n in range(14, 23))  # 16 KiB .. 4 MiB
# checksum_alg values we can verify (cryptsetup's names -> hashlib's)
CSUM_ALGS = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
             "sha512": "sha512", "sha3-256": "sha3_256", "sha3-512": "sha3_512",
             "blake2b-512": "blake2b", "blake2s-256": "blake2s"}

KeySlot1 = Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(32),
    "key_material_offset" / Int32ub,
    "stripes" / Int32ub,
)

Header1 = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipher_name" / Bytes(32),
    "cipher_mode" / Bytes(32),
    "hash_spec" / Bytes(32),
    "payload_offset" / Int32ub,  # sectors
    "key_bytes" / Int32ub,
    "mk_digest" / Bytes(20),
    "mk_digest_salt" / Bytes(32),
    "mk_digest_iter" / Int32ub,
    "uuid" / Bytes(40),
    "key_slots" / Array(8, KeySlot1),
)
assert Header1.sizeof() == 592

Header2 = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "hdr_size" / Int64ub,  # binary header + JSON area
    "seqid" / Int64ub,
    "label" / Bytes(48),
    "checksum_alg" / Bytes(32),
    "salt" / Bytes(64),
    "uuid" / Bytes(40),
    "subsystem" / Bytes(48),
    "hdr_offset" / Int64ub,
    "_padding" / Bytes(184),
    "csum" / Bytes(64),  # offset 448
)
CSUM_OFF = 448
assert Header2.sizeof() == 512


@dataclass(frozen=True)
class LUKS1Header:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # in 512-byte sectors
    key_bytes: int
    mk_digest_iter: int
    uuid: str
    active_key_slots: tuple[int, ...]

    version = 1

    @property
    def cipher(self) -> str:
        return f"{self.cipher_name}-{self.cipher_mode}"


@dataclass(frozen=True)
class LUKS2Header:
    secondary: bool
    hdr_size: int
    json_size: int
    seqid: int
    label: str
    subsystem: str
    checksum_alg: str
    uuid: str
    hdr_offset: int
    checksum_ok: bool | None  # None: JSON area not in buffer, or unknown hash
    metadata: dict | None  # parsed JSON when available and valid

    version = 2

    @property
    def cipher(self) -> str | None:
        """The first segment's encryption, e.g. 'aes-xts-plain64'."""
        try:
            segs = self.metadata["segments"]
            return segs[sorted(segs, key=lambda k: int(k))[0]]["encryption"]
        except Exception:
            return None

    @property
    def active_key_slots(self) -> tuple[int, ...] | None:
        try:
            return tuple(sorted(int(k) for k in self.metadata["keyslots"]))
        except Exception:
            return None


def _luks1(buf: bytes, offset: int) -> LUKS1Header | None:
    c = safe_parse(Header1, buf, offset)
    if c is None or c.magic != MAGIC1 or c.version != 1:
        return None
    active = tuple(i for i, k in enumerate(c.key_slots) if k.active == KEY_ENABLED)
    return LUKS1Header(
        cipher_name=cstr(c.cipher_name), cipher_mode=cstr(c.cipher_mode),
        hash_spec=cstr(c.hash_spec), payload_offset=c.payload_offset,
        key_bytes=c.key_bytes, mk_digest_iter=c.mk_digest_iter,
        uuid=cstr(c.uuid), active_key_slots=active,
    )


def _luks2(buf: bytes, offset: int) -> LUKS2Header | None:
    c = safe_parse(Header2, buf, offset)
    if c is None or c.magic not in (MAGIC1, MAGIC2_SECONDARY) or c.version != 2:
        return None
    if c.hdr_size not in LUKS2_HDR_SIZES:
        return None
    alg = cstr(c.checksum_alg)
    ok = meta = None
    area = bytes(buf[offset:offset + c.hdr_size])
    if len(area) == c.hdr_size:
        h = hashlib.new(CSUM_ALGS[alg]) if alg in CSUM_ALGS else None
        if h is not None:
            raw = bytearray(area)
            raw[CSUM_OFF:CSUM_OFF + 64] = b"\0" * 64
            h.update(bytes(raw))
            ok = h.digest() == bytes(c.csum[:h.digest_size])
        js = area[LUKS2_BIN_SIZE:].split(b"\0", 1)[0]
        try:
            meta = json.loads(js.decode("utf-8"))
            if not isinstance(meta, dict):
                meta = None
        except Exception:  # also RecursionError on deeply nested JSON
            meta = None
    return LUKS2Header(
        secondary=c.magic == MAGIC2_SECONDARY, hdr_size=c.hdr_size,
        json_size=c.hdr_size - LUKS2_BIN_SIZE, seqid=c.seqid, label=cstr(c.label, "utf-8"),
        subsystem=cstr(c.subsystem, "utf-8"), checksum_alg=alg, uuid=cstr(c.uuid),
        hdr_offset=c.hdr_offset, checksum_ok=ok, metadata=meta,
    )


def detect(buf: bytes, offset: int = 0) -> LUKS1Header | LUKS2Header | None:
    """A LUKS1 or LUKS2 (primary or secondary) header at ``buf[offset:]``, else None."""
    try:
        magic = bytes(buf[offset:offset + 8])
        if magic[:6] not in (MAGIC1, MAGIC2_SECONDARY):
            return None
        version = int.from_bytes(magic[6:8], "big")
        if version == 1:
            return _luks1(buf, offset)
        if version == 2:
            return _luks2(buf, offset)
    except Exception:
        pass
    return None
