"""Writes the fuzzer's seed corpus (tests/fuzz/corpus/): for every harness
configuration, well-formed requests of each kind and a few classic mistakes,
so that libFuzzer starts from inputs that reach deep into the request path.

    .venv/bin/python -m tests.fuzz.make_seeds
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tests.fuzz.blkif import (FUZZ_CONFIGS, FUZZ_RING_FRAMES, OP_FLUSH_DISKCACHE, OP_READ,
                              OP_WRITE, OP_WRITE_BARRIER, FuzzInput, discard, indirect, raw, rw,
                              segment)

D = FUZZ_RING_FRAMES        # first data gref


def seeds():
    for cfg, (proto, _order, _ro, ind, ssz, mirror) in enumerate(FUZZ_CONFIGS):
        per = ssz // 512
        for start in (0, 0xFFFFFFF0):
            # Plain reads and writes: one segment, then all eleven.
            yield f"c{cfg}-rw-{start:x}", (
                FuzzInput(cfg, start)
                .push(rw(proto, OP_WRITE, 1, 0, [segment(D)]))
                .push(rw(proto, OP_READ, 2, 8, [segment(D + 1)]))
                .push(rw(proto, OP_WRITE, 3, 64, [segment(D + i) for i in range(11)]))
                .push(rw(proto, OP_READ, 4, 64, [segment(D + 11 + i) for i in range(11)]))
                .run())
        yield f"c{cfg}-ordered", (
            FuzzInput(cfg)
            .push(rw(proto, OP_WRITE, 1, 0, [segment(D)]))
            .push(rw(proto, OP_FLUSH_DISKCACHE, 2, 0))
            .push(rw(proto, OP_WRITE_BARRIER, 3, 16, [segment(D + 2)]))
            .push(rw(proto, OP_WRITE, 4, 24, [segment(D + 3)]))
            .push(rw(proto, OP_FLUSH_DISKCACHE, 5, 32, [segment(D + 4)]))
            .run())
        yield f"c{cfg}-discard", (
            FuzzInput(cfg)
            .push(discard(proto, 1, 0, 8 * per))
            .push(discard(proto, 2, 2048 - 8, 8))
            .push(discard(proto, 3, 2040, 16))
            .run())
        if ind:
            n = min(ind, 64)
            segs = b"".join(segment(D + 2 + i % 30) for i in range(n))
            yield f"c{cfg}-indirect", (
                FuzzInput(cfg)
                .page(0, 0, segs)
                .push(indirect(proto, OP_WRITE, 7, 128, n, [D]))
                .push(indirect(proto, OP_READ, 8, 128, n, [D]))
                .run())
            yield f"c{cfg}-indirect-2pages", (
                FuzzInput(cfg)
                .page(0, 4096 - 16, segment(D + 5) + segment(D + 6))
                .page(1, 0, segment(D + 7))
                .push(indirect(proto, OP_READ, 9, 0, 3, [D, D + 1]))
                .run())
        yield f"c{cfg}-mistakes", (
            FuzzInput(cfg)
            .push(rw(proto, OP_READ, 1, 0, [], nr_segments=0))
            .push(rw(proto, OP_READ, 2, 0, [segment(D)], nr_segments=12))
            .push(rw(proto, OP_READ, 3, 0, [segment(D, 5, 2)]))
            .push(rw(proto, OP_READ, 4, 0, [segment(D, 0, 8)]))
            .push(rw(proto, OP_READ, 5, 2047, [segment(D)]))
            .push(rw(proto, OP_READ, 6, 0, [segment(9999)]))
            .push(raw(proto, 99, 7))
            .push(indirect(proto, OP_READ, 8, 0, 0, [D]))
            .push(discard(proto, 9, 2000, 100))
            .run())
        yield f"c{cfg}-grants", (
            FuzzInput(cfg)
            .grant(D, 0, 0, D)                      # not permitted
            .grant(D + 1, 1, 3, D + 1)              # granted to another domain
            .grant(D + 2, 1 | 4, 0, D + 2)          # read-only
            .grant(D + 3, 1, 0, 1 << 20)            # frame out of range
            .push(rw(proto, OP_WRITE, 1, 0, [segment(D)]))
            .push(rw(proto, OP_WRITE, 2, 0, [segment(D + 1)]))
            .push(rw(proto, OP_READ, 3, 0, [segment(D + 2)]))
            .push(rw(proto, OP_WRITE, 4, 0, [segment(D + 2)]))
            .push(rw(proto, OP_WRITE, 5, 0, [segment(D + 3)]))
            .run())
        if mirror and ind:
            # Large writes overflow the 1 MiB mirror ring: GAP, then resync.
            segs = b"".join(segment(D + 2 + i % 30) for i in range(64))
            inp = FuzzInput(cfg).page(0, 0, segs).checkpoint(b"before")
            for k in range(6):      # 6 x 256 KiB through a 1 MiB mirror ring
                inp.push(indirect(proto, OP_WRITE, 10 + k, (k % 4) * 512, 64, [D]))
            yield f"c{cfg}-mirror-overflow", (
                inp.run().push(rw(proto, OP_FLUSH_DISKCACHE, 20, 0)).run().checkpoint(b"after")
                .drain().push(rw(proto, OP_WRITE, 21, 0, [segment(D + 3)])).run())
        yield f"c{cfg}-indices", (
            FuzzInput(cfg, 5)
            .push(rw(proto, OP_WRITE, 1, 0, [segment(D)]))
            .step(0)
            .prod(5 + 1000)
            .run()
            .event(3, 1)
            .run())


def main() -> None:
    out = Path(__file__).resolve().parent / "corpus"
    out.mkdir(exist_ok=True)
    for name, inp in seeds():
        data = inp.bytes()
        (out / f"{name}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)


if __name__ == "__main__":
    main()
