"""`xentap bench journal`: the CDP journal's ingest, restore and metadata figures,
side by side with the sequential write speed of the same filesystem, in one run.

- seq_write_mb_s: ``dd if=/dev/zero bs=1M conv=fdatasync`` of the disk's size
  in the same directory; the median of four runs (one before the ingest, three
  alternating with the restores).
- ingest_4k_mb_s / ingest_1m_mb_s: :meth:`Journal.append_writes` of prebuilt
  WRITES batches (4 KiB records x 256 / 1 MiB records x 4 per batch, decoded
  from wire frames as the receiver gets them), made
  durable every 4 MiB (group commit: one zstd frame per batch, one
  fdatasync per commit, run in a worker thread while the next 4 MiB are
  appended, as the receiver does), compression on.  Record data is half random, half
  zeroes per 4 KiB block (compresses about 2:1, like a used filesystem).
- restore_mb_s: disk bytes / median seconds of three restores of the *latest* point (the
  worst case: the whole history replayed) of a disk whose base is full of
  data and whose journal holds ``history`` of 4 KiB random writes (with a
  flush every 64 writes) timestamped across the history's duration.
- metadata_overhead: (frame headers + record tables + .idx + .ckp) / journal
  bytes on disk, for the 4 KiB history.
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from engines import journal as jm
from xentap import wire

_BLOB = 16 << 20
RUNS = 3  #: restores of the latest point, each after a dd run (medians reported)


def _blob() -> memoryview:
    r = os.urandom(_BLOB // 2)
    return memoryview(b"".join(r[i:i + 2048] + bytes(2048) for i in range(0, len(r), 2048)))


def seq_write(directory: str, nbytes: int) -> float:
    """MB/s of dd writing nbytes sequentially (fdatasync included)."""
    path = os.path.join(directory, "dd.img")
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={nbytes >> 20}",
                        "conv=fdatasync"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        el = time.perf_counter() - t0
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return nbytes / el / 1e6


def _batches(rnd, blob, disk: int, rec: int, per: int, total: int, first_seq: int,
             t0: int, dt: int) -> list:
    out, seq, ts = [], first_seq, t0
    for _ in range(max(1, total // (rec * per))):
        recs = []
        for i in range(per):
            o = rnd.randrange(0, _BLOB - rec, 4096)
            recs.append(wire.WriteRecord(seq + i, ts, rnd.randrange(disk // rec) * rec // 512,
                                         rec, 0, blob[o:o + rec]))
            ts += dt
        # as the appliance gets them: decoded from a WRITES frame (wire.Records)
        frame = wire.encode(wire.Writes(stream_id=1, epoch=1, first_seq=seq, records=recs))
        out.append((seq, wire.decode(frame).records))
        seq += per
    return out


def ingest(directory: str, disk: int, rec: int, per: int, total: int, blob) -> dict:
    d = os.path.join(directory, f"ingest-{rec}")
    j = jm.Journal.create(d, vbd_uuid=str(uuid.uuid4()), size_bytes=disk,
                          segment_bytes=jm.DEFAULT_SEGMENT_BYTES)
    try:
        bs = _batches(random.Random(rec), blob, disk, rec, per, total, 1, time.time_ns(), 1000)
        commit_every = max(1, (4 << 20) // (rec * per))
        # as the receiver does it: appends in this thread, each group commit's
        # compression, write and fdatasync in a worker while the next group is appended
        pool = ThreadPoolExecutor(1)
        fut = None
        t0 = time.perf_counter()
        for k, (seq, recs) in enumerate(bs):
            j.append_writes(seq, recs)
            if k % commit_every == commit_every - 1:
                if fut is not None:
                    fut.result()
                fut = pool.submit(j.write, j.take())
        if fut is not None:
            fut.result()
        j.commit()
        el = time.perf_counter() - t0
        pool.shutdown()
        n = len(bs) * rec * per
        return dict(mb_s=n / el / 1e6, records_s=len(bs) * per / el, bytes=n, seconds=el,
                    stored_fraction=j.stats["stored_bytes"] / n)
    finally:
        j.close()
        shutil.rmtree(d, ignore_errors=True)


def restore(directory: str, disk: int, history_seconds: float, history_bytes: int, blob,
            progress: Callable[[str], None]) -> dict:
    base_src = os.path.join(directory, "disk.img")
    with open(base_src, "wb") as f:  # a disk full of data
        for off in range(0, disk, _BLOB):
            f.write(blob[:min(_BLOB, disk - off)])
        f.flush()
        os.fsync(f.fileno())
    d = os.path.join(directory, "journal")
    j = jm.Journal.create(d, vbd_uuid=str(uuid.uuid4()), size_bytes=disk, base_from=base_src)
    os.unlink(base_src)
    nrec = history_bytes // 4096
    dt = max(1, int(history_seconds * 1e9 / nrec))
    t0 = time.time_ns() - int(history_seconds * 1e9)
    rnd = random.Random(9)
    seq = 1
    progress(f"journaling {history_bytes >> 20} MiB of 4 KiB random writes over "
             f"{history_seconds:.0f} s of history")
    for _seq, recs in _batches(rnd, blob, disk, 4096, 64, history_bytes, 1, t0, dt):
        j.append_writes(seq, recs)
        seq += len(recs)
        j.append_event(seq, jm.Kind.FLUSH, recs[-1].timestamp_ns)
        seq += 1
        if seq % 1024 < 65:
            j.commit()
    j.commit()
    info = j.info()
    seg_bytes = info["journal_bytes"]
    meta = info["index_bytes"]
    for s in j.segments:
        with open(s.xjs, "rb") as f:
            for _off, h, _t, _p, err in jm._scan_frames(f, jm.SEG_HDR.size):
                if err:
                    break
                meta += jm.FRAME_HDR.size + h[9]
        meta += jm.SEG_HDR.size
    overhead = meta / (seg_bytes + info["index_bytes"])
    out = os.path.join(directory, "restored.img")
    progress(f"restoring the latest point of a {disk >> 20} MiB disk "
             f"({j.last_seq} records replayed)")
    # restores and dd alternate, three times each: the ratio of the medians is what
    # is reported (one of each swings with whatever else the disk is doing)
    secs, dd = [], []
    for _ in range(RUNS):
        dd.append(seq_write(directory, disk))
        secs.append(j.restore(out, seq=j.durable_seq)["seconds"])
    mid = j.seq_at(t0 + int(history_seconds * 1e9 / 2))
    res_mid = j.restore(out, seq=mid)
    j.close()
    os.unlink(out)
    shutil.rmtree(d, ignore_errors=True)
    return dict(mb_s=disk / statistics.median(secs) / 1e6, seconds=statistics.median(secs),
                dd_mb_s=statistics.median(dd), all_mb_s=[round(disk / x / 1e6, 1) for x in secs],
                all_dd_mb_s=[round(x, 1) for x in dd],
                mid_mb_s=disk / res_mid["seconds"] / 1e6, records=seq - 1,
                journal_bytes=seg_bytes, metadata_overhead=overhead)


def run(directory: str | None, disk: int, history_seconds: float, history_bytes: int,
        ingest_bytes: int, progress: Callable[[str], None]) -> dict:
    tmp = tempfile.mkdtemp(prefix="xt-jbench-", dir=directory)
    try:
        blob = _blob()
        progress(f"sequential write of {disk >> 20} MiB with dd in {tmp}")
        dd0 = seq_write(tmp, disk)
        progress(f"ingest: {ingest_bytes >> 20} MiB of 4 KiB records, then of 1 MiB records")
        i4 = ingest(tmp, disk, 4096, 256, ingest_bytes, blob)
        i1 = ingest(tmp, disk, 1 << 20, 4, ingest_bytes, blob)
        r = restore(tmp, disk, history_seconds, history_bytes, blob, progress)
        seq_mb = statistics.median([dd0] + r["all_dd_mb_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(
        ingest_4k_mb_s=round(i4["mb_s"], 1), ingest_4k_records_s=round(i4["records_s"]),
        ingest_1m_mb_s=round(i1["mb_s"], 1),
        restore_mb_s=round(r["mb_s"], 1), restore_mid_mb_s=round(r["mid_mb_s"], 1),
        seq_write_mb_s=round(seq_mb, 1),
        ingest_4k_ratio=round(i4["mb_s"] / seq_mb, 3), ingest_1m_ratio=round(i1["mb_s"] / seq_mb, 3),
        restore_ratio=round(r["mb_s"] / seq_mb, 3),
        restore_runs_mb_s=r["all_mb_s"], seq_write_runs_mb_s=[round(dd0, 1)] + r["all_dd_mb_s"],
        metadata_overhead=round(r["metadata_overhead"], 4),
        compressed_fraction=round(i4["stored_fraction"], 3),
        disk_bytes=disk, history_seconds=history_seconds, history_bytes=history_bytes,
        history_records=r["records"], ingest_bytes=ingest_bytes, zstd_level=jm.ZSTD_LEVEL)


def format_table(r: dict) -> str:
    return "\n".join([
        f"journal bench: {r['disk_bytes'] >> 20} MiB disk, {r['history_seconds']:.0f} s history "
        f"of {r['history_bytes'] >> 20} MiB 4 KiB random writes, zstd level {r['zstd_level']}",
        f"  sequential write (dd)   {r['seq_write_mb_s']:8.1f} MB/s",
        f"  ingest 4 KiB records    {r['ingest_4k_mb_s']:8.1f} MB/s  "
        f"({r['ingest_4k_records_s']} records/s, ratio {r['ingest_4k_ratio']:.2f}, "
        f"stored {r['compressed_fraction']:.2f} of the data)",
        f"  ingest 1 MiB records    {r['ingest_1m_mb_s']:8.1f} MB/s  (ratio {r['ingest_1m_ratio']:.2f})",
        f"  restore latest point    {r['restore_mb_s']:8.1f} MB/s  (ratio {r['restore_ratio']:.2f}; "
        f"mid-window point {r['restore_mid_mb_s']:.1f} MB/s)",
        f"  metadata overhead       {r['metadata_overhead'] * 100:8.2f} %",
    ])
