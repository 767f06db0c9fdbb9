"""Mirror throughput from dom0: to the appliance domain over its vif, and to
an appliance process in dom0 over loopback, side by side in one dom0
(tests/xen/cases/appliance-throughput.sh; the ratio vif/loopback is what
means something: both are emulated).

What is measured: the mirror alone, not the guest.  Each side is a VBD served
by the shim (sim transport, in this process) to a simulated guest, mirrored
by the daemon's drainer (xentap.drainer.Drainer, unchanged but for a hold:
while held, its step does nothing; it keeps its session and heartbeats) to
an appliance over ZeroMQ with CurveZMQ.  A round on one side:

  1. hold the drainer (in session with its appliance);
  2. the guest writes SIZE MiB in 1 MiB sequential writes (QD 8; each sector
     its number, a version and a counter fill, which zstd compresses): they sit in
     the mirror ring (big enough that the backlog stays under the drainer's
     spill threshold, a quarter of the ring: nothing goes to the spill log);
  3. release the drainer and time it until the appliance has acknowledged
     the last record (ACKs come once the appliance's journal is synced):
     MB/s = SIZE / that time; records/s the same way.  The guest is idle
     throughout; also reported: the rate between 10 % and 90 % acknowledged
     (steady state, without the start and the last ACK).

Rounds alternate between the sides (vif, loopback, then loopback, vif, ...),
after an unmeasured smaller round of each side.
CPU per part over each timed drain (in cores = CPU seconds / drain seconds):
the drainer's thread and libzmq's I/O threads (this process), the suite's
xentap daemon (it serves the appliance domain's journal disk), the local
appliance process, the appliance domain (`xl list` Time(s), read just before
the release and just after the last ACK), and all of dom0 (/proc/stat: busy,
and steal: its vCPUs runnable while Xen ran another domain or nothing of
dom0's; per-process figures count some of that steal, so they can add up
to more than dom0_busy).

The loopback appliance is what the appliance domain runs (`python3 -m
xentap.cli_appliance serve`, default credit and sync settings), here with its
data on dom0's tmpfs, as `xentap bench mirror`'s appliance on /dev/shm; the
appliance domain's journal is its ext4 disk, a xentap VBD the daemon serves
from a file on dom0's tmpfs.

Prints METRIC lines (`--metric` names them); exit 0 when every round was
acknowledged with no spill, overflow or gap and the local appliance's replica
equals its disk.  A reconnection of the drainer (no word from the appliance
for xentap.drainer.DEAD_AFTER) is reported and stays in the round's time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- CPU

def _ticks(stat_path: str) -> int:
    try:
        with open(stat_path) as f:
            s = f.read()
    except OSError:
        return 0
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])        # utime, stime


def _proc_ticks(pid: int | None) -> int:
    """A whole process's CPU (all threads; children it waited for excluded)."""
    return _ticks(f"/proc/{pid}/stat") if pid else 0


def _zmq_ticks() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("ZMQbg"):
                    total += _ticks(f"/proc/self/task/{tid}/stat")
        except OSError:
            pass
    return total


