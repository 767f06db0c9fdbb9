"""The spill log: reopened by the process that closed it, unchanged, it is
taken over without reading its frames again; anything else is recovered."""
from __future__ import annotations

import os
import time

import pytest

from xentap import spill as spill_mod
from xentap import wire
from xentap.spill import SpillLog


def frames(n: int, per: int = 64, first: int = 1):
    out = []
    for k in range(n):
        seq = first + k * per
        recs = [wire.WriteRecord(seq + i, time.time_ns(), i * 8, 4096, 0, os.urandom(4096))
                for i in range(per)]
        out.append((seq, seq + per - 1,
                    wire.encode(wire.Writes(stream_id=1, epoch=1, first_seq=seq, records=recs))))
    return out


def written(tmp_path, n=6):
    d = str(tmp_path / "spill")
    log = SpillLog(d, 64 << 20, segment_bytes=1 << 20)     # several segments
    for first, last, f in frames(n):
        assert log.append(f, first, last)
    log.close()
    return d, log


def test_a_log_this_process_closed_is_taken_over_without_reading_it(tmp_path, monkeypatch):
    d, old = written(tmp_path)
    assert len(old.segments) > 1

    def no_decode(*a, **k):
        raise AssertionError("frames read again")
    monkeypatch.setattr(spill_mod.wire, "decode", no_decode)
    log = SpillLog(d, 64 << 20, segment_bytes=1 << 20)
    assert [(s.path, s.first_seq, s.last_seq, s.size) for s in log.segments] == \
        [(s.path, s.first_seq, s.last_seq, s.size) for s in old.segments]
    assert [f[:2] for f in log.frames_after(0)] == [(1 + 64 * k, 64 * (k + 1)) for k in range(6)]
    log.close()


@pytest.mark.parametrize("change", ["torn tail", "file removed"])
def test_a_log_changed_since_it_was_closed_is_recovered_from_its_files(tmp_path, change):
    d, old = written(tmp_path)
    last = old.segments[-1].path
    if change == "torn tail":
        with open(last, "ab") as f:
            f.write(b"XTSP" + b"\x01" * 40)             # a torn entry
    else:
        os.unlink(last)
    log = SpillLog(d, 64 << 20, segment_bytes=1 << 20)
    if change == "torn tail":
        assert log.last_seq == old.last_seq and os.path.getsize(last) == old.segments[-1].size
    else:
        assert log.last_seq == old.segments[-2].last_seq
    assert log.first_seq == 1
    log.close()


def test_frames_after_with_head_reads_only_the_start_of_each_frame(tmp_path):
    """The status round's lag reads one field of the first unacknowledged
    frame: with ``head`` the rest of each frame is skipped, not read."""
    d, log = written(tmp_path)
    log = SpillLog(d, 64 << 20, segment_bytes=1 << 20)
    whole = list(log.frames_after(64))
    heads = list(log.frames_after(64, head=60))
    assert [f[:2] for f in heads] == [f[:2] for f in whole]
    assert all(len(h[2]) == 60 and h[2] == f[2][:60] for h, f in zip(heads, whole))
    assert all(len(f[2]) > 60 for f in whole)
    log.close()
