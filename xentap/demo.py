"""`xentap demo`: the main job on the embedded default, no Xen needed.

A simulated guest (sim domain + sim blkfront) runs a disk workload through
the shim onto a raw image: it fills the disk, runs a mixed random workload
with flushes, then reads every sector back and checks it.  A live progress
line shows what the shim serves; the end says whether every byte verified.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from xentap import shim

MiB = 1 << 20


class Progress:
    """One live line on a terminal (a line every few seconds otherwise)."""

    def __init__(self, vbd: shim.Vbd, out=sys.stderr):
        self.vbd = vbd
        self.out = out
        self.tty = out.isatty()

    def watch(self, phase: str, work: Callable[[], dict]) -> dict:
        result: dict = {}
        error: list[BaseException] = []

        def target():
            try:
                result.update(work())
            except BaseException as e:     # re-raised in the caller's thread
                error.append(e)

        t = threading.Thread(target=target, daemon=True)
        last = self.vbd.stats()
        t0 = tlast = time.monotonic()
        t.start()
        every = 0.5 if self.tty else 2.0
        while t.is_alive():
            t.join(every)
            now = time.monotonic()
            st = self.vbd.stats()
            dt = now - tlast
            if not t.is_alive() and dt < 0.25:
                break       # the tail of a finished phase: too short to mean anything
            ios = sum(st[k] - last[k] for k in ("reqs_read", "reqs_write", "reqs_flush"))
            nbytes = sum(st[k] - last[k] for k in ("bytes_read", "bytes_written"))
            line = (f"demo: {phase:<22} {now - t0:5.1f}s  {ios / dt:>9,.0f} IOPS  "
                    f"{nbytes / dt / 1e6:>8,.1f} MB/s  in flight {st['in_flight']:>3}  "
                    f"errors {st['err_io'] + st['err_bad_request'] + st['err_grant']}")
            self.out.write(("\r" + line) if self.tty else line + "\n")
            self.out.flush()
            last, tlast = st, now
        if self.tty:
            self.out.write("\n")
        if error:
            raise error[0]
        return result


def run(workdir: str, size: int, seconds: float, echo: Callable[[str], None]) -> bool:
    """Runs the demo; returns True when every check passed."""
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, "guest-disk.img")
    with open(image, "wb") as f:
        f.truncate(size)
    simdir = os.path.join(workdir, "sim-domain")
    echo(f"demo: a simulated guest (domain 1) with a {size // MiB} MiB disk served by the shim "
         f"from {image}")
    with shim.SimDomain(simdir, domid=1) as dom, \
            shim.Vbd(image, max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS) as vbd, \
            shim.Transport.sim(dom.path) as transport:
        front = shim.SimFront(dom.path, sectors=vbd.sectors, nr_queues=2, ring_order=2,
                              max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
        try:
            vbd.connect(transport, front.params)
            echo(f"demo: connected: {front.params.nr_queues} queues, "
                 f"{1 << front.params.ring_order}-page rings, {vbd.engine} I/O engine, "
                 f"{shim.MAX_INDIRECT_SEGMENTS} indirect segments")
            p = Progress(vbd)
            results = [
                p.watch("fill (1 MiB writes)", lambda: front.run(
                    block_size=MiB, queue_depth=8, sequential=True, max_ios=size // MiB, verify=True)),
                p.watch("mixed 4 KiB, flushes", lambda: front.run(
                    block_size=4096, queue_depth=32, read_pct=30, seconds=seconds, verify=True,
                    flush_every=64, seed=int(time.time()))),
                p.watch("read back and verify", lambda: front.run(
                    block_size=MiB, queue_depth=8, read_pct=100, sequential=True,
                    max_ios=size // MiB, verify=True)),
            ]
            vbd.disconnect()
            st = vbd.stats()
        finally:
            front.close()
    errors = sum(r["errors"] for r in results)
    bad = sum(r["verify_failures"] for r in results)
    ordering = sum(r["flush_order_violations"] for r in results)
    mixed = results[1]
    echo(f"demo: mixed workload: {mixed['ios'] / mixed['seconds']:,.0f} IOPS, "
         f"latency p50 {mixed['lat_us_p50']:.0f} us, p99 {mixed['lat_us_p99']:.0f} us")
    echo(f"demo: the shim served {st['reqs_read']:,} reads, {st['reqs_write']:,} writes, "
         f"{st['reqs_flush']:,} flushes ({st['reqs_indirect']:,} indirect); "
         f"{(st['bytes_read'] + st['bytes_written']) / MiB:,.0f} MiB moved")
    ok = errors == 0 and bad == 0 and ordering == 0
    if ok:
        echo(f"demo: OK: every sector of the {size // MiB} MiB disk read back as written; "
             "0 I/O errors; every flush answered after the writes before it")
    else:
        echo(f"demo: FAILED: {errors} I/O errors, {bad} sectors wrong, "
             f"{ordering} flush ordering violations")
    return ok
