"""Protection: which appliance a VBD is mirrored to, and the mirror of one VBD
in the daemon.

An administrator names the appliance in one string (``xentap attach
--protect APPLIANCE``, ``protect=APPLIANCE`` in ``xentap_disks``):

- ``NAME``: an appliance domain made one by ``xentap appliance-grant`` (its
  node's ``name``); the daemon takes the endpoint and public key that domain
  publishes in its status node, validated, when the mirror starts.
- ``tcp://HOST:PORT`` or ``ipc:///PATH``: an appliance at that endpoint (e.g.
  ``xentap appliance serve`` in dom0, or a remote one); its CurveZMQ public
  key comes from ``--protect-key FILE`` (stored in the backend node) or else
  from the daemon's ``<keys-dir>/appliance.key``.

Both go in the VBD's backend node (``protect``, ``protect-key``), written by
the toolstack in dom0 only, with the VBD's stream ``vbd-uuid``.

:class:`Mirror` is the daemon's side of one protected VBD: it turns the
shim's mirror ring on before the shim connects, runs a
:class:`~xentap.drainer.Drainer` with a spill log under
``<state-dir>/spill/<vbd-uuid>``, and ends it cleanly (bounded drain, the rest
to the spill log, the stream's last seq recorded) so that the next shim
session or the next daemon goes on with the same stream.  After a daemon
that was killed, the next drainer finds the stream unclean and resyncs the
whole disk after a GAP (xentap.drainer).
"""
from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xentap import xs_keys as K
from xentap.appliance_node import ENDPOINT_RE, is_z85_key, read_appliance_status

# (xentap.keys (zmq), xentap.drainer, xentap.shim, xentap.wire and construct
# are imported where they are used: `xentap create`/`attach` import this
# module for check_protect and its defaults, and under Xen-in-QEMU every
# import is seconds of emulated CPU: zmq and the drainer were 2/3 of them.)
if TYPE_CHECKING:
    from xentap import shim
    from xentap.drainer import Drainer

_preloading: threading.Thread | None = None


def _preload_mirror_modules() -> None:
    """Imports what a drainer needs in a thread of its own, once: the daemon
    makes a Mirror when a protected VBD is opened, well before its appliance
    can be reached, so that the drainer's start (in Mirror.start, once the
    appliance announced itself) does not wait for zmq and the drainer to be
    imported (tens of seconds in an emulated dom0: the guest may have
    written by then, and a new stream's drainer takes what the disk holds
    when it starts as its initial sync)."""
    global _preloading
    if _preloading is not None:
        return

    def body() -> None:
        import xentap.drainer  # noqa: F401
        import xentap.keys  # noqa: F401

    _preloading = threading.Thread(target=body, daemon=True, name="xentap-mirror-imports")
    _preloading.start()

log = logging.getLogger("xentap.protect")

DEFAULT_STATE_DIR = "/var/lib/xentap"
DEFAULT_KEYS_DIR = "/etc/xentap/keys"
DEFAULT_SPILL_LIMIT = 1 << 30
DRAIN_TIMEOUT = 5.0      # seconds a stopping mirror waits for the appliance

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def is_endpoint(value: str) -> bool:
    return value.startswith(("tcp://", "ipc://"))


def check_protect(value: str) -> str:
    """An APPLIANCE value's syntax; raises ValueError (one line) when bad."""
    if is_endpoint(value):
        if not ENDPOINT_RE.match(value):
            raise ValueError(f"appliance endpoint {value!r} is not tcp://HOST:PORT or "
                             f"ipc:///PATH")
        if value.startswith("tcp://"):
            port = int(value.rsplit(":", 1)[1])
            if not 0 < port < 65536:
                raise ValueError(f"appliance endpoint {value}: port {port} out of range")
        return value
    if not _NAME_RE.match(value):
        raise ValueError(f"appliance {value!r} is neither an appliance domain's name nor "
                         f"tcp://HOST:PORT or ipc:///PATH")
    return value


def load_protect_key(path: str) -> str:
    """The Z85 public key in file ``path``; OSError/ValueError with the path."""
    from xentap import keys as keys_mod
    return keys_mod.load_public(path).decode("ascii")


def find_appliance(xs, name: str) -> int | None:
    """The domid of the appliance domain called ``name`` (or numbered so)."""
    for d in xs.ls(K.APPLIANCE_ROOT) or []:
        if not d.isdigit():
            continue
        if d == name or xs.read(f"{K.appliance_path(int(d))}/{K.AP_NAME}") == name:
            return int(d)
    return None


def check_protect_xs(xs, value: str, key_file: str | None) -> dict[str, str]:
    """The backend keys that protect a VBD with appliance ``value`` (and
    ``key_file`` for an endpoint); raises ValueError (one line) when
    ``value`` names no appliance or the key file is bad."""
    check_protect(value)
    out = {K.BE_PROTECT: value}
    if is_endpoint(value):
        if key_file:
            out[K.BE_PROTECT_KEY] = load_protect_key(key_file)
    else:
        if key_file:
            raise ValueError(f"--protect-key goes with an endpoint; appliance domain "
                             f"{value} publishes its own key")
        if find_appliance(xs, value) is None:
            raise ValueError(f"no appliance domain named {value!r} (make one with "
                             f"'xentap appliance-grant', or give tcp://HOST:PORT)")
    return out


