"""Workload content for tests and `xentap bench analyzer`: file data that looks
like what guests store, ransomware-style encryption of it, benign
high-entropy files (archives, media, encrypted video) and compiled code."""
from __future__ import annotations

import io
import lzma
import os
import random

import zipfile
import zlib
from pathlib import Path

_CORPUS: bytes | None = None


def _base_corpus() -> bytes:
    global _CORPUS
    if _CORPUS is None:
        lib = Path(os.__file__).parent
        parts, n = [], 0
        for p in sorted(lib.glob("*.py")):
            try:
                b = p.read_bytes()
            except OSError:
                continue
            parts.append(b)
            n += len(b)
            if n > 4 << 20:
                break
        _CORPUS = b"".join(parts) or (b"the quick brown fox jumps over the lazy dog\n" * 4096)
    return _CORPUS


def text(nbytes: int, seed: int = 0) -> bytes:
    """Structured file content (source code lines, shuffled by ``seed``)."""
    base = _base_corpus()
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < nbytes:
        start = rnd.randrange(0, max(1, len(base) - 65536))
        out += base[start:start + rnd.randrange(4096, 65536)]
    return bytes(out[:nbytes])


def _aes_ctr(key: bytes, nonce: bytes, data: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:  # no cryptography: a keyed stream of the same statistics
        import hashlib
        out = bytearray()
        i = 0
        while len(out) < len(data):
            out += hashlib.blake2b(key + nonce + i.to_bytes(8, "little"), digest_size=64).digest()
            i += 1
        return bytes(a ^ b for a, b in zip(data, out))
    c = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return c.update(data) + c.finalize()


MODES = ("whole", "intermittent", "first5")


def encrypt(data: bytes, mode: str = "whole", key: bytes = b"k" * 32, nonce: bytes = b"n" * 16) -> bytes:
    """Encrypt like ransomware does: the whole file, every other 16 bytes, or the first 5 %."""
    if mode == "whole":
        return _aes_ctr(key, nonce, data)
    if mode == "intermittent":
        enc = _aes_ctr(key, nonce, data)
        out = bytearray(data)
        for i in range(0, len(data), 32):
            out[i:i + 16] = enc[i:i + 16]
        return bytes(out)
    if mode == "first5":
        n = max(16, (len(data) * 5 // 100 + 15) // 16 * 16)
        return _aes_ctr(key, nonce, data[:n]) + data[n:]
    raise ValueError(f"unknown mode {mode!r}")


def encrypted_extent(data: bytes, mode: str) -> int:
    """How many leading bytes of a file ``encrypt`` changes (all but first5)."""
    if mode == "first5":
        return max(16, (len(data) * 5 // 100 + 15) // 16 * 16)
    return len(data)


_ELF: bytes | None = None


def _elf_corpus() -> bytes:
    """Compiled code of this host: ELF executables and libraries (up to 16 MiB)."""
    global _ELF
    if _ELF is None:
        parts, n = [], 0
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/bin"):
            for p in sorted(Path(d).glob("*")):
                try:
                    if not p.is_file() or p.stat().st_size > 4 << 20:
                        continue
                    b = p.read_bytes()
                except OSError:
                    continue
                if b[:4] == b"\x7fELF":
                    parts.append(b)
                    n += len(b)
                if n > 16 << 20:
                    break
            if n > 16 << 20:
                break
        _ELF = b"".join(parts)
    return _ELF


def compile_output(nbytes: int, seed: int = 0) -> bytes:
    """What a compile writes: object files and binaries (this host's ELF code,
    shuffled by ``seed``; structured text of the same size without any)."""
    base = _elf_corpus()
    if len(base) < 1 << 20:
        return text(nbytes, seed)
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < nbytes:
        start = rnd.randrange(0, len(base) - 65536) & ~4095
        out += base[start:start + rnd.randrange(16384, 65536)]
    return bytes(out[:nbytes])


# ---------------------------------------------------------------- benign files
def zip_file(nbytes: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        i = 0
        while buf.tell() < nbytes:
            z.writestr(f"f{i}.txt", text(256 << 10, seed + i) + os.urandom(64 << 10))
            i += 1
    return buf.getvalue()


def xz_file(nbytes: int, seed: int = 0) -> bytes:
    return lzma.compress(os.urandom(nbytes // 2) + text(nbytes, seed), preset=0)[:max(nbytes, 4096)]


def zstd_file(nbytes: int, seed: int = 0) -> bytes:
    try:
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(os.urandom(nbytes // 2) + text(nbytes, seed))
    except ImportError:  # a zstd frame header over deflate data: same statistics, same signature
        return b"\x28\xb5\x2f\xfd" + zlib.compress(os.urandom(nbytes // 2) + text(nbytes, seed))


def gzip_log(nbytes: int, seed: int = 0) -> bytes:
    import gzip
    return gzip.compress(os.urandom(nbytes // 2) + text(nbytes, seed), compresslevel=6)


def jpeg_file(nbytes: int) -> bytes:
    """A baseline-JPEG-shaped file: SOI, JFIF APP0, entropy-coded (random) scan, EOI."""
    return (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            + os.urandom(max(0, nbytes - 24)).replace(b"\xff", b"\xff\x00")[:max(0, nbytes - 24)] + b"\xff\xd9")


def mp4_file(nbytes: int) -> bytes:
    return b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + os.urandom(max(0, nbytes - 32))


def encrypted_video(nbytes: int) -> bytes:
    """A video file kept encrypted (no signature: AES over an mp4)."""
    return _aes_ctr(os.urandom(32), os.urandom(16), mp4_file(nbytes))


def luks_sector_data(plain: bytes, key: bytes = bytes(range(64)), sector: int = 0) -> bytes:
    """What dm-crypt (aes-xts-plain64) writes for ``plain`` at ``sector``."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        return _aes_ctr(key[:32], sector.to_bytes(16, "little"), plain)
    out = bytearray()
    for i in range(0, len(plain), 512):
        tweak = (sector + i // 512).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        out += c.update(plain[i:i + 512]) + c.finalize()
    return bytes(out)


__all__ = ["text", "encrypt", "MODES", "zip_file", "xz_file", "zstd_file", "gzip_log", "jpeg_file",
           "mp4_file", "encrypted_video", "luks_sector_data", "encrypted_extent", "compile_output"]

