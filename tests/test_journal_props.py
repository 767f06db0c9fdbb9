"""Property test of the journal against an oracle disk: random workloads (writes,
discards, zeroes, flushes, GAP/RESYNC windows, stream checkpoints, analyzer
tags), segment rolls, retention trims and restarts (with appends that were
never made durable lost); restore at random seqs, times and checkpoints must
equal the oracle at that instant."""
from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engines.journal import Journal, Kind, TagKind
from xentap import wire

SECTORS = 64  # a 32 KiB disk
DISK = SECTORS * 512
DISCARD, ZEROES = int(wire.WriteFlags.DISCARD), int(wire.WriteFlags.ZEROES)

record = st.tuples(st.integers(0, SECTORS - 8), st.sampled_from([1, 2, 8]),
                   st.sampled_from(["data", "data", "data", "discard", "zeroes"]),
                   st.integers(-2_000_000, 5_000_000), st.integers(0, 255))
writes = st.tuples(st.just("writes"), st.lists(record, min_size=1, max_size=12))
op = st.one_of(
    writes, writes, writes, writes,
    st.tuples(st.just("flush")),
    st.tuples(st.just("gap")),
    st.tuples(st.just("resync"), st.integers(0, SECTORS - 8), st.integers(0, 255)),
    st.tuples(st.just("resync_end")),
    st.tuples(st.just("checkpoint"), st.text(max_size=20)),
    st.tuples(st.just("tag"), st.integers(0, 10**6), st.booleans()),
    st.tuples(st.just("commit")),
    st.tuples(st.just("commit")),
    st.tuples(st.just("restart")),
)


class Model:
    def __init__(self):
        self.disk = bytearray(DISK)
        self.snap = {0: bytes(DISK)}
        self.ts = {0: 0}
        self.gap = {0: False}  # GAP window open after seq
        self.kind = {0: -1}
        self.seq = 1
        self.now = time.time_ns() - 3600 * 10**9
        self.durable = 0
        self.cps: dict[tuple[int, int], tuple[bool, str]] = {}  # durable (seq, kind) -> ...
        self.pending_cps: dict[tuple[int, int], tuple[bool, str]] = {}

    def stamp(self, delta: int) -> int:
        t = max(self.now, self.now + delta)  # the journal keeps time non-decreasing
        self.now = t
        return t

    def record(self, kind: int, t: int) -> int:
        s = self.seq
        self.snap[s] = bytes(self.disk)
        self.ts[s] = t
        self.kind[s] = kind
        self.gap[s] = self.gap[s - 1] if kind not in (Kind.GAP, Kind.RESYNC_END) \
            else kind == Kind.GAP
        self.seq += 1
        return s

    def rollback(self) -> None:
        """A restart: what was not made durable is gone."""
        for s in range(self.durable + 1, self.seq):
            for d in (self.snap, self.ts, self.gap, self.kind):
                d.pop(s, None)
        self.seq = self.durable + 1
        self.disk = bytearray(self.snap[self.durable])
        self.now = max(self.now, self.ts[self.durable])
        self.pending_cps.clear()


def _check(j: Journal, m: Model, tmp: Path, data) -> None:
    j.settle()
    base, last = j.base_seq, j.durable_seq
    assert last == m.durable
    out = tmp / "restored.img"
    seqs = {base, last, data.draw(st.integers(base, last), label="seq")}
    for s in sorted(seqs):
        j.restore(out, seq=s)
        assert out.read_bytes() == m.snap[s], f"restore at seq {s} (window {base}..{last})"
    # by time: the last write at or before it
    if last > base:
        lo = m.ts[base] if base else m.ts[1]
        t = lo + data.draw(st.integers(0, m.ts[last] - lo), label="time")
        want = max([s for s in range(base + 1, last + 1) if m.ts[s] <= t], default=base)
        got = j.seq_at(t)
        assert m.ts[got] == m.ts[want] and got == want, (t, got, want)
    # checkpoints: every flush, stream checkpoint and tag after the base
    expect = {k: v for k, v in m.cps.items() if base < k[0] <= last}
    got = {(c.seq, c.kind): (c.consistent, c.label) for c in j.checkpoints()}
    assert got == expect
    if expect:
        (s, _k) = data.draw(st.sampled_from(sorted(expect)), label="checkpoint")
        j.restore(out, seq=s)
        assert out.read_bytes() == m.snap[s]


