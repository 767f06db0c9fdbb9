"""The appliance domain's announcer: publishes, in the appliance's own
xenstore status directory (xentap.xs_keys: ``/local/domain/0/xentap/
appliance/<domid>/status``, writable by this domain only once dom0 granted
it), its endpoint, its CurveZMQ public key, its state and a heartbeat, and
per VBD it serves ``vbd/<domid>/<devid>/{window-start, window-end, data-state}``.

Runs in the appliance domain beside ``xentap appliance serve`` (started by
the image's /init); talks to xenstored through /dev/xen/xenbus.  ``state``
is ``starting`` until the serve process accepts TCP connections on the
endpoint, then ``ready``; ``stopping`` on SIGTERM.  Until dom0 grants the
directory every write is refused (EACCES): it keeps trying, quietly.

Per VBD (``--data-dir``, the serve process's): the serve process's analysis
writes ``<data-dir>/<vbd-uuid>/analysis.json`` (appliance_domu/analysis.py)
with the VBD's identity from dom0's HELLO (domid, devid), its journal's
window and the analyzer's data state, at once when the data state changes.
This process looks at those files every POLL_EVERY seconds (a stat each;
a file is read again only when it changed) and writes what changed at once:
an alarm is in xenstore within about a second of the analyzer raising it.
A VBD whose file is gone (its journal removed) has its keys removed.  At
most xs_keys.APS_MAX_VBDS VBDs, the most recently updated; of two VBDs
with the same domid/devid (a disk detached, another attached) the newer.
Nothing here imports numpy: this process stays small.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import socket
import sys
import time
import uuid

from xentap import xs_keys as K
from xentap.appliance_node import is_z85_key

HEARTBEAT_EVERY = 2.0
POLL_EVERY = 0.5  #: seconds between looks at the VBDs' analysis files
XENBUS = "/dev/xen/xenbus"
STATE_NAME = "analysis.json"  # = appliance_domu.analysis.STATE_NAME (not imported: numpy)
STATE_FORMAT = 1  # = appliance_domu.analysis.STATE_FORMAT
MAX_STATE_BYTES = 4 << 20  #: a larger analysis file is not read
MAX_DIR_ENTRIES = 65536  #: data-dir entries looked at
_DATA_STATE_RE = re.compile(r"[a-z0-9-]{1,64}")
_U64 = (1 << 64) - 1


def status_dir(domid: int) -> str:
    """Where dom0 lets appliance ``domid`` write (xentap.xs_keys)."""
    return K.appliance_status_path(domid)


def public_key(path: str) -> str:
    """The Z85 public key of a key file (``public-key = "..."``, the format
    of xentap.keys), read here: xentap.keys imports zmq and asyncio, seconds
    of emulated CPU taken from the serve process starting beside this one on
    the appliance's one vCPU.  dom0 checks the key it reads again."""
    with open(path, "rb") as f:
        data = f.read(64 << 10)
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"public-key"):
            rest = line[len(b"public-key"):].lstrip()
            if rest.startswith(b"="):
                key = rest[1:].strip(b" \t'\"").decode("ascii", "replace")
                if is_z85_key(key):
                    return key
                raise ValueError(f"{path}: the public key is not 40 Z85 characters")
    raise ValueError(f"{path}: no public-key line")


def _int(v, lo: int, hi: int) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi else None


