"""Vectorised randomness statistics over batches of 4 KiB blocks.

For each block a fixed sample of 512 bytes is taken: the first 32 bytes of
every 256-byte group, i.e. 32 chunks of 16 bytes, alternately "even" and
"odd", spread over two 2 KiB windows.  From the sample's byte counts we get

* the whole-block chi-square against the uniform distribution (and entropy),
* the chi-square of the even and the odd 16-byte stripes (intermittent
  encryption that encrypts every other 16 bytes leaves one stripe random
  and the other structured),
* the chi-square of each window (a block that is partly encrypted).

For uniformly random bytes each of these chi-squares is 255 +- 22.6
(measured); text, code, metadata and zeros give thousands.

How it is computed (the analyzer's hot path, so it matters): one
``numpy.bincount`` over the whole batch counts, per block and byte value,
three numbers packed into one float64 bin (exact below 2**53): the count in
the even stripe, in the odd stripe and in the first window, 16 bits each.
Every chi-square is ``256/N * sum(count**2) - N``; the sums of squares of
the five histograms (even, odd, first window, whole = even + odd, second
window = whole - first) come from one ``vecdot``.  Nothing is allocated per
byte of the sample beyond the bin keys, and the work buffers are kept per
thread, so a batch costs a few passes over its 512-byte samples.

Blocks whose sample has at least 58 of its 64 8-byte words zero (so more
than 90 % zero bytes) skip the counting: every test below then has a known
answer (at least 205 zeros in each stripe and window put all their
chi-squares far above ``STRUCTURED_CHI2``: not random, not intermittent, not
partial), and their chi-squares are reported as +inf.
"""
from __future__ import annotations

import threading

import numpy as np

BLOCK = 4096
SAMPLE = 512
RANDOM_CHI2 = 400.0  # ~6.5 sigma above the random mean: random below this
STRUCTURED_CHI2 = 1000.0  # clearly not random above this
ZERO_FRAC = 0.9  # a block whose sample is more than this share of zero bytes is "zero"

# 4-byte little-endian prefixes of compressed / media / encrypted-container formats
_SIG4 = [
    b"PK\x03\x04", b"\xfd7zX", b"\x28\xb5\x2f\xfd", b"\x89PNG", b"7z\xbc\xaf", b"%PDF",
    b"\x1a\x45\xdf\xa3", b"OggS", b"RIFF", b"fLaC", b"Rar!", b"LUKS", b"\x04\x22\x4d\x18",
    b"GIF8", b"!<ar", b"hsqs", b"MSCF", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
]
_SIG3 = [b"\x1f\x8b\x08", b"\xff\xd8\xff", b"BZh", b"ID3"]
SIG4 = np.array(sorted(int.from_bytes(s, "little") for s in _SIG4), dtype=np.uint32)
SIG3 = np.array(sorted(int.from_bytes(s, "little") for s in _SIG3), dtype=np.uint32)
FTYP = int.from_bytes(b"ftyp", "little")  # ISO media (mp4, mov, heic) at offset 4
_SIG4_SET = frozenset(_SIG4)
_SIG3_SET = frozenset(_SIG3)

MAX_BATCH = 1024  # blocks per bincount (bounds the work buffers: ~7 MiB per thread)
# bin weight of each sample position: even stripe -> 1, odd stripe -> 2**16,
# first window -> + 2**32 (three 16-bit counts of at most 256 per bin)
_pos = np.arange(SAMPLE)
_PARITY = (_pos % 32) // 16
_WINDOW = _pos // 256
_WEIGHT = (np.where(_PARITY == 0, 1, 1 << 16) + np.where(_WINDOW == 0, 1 << 32, 0)).astype(np.float64)
_WEIGHTS = np.tile(_WEIGHT, MAX_BATCH)
_KEYBASE = (np.arange(MAX_BATCH, dtype=np.intp) * 256).reshape(MAX_BATCH, 1)


def starts_with_signature(data) -> bool:
    """The same test as :func:`signatures` on the first block of one buffer."""
    head = bytes(data[:8])
    return head[:4] in _SIG4_SET or head[:3] in _SIG3_SET or head[4:8] == b"ftyp"


