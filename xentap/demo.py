"""`xentap demo`: the main job on the embedded default, no Xen needed.

A simulated guest (sim domain + sim blkfront) runs a disk workload through
the shim onto a raw image: it fills the disk, runs a mixed random workload
with flushes, then reads every sector back and checks it.  Every write is
mirrored, asynchronously, to a local appliance (its own process, CurveZMQ on
loopback) that keeps a replica.  A live progress line shows what the shim
serves and how far the mirror lags; the end says whether every byte verified
and whether the replica equals the guest's disk.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import Callable

from xentap import keys, shim
from xentap.drainer import Drainer, VbdIdentity

MiB = 1 << 20


class Progress:
    """One live line on a terminal (a line every few seconds otherwise)."""

    def __init__(self, vbd: shim.Vbd, drainer: Drainer | None = None, out=sys.stderr):
        self.vbd = vbd
        self.drainer = drainer
        self.out = out
        self.tty = out.isatty()

    def mirror(self) -> str:
        if not self.drainer:
            return ""
        d = self.drainer.stats()
        lag = (d["next_seq"] - 1) - d["acked_seq"]
        return (f"  mirror: {d['state']}, {lag:,} writes behind, lag p99 "
                f"{d['lag_ms']['p99']:.0f} ms, overflows {d['overflows']}")

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
                    f"errors {st['err_io'] + st['err_bad_request'] + st['err_grant']}"
                    f"{self.mirror()}")
            self.out.write(("\r" + line) if self.tty else line + "\n")
            self.out.flush()
            last, tlast = st, now
        if self.tty:
            self.out.write("\n")
        if error:
            raise error[0]
        return result


def _serve(endpoint: str, data_dir: str, keys_dir: str, allowed_dir: str, ready) -> None:
    """The local appliance (embedded default): a receiver keeping replicas."""
    import logging

    from appliance_domu.receiver import Receiver
    logging.basicConfig(level=logging.WARNING, format="appliance: %(message)s")
    rx = Receiver(endpoint, data_dir, curve=keys.CurveServer.from_dir(keys_dir, allowed_dir))
    rx.bind()
    ready.set()
    rx.run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class LocalAppliance:
    """Keys for both ends and an appliance process on loopback, CurveZMQ on."""

    def __init__(self, workdir: str):
        self.keys = os.path.join(workdir, "keys")
        self.allowed = os.path.join(workdir, "appliance-allowed")
        self.data = os.path.join(workdir, "appliance")
        for d in (self.keys, self.allowed):
            os.makedirs(d, exist_ok=True)
        for name in (keys.APPLIANCE_NAME, keys.DOM0_NAME):
            if not keys.paths(self.keys, name)[1].exists():
                keys.create(self.keys, name)
        shutil.copy(keys.paths(self.keys, keys.DOM0_NAME)[0], self.allowed)
        self.endpoint = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(self.endpoint, self.data, self.keys,
                                                     self.allowed, ready), daemon=True)
        self.proc.start()
        if not ready.wait(30):
            raise RuntimeError("the local appliance did not start")
        client = keys.CurveClient.from_files(keys.paths(self.keys, keys.DOM0_NAME)[1],
                                             keys.paths(self.keys, keys.APPLIANCE_NAME)[0])
        self.socket_setup = lambda s: keys.configure_client(s, client)

    def replica(self, vbd_uuid: uuid.UUID) -> str:
        return os.path.join(self.data, str(vbd_uuid), "replica.img")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def run(workdir: str, size: int, seconds: float, echo: Callable[[str], None]) -> bool:
    """Runs the demo; returns True when every check passed."""
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, "guest-disk.img")
    with open(image, "wb") as f:
        f.truncate(size)
    for old in ("appliance", "spill"):
        shutil.rmtree(os.path.join(workdir, old), ignore_errors=True)
    simdir = os.path.join(workdir, "sim-domain")
    echo(f"demo: a simulated guest (domain 1) with a {size // MiB} MiB disk served by the shim "
         f"from {image}")
    appliance = LocalAppliance(workdir)
    echo(f"demo: a local appliance at {appliance.endpoint} (CurveZMQ), keeping a replica")
    ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=1, devid=51712, vdev="xvda", size_bytes=size)
    drainer = None
    try:
        with shim.SimDomain(simdir, domid=1) as dom, \
                shim.Vbd(image, max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS) as vbd, \
                shim.Transport.sim(dom.path) as transport:
            vbd.mirror_enable()
            front = shim.SimFront(dom.path, sectors=vbd.sectors, nr_queues=2, ring_order=2,
                                  max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
            try:
                vbd.connect(transport, front.params)
                drainer = Drainer(vbd, ident, appliance.endpoint, image_path=image,
                                  spill_dir=os.path.join(workdir, "spill"), spill_limit=1 << 30,
                                  socket_setup=appliance.socket_setup).start()
                echo(f"demo: connected: {front.params.nr_queues} queues, "
                     f"{1 << front.params.ring_order}-page rings, {vbd.engine} I/O engine, "
                     f"{shim.MAX_INDIRECT_SEGMENTS} indirect segments; mirroring every write")
                p = Progress(vbd, drainer)
                results = [
                    p.watch("fill (1 MiB writes)", lambda: front.run(
                        block_size=MiB, queue_depth=8, sequential=True, max_ios=size // MiB,
                        verify=True)),
                    p.watch("mixed 4 KiB, flushes", lambda: front.run(
                        block_size=4096, queue_depth=32, read_pct=30, seconds=seconds, verify=True,
                        flush_every=64, seed=int(time.time()))),
                    p.watch("read back and verify", lambda: front.run(
                        block_size=MiB, queue_depth=8, read_pct=100, sequential=True,
                        max_ios=size // MiB, verify=True)),
                ]
                vbd.disconnect()
                st = vbd.stats()
                echo("demo: waiting for the appliance to acknowledge every write ...")
                caught_up = drainer.wait_acked(120)
                mirror = drainer.stats()
            finally:
                if drainer:
                    drainer.stop()
                front.close()
        replica_ok = caught_up and os.path.exists(appliance.replica(ident.vbd_uuid)) and \
            _sha256(appliance.replica(ident.vbd_uuid)) == _sha256(image)
    finally:
        appliance.stop()
    errors = sum(r["errors"] for r in results)
    bad = sum(r["verify_failures"] for r in results)
    ordering = sum(r["flush_order_violations"] for r in results)
    mixed = results[1]
    echo(f"demo: mixed workload: {mixed['ios'] / mixed['seconds']:,.0f} IOPS, "
         f"latency p50 {mixed['lat_us_p50']:.0f} us, p99 {mixed['lat_us_p99']:.0f} us")
    echo(f"demo: the shim served {st['reqs_read']:,} reads, {st['reqs_write']:,} writes, "
         f"{st['reqs_flush']:,} flushes ({st['reqs_indirect']:,} indirect); "
         f"{(st['bytes_read'] + st['bytes_written']) / MiB:,.0f} MiB moved")
    echo(f"demo: mirror: {mirror['acked_seq']:,} records and markers acknowledged, "
         f"{mirror['bytes_sent'] / MiB:,.0f} MiB sent, lag p50 {mirror['lag_ms']['p50']:.0f} ms "
         f"p99 {mirror['lag_ms']['p99']:.0f} ms max {mirror['lag_ms']['max']:.0f} ms, "
         f"overflows {mirror['overflows']}, gaps {mirror['gaps']}")
    ok = errors == 0 and bad == 0 and ordering == 0 and replica_ok
    if ok:
        echo(f"demo: OK: every sector of the {size // MiB} MiB disk read back as written, "
             "and the appliance's replica equals the guest's disk")
    else:
        echo(f"demo: FAILED: {errors} I/O errors, {bad} sectors wrong, "
             f"{ordering} flush ordering violations, replica "
             f"{'equal' if replica_ok else 'DIFFERENT from the disk'}")
    return ok