def read_vbd(path: str) -> tuple[tuple[int, int], int, dict[str, str]] | None:
    """((domid, devid), updated_ns, {key: value}) from one analysis file, or
    None when it names no VBD.  Values are checked as dom0 checks them."""
    from xentap import xs_keys as K
    with open(path, "rb") as f:
        raw = f.read(MAX_STATE_BYTES + 1)
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError("too large")
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError("not an analysis state")
    domid, devid = _int(doc.get("domid"), 0, 0x7FEF), _int(doc.get("devid"), 1, K.MAX_DEVID)
    if domid is None or devid is None:  # an old file, no HELLO identity
        return None
    vals: dict[str, str] = {}
    win = doc.get("window")
    if isinstance(win, dict):
        first, last = _int(win.get("first_ts_ns"), 0, _U64), _int(win.get("last_ts_ns"), 0, _U64)
        if first and last and first <= last:  # else the journal holds no history yet
            vals[K.APS_WINDOW_START] = str(first // 1_000_000_000)
            vals[K.APS_WINDOW_END] = str(last // 1_000_000_000)
    st = doc.get("status")
    ds = st.get("data_state") if isinstance(st, dict) else None
    if isinstance(ds, str) and _DATA_STATE_RE.fullmatch(K.aps_data_state(ds)):
        vals[K.APS_DATA_STATE] = K.aps_data_state(ds)
    return (domid, devid), _int(doc.get("updated_ns"), 0, _U64) or 0, vals


class VbdPublisher:
    """Keeps ``status/vbd`` equal to what the data dir's analysis files say,
    writing only what changed.  ``reset()`` after a reconnect or a re-grant:
    what is in xenstore is read again and redone."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._files: dict[str, tuple] = {}  # uuid -> (stat key, parsed or None)
        self.published: dict[tuple[int, int], dict[str, str | None]] | None = None
        self.left_out = 0

    def reset(self) -> None:
        self.published = None

    def scan(self) -> dict[tuple[int, int], dict[str, str]]:
        """What should be published now, from the files (read only when changed)."""
        seen: dict[str, tuple] = {}
        try:
            names = []
            with os.scandir(self.data_dir) as it:
                for n, e in enumerate(it):
                    if n >= MAX_DIR_ENTRIES:
                        break
                    names.append(e.name)
        except OSError:
            names = []
        for name in names:
            try:
                uuid.UUID(name)
            except ValueError:
                continue
            path = os.path.join(self.data_dir, name, STATE_NAME)
            try:
                s = os.stat(path)
            except OSError:
                continue
            key = (s.st_ino, s.st_mtime_ns, s.st_size)
            old = self._files.get(name)
            if old is not None and old[0] == key:
                seen[name] = old
                continue
            try:
                seen[name] = (key, read_vbd(path))
            except (OSError, ValueError) as e:
                if old is None or old[0] != key:
                    print(f"appliance: {path}: not published: {e}", flush=True)
                seen[name] = (key, None)
        self._files = seen
        best: dict[tuple[int, int], tuple[int, dict]] = {}
        for _key, parsed in seen.values():
            if parsed is None:
                continue
            ident, updated, vals = parsed
            if ident not in best or updated > best[ident][0]:
                best[ident] = (updated, vals)
        from xentap import xs_keys as K
        chosen = sorted(best.items(), key=lambda kv: kv[1][0], reverse=True)
        if len(chosen) > K.APS_MAX_VBDS and len(chosen) != self.left_out:
            print(f"appliance: {len(chosen)} VBDs, only the {K.APS_MAX_VBDS} most recently "
                  f"updated are published", flush=True)
        self.left_out = len(chosen) if len(chosen) > K.APS_MAX_VBDS else 0
        return {ident: vals for ident, (_u, vals) in chosen[:K.APS_MAX_VBDS]}

    def sync(self, client, status: str) -> int:
        """Writes what changed since the last sync; returns the number of writes."""
        from xentap import xs_keys as K
        want = self.scan()
        vdir = f"{status}/{K.APS_VBD}"
        if self.published is None:  # what is there now (a previous announcer's too)
            pub: dict[tuple[int, int], dict[str, str | None]] = {}
            for d in _ls(client, vdir):
                for v in _ls(client, f"{vdir}/{d}") if _number(d) else []:
                    if _number(v):  # unknown values: each key is written or removed
                        pub[(int(d), int(v))] = dict.fromkeys(K.APS_VBD_KEYS, "?")
                    else:
                        _rm(client, f"{vdir}/{d}/{v}")
                if not _number(d):
                    _rm(client, f"{vdir}/{d}")
            self.published = pub
        pub = self.published
        n = 0
        for ident in [i for i in pub if i not in want]:
            _rm(client, f"{vdir}/{ident[0]}/{ident[1]}")
            del pub[ident]
            n += 1
            if not any(i[0] == ident[0] for i in pub):
                _rm(client, f"{vdir}/{ident[0]}")
        for ident, vals in want.items():
            have = pub.setdefault(ident, {})
            base = f"{vdir}/{ident[0]}/{ident[1]}"
            for k in K.APS_VBD_KEYS:
                v = vals.get(k)
                if k in have and have[k] == v:
                    continue
                if v is None:
                    _rm(client, f"{base}/{k}")
                else:
                    client.write(f"{base}/{k}".encode(), v.encode())
                have[k] = v
                n += 1
        return n


def _number(name: str) -> bool:
    """A node name as this writes numbers (so that int() gives the path back)."""
    return name.isascii() and name.isdigit() and name == str(int(name))


def _ls(client, path: str) -> list[str]:
    import pyxs
    try:
        return [x.decode() for x in client.list(path.encode())]
    except pyxs.PyXSError as e:
        if e.args and e.args[0] == errno.ENOENT:
            return []
        raise


def _rm(client, path: str) -> None:
    import pyxs
    try:
        client.delete(path.encode())
    except pyxs.PyXSError as e:
        if not (e.args and e.args[0] == errno.ENOENT):
            raise


def _disk_reads() -> str:
    """'; xvdb: N reads, M MiB, busy T s' per xen disk so far (/sys/block/*/stat:
    how much of the start-up went into reading the root disk), or ''."""
    out = []
    try:
        names = sorted(n for n in os.listdir("/sys/block") if n.startswith("xvd"))
    except OSError:
        return ""
    for n in names:
        try:
            with open(f"/sys/block/{n}/stat") as f:
                v = [int(x) for x in f.read().split()]
            out.append(f"{n}: {v[0]} reads, {v[2] / 2048:.1f} MiB, busy {v[9] / 1000:.1f} s")
        except (OSError, ValueError, IndexError):
            continue
    return "; " + "; ".join(out) if out else ""


def _uptime() -> str:
    """' after N.NNs' (the domain's uptime, as init's console lines say it), or ''."""
    try:
        with open("/proc/uptime") as f:
            return f" after {f.read().split()[0]}s"
    except (OSError, IndexError):
        return ""


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
    ap.add_argument("--data-dir", help="the serve process's data directory: publish its "
                    "VBDs' journal windows and data states")
    ap.add_argument("--xenstore-socket", help="a xenstored Unix socket instead of "
                    f"{XENBUS} (tests)")
    ap.add_argument("--once", action="store_true", help="publish once and exit (tests)")
    a = ap.parse_args(argv)

    import pyxs

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # The key file may not exist yet: on an appliance's first boot the serve
    # process makes the pair (serve --make-keys) before it listens.  The
    # state stays `starting` until the key is read.
    key = None
    vbds = VbdPublisher(a.data_dir) if a.data_dir else None
    client = None
    domid = None
    granted = False
    state = "starting"
    announced = (None, 0.0)  # (state, monotonic time) of the last heartbeat written
    while True:
        if a.public_key_file and key is None and os.path.exists(a.public_key_file):
            try:
                key = public_key(a.public_key_file)
            except (OSError, ValueError) as e:   # (being written: the next round)
                print(f"appliance: public key: {e}", flush=True)
        if (a.serve_pid and state == "starting" and (key or not a.public_key_file)
                and accepting(a.endpoint)):
            state = "ready"
            print(f"appliance: ready on {a.endpoint}{_uptime()}{_disk_reads()}", flush=True)
        if stop:
            state = "stopping"
        try:
            if client is None:
                client = pyxs.Client(unix_socket_path=a.xenstore_socket) if a.xenstore_socket \
                    else pyxs.Client(xen_bus_path=XENBUS)
                client.connect()
                domid = int(client.read(b"domid"))
            d = status_dir(domid)
            now = time.monotonic()
            if not granted or announced[0] != state or now - announced[1] >= HEARTBEAT_EVERY:
                vals = {"endpoint": a.endpoint, "state": state,
                        "heartbeat": str(int(time.time()))}
                if key:
                    vals["public-key"] = key
                for k, v in vals.items():
                    client.write(f"{d}/{k}".encode(), v.encode())
                announced = (state, now)
                # dom0 re-granted (the directory made anew): redo the VBDs
                if vbds is not None and vbds.published and not _ls(client, f"{d}/vbd"):
                    vbds.reset()
            if vbds is not None:
                vbds.sync(client, d)
            if not granted:
                granted = True
                print(f"appliance: announced in {d} (domain {domid})", flush=True)
        except (pyxs.PyXSError, OSError, ValueError) as e:
            if granted:
                print(f"appliance: xenstore: {e}", flush=True)
            granted = False
            if vbds is not None:
                vbds.reset()
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
        time.sleep(POLL_EVERY if vbds is not None or state != "ready" else HEARTBEAT_EVERY)


if __name__ == "__main__":
    sys.exit(main())
