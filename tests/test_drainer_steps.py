"""The drainer's steps, driven one by one (no thread, no appliance): what it
sends, in which order, as the ring fills and spills."""
from __future__ import annotations

import uuid

from tests.test_mirror_ring import image, mirrored  # noqa: F401 - fixture
from xentap import drainer as dr
from xentap import wire


def _drainer(tmp_path, g, image):  # noqa: F811
    ident = dr.VbdIdentity(vbd_uuid=uuid.uuid4(), domid=3, devid=51712, vdev="xvda",
                           size_bytes=32 << 20)
    d = dr.Drainer(g.vbd, ident, "tcp://127.0.0.1:9", image_path=str(image),
                   spill_dir=str(tmp_path / "spill"), spill_limit=64 << 20)
    d.in_session = True
    d.credit.on_ack(wire.Ack(stream_id=ident.stream_id, epoch=d.epoch, acked_seq=0,
                             credit_bytes=1 << 30, credit_msgs=1 << 20))
    sent: list[tuple[int, int]] = []

    def send(frame) -> bool:
        msg = wire.decode(frame)
        seqs = [r.seq for r in msg.records]
        sent.append((seqs[0], seqs[-1]))
        return True

    d._send = send
    return d, sent


def _write(g, n: int, seed: int) -> None:
    res = g.front.run(block_size=4096, queue_depth=4, read_pct=0, size=8 << 20,
                      max_ios=n, seed=seed)
    assert res["errors"] == 0


def test_a_spill_cursor_left_behind_never_sends_a_seq_again(tmp_path, image,  # noqa: F811
                                                           monkeypatch):
    """While the ring fills, a step sends one spilled frame (budget 1) and keeps
    its cursor into the spill log.  When that frame was the last unsent one,
    the ring's records go next; once sent, they are spilled too (sent is not
    acknowledged).  The cursor kept from before read on into those entries:
    it sent seqs of this session again, and the appliance ended the session
    (bench mirror, 4 KiB: "duplicate of an already received seq")."""
    monkeypatch.setattr(dr, "GATHER_NS", 0)     # (young writes go at once)
    g = mirrored(tmp_path, image)
    d, sent = _drainer(tmp_path, g, image)
    try:
        _write(g, 20, 1)
        assert d._spill_from_ring()             # seqs 1..20 spilled, unsent
        assert d._send_spilled(budget=1)        # sent; the cursor stays
        assert not d._spill_unsent()
        _write(g, 20, 2)
        assert d._send_from_ring()              # 21..40 sent from the ring
        assert d._spill_from_ring()             # ... and spilled, unacknowledged
        _write(g, 20, 3)
        assert d._spill_from_ring()             # 41..60 spilled, unsent
        while d._send_spilled():
            pass
        assert sent == [(1, 20), (21, 40), (41, 60)]
    finally:
        d.close(drain_timeout=0)
        g.close()


def test_status_lag_figures_are_of_the_recent_frames_a_benchmark_gets_all(tmp_path, image):  # noqa: F811
    """The daemon asks for the figures every second: sorting every kept lag
    (up to LAG_SAMPLES) cost 15 ms per VBD each time; the recent ones say
    what the lag is now.  A benchmark asks for the whole run."""
    g = mirrored(tmp_path, image)
    d, _ = _drainer(tmp_path, g, image)
    try:
        d.lags_ms.extend([1000.0] * 6000 + [1.0] * dr.LAG_RECENT)
        recent = d.stats()["lag_ms"]
        assert recent == {"p50": 1.0, "p99": 1.0, "max": 1.0}
        whole = d.stats(lag_window=None)["lag_ms"]
        assert whole == {"p50": 1000.0, "p99": 1000.0, "max": 1000.0}
    finally:
        d.close(drain_timeout=0)
        g.close()


def test_a_few_writes_wait_for_more_a_full_batch_goes_at_once(tmp_path, image, monkeypatch):  # noqa: F811
    """Each frame costs about as much as its records (drainer, libzmq, the
    appliance): a few writes wait up to GATHER_NS after the first one's
    completion for more; GATHER_BYTES of them go at once."""
    g = mirrored(tmp_path, image)
    d, sent = _drainer(tmp_path, g, image)
    try:
        _write(g, 4, 1)
        first_ts = int.from_bytes(g.vbd.mirror_peek().data[8:16], "little")
        monkeypatch.setattr(dr, "_now_ns", lambda: first_ts + dr.GATHER_NS - 1)
        assert not d._send_from_ring() and sent == []
        assert d._gathering == first_ts + dr.GATHER_NS
        monkeypatch.setattr(dr, "_now_ns", lambda: first_ts + dr.GATHER_NS)
        assert d._send_from_ring() and sent == [(1, 4)]
        n = dr.GATHER_BYTES // (4096 + wire.RECORD_HEADER_SIZE) + 1
        _write(g, n, 2)
        monkeypatch.setattr(dr, "_now_ns", lambda: first_ts)      # young, but enough of them
        assert d._send_from_ring() and sent == [(1, 4), (5, 4 + n)]
        # the clock set back an hour: the writes wait GATHER_NS from now, not an hour
        _write(g, 4, 3)
        monkeypatch.setattr(dr, "_now_ns", lambda: first_ts - 3600 * 10**9)
        assert not d._send_from_ring() and d._gathering == first_ts - 3600 * 10**9 + dr.GATHER_NS
    finally:
        d.close(drain_timeout=0)
        g.close()
