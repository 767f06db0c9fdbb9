"""Dom0 side of cases/appliance-domu.sh: find the appliance domain in
xenstore, mirror a guest's writes to it, and say what was sent.

Finds appliance NAME's status (xentap.daemon.read_appliance_status: the
validated endpoint and CurveZMQ public key it announced), then serves a disk
image to a simulated guest through the shim (sim transport, in dom0) with
mirroring on, and drains the mirror ring to the appliance over the vif with
CurveZMQ (dom0's key pair from --keys).  The guest fills the disk with 1 MiB
writes, then runs 4 KiB random writes with flushes; everything must be
acknowledged (durable in the appliance's journal).  Prints
``VBD <uuid> <sha256 of the image>`` and ``METRIC`` lines; exit 0 on success.

(The writing guest is the shim's simulated one, written before the daemon
could mirror a Xen guest's disk (`xentap attach --protect`); the appliance
side, the vif and the keys are real.)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import uuid

MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="xentap-appliance")
    ap.add_argument("--keys", required=True, help="dom0's key directory (dom0.key_secret)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--metric", default="mirror", help="name of the METRIC line")
    a = ap.parse_args()

    from xentap import keys, shim
    from xentap.appliance_domain import find_domain
    from xentap.appliance_node import read_appliance_status
    from xentap.drainer import Drainer, VbdIdentity
    from xentap.xenbus import Xs

    with Xs.open() as xs:
        domid = find_domain(xs, a.name)
        if domid is None:
            print(f"no domain {a.name}")
            return 1
        st = read_appliance_status(xs, domid)
    print(f"appliance {a.name}: domain {domid}, state {st['state']}, endpoint {st['endpoint']}, "
          f"key {st['public_key']}, problems {st.get('problems')}")
    if st["state"] != "ready" or not st["endpoint"] or not st["public_key"]:
        print("the appliance has not announced a usable endpoint and key")
        return 1
    pub, sec = keys.load_secret(keys.paths(a.keys, "dom0")[1])
    client = keys.CurveClient(pub, sec, st["public_key"].encode())

    size = a.size_mib * MiB
    os.makedirs(a.workdir, exist_ok=True)
    with open(a.image, "wb") as f:
        f.truncate(size)
    ident = VbdIdentity(vbd_uuid=uuid.uuid4(), domid=1, devid=51712, vdev="xvda", size_bytes=size)
    simdir = os.path.join(a.workdir, "sim-domain")
    with shim.SimDomain(simdir, domid=1) as dom, shim.Vbd(a.image, max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS) as vbd, \
            shim.Transport.sim(dom.path) as transport:
        vbd.mirror_enable(16 * MiB)
        front = shim.SimFront(dom.path, sectors=vbd.sectors, nr_queues=2, ring_order=2,
                              max_indirect_segments=shim.MAX_INDIRECT_SEGMENTS)
        drainer = None
        try:
            vbd.connect(transport, front.params)
            drainer = Drainer(vbd, ident, st["endpoint"], image_path=a.image,
                              spill_dir=os.path.join(a.workdir, "spill"), spill_limit=256 * MiB,
                              socket_setup=lambda s: keys.configure_client(s, client)).start()
            print("mirror: writing", flush=True)
            t0 = time.monotonic()
            fill = front.run(block_size=MiB, queue_depth=8, sequential=True,
                             max_ios=size // MiB, verify=True)
            mixed = front.run(block_size=4096, queue_depth=16, read_pct=30, seconds=a.seconds,
                              verify=True, flush_every=64, seed=1234)
            t_io = time.monotonic() - t0
            vbd.mirror_checkpoint("appliance-domu-end")     # the last checkpoint: all writes
            vbd.disconnect()
            caught_up = drainer.wait_acked(300)
            t_all = time.monotonic() - t0
            m = drainer.stats()
        except BaseException:
            import traceback
            traceback.print_exc()
            sys.stdout.flush()
            raise
        finally:
            if drainer:
                drainer.stop()
            front.close()
    errors = fill["errors"] + mixed["errors"]
    bad = fill["verify_failures"] + mixed["verify_failures"]
    h = hashlib.sha256()
    with open(a.image, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    print(f"VBD {ident.vbd_uuid} {h.hexdigest()}")
    print(f"METRIC appliance-domu {a.metric} bytes_sent={m['bytes_sent']} "
          f"mib_s={m['bytes_sent'] / MiB / t_all:.2f} io_s={t_io:.1f} all_acked_s={t_all:.1f} "
          f"acked_seq={m['acked_seq']} sessions={m['sessions']} overflows={m['overflows']} "
          f"gaps={m['gaps']} lag_p50_ms={m['lag_ms']['p50']:.0f} lag_max_ms={m['lag_ms']['max']:.0f}")
    print(f"guest: {fill['ios'] + mixed['ios']} I/Os, {errors} errors, {bad} verify failures")
    if errors or bad:
        return 1
    if not caught_up:
        print("the appliance did not acknowledge every write within 300 s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