def _run(data, max_ops: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="xt-jprop-"))
    try:
        opts = dict(segment_bytes=data.draw(st.sampled_from([2048, 8192, 8192, 1 << 20]),
                                         label="seg"),
                    retention_bytes=data.draw(st.sampled_from([6000, 20000, 1 << 40]),
                                              label="retention"))
        vbd = str(uuid.uuid4())
        j = Journal.create(tmp / "j", vbd_uuid=vbd, size_bytes=DISK, **opts)
        m = Model()
        try:
            for o in data.draw(st.lists(op, min_size=max_ops // 4, max_size=max_ops),
                               label="ops"):
                name = o[0]
                if name == "writes":
                    recs = []
                    for i, (sector, n, kind, dt, fill) in enumerate(o[1]):
                        t = m.stamp(dt)
                        ln = n * 512
                        if kind == "data":
                            d = random.Random(fill * 7 + ln).randbytes(ln)  # incompressible
                            recs.append(wire.WriteRecord(m.seq + i, t, sector, ln, 0, d))
                        else:
                            fl = DISCARD if kind == "discard" else ZEROES
                            recs.append(wire.WriteRecord(m.seq + i, t, sector, ln, fl, b""))
                    j.append_writes(m.seq, recs)
                    for r in recs:
                        m.disk[r.sector * 512:r.sector * 512 + r.length] = \
                            r.data or bytes(r.length)
                        m.record(Kind.WRITE, r.timestamp_ns)
                elif name == "flush":
                    t = m.stamp(1000)
                    j.append_event(m.seq, Kind.FLUSH, t)
                    s = m.record(Kind.FLUSH, t)
                    m.pending_cps[(s, TagKind.FLUSH)] = (not m.gap[s], "")
                elif name == "gap":
                    if m.gap[m.seq - 1]:
                        continue
                    t = m.stamp(1000)
                    j.append_event(m.seq, Kind.GAP, t, arg=1)
                    m.record(Kind.GAP, t)
                elif name == "resync":
                    if not m.gap[m.seq - 1]:
                        continue
                    sector, fill = o[1], o[2]
                    d = bytes([fill]) * 4096
                    j.append_resync(m.seq, sector, 4096, 0, d)
                    m.disk[sector * 512:sector * 512 + 4096] = d
                    m.record(Kind.RESYNC, m.ts[m.seq - 1])  # no time on the wire: the last one
                elif name == "resync_end":
                    if not m.gap[m.seq - 1]:
                        continue
                    t = m.stamp(1000)
                    j.append_event(m.seq, Kind.RESYNC_END, t)
                    m.record(Kind.RESYNC_END, t)
                elif name == "checkpoint":
                    t = m.stamp(1000)
                    label = o[1]
                    cons = m.kind[m.seq - 1] == Kind.FLUSH and not m.gap[m.seq - 1]
                    j.append_event(m.seq, Kind.CHECKPOINT, t, arg=TagKind.USER, label=label)
                    s = m.record(Kind.CHECKPOINT, t)
                    m.pending_cps[(s, TagKind.USER)] = (cons, label)
                elif name == "tag":
                    j.settle()
                    lo, hi = j.base_seq + 1, m.seq - 1
                    if lo > hi or (o[1] % (hi - lo + 1) + lo, TagKind.ANALYZER) in m.cps \
                            or (o[1] % (hi - lo + 1) + lo, TagKind.ANALYZER) in m.pending_cps:
                        continue
                    s = o[1] % (hi - lo + 1) + lo
                    c = j.add_tag(s, TagKind.ANALYZER, f"a{s}", consistent=o[2])
                    assert c.consistent == (o[2] and not m.gap[s])
                    m.pending_cps[(s, TagKind.ANALYZER)] = (c.consistent, f"a{s}")
                elif name == "commit":
                    j.commit()
                    m.durable = m.seq - 1
                    m.cps.update(m.pending_cps)
                    m.pending_cps.clear()
                elif name == "restart":
                    j.close()
                    m.rollback()
                    j = Journal.open(tmp / "j", writable=True, **opts)
                    event("restarted")
                    assert j.last_seq == m.durable
                    _check(j, m, tmp, data)
            j.commit()
            m.durable = m.seq - 1
            m.cps.update(m.pending_cps)
            _check(j, m, tmp, data)
            assert j.verify()["ok"]
            event(f"trimmed: {j.base_seq > 0}")
            event(f"segments rolled: {len(j.segments) > 1 or j.base_seq > 0}")
            event(f"checkpoints: {bool(m.cps)}")
        finally:
            j.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_restore_equals_oracle_across_rolls_trims_and_restarts(data):
    _run(data, 40)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_restore_equals_oracle_long_workloads(data):
    _run(data, 150)