def _member(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    i = np.searchsorted(table, x)
    return table[np.minimum(i, len(table) - 1)] == x


def _signatures(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bool per block from its first two little-endian 32-bit words."""
    return _member(first, SIG4) | _member(first & 0x00FFFFFF, SIG3) | (second == FTYP)


def signatures(blocks: np.ndarray) -> np.ndarray:
    """Bool per block (n, >= 8 uint8: a block or its sample): starts with a known
    compressed/media signature."""
    head = np.ascontiguousarray(blocks[:, :8]).view("<u4")
    return _signatures(head[:, 0], head[:, 1])


def sample(blocks: np.ndarray) -> np.ndarray:
    """(n, 4096) blocks -> (n, 512) sample (a copy)."""
    n = blocks.shape[0]
    return np.ascontiguousarray(blocks.reshape(n, 16, 256)[:, :, :32]).reshape(n, SAMPLE)


def _sumsq_einsum(y: np.ndarray) -> np.ndarray:
    return np.einsum("nki,nki->nk", y, y)


# sums of squares along the last axis: numpy >= 2's vecdot is ~2x faster than einsum here
_sumsq = (lambda y: np.vecdot(y, y)) if hasattr(np, "vecdot") else _sumsq_einsum


# square_sums' columns (even, odd, window 0, whole, window 1) -> chi-square: 256/N * sum - N
_N = np.array([SAMPLE // 2, SAMPLE // 2, SAMPLE // 2, SAMPLE, SAMPLE // 2], dtype=np.float32)
_CHI_SCALE = np.float32(256.0) / _N
_CHI_SUB = _N


class _Work(threading.local):
    """Per-thread work buffers of :func:`square_sums` (reused, never reallocated)."""

    def __init__(self) -> None:
        self.keys = np.empty((MAX_BATCH, SAMPLE), np.intp)
        self.packed = np.empty(MAX_BATCH * 256, np.int64)
        self.y = np.empty((MAX_BATCH, 5, 256), np.float32)


_work = _Work()


def square_sums(samp: np.ndarray) -> np.ndarray:
    """(n, 5) float32: the sums of squared byte counts of the even stripe, the odd
    stripe, the first window, the whole sample and the second window of each
    sample (exact: integers below 2**24); and (n,) the count of zero bytes."""
    n = samp.shape[0]
    if n > MAX_BATCH:
        parts = [square_sums(samp[i:i + MAX_BATCH]) for i in range(0, n, MAX_BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    w = _work
    keys = w.keys[:n]
    np.add(samp, _KEYBASE[:n], out=keys)
    bins = np.bincount(keys.reshape(-1), weights=_WEIGHTS[:n * SAMPLE], minlength=n * 256)
    packed = w.packed[:n * 256]
    np.copyto(packed, bins, casting="unsafe")
    y = w.y[:n]
    # lanes of the packed counts: even stripe, odd stripe, first window (, zero)
    np.copyto(y[:, 0:3], packed.view(np.uint16).reshape(n, 256, 4)[:, :, 0:3].transpose(0, 2, 1))
    np.add(y[:, 0], y[:, 1], out=y[:, 3])  # whole
    np.subtract(y[:, 3], y[:, 2], out=y[:, 4])  # second window
    return _sumsq(y), y[:, 3, 0].copy()


class BlockStats:
    """Per-block statistics of a batch; every attribute is an array of length n.

    ``BlockStats(blocks)`` takes (n, 4096) blocks; ``BlockStats.of_sample(s)``
    the (n, 512) samples of :func:`sample` (what the detector keeps)."""

    __slots__ = ("chi2", "stripe_chi2", "window_chi2", "zero_frac", "_signature", "_sample")

    def __init__(self, blocks: np.ndarray):
        self._init(sample(blocks))

    @classmethod
    def of_sample(cls, samp: np.ndarray) -> "BlockStats":
        self = cls.__new__(cls)
        self._init(samp)
        return self

    def _init(self, samp: np.ndarray) -> None:
        n = samp.shape[0]
        self._sample = samp
        self._signature = None
        # at most 6 of the 64 8-byte words non-zero: more than 90 % zero bytes for sure
        nzw = np.count_nonzero(samp.view(np.uint64), axis=1)
        skip = nzw <= 64 - 58
        if not skip.any():
            ss, zeros = square_sums(samp)
            chi = ss * _CHI_SCALE
            chi -= _CHI_SUB
            self.zero_frac = zeros * (1.0 / SAMPLE)
        else:
            live = np.nonzero(~skip)[0]
            chi = np.full((n, 5), np.inf, dtype=np.float32)
            self.zero_frac = np.ones(n)  # all-zero samples: exactly 1
            some = np.nonzero(skip & (nzw > 0))[0]
            if len(some):
                self.zero_frac[some] = (SAMPLE - np.count_nonzero(samp[some], axis=1)) * (1.0 / SAMPLE)
            if len(live):
                ss, zeros = square_sums(samp[live])
                chi[live] = ss * _CHI_SCALE - _CHI_SUB
                self.zero_frac[live] = zeros * (1.0 / SAMPLE)
        self.chi2 = chi[:, 3]
        self.stripe_chi2 = chi[:, 0:2]
        self.window_chi2 = chi[:, 2:5:2]

    @property
    def signature(self) -> np.ndarray:
        """Starts with a known compressed/media signature (computed when first asked)."""
        if self._signature is None:
            words = self._sample.view(np.uint32)  # (n, 128): the block's first 8 bytes are words 0, 1
            self._signature = _signatures(words[:, 0], words[:, 1])
        return self._signature

    def entropy(self) -> np.ndarray:
        """Shannon entropy of the sample in bits per byte (at most ~7.6 for a 512-byte sample)."""
        n = self._sample.shape[0]
        h = np.bincount((self._sample + (np.arange(n, dtype=np.intp) * 256)[:, None]).reshape(-1),
                        minlength=n * 256).reshape(n, 256)
        p = h * (1.0 / SAMPLE)
        return -(p * np.log2(p + (p == 0))).sum(-1)

    @property
    def zero(self) -> np.ndarray:
        return self.zero_frac > ZERO_FRAC

    @property
    def random(self) -> np.ndarray:
        return self.chi2 < RANDOM_CHI2

    @property
    def structured(self) -> np.ndarray:
        return self.chi2 > STRUCTURED_CHI2

    @property
    def intermittent(self) -> np.ndarray:
        """One 16-byte stripe random, the other clearly structured."""
        s = self.stripe_chi2
        return (((s[:, 0] < RANDOM_CHI2) & (s[:, 1] > STRUCTURED_CHI2))
                | ((s[:, 1] < RANDOM_CHI2) & (s[:, 0] > STRUCTURED_CHI2)))

    @property
    def partial(self) -> np.ndarray:
        """One 2 KiB half random, the other clearly structured and not mostly zero."""
        w = self.window_chi2
        return ((w < RANDOM_CHI2).any(-1) & (w > STRUCTURED_CHI2).any(-1) & (self.zero_frac < 0.5))
