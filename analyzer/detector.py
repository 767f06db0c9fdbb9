"""Mass-encryption detector for one VBD, fed its writes in order.

Writes are cut into 4 KiB blocks and analysed in batches (one numpy pass per
batch, see :mod:`analyzer.entropy`).  A block is *suspicious* when

* it is random and the same disk block was structured before (seen in an
  earlier write, or read from the replica through ``read_old``), or
* its 16-byte stripes alternate random / structured (intermittent
  encryption), or
* it is partly random and partly structured where structured data was.

Blocks under a compressed / media signature (the block that starts a zip,
jpeg, zstd, xz, mp4... file and the blocks written contiguously after it),
blocks in excluded regions (fs journals and logs) and blocks inside a volume
that is encrypted as a whole (LUKS) never count.  Random data written where
nothing structured was (a new archive, an encrypted video) is counted as
``random_new`` but raises nothing by itself.

The alarm compares the suspicious share of the recent writes (the last
``window_bytes`` of analysed data, a sliding window) with this VBD's own
baseline (the mean share over past windows): it needs at least
``min_bytes / sensitivity`` suspicious bytes and a share above
``max(min_share, factor * baseline) / sensitivity``.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .entropy import BLOCK, SAMPLE, BlockStats, starts_with_signature

UNKNOWN, STRUCTURED, RANDOM, ZERO = 0, 1, 2, 3
_CHUNK_SHIFT = 20  # state map chunks of 1 Mi blocks (4 GiB of disk, 1 MiB of memory)
_CHUNK_MASK = (1 << _CHUNK_SHIFT) - 1
_MAX_RUNS = 256
_V32 = np.dtype((np.void, 32))


@dataclass
class DetectorConfig:
    sensitivity: float = 1.0  # > 1: alarm earlier and on less; < 1: later
    window_bytes: int = 16 << 20  # the recent writes the share is measured on
    min_bytes: int = 4 << 20  # suspicious bytes needed (at sensitivity 1)
    min_share: float = 0.15  # suspicious share of recent data writes needed
    factor: float = 4.0  # ... and at least this many times the baseline share
    batch_blocks: int = 256  # blocks per analysis batch (1 MiB)
    state_chunks: int = 64  # per-block states kept for this many 4 GiB regions (1 MiB each), LRU

    def validate(self) -> None:
        if not 0.05 <= self.sensitivity <= 20:
            raise ValueError("sensitivity must be between 0.05 and 20")
        if self.window_bytes < 1 << 20:
            raise ValueError("window must be at least 1M")
        if not 1 <= self.batch_blocks <= 1024:
            raise ValueError("batch must be 1..1024 blocks")
        if self.state_chunks < 1:
            raise ValueError("state_chunks must be at least 1")


@dataclass(frozen=True)
class Suspicion:
    """What the detector says when it raises the alarm."""

    first_seq: int
    first_time_ns: int
    first_sector: int
    seq: int  # the write that tipped it
    time_ns: int
    suspicious_bytes: int
    share: float
    baseline: float
    intermittent_blocks: int
    overwrite_blocks: int


def _classify(st: BlockStats, random: np.ndarray | None = None) -> np.ndarray:
    """Per-block state (uint8): ZERO, RANDOM, STRUCTURED or UNKNOWN (in between)."""
    random = st.random if random is None else random
    state = st.structured.view(np.uint8) * np.uint8(STRUCTURED)
    state[random] = RANDOM
    state[st.zero] = ZERO
    return state


class EncryptionDetector:
    def __init__(self, config: DetectorConfig | None = None, read_old=None):
        """``read_old(byte_offset, length) -> bytes`` returns what the disk held
        before this stream (the replica), or None: then only blocks written in
        the stream have a known previous state."""
        self.cfg = config or DetectorConfig()
        self.cfg.validate()
        self.read_old = read_old
        self._state: OrderedDict[int, np.ndarray] = OrderedDict()  # LRU; evicted blocks are unknown again
        # the 512-byte samples of the queued blocks (the only bytes of a write the
        # statistics read), taken when the write is queued: nothing holds the write
        self._grow(self.cfg.batch_blocks + 64)
        self._meta: list[tuple[int, int, int, int, bool]] = []  # seq, time, first block, nblocks, sig-continued
        self._nblocks = 0
        self._runs: dict[int, None] = {}  # byte offsets where a signature run ends
        self._excl_starts: list[int] = []
        self._excl: list[tuple[int, int]] = []
        # sliding window over the last window_bytes of analysed data: (data, suspicious) per batch
        self._win: deque[tuple[int, int]] = deque()
        self.recent_data = 0
        self.recent_susp = 0
        self._since_window = 0
        self.baseline = 0.0
        self._windows = 0
        self._first: tuple[int, int, int] | None = None
        self.alarmed: Suspicion | None = None
        self.totals = {"bytes": 0, "blocks": 0, "random": 0, "random_new": 0, "overwrite": 0,
                       "intermittent": 0, "partial": 0, "signature": 0, "excluded": 0}

    # ----- regions that never count
    def exclude(self, start: int, end: int) -> None:
        """Never count bytes [start, end) (journals, logs, encrypted volumes)."""
        self._excl.append((start, end))
        self._excl.sort()
        self._excl_starts = [s for s, _ in self._excl]

    def _excluded(self, off: int) -> bool:
        i = bisect_right(self._excl_starts, off) - 1
        return i >= 0 and off < self._excl[i][1]

    def _grow(self, blocks: int) -> None:
        old = getattr(self, "_samp", None)
        self._samp = np.empty((blocks, SAMPLE), dtype=np.uint8)
        self._samp32 = self._samp.reshape(-1).view(_V32)
        if old is not None:
            self._samp[:len(old)] = old

    # ----- input
    def add(self, seq: int, time_ns: int, offset: int, data) -> Suspicion | None:
        """Queue one write; returns a Suspicion when this call raised the alarm."""
        nb = len(data) // BLOCK
        self.totals["bytes"] += len(data)
        if nb == 0:
            return None
        if self._excl and self._excluded(offset):
            self.totals["excluded"] += nb * BLOCK
            return None
        # a write that starts a compressed/media file, or continues one written
        # just before it (sequential writes of one file), is covered by its signature
        cont = offset in self._runs
        if cont:
            del self._runs[offset]
        cont = cont or starts_with_signature(data)
        if cont:
            self._runs[offset + nb * BLOCK] = None
            if len(self._runs) > _MAX_RUNS:
                self._runs.pop(next(iter(self._runs)))
        n0 = self._nblocks
        if n0 + nb > len(self._samp):
            self._grow(max(2 * len(self._samp), n0 + nb))
        # the first 32 bytes of every 256 (copied as 32-byte items: numpy copies
        # those several times faster than 32 single bytes)
        chunks = np.frombuffer(data, dtype=_V32, count=nb * (BLOCK // 32))
        self._samp32[n0 * 16:(n0 + nb) * 16] = chunks[::8]
        self._meta.append((seq, time_ns, offset // BLOCK, nb, cont))
        self._nblocks = n0 + nb
        if self._nblocks >= self.cfg.batch_blocks:
            return self.process()
        return None

    def process(self) -> Suspicion | None:
        """Analyse the queued writes now (also done by add when a batch is full)."""
        if not self._nblocks:
            return None
        meta, n = self._meta, self._nblocks
        self._meta, self._nblocks = [], 0
        st = BlockStats.of_sample(self._samp[:n])
        # per block: its write, block number on disk, sig-continuation of its write
        nw = len(meta)
        counts = np.fromiter((m[3] for m in meta), dtype=np.intp, count=nw)
        first_blk = np.fromiter((m[2] for m in meta), dtype=np.int64, count=nw)
        starts = np.cumsum(counts) - counts
        pos = np.arange(n)
        bno = pos + np.repeat(first_blk - starts, counts)
        # a signature covers the rest of its write; a continued write is covered whole
        covered = None
        if st.signature.any() or any(m[4] for m in meta):
            widx = np.repeat(np.arange(nw), counts)
            cont = np.fromiter((m[4] for m in meta), dtype=bool, count=nw)
            mark = np.where(st.signature, pos, -1)
            covered = np.maximum.accumulate(mark) >= starts[widx]
            covered |= cont[widx]
            last = starts + counts - 1
            for i in np.nonzero(covered[last])[0]:
                end = (int(first_blk[i]) + int(counts[i])) * BLOCK
                self._runs[end] = None
                if len(self._runs) > _MAX_RUNS:
                    self._runs.pop(next(iter(self._runs)))
            if not covered.any():
                covered = None

        random = st.random
        new_state = _classify(st, random)
        prior = self._lookup(bno)
        partial = None
        if self.read_old is not None:
            partial = st.partial
            self._fill_unknown(prior, bno, random | partial)
        was_structured = prior == STRUCTURED
        inter = st.intermittent
        overwrite = random & was_structured
        if was_structured.any():
            partial = (st.partial if partial is None else partial) & was_structured & ~random
        else:
            partial = None
        random_new = random & ~was_structured
        if covered is not None:
            free = ~covered
            inter &= free
            overwrite &= free
            random_new &= free
            if partial is not None:
                partial &= free
        susp = overwrite | inter
        if partial is not None:
            susp |= partial
        self._store(bno, new_state)

        t = self.totals
        def cnt(a: np.ndarray) -> int:
            return int(np.count_nonzero(a))
        n_inter, n_over = cnt(inter), cnt(overwrite)
        t["blocks"] += n
        t["random"] += cnt(random) * BLOCK
        t["random_new"] += cnt(random_new) * BLOCK
        t["overwrite"] += n_over * BLOCK
        t["intermittent"] += n_inter * BLOCK
        t["partial"] += (0 if partial is None else cnt(partial)) * BLOCK
        t["signature"] += (0 if covered is None else cnt(covered)) * BLOCK
        nsusp = cnt(susp)
        if nsusp and self._first is None:
            k = int(np.argmax(susp))
            m = meta[int(np.searchsorted(starts, k, side="right")) - 1]
            self._first = (m[0], m[1], int(bno[k]) * (BLOCK // 512))
        return self._account(n * BLOCK, nsusp * BLOCK, meta[-1], n_inter, n_over)

    # ----- window, baseline, alarm
    def _account(self, data: int, susp: int, last_meta, n_inter: int, n_over: int) -> Suspicion | None:
        cfg = self.cfg
        self._win.append((data, susp))
        self.recent_data += data
        self.recent_susp += susp
        while self._win and self.recent_data - self._win[0][0] >= cfg.window_bytes:
            d, s = self._win.popleft()
            self.recent_data -= d
            self.recent_susp -= s
        self._since_window += data
        if self._since_window >= cfg.window_bytes:
            self._since_window = 0
            share = self.recent_susp / self.recent_data if self.recent_data else 0.0
            if self.alarmed is None:
                self.baseline = (self.baseline * self._windows + share) / (self._windows + 1)
                self._windows = min(self._windows + 1, 64)
        if self.recent_susp < BLOCK:
            self._first = None
        if self.alarmed is not None or not self.recent_data:
            return None
        share = self.recent_susp / self.recent_data
        s = cfg.sensitivity
        if (self.recent_susp >= cfg.min_bytes / s
                and share >= max(cfg.min_share, cfg.factor * self.baseline) / s
                and self._first is not None):
            f = self._first
            self.alarmed = Suspicion(
                first_seq=f[0], first_time_ns=f[1], first_sector=f[2], seq=last_meta[0],
                time_ns=last_meta[1], suspicious_bytes=int(self.recent_susp), share=round(share, 4),
                baseline=round(self.baseline, 4), intermittent_blocks=n_inter, overwrite_blocks=n_over)
            return self.alarmed
        return None

    def reset_alarm(self) -> None:
        """Re-arm after an alarm was handled (the counters start afresh)."""
        self.alarmed = None
        self._win.clear()
        self.recent_data = self.recent_susp = 0
        self._first = None

    # ----- per disk-block state
    def _lookup(self, bno: np.ndarray) -> np.ndarray:
        ch = bno >> _CHUNK_SHIFT
        c0 = int(ch[0])
        if (ch == c0).all():  # the usual case: the whole batch is in one 4 GiB region
            arr = self._state.get(c0)
            if arr is None:
                return np.zeros(len(bno), dtype=np.uint8)
            self._state.move_to_end(c0)
            return arr[bno & _CHUNK_MASK]
        out = np.zeros(len(bno), dtype=np.uint8)
        for c in np.unique(ch):
            arr = self._state.get(int(c))
            if arr is not None:
                self._state.move_to_end(int(c))
                sel = ch == c
                out[sel] = arr[bno[sel] & _CHUNK_MASK]
        return out

    def _chunk(self, c: int) -> np.ndarray:
        arr = self._state.get(c)
        if arr is None:
            arr = self._state[c] = np.zeros(1 << _CHUNK_SHIFT, dtype=np.uint8)
            while len(self._state) > self.cfg.state_chunks:
                self._state.popitem(last=False)
        return arr

    def _store(self, bno: np.ndarray, state: np.ndarray) -> None:
        ch = bno >> _CHUNK_SHIFT
        c0 = int(ch[0])
        if (ch == c0).all():
            self._chunk(c0)[bno & _CHUNK_MASK] = state
            return
        for c in np.unique(ch):
            sel = ch == c
            self._chunk(int(c))[bno[sel] & _CHUNK_MASK] = state[sel]

    def _fill_unknown(self, prior: np.ndarray, bno: np.ndarray, want: np.ndarray) -> None:
        """Classify the replica's old content of blocks we never saw written.

        Blocks at consecutive disk addresses are read with one ``read_old``
        call per run (a write's blocks are consecutive: one read, not one per
        block); after a short read the rest of the run is asked again, and a
        block that no read returns whole counts as zeros."""
        idx = np.nonzero((prior == UNKNOWN) & want)[0]
        if not len(idx):
            return
        b = bno[idx]
        cut = np.nonzero(np.diff(b) != 1)[0] + 1
        run_starts = np.concatenate(([0], cut))
        run_ends = np.concatenate((cut, [len(idx)]))
        samp = np.zeros((len(idx), SAMPLE), dtype=np.uint8)  # zeros where a read fell short
        for r0, r1 in zip(run_starts.tolist(), run_ends.tolist()):
            while r0 < r1:
                got = self.read_old(int(b[r0]) * BLOCK, (r1 - r0) * BLOCK)
                whole = 0 if got is None else min(len(got) // BLOCK, r1 - r0)
                if whole:
                    chunks = np.frombuffer(got, dtype=_V32, count=whole * (BLOCK // 32))
                    samp[r0:r0 + whole].reshape(-1).view(_V32)[:] = chunks[::8]
                # a short read: the rest of the run block by block (the first one missing stays zero)
                r0 += max(whole, 1)
        prior[idx] = _classify(BlockStats.of_sample(samp))