def _dom0_ticks() -> tuple[int, int]:
    """All of dom0's CPUs: (busy: user nice system irq softirq; steal: runnable
    while Xen ran something else -- the appliance domain, or nothing of dom0's)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6], v[7]


def _domain_cpu_s(name: str | None) -> float | None:
    """The domain's CPU seconds so far (`xl list NAME`, Time(s)); None without xl."""
    if not name:
        return None
    try:
        out = subprocess.run(["xl", "list", name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.splitlines()
    if out.returncode or len(lines) < 2 or not lines[0].startswith("Name"):
        return None
    try:
        return float(lines[1].split()[-1])
    except ValueError:
        return None


# ---------------------------------------------------------------- a side

def make_held_drainer_class():
    from xentap.drainer import Drainer

    class HeldDrainer(Drainer):
        """The daemon's drainer; while `hold` is set its step moves nothing
        (the loop still polls: heartbeats and ACKs go on)."""

        def __init__(self, *a, **kw):
            self.hold = threading.Event()
            self.hold.set()
            super().__init__(*a, **kw)

        def _step(self) -> bool:
            if self.hold.is_set():
                return False
            return super()._step()

    return HeldDrainer


class Side:
    def __init__(self, name: str, endpoint: str, socket_setup, workdir: str, size: int, ring: int,
                 domid: int, appliance_pid: int | None = None, appliance_domain: str | None = None):
        from xentap import shim
        from xentap.drainer import VbdIdentity

        self.name, self.endpoint, self.size = name, endpoint, size
        self.appliance_pid, self.appliance_domain = appliance_pid, appliance_domain
        d = os.path.join(workdir, name)
        os.makedirs(d, exist_ok=True)
        self.image = os.path.join(d, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=domid, devid=51712, vdev="xvda",
                                 size_bytes=size)
        self.dom = shim.SimDomain(os.path.join(d, "sim-domain"), domid=domid)
        self.vbd = shim.Vbd(self.image, max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
        self.transport = shim.Transport.sim(self.dom.path)
        self.vbd.mirror_enable(ring)
        self.front = shim.SimFront(self.dom.path, sectors=self.vbd.sectors, nr_queues=1, ring_order=2,
                                   max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
        self.vbd.connect(self.transport, self.front.params)
        self.drainer = make_held_drainer_class()(
            self.vbd, self.ident, endpoint, image_path=self.image,
            spill_dir=os.path.join(d, "spill"), spill_limit=256 * MiB,
            socket_setup=socket_setup).start()
        self.rounds: list[dict] = []

    def wait_session(self, limit: float) -> bool:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if self.drainer.error:
                raise self.drainer.error
            if self.drainer.in_session:
                return True
            time.sleep(0.05)
        return False

    def round(self, n: int, say, size: int | None = None) -> dict:
        """One round (n = 0: an unmeasured one of `size` bytes, not recorded)."""
        size = size or self.size
        d = self.drainer
        d.hold.set()
        if not self.wait_session(300):
            raise RuntimeError(f"{self.name}: no session with the appliance at {self.endpoint} in 300 s")
        st0 = d.stats()
        if st0["ring_used_bytes"] or st0["spill_bytes"] or st0["acked_seq"] != st0["next_seq"] - 1:
            raise RuntimeError(f"{self.name}: round {n} starts with a backlog: {st0}")
        sessions0 = d.sessions
        # the guest: SIZE MiB of 1 MiB sequential writes, into the held ring
        g = self.front.run(block_size=MiB, queue_depth=8, sequential=True, size=size,
                           max_ios=size // MiB, verify=True, seed=n + 1)
        if g["errors"] or g["bytes_written"] != size:
            raise RuntimeError(f"{self.name}: guest: {g}")
        st = d.stats()
        last, acked0 = st["next_seq"] - 1, st["acked_seq"]
        if st["spill_bytes"] or st["overflows"]:
            raise RuntimeError(f"{self.name}: the held ring spilled or overflowed: {st}")
        backlog = st["ring_used_bytes"]
        dom_cpu0 = _domain_cpu_s(self.appliance_domain)
        tid = d._thread.native_id                   # noqa: SLF001
        c0 = (_ticks(f"/proc/self/task/{tid}/stat"), _zmq_ticks(), _proc_ticks(self.appliance_pid),
              _proc_ticks(DAEMON_PID), *_dom0_ticks())
        samples = []
        t0 = time.monotonic()
        d.hold.clear()
        os.write(d.wake_fd, (1).to_bytes(8, "little"))     # wake it now, not at its next 0.1 s poll
        prev = acked0
        limit = 600
        while True:
            a = d.acked_seq
            now = time.monotonic()
            if a != prev:
                samples.append((now - t0, a - acked0))
                prev = a
            if a >= last:
                break
            if d.error:
                raise d.error
            if now - t0 > limit:
                raise RuntimeError(f"{self.name}: not acknowledged {limit} s after release: {d.stats()}")
            time.sleep(0.002)
        t1 = time.monotonic()
        c1 = (_ticks(f"/proc/self/task/{tid}/stat"), _zmq_ticks(), _proc_ticks(self.appliance_pid),
              _proc_ticks(DAEMON_PID), *_dom0_ticks())
        d.hold.set()
        dom_cpu1 = _domain_cpu_s(self.appliance_domain)
        secs = t1 - t0
        nrec = last - acked0
        # steady state: from 10 % to 90 % of the records acknowledged
        lo = next((t, k) for t, k in samples if k >= 0.1 * nrec)
        hi = next((t, k) for t, k in samples if k >= 0.9 * nrec)
        steady = (hi[1] - lo[1]) * MiB / (hi[0] - lo[0]) / 1e6 if hi[0] > lo[0] else 0.0
        cpu = {k: (c1[i] - c0[i]) / TICK / secs
               for i, k in enumerate(("drainer", "zmq", "appliance_proc", "daemon", "dom0_busy", "dom0_steal"))}
        cpu["appliance_domain"] = ((dom_cpu1 - dom_cpu0) / secs
                                   if dom_cpu0 is not None and dom_cpu1 is not None else None)
        st1 = d.stats()
        r = {"round": n, "side": self.name, "mib": size // MiB, "records": nrec, "backlog": backlog,
             "drain_s": secs, "mb_s": size / secs / 1e6, "rec_s": nrec / secs,
             "steady_mb_s": steady, "first_ack_s": samples[0][0], "acks": len(samples),
             "guest_s": g["seconds"], "guest_mb_s": size / g["seconds"] / 1e6, "cpu": cpu,
             "reconnects": d.sessions - sessions0, "spill": st1["spill_bytes"],
             "overflows": st1["overflows"], "gaps": st1["gaps"]}
        if n:
            self.rounds.append(r)
        say(f"round {n or '0 (unmeasured)'} {self.name}: {size // MiB} MiB ({nrec} records, ring backlog "
            f"{backlog / MiB:.1f} MiB) acknowledged {secs:.2f} s after release: {r['mb_s']:.2f} MB/s, "
            f"{r['rec_s']:.1f} records/s; 10-90 % {steady:.2f} MB/s; first ACK after "
            f"{r['first_ack_s']:.2f} s, {len(samples)} ACKs; (the guest wrote it in {g['seconds']:.2f} s, "
            f"{r['guest_mb_s']:.1f} MB/s, not timed); CPU in cores: "
            + " ".join(f"{k}={v:.2f}" for k, v in cpu.items() if v is not None))
        return r

    def close(self) -> None:
        try:
            self.vbd.disconnect()
        except Exception:               # noqa: BLE001
            pass
        self.drainer.stop()
        self.front.close()
        self.vbd.close()
        self.transport.close()
        self.dom.close()


DAEMON_PID: int | None = None
DEAD_AFTER = 10.0


# ---------------------------------------------------------------- the local appliance

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_appliance(workdir: str, dom0_keys: str, log_path: str):
    """`python3 -m xentap.cli_appliance serve` (what the appliance domain's init
    runs) on 127.0.0.1 with its data on `workdir` (tmpfs in dom0); its own key
    pair, dom0's key allowed.  Returns (Popen, endpoint, its public key)."""
    from xentap import keys
    kdir = os.path.join(workdir, "keys")
    allowed = os.path.join(kdir, "allowed")
    os.makedirs(allowed, exist_ok=True)
    if not keys.paths(kdir, keys.APPLIANCE_NAME)[1].exists():
        keys.create(kdir, keys.APPLIANCE_NAME)
    shutil.copy(keys.paths(dom0_keys, keys.DOM0_NAME)[0], allowed)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "xentap.cli_appliance", "serve", "--listen", endpoint,
                             "--data-dir", data, "--keys", kdir, "-v"],
                            stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while True:
        with open(log_path) as f:
            if "listening on" in f.read():
                break
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            with open(log_path) as f:
                raise RuntimeError(f"the local appliance did not start: {f.read()[-2000:]}")
        time.sleep(0.2)
    pub = keys.load_public(keys.paths(kdir, keys.APPLIANCE_NAME)[0])
    return proc, endpoint, pub, data


def main() -> int:
    global DAEMON_PID, DEAD_AFTER
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="xentap-appliance", help="the appliance domain (found in xenstore)")
    ap.add_argument("--endpoint", help="instead of --name's: an appliance at this endpoint ...")
    ap.add_argument("--server-key", help="... with this Z85 public key (tests without Xen)")
    ap.add_argument("--no-vif", action="store_true", help="loopback only")
    ap.add_argument("--keys", required=True, help="dom0's key directory (dom0.key_secret)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size-mib", type=int, default=30, help="per round (30: a 128 MiB ring)")
    ap.add_argument("--rounds", type=int, default=3, help="per side")
    ap.add_argument("--warmup-mib", type=int, default=8, help="an unmeasured round of each side first")
    ap.add_argument("--daemon-pid", type=int, default=None, help="the xentap daemon (its CPU is shown)")
    ap.add_argument("--metric", default="appliance-throughput", help="name in the METRIC lines")
    a = ap.parse_args()
    DAEMON_PID = a.daemon_pid
    from xentap import drainer as drainer_mod
    DEAD_AFTER = drainer_mod.DEAD_AFTER

    from xentap import keys

    def say(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.monotonic()
    sides: list[Side] = []
    local = None
    size = a.size_mib * MiB
    # a power of two: the backlog (SIZE and record headers) stays under the drainer's
    # spill threshold, a quarter of the ring
    ring = 1 << (4 * (size + MiB) - 1).bit_length()
    pub, sec = keys.load_secret(keys.paths(a.keys, "dom0")[1])
    rc = 1
    try:
        vif_ep = vif_key = vif_dom = None
        if not a.no_vif:
            if a.endpoint:
                vif_ep, vif_key = a.endpoint, a.server_key
            else:
                from xentap.appliance_domain import find_domain
                from xentap.appliance_node import read_appliance_status
                from xentap.xenbus import Xs
                with Xs.open() as xs:
                    domid = find_domain(xs, a.name)
                    if domid is None:
                        say(f"no domain {a.name}")
                        return 1
                    st = read_appliance_status(xs, domid)
                say(f"appliance domain {a.name}: domain {domid}, state {st['state']}, endpoint "
                    f"{st['endpoint']}, key {st['public_key']}, problems {st.get('problems')}")
                if st["state"] != "ready" or not st["endpoint"] or not st["public_key"]:
                    say("the appliance has not announced a usable endpoint and key")
                    return 1
                vif_ep, vif_key, vif_dom = st["endpoint"], st["public_key"], a.name
        lo_dir = os.path.join(a.workdir, "loopback-appliance")
        local, lo_ep, lo_key, lo_data = start_local_appliance(lo_dir, a.keys,
                                                              os.path.join(a.workdir, "loopback-appliance.log"))
        say(f"local appliance: pid {local.pid}, {lo_ep}, data in {lo_data} "
            f"({time.monotonic() - t_start:.1f} s after start)")

        def setup_for(server_key):
            client = keys.CurveClient(pub, sec, server_key.encode() if isinstance(server_key, str)
                                      else server_key)
            return lambda s: keys.configure_client(s, client)

        if vif_ep:
            sides.append(Side("vif", vif_ep, setup_for(vif_key), a.workdir, size, ring, domid=1,
                              appliance_domain=vif_dom))
        sides.append(Side("loopback", lo_ep, setup_for(lo_key), a.workdir, size, ring, domid=2,
                          appliance_pid=local.pid))
        for s in sides:
            t0 = time.monotonic()
            if not s.wait_session(300):
                say(f"{s.name}: no session with {s.endpoint} after 300 s")
                return 1
            say(f"{s.name}: drainer in session with {s.endpoint} after {time.monotonic() - t0:.1f} s")
        say(f"{a.rounds} rounds per side of {a.size_mib} MiB (1 MiB sequential writes, QD 8, the "
            f"sim guest's sector pattern, held in a {ring // MiB} MiB mirror ring), alternating, after "
            f"an unmeasured {a.warmup_mib} MiB round of each; timed: release of the drainer to the "
            "appliance's ACK of the last record (the guest idle)")
        for s in sides:
            s.round(0, say, a.warmup_mib * MiB)
        for n in range(a.rounds):
            for s in (sides if n % 2 == 0 else sides[::-1]):
                s.round(n + 1, say)
        rc = 0
        bad = [r for s in sides for r in s.rounds if r["spill"] or r["overflows"] or r["gaps"]]
        if bad:
            say(f"rounds with a spill, overflow or gap: {bad}")
            rc = 1
        for s in sides:
            for r in s.rounds:
                if r["reconnects"]:     # a figure, not a failure: the round's time includes it
                    say(f"round {r['round']} {s.name}: the drainer reconnected {r['reconnects']} time(s) "
                        f"(no word from the appliance for {DEAD_AFTER:.0f} s); its time includes that")
        # the loopback appliance's replica must equal its disk
        lo = sides[-1]
        rep = os.path.join(lo_data, str(lo.ident.vbd_uuid), "replica.img")
        t0 = time.monotonic()
        while not (same := _same(rep, lo.image)) and time.monotonic() - t0 < 60:
            time.sleep(1)       # the replica is applied after the journal's ACK
        say(f"loopback appliance's replica equals the disk: {same}")
        if not same:
            rc = 1
        med = {s.name: {k: statistics.median(r[k] for r in s.rounds)
                        for k in ("mb_s", "rec_s", "steady_mb_s", "drain_s", "first_ack_s", "guest_mb_s")}
               for s in sides}
        cpu = {s.name: {k: statistics.median(r["cpu"][k] for r in s.rounds)
                        for k in s.rounds[0]["cpu"] if s.rounds[0]["cpu"][k] is not None}
               for s in sides}
        for s in sides:
            m = med[s.name]
            say(f"METRIC {a.metric} {s.name} mb_s={m['mb_s']:.2f} records_s={m['rec_s']:.1f} "
                f"steady_mb_s={m['steady_mb_s']:.2f} drain_s={m['drain_s']:.2f} "
                f"first_ack_s={m['first_ack_s']:.2f} rounds={len(s.rounds)} "
                f"reconnects={sum(r['reconnects'] for r in s.rounds)} "
                f"range_mb_s={min(r['mb_s'] for r in s.rounds):.2f}-{max(r['mb_s'] for r in s.rounds):.2f}")
            say(f"METRIC {a.metric} cpu_{s.name} " + " ".join(f"{k}={v:.2f}" for k, v in cpu[s.name].items()))
        if "vif" in med:
            v, lo_m = med["vif"]["mb_s"], med["loopback"]["mb_s"]
            pairs = [x["mb_s"] / y["mb_s"] for x, y in zip(sides[0].rounds, sides[1].rounds)]
            say(f"METRIC {a.metric} vif_mb_s={v:.2f} loopback_mb_s={lo_m:.2f} ratio={v / lo_m:.3f} "
                f"pair_ratio_median={statistics.median(pairs):.3f} "
                f"pair_ratios={','.join(f'{p:.3f}' for p in pairs)} mib_per_round={a.size_mib} "
                f"rounds={a.rounds} method=held-ring-drain-to-last-ack")
        say(f"done after {time.monotonic() - t_start:.1f} s")
        return rc
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        return 1
    finally:
        for s in sides:
            try:
                s.close()
            except Exception:           # noqa: BLE001
                import traceback
                traceback.print_exc()
        if local is not None:
            local.terminate()
            try:
                local.wait(30)
            except subprocess.TimeoutExpired:
                local.kill()


def _same(a: str, b: str) -> bool:
    if not (os.path.exists(a) and os.path.exists(b)) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    sys.exit(main())
