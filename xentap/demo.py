"""`xentap demo`: the main job on the embedded default, no Xen needed.

Part 1, the data path: a simulated guest (sim domain + sim blkfront) runs a
disk workload through the shim onto a raw image: it fills the disk, runs a
mixed random workload with flushes, then reads every sector back and checks
it.  Every write is mirrored, asynchronously, to a local appliance (its own
process, CurveZMQ on loopback) that journals it and keeps a replica.  A live
progress line shows what the shim serves and how far the mirror lags.

Part 2, the data state: two traces of a real kernel's writes (an ext4
workload, then a ransomware run that encrypts the documents in place),
recorded with analyzer/capture (fusetrace on a loop device; once, then kept
in the demo's directory), are replayed through the shim by a second
simulated guest.  The appliance journals and analyses the mirrored stream;
the demo shows the filesystem it found, the consistent points it tagged in
the journal, the alarm with the first suspicious write, then restores the
recommended point from the journal, runs e2fsck on it and reads the
documents back.  The last line says whether the restored disk is clean and
free of the encrypted data.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
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


def _serve(endpoint: str, data_dir: str, keys_dir: str, allowed_dir: str, ready,
           cpus: set[int] | None = None) -> None:
    """The local appliance (embedded default): a receiver keeping replicas;
    on `cpus` only when given (before any of its threads starts)."""
    import logging

    if cpus:
        os.sched_setaffinity(0, cpus)
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

    def __init__(self, workdir: str, data_dir: str | None = None,
                 cpus: set[int] | None = None):
        """Keys go in `workdir`; the appliance's journals and replicas in
        `data_dir` (default `workdir/appliance`); its process runs on `cpus`
        when given (as an appliance domain has vCPUs of its own)."""
        self.keys = os.path.join(workdir, "keys")
        self.allowed = os.path.join(workdir, "appliance-allowed")
        self.data = data_dir or os.path.join(workdir, "appliance")
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
                                                     self.allowed, ready, cpus), daemon=True)
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
    for old in ("appliance", "spill", "spill-story"):
        shutil.rmtree(os.path.join(workdir, old), ignore_errors=True)
    appliance = LocalAppliance(workdir)
    echo(f"demo: a local appliance at {appliance.endpoint} (CurveZMQ) journals, replicates "
         f"and analyses every mirrored write")
    try:
        datapath_ok = _datapath(workdir, size, seconds, appliance, echo)
        ok, final = _story(workdir, appliance, echo)
    finally:
        appliance.stop()
    echo(final)
    return datapath_ok and ok


def _datapath(workdir: str, size: int, seconds: float, appliance: LocalAppliance,
              echo: Callable[[str], None]) -> bool:
    """Part 1: fill, mixed workload, read back, replica == disk."""
    image = os.path.join(workdir, "guest-disk.img")
    with open(image, "wb") as f:
        f.truncate(size)
    simdir = os.path.join(workdir, "sim-domain")
    echo(f"demo: part 1, the data path: a simulated guest (domain 1) with a {size // MiB} MiB "
         f"disk served by the shim from {image}")
    ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=1, devid=51712, vdev="xvda", size_bytes=size)
    drainer = None
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
            mirror = drainer.stats(lag_window=None)     # the whole demo
        finally:
            if drainer:
                drainer.stop()
            front.close()
    replica_ok = caught_up and os.path.exists(appliance.replica(ident.vbd_uuid)) and \
        _sha256(appliance.replica(ident.vbd_uuid)) == _sha256(image)
    errors = sum(r["errors"] for r in results)
    bad = sum(r["verify_failures"] for r in results)
    ordering = sum(r["flush_order_violations"] for r in results)
    mixed = results[1]
    echo(f"demo: the shim served {st['reqs_read']:,} reads, {st['reqs_write']:,} writes, "
         f"{st['reqs_flush']:,} flushes; mixed 4 KiB: {mixed['ios'] / mixed['seconds']:,.0f} "
         f"IOPS, latency p50 {mixed['lat_us_p50']:.0f} us, p99 {mixed['lat_us_p99']:.0f} us")
    echo(f"demo: mirror: {mirror['acked_seq']:,} records and markers acknowledged, "
         f"{mirror['bytes_sent'] / MiB:,.0f} MiB sent, lag p50 {mirror['lag_ms']['p50']:.0f} ms "
         f"p99 {mirror['lag_ms']['p99']:.0f} ms max {mirror['lag_ms']['max']:.0f} ms, "
         f"overflows {mirror['overflows']}, gaps {mirror['gaps']}")
    ok = errors == 0 and bad == 0 and ordering == 0 and replica_ok
    if ok:
        echo(f"demo: data path OK: every sector of the {size // MiB} MiB disk read back as "
             "written, and the appliance's replica equals the guest's disk")
    else:
        echo(f"demo: data path FAILED: {errors} I/O errors, {bad} sectors wrong, "
             f"{ordering} flush ordering violations, replica "
             f"{'equal' if replica_ok else 'DIFFERENT from the disk'}")
    return ok


# ---------------------------------------------------------------- part 2: the data state

STORY_DISK = 96 * MiB
STORY_DOCS, STORY_DOC_SIZE, STORY_SEED = 40, 256 << 10, 7
_TRACES_VERSION = "1"  # bump when the recorded workloads change


def _record_traces(tdir: Path, echo: Callable[[str], None]) -> tuple[Path, Path]:
    """The two guest traces, recorded once with analyzer/capture and kept in ``tdir``:
    an ext4 workload (mkfs, documents, a directory tree, an fsync'd log, umount),
    then a ransomware run on the same disk (mount, every document encrypted in
    place with AES, sync, umount)."""
    from analyzer import capture
    from analyzer.checks import populate, ransom, run as sh

    work, attack = tdir / "ext4-workload.trace.gz", tdir / "ransomware.trace.gz"
    stamp = tdir / "version"
    if work.exists() and attack.exists() and stamp.exists() \
            and stamp.read_text() == _TRACES_VERSION:
        return work, attack
    why = capture.available()
    if why is not None:
        raise RuntimeError(f"cannot record the guest traces here: {why}")
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    echo("demo: recording the guest traces once (a real kernel's ext4 on a loop device, "
         "through fusetrace) ...")
    img, mnt = tdir / "record.img", tdir / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(STORY_DISK)
    raw_work, raw_attack = tdir / "work.trace", tdir / "attack.trace"
    with capture.Capture(img, raw_work) as dev:
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "guest", dev)
        sh("mount", "-o", "commit=1", dev, str(mnt))
        try:
            populate(mnt, STORY_DOCS, STORY_DOC_SIZE, seed=STORY_SEED)
            shutil.copytree(Path(os.__file__).parent / "json", mnt / "json")
            with open(mnt / "app.log", "ab") as f:
                for i in range(16):
                    f.write(b"%d: order %d shipped\n" % (time.time_ns(), i) * 64)
                    f.flush()
                    os.fsync(f.fileno())
            sh("sync")
        finally:
            sh("umount", str(mnt), check=False)
    with capture.Capture(img, raw_attack) as dev:
        sh("mount", "-o", "commit=1", dev, str(mnt))
        try:
            ransom(mnt, [f"docs/f{i:03d}.txt" for i in range(STORY_DOCS)], "whole")
            sh("sync")
        finally:
            sh("umount", str(mnt), check=False)
    for raw, out in ((raw_work, work), (raw_attack, attack)):
        sh("gzip", "-1", "-f", str(raw))
        os.replace(str(raw) + ".gz", out)
    img.unlink()
    mnt.rmdir()
    stamp.write_text(_TRACES_VERSION)
    return work, attack


def _ops(path: Path) -> list[tuple[str, int, bytes]]:
    from analyzer import trace as tr
    return [("flush", 0, b"") if r.kind == tr.FLUSH else ("write", r.sector, r.data)
            for r in tr.read(path)]


def _wait_analysis(vdir: Path, acked: int, timeout: float) -> dict | None:
    """The appliance's analysis state once it analysed up to ``acked`` and its tags
    are in the journal (durable with the VBD's next group commit)."""
    from appliance_domu.analysis import read_state
    from engines.journal import Journal

    end = time.monotonic() + timeout
    st = None
    while time.monotonic() < end:
        try:
            st = read_state(vdir)
        except ValueError:  # caught mid-write: cannot happen (atomic rename), but be patient
            st = None
        if st and st["status"]["analysed_seq"] >= acked:
            j = Journal.open(vdir / "journal")
            try:
                ntags = sum(c.kind_name == "analyzer" for c in j.checkpoints())
            finally:
                j.close()
            if ntags >= st["status"]["tags"]:
                return st
        time.sleep(0.1)
    return st


def _documents(img: Path, work: Path) -> tuple[int, int]:
    """(documents equal to what the guest wrote, documents) on an ext4 image (debugfs)."""
    from analyzer import workloads as wl

    out = work / "docs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump /docs {out}", str(img)], capture_output=True)
    same = 0
    for i in range(STORY_DOCS):
        p = out / "docs" / f"f{i:03d}.txt"
        if p.exists() and p.read_bytes() == wl.text(STORY_DOC_SIZE, STORY_SEED + i):
            same += 1
    shutil.rmtree(out, ignore_errors=True)
    return same, STORY_DOCS


