"""A mirror stream's record in its spill dir: the last drainer's last seq,
epoch and whether it ended cleanly (json and os only: the daemon reads it
on its main loop)."""
from __future__ import annotations

import json
import os

STREAM_STATE = "stream"         # in the spill dir: {"last_seq": ..., "epoch": ..., "clean": ...}


def read_stream_state(spill_dir: str) -> dict:
    """What the last drainer of this spill dir recorded: ``last_seq`` (the
    stream's last seq, acknowledged or in the spill log), ``epoch`` and
    ``clean`` (it ended by :meth:`Drainer.close` with nothing lost); zeros
    and clean when there is no record (a new stream), unclean when the record
    is damaged."""
    path = os.path.join(spill_dir, STREAM_STATE)
    if not os.path.exists(path):
        return {"last_seq": 0, "epoch": 0, "clean": True}
    try:
        with open(path, encoding="ascii") as f:
            raw = json.load(f)
        out = {k: int(raw[k]) for k in ("last_seq", "epoch")}
        if all(0 <= v < 1 << 63 for v in out.values()):
            out["clean"] = raw.get("clean") is True
            return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {"last_seq": 0, "epoch": 0, "clean": False}


def write_stream_state(spill_dir: str, last_seq: int, epoch: int, clean: bool) -> None:
    path = os.path.join(spill_dir, STREAM_STATE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        json.dump({"last_seq": last_seq, "epoch": epoch, "clean": clean}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_new(clean: bool, last_seq: int, spilled: bool) -> bool:
    """Nothing of the stream was numbered before: it ended clean (or never
    ran) at seq 0 and nothing is spilled."""
    return clean and last_seq == 0 and not spilled


def is_new_stream(spill_dir: str, spilled: bool) -> bool:
    """is_new from the stream's record in ``spill_dir`` (`spilled`: the spill
    dir holds segments)."""
    st = read_stream_state(spill_dir)
    return is_new(st["clean"], st["last_seq"], spilled)
