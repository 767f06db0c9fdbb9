"""The appliance domain's announcer: publishes, in the appliance's own
xenstore status directory (xentap.xs_keys: ``/local/domain/0/xentap/
appliance/<domid>/status``, writable by this domain only once dom0 granted
it), its endpoint, its CurveZMQ public key, its state and a heartbeat.

Runs in the appliance domain beside ``xentap appliance serve`` (started by
the image's /init); talks to xenstored through /dev/xen/xenbus.  ``state``
is ``starting`` until the serve process accepts TCP connections on the
endpoint, then ``ready``; ``stopping`` on SIGTERM.  Until dom0 grants the
directory every write is refused (EACCES): it keeps trying, quietly.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

HEARTBEAT_EVERY = 2.0
XENBUS = "/dev/xen/xenbus"


def status_dir(domid: int) -> str:
    """Where dom0 lets appliance ``domid`` write (xentap.xs_keys)."""
    try:
        from xentap import xs_keys as K
        return K.appliance_status_path(domid)
    except (ImportError, AttributeError):    # an older xs_keys: the same layout
        return f"/local/domain/0/xentap/appliance/{domid}/status"


def public_key(path: str) -> str:
    from xentap import keys
    return keys.load_public(path).decode()


def accepting(endpoint: str) -> bool:
    """Whether something accepts TCP connections at tcp://HOST:PORT."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--public-key-file")
    ap.add_argument("--serve-pid", type=int)
    ap.add_argument("--xenstore-socket", help="a xenstored Unix socket instead of "
                    f"{XENBUS} (tests)")
    ap.add_argument("--once", action="store_true", help="publish once and exit (tests)")
    a = ap.parse_args(argv)

    import pyxs

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    key = public_key(a.public_key_file) if a.public_key_file else None
    client = None
    domid = None
    granted = False
    state = "starting"
    while True:
        if a.serve_pid and state == "starting" and accepting(a.endpoint):
            state = "ready"
            print(f"appliance: ready on {a.endpoint}", flush=True)
        if stop:
            state = "stopping"
        try:
            if client is None:
                client = pyxs.Client(unix_socket_path=a.xenstore_socket) if a.xenstore_socket \
                    else pyxs.Client(xen_bus_path=XENBUS)
                client.connect()
                domid = int(client.read(b"domid"))
            d = status_dir(domid)
            vals = {"endpoint": a.endpoint, "state": state, "heartbeat": str(int(time.time()))}
            if key:
                vals["public-key"] = key
            for k, v in vals.items():
                client.write(f"{d}/{k}".encode(), v.encode())
            if not granted:
                granted = True
                print(f"appliance: announced in {d} (domain {domid})", flush=True)
        except (pyxs.PyXSError, OSError, ValueError) as e:
            if granted:
                print(f"appliance: xenstore: {e}", flush=True)
            granted = False
            if not isinstance(e, pyxs.PyXSError) and client is not None:
                try:
                    client.close()
                except Exception:
                    pass
                client = None
        if stop or (a.once and granted):
            return 0
        if a.once:
            return 1
        time.sleep(HEARTBEAT_EVERY if state == "ready" else 0.5)


if __name__ == "__main__":
    sys.exit(main())