@dataclass
class Target:
    """Where a mirror sends: an endpoint and the appliance's public key."""

    endpoint: str
    public_key: bytes


def resolve(xs, protect: str, key: str | None, keys_dir: str) -> Target:
    """The endpoint and key of appliance ``protect`` now; ValueError/OSError
    (one line) when it cannot be reached yet or is misconfigured."""
    check_protect(protect)
    if is_endpoint(protect):
        if key is not None:
            if not is_z85_key(key):
                raise ValueError(f"{K.BE_PROTECT_KEY} is not a 40-character Z85 key")
            return Target(protect, key.encode())
        from xentap import keys as keys_mod
        path = keys_mod.paths(keys_dir, keys_mod.APPLIANCE_NAME)[0]
        return Target(protect, keys_mod.load_public(path))
    domid = find_appliance(xs, protect)
    if domid is None:
        raise ValueError(f"no appliance domain named {protect!r}")
    st = read_appliance_status(xs, domid, vbds=False)
    if st["endpoint"] is None or st["public_key"] is None:
        why = ", ".join(st["problems"]) or "no endpoint or public key published yet"
        raise ValueError(f"appliance {protect} (domain {domid}): {why}")
    return Target(st["endpoint"], st["public_key"].encode())


class Mirror:
    """The mirror of one protected VBD (see the module's docstring)."""

    def __init__(self, *, vbd_uuid: uuid.UUID, domid: int, devid: int, target: Target,
                 keys_dir: str, state_dir: str, ring_bytes: int | None = None,
                 spill_limit: int = DEFAULT_SPILL_LIMIT):
        if ring_bytes is None:
            from xentap import shim
            ring_bytes = shim.DEFAULT_MIRROR_RING
        _preload_mirror_modules()
        self.vbd_uuid = vbd_uuid
        self.domid, self.devid = domid, devid
        self.target = target
        self.keys_dir = keys_dir
        self.ring_bytes = ring_bytes
        self.spill_limit = spill_limit
        self.spill_dir = spill_dir(state_dir, vbd_uuid)
        self.drainer: Drainer | None = None
        self.stopped = False
        #: a new stream's disk: where it held data before the shim first connected
        self.data_extents: list[tuple[int, int]] | None | bool = False

    def enable(self, vbd: shim.Vbd, image_path: str) -> None:
        """Turns the shim's mirror ring on (before it connects).  A new
        stream's drainer sends what the disk holds before the guest's writes
        (its initial sync): where that is, is taken now, before the guest can
        write (a drainer starts later, once the appliance is found)."""
        vbd.mirror_enable(self.ring_bytes)
        if self.data_extents is False and self._new_stream():
            from xentap import sparse
            fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.data_extents = sparse.data_extents(fd, vbd.sectors * 512)
            finally:
                os.close(fd)

    def _new_stream(self) -> bool:
        """Nothing of this stream numbered before: no stream record, nothing spilled."""
        from xentap.stream_state import is_new_stream
        return is_new_stream(self.spill_dir, bool(spill_segments(self.spill_dir)))

    def start(self, vbd: shim.Vbd, image_path: str) -> None:
        """Starts draining ``vbd``'s ring, going on with the stream where the
        previous drainer of this VBD left it.  OSError/ValueError when dom0's
        keys are missing."""
        from xentap import keys as keys_mod
        from xentap.drainer import Drainer, VbdIdentity
        from xentap.stream_state import read_stream_state
        pub, sec = keys_mod.load_secret(keys_mod.paths(self.keys_dir, keys_mod.DOM0_NAME)[1])
        client = keys_mod.CurveClient(pub, sec, self.target.public_key)
        prev = read_stream_state(self.spill_dir)
        info = vbd.info()
        ident = VbdIdentity(vbd_uuid=self.vbd_uuid, domid=self.domid, devid=self.devid,
                            vdev=K.devid_to_vdev(self.devid),
                            size_bytes=vbd.sectors * 512,
                            logical_sector_size=info.get("sector_size", 512),
                            physical_sector_size=info.get("physical_sector_size", 512))
        self.drainer = Drainer(vbd, ident, self.target.endpoint, image_path=image_path,
                               spill_dir=self.spill_dir, spill_limit=self.spill_limit,
                               socket_setup=lambda s: keys_mod.configure_client(s, client),
                               seq_base=prev["last_seq"], epoch=prev["epoch"],
                               unclean=not prev["clean"],
                               data_extents=self.data_extents).start()
        self.data_extents = False               # the next session's drainer goes on
        self.stopped = False
        log.info("dom%d %s: mirroring to %s (stream %s from seq %d%s)", self.domid,
                 K.devid_to_vdev(self.devid), self.target.endpoint, self.vbd_uuid,
                 self.drainer.acked_seq + 1, "" if prev["clean"] else
                 "; the last drainer ended uncleanly: full resync")

    def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> dict[str, Any] | None:
        """Ends the drainer (after the shim stopped taking writes); returns
        its last figures."""
        d, self.drainer = self.drainer, None
        if d is None:
            return None
        acked = d.close(drain_timeout)
        st = d.stats()
        self.stopped = True
        log.info("dom%d %s: mirror stopped, %s (acked seq %d, %d bytes spilled)", self.domid,
                 K.devid_to_vdev(self.devid), "all acknowledged" if acked else
                 "the rest kept in the spill log", st["acked_seq"], st["spill_bytes"])
        return st