def _story(workdir: str, appliance: LocalAppliance,
           echo: Callable[[str], None]) -> tuple[bool, str]:
    """Part 2; returns (ok, the demo's final line)."""
    from analyzer.checks import fsck_clean
    from engines.journal import Journal

    wd = Path(workdir)
    try:
        work, attack = _record_traces(wd / "traces", echo)
    except Exception as e:  # noqa: BLE001 - capture tooling missing, mkfs failed, ...
        return False, f"demo: FAILED: no guest traces to replay: {e}"
    ops_work, ops_attack = _ops(work), _ops(attack)
    mb = sum(len(o[2]) for o in ops_work + ops_attack) / MiB
    image = wd / "story-disk.img"
    with open(image, "wb") as f:
        f.truncate(STORY_DISK)
    echo(f"demo: part 2, the data state: a second guest (domain 2, {STORY_DISK // MiB} MiB disk) "
         f"replays a real kernel's writes through the shim: an ext4 workload "
         f"({len(ops_work)} writes and flushes), then a ransomware run ({len(ops_attack)}); "
         f"{mb:.0f} MiB")
    ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=2, devid=51728, vdev="xvdb",
                        size_bytes=STORY_DISK)
    drainer = None
    t0 = time.monotonic()
    with shim.SimDomain(str(wd / "sim-domain-2"), domid=2) as dom, \
            shim.Vbd(str(image), max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS) as vbd, \
            shim.Transport.sim(dom.path) as transport:
        vbd.mirror_enable()
        front = shim.SimFront(dom.path, sectors=vbd.sectors, nr_queues=1, ring_order=1,
                              max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
        try:
            vbd.connect(transport, front.params)
            drainer = Drainer(vbd, ident, appliance.endpoint, image_path=str(image),
                              spill_dir=str(wd / "spill-story"), spill_limit=1 << 30,
                              socket_setup=appliance.socket_setup).start()
            res = [front.replay(ops_work, queue_depth=16), front.replay(ops_attack, queue_depth=16)]
            vbd.disconnect()
            caught_up = drainer.wait_acked(60)
            acked = drainer.stats()["acked_seq"]
        finally:
            if drainer:
                drainer.stop()
            front.close()
    errors = sum(r["errors"] + r["flush_order_violations"] for r in res)
    if errors or not caught_up:
        return False, (f"demo: FAILED: the replay had {errors} errors / ordering violations, "
                       f"mirror {'caught up' if caught_up else 'NOT acknowledged'}")
    vdir = Path(appliance.data) / str(ident.vbd_uuid)
    st = _wait_analysis(vdir, acked, 60)
    if st is None or st["status"]["analysed_seq"] < acked:
        return False, "demo: FAILED: the appliance's analysis did not catch up within 60 s"
    echo(f"demo: replayed, mirrored, journaled and analysed in {time.monotonic() - t0:.1f} s: "
         f"{acked:,} seqs; the appliance's analysis is published in {vdir / 'analysis.json'} "
         f"(see 'xentap analyze {str(ident.vbd_uuid)[:8]} --data-dir {appliance.data}')")
    state = st["state"]
    for fs in state["filesystems"]:
        echo(f"demo: filesystem found: {fs['type']} at byte {fs['offset']}, uuid {fs['uuid']}")
    j = Journal.open(vdir / "journal")
    try:
        tags = [c for c in j.checkpoints() if c.kind_name == "analyzer"]
    finally:
        j.close()
    cons = [c for c in tags if c.consistent and not c.label.startswith("recommended")]
    alarm = st.get("alarm")
    first = alarm["detail"]["first_seq"] if alarm else None
    before = [c for c in cons if first is None or c.seq < first]
    echo(f"demo: journal tags from the analyzer: {len(tags)}, {len(cons)} filesystem-consistent "
         f"({len(before)} before the attack): " + ", ".join(
             f"seq {c.seq} ({c.label.split(': ', 1)[-1]})" for c in cons[-4:]))
    if not alarm:
        return False, "demo: FAILED: the ransomware run raised no encryption alarm"
    d = alarm["detail"]
    echo(f"demo: ALARM: mass encryption suspected from write {d['first_seq']} "
         f"(sector {d['first_sector']}, {_clock(d['first_time_ns'])}), raised at write "
         f"{alarm['seq']}; {d['suspicious_bytes'] / MiB:.1f} MiB suspicious, share "
         f"{d['share']:.0%} against a baseline of {d['baseline']:.0%}")
    rec = d["recommended_seq"]
    if rec is None:
        return False, "demo: FAILED: no consistent point before the first suspicious write"
    echo(f"demo: recommended recovery point: seq {rec} ({d['recommended_label']}), "
         f"the last filesystem-consistent point before it")
    restored = wd / "restored.img"
    j = Journal.open(vdir / "journal")
    try:
        r = j.restore(restored, seq=rec)
    finally:
        j.close()
    clean, out = fsck_clean("ext4", restored, wd)
    good, total = _documents(wd / "check.img", wd)
    now_good, _ = _documents(image, wd)
    echo(f"demo: restored seq {rec} from the journal into {restored} "
         f"({r['bytes'] / MiB:.0f} MiB in {r['seconds']:.1f} s); e2fsck -fn after journal "
         f"replay: {'clean' if clean else 'ERRORS: ' + out.strip().splitlines()[-1]}; "
         f"documents as the guest wrote them: {good}/{total} restored, {now_good}/{total} on "
         f"the guest's disk now")
    (wd / "check.img").unlink(missing_ok=True)
    if clean and good == total:
        return True, (f"demo: OK: the restored disk (seq {rec}) is clean and free of the "
                      f"encrypted data: all {total} documents read back as written before the "
                      f"attack from write {d['first_seq']}")
    return False, (f"demo: FAILED: the restored disk (seq {rec}) is "
                   f"{'clean' if clean else 'NOT clean'} and has {total - good} of {total} "
                   f"documents encrypted or missing")


def _clock(t_ns: int | None) -> str:
    if not t_ns:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(t_ns / 1e9)) + f".{t_ns // 1_000_000 % 1000:03d}"