# --- the spill directories of streams that ended -----------------------------------------

def spill_root(state_dir: str) -> str:
    return os.path.join(state_dir, "spill")


def spill_dir(state_dir: str, vbd_uuid: uuid.UUID | str) -> str:
    return os.path.join(spill_root(state_dir), str(vbd_uuid))


def spill_segments(directory: str) -> list[str]:
    """The spill log's segment files in ``directory`` (xentap.spill names them)."""
    try:
        return [n for n in os.listdir(directory) if n.startswith("spill-") and n.endswith(".log")]
    except FileNotFoundError:
        return []


def spill_drained(directory: str) -> bool:
    """Whether a stream's spill dir holds nothing the appliance lacks: its
    last drainer closed cleanly (nothing lost) and left no spill segment
    (the segments of acknowledged writes are deleted as acks come), so
    every write of the stream was acknowledged."""
    from xentap.stream_state import read_stream_state
    return read_stream_state(directory)["clean"] and not spill_segments(directory)


def spilled_bytes(directory: str) -> int:
    total = 0
    for name in spill_segments(directory):
        try:
            total += os.path.getsize(os.path.join(directory, name))
        except OSError:
            pass
    return total


def remove_spill_dir(directory: str, why: str) -> None:
    """Removes the spill dir of a stream that will never go on (its VBD was
    detached) once it is drained; keeps one that still holds writes the
    appliance has not acknowledged, and says so."""
    if not os.path.isdir(directory):
        return
    if spill_drained(directory):
        shutil.rmtree(directory, ignore_errors=True)
        log.info("%s: removed %s (every write acknowledged)", why, directory)
    else:
        from xentap.stream_state import read_stream_state
        log.warning("%s: keeping %s: %d bytes of writes the appliance has not acknowledged%s",
                    why, directory, spilled_bytes(directory),
                    "" if read_stream_state(directory)["clean"]
                    else " (its drainer ended uncleanly)")


# --- how far behind the appliance is ------------------------------------------------------

class UnackedAge:
    """The age of the oldest write the appliance has not acknowledged: how
    far behind the appliance is right now (``mirror-lag-ms``).

    The drainer dates what it sent and has not had acknowledged
    (``pending_ts``: last seq and completion time of each frame in flight)
    and the spill log keeps its frames with the writes' completion times.  A
    write still in the mirror ring and never sent is dated by when this
    clock first saw its seq (:meth:`ms` runs once per status round, so it is
    never older than it is, and at most one round younger).  The oldest of
    these dates is the oldest unacknowledged write's.
    """

    MAX_SAMPLES = 4096

    def __init__(self) -> None:
        #: (next seq, time) each time the stream's next seq moved: at that
        #: time every seq below it existed.
        self._seen: collections.deque[tuple[int, int]] = collections.deque()

    def ms(self, drainer: Drainer | None, acked_seq: int, next_seq: int,
           now_ns: int | None = None) -> float:
        now = time.time_ns() if now_ns is None else now_ns
        oldest = acked_seq + 1
        if oldest >= next_seq:                  # nothing unacknowledged
            self._seen.clear()
            return 0.0
        if not self._seen or self._seen[-1][0] != next_seq:
            if len(self._seen) >= self.MAX_SAMPLES:     # coarser, never wrong in the oldest
                del self._seen[len(self._seen) // 2]
            self._seen.append((next_seq, now))
        while self._seen[0][0] <= oldest:       # the last one is above oldest
            self._seen.popleft()
        dates = [self._seen[0][1]]
        if drainer is not None:
            try:
                last, ts = drainer.pending_ts[0]     # the drainer's thread pops it meanwhile
                if last >= oldest:
                    dates.append(ts)
            except IndexError:
                pass
            dates += self._spilled(drainer, acked_seq)
        return round(max(0, now - min(dates)) / 1e6, 1)

    @staticmethod
    def _spilled(drainer: Drainer, acked_seq: int) -> list[int]:
        """The date of the first spilled frame after ``acked_seq`` (read while
        the drainer's thread appends and trims: a vanished segment or a torn
        frame is simply not a date)."""
        from construct import ConstructError

        from xentap import wire
        spill = drainer.spill
        try:
            if spill.last_seq <= acked_seq:
                return []
            for _first, _last, frame in spill.frames_after(acked_seq, wire.FRAME_TIME_BYTES):
                ts = wire.frame_time_ns(frame)
                return [] if ts is None else [ts]
        except (OSError, ValueError, IndexError, ConstructError) as e:
            log.debug("reading the spill log for the lag: %s", e)
        return []
