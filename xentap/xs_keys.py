"""Every xenstore path and key xentap reads or writes, in one place.

Nothing else in xentap spells a xenstore path or key: it imports it from
here.  Key names follow Linux's ``xen-blkfront.c`` and ``xen-blkback/xenbus.c``
(and libxl for the toolstack's keys), because Linux blkfront is the frontend we
serve and it only understands those names.

Layout
------
::

    /local/domain/0/backend/xentap/<domid>/<devid>/    backend node   (n0 r<domid>)
        frontend, frontend-id, online, state, params, mode, dev, type,
        device-type, [protect, protect-key], vbd-uuid   written by the toolstack (attach)
        sectors, sector-size, physical-sector-size, info, feature-*,
        max-ring-page-order, multi-queue-max-queues, state, error
                                                        written by the daemon
    /local/domain/<domid>/device/vbd/<devid>/           frontend node  (n<domid> r0)
        backend, backend-id, state, virtual-device, device-type
                                                        written by the toolstack (attach)
        ring-ref | ring-ref<i>, event-channel, protocol, ring-page-order,
        multi-queue-num-queues, queue-<q>/{ring-ref*, event-channel}, state
                                                        written by the guest: UNTRUSTED
    /local/domain/0/xentap/                             xentap's own subtree (n0)
        daemon/{pid, state, transport, heartbeat}       the daemon
        vbd/<domid>/<devid>/{state, ...counters,        per-VBD status, every second;
                             mirror-*}                  kept after the guest ends, until detach
        appliance/<domid>/                              an appliance domain (n0 r<domid>)
            name                                        written by dom0
            status/{state, endpoint, public-key, heartbeat,
                    vbd/<d>/<v>/{window-start, window-end, data-state}}
                                                        (n0 b<domid>) written by the
                                                        appliance: UNTRUSTED

``<devid>`` is the Linux virtual-device number (xvda = 51712, see
:func:`vdev_to_devid`).  The backend type name ``xentap`` is ours: blkfront
follows its frontend's ``backend`` key and never looks at the type.
"""
from __future__ import annotations

import enum
import re

# --- roots --------------------------------------------------------------------

#: The backend domain: the daemon runs in dom0.
BACKEND_DOMID = 0
#: Our backend type (kernel blkback uses ``vbd``).
BACKEND_TYPE = "xentap"
#: Every xentap backend node lives under this; the daemon watches it.
BACKEND_ROOT = f"/local/domain/{BACKEND_DOMID}/backend/{BACKEND_TYPE}"
#: Fired by xenstored when a domain dies or is released.
RELEASE_DOMAIN = "@releaseDomain"
#: Fired by xenstored when a domain is introduced.
INTRODUCE_DOMAIN = "@introduceDomain"
#: The frontend device class of virtual block devices.
FRONTEND_CLASS = "vbd"


def domain_path(domid: int) -> str:
    """A domain's home, ``/local/domain/<domid>``."""
    return f"/local/domain/{domid}"


def backend_path(domid: int, devid: int) -> str:
    """The backend node of VBD ``devid`` of guest ``domid``."""
    return f"{BACKEND_ROOT}/{domid}/{devid}"


def frontend_path(domid: int, devid: int) -> str:
    """The frontend node of VBD ``devid`` in guest ``domid``."""
    return f"{domain_path(domid)}/device/{FRONTEND_CLASS}/{devid}"


_BACKEND_RE = re.compile(rf"^{re.escape(BACKEND_ROOT)}(?:/([0-9]+)(?:/([0-9]+)(/.*)?)?)?$")


def parse_backend_path(path: str) -> tuple[int | None, int | None, str | None] | None:
    """Splits a path under :data:`BACKEND_ROOT` into (domid, devid, rest).

    Returns None for paths outside the root (or with non-numeric
    components); missing parts are None, ``rest`` keeps its leading slash.
    """
    m = _BACKEND_RE.match(path)
    if not m:
        return None
    domid, devid, rest = m.groups()
    return (int(domid) if domid else None, int(devid) if devid else None, rest)


# --- xenbus states (xen/include/public/io/xenbus.h) ---------------------------

class XenbusState(enum.IntEnum):
    """``enum xenbus_state``: the ``state`` key of both ends."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2        # backend: features written, waiting for the frontend's rings
    INITIALISED = 3      # frontend: rings published
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @property
    def label(self) -> str:
        """The name Xen's tools print (``Initialising``, ``InitWait``...)."""
        return _STATE_LABELS[self]

    @classmethod
    def parse(cls, value: str | bytes | None) -> "XenbusState":
        """The state a ``state`` key holds; UNKNOWN when absent or garbage."""
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if value is None or not value.isdigit():
            return cls.UNKNOWN
        try:
            return cls(int(value))
        except ValueError:
            return cls.UNKNOWN


_STATE_LABELS = {
    XenbusState.UNKNOWN: "Unknown", XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait", XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected", XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed", XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}

# --- keys in both nodes -------------------------------------------------------

#: The xenbus state of that end (:class:`XenbusState` as a decimal string).
STATE = "state"

# --- backend node: written by the toolstack (xentap attach, as libxl does) -----

#: Path of the frontend node.
BE_FRONTEND = "frontend"
#: Domain id of the frontend.
BE_FRONTEND_ID = "frontend-id"
#: "1" while the device should exist; "0" asks for removal (xl block-detach).
BE_ONLINE = "online"
#: The image: a raw file, LV or block device path (libxl's ``params``).
BE_PARAMS = "params"
#: "r" or "w".
BE_MODE = "mode"
#: The vdev name as the user gave it (``xvda``), for humans.
BE_DEV = "dev"
#: Backend type, ``xentap``.
BE_TYPE = "type"
#: ``disk`` (or ``cdrom``).
BE_DEVICE_TYPE = "device-type"

#: Mirroring: the appliance that protects this VBD, as the administrator
#: named it (``xentap attach --protect``, ``protect=`` in xentap_disks): an
#: appliance domain's name (its node under APPLIANCE_ROOT, whose status gives
#: endpoint and public key) or an endpoint ``tcp://HOST:PORT`` / ``ipc:///PATH``.
#: Absent: not mirrored.
BE_PROTECT = "protect"
#: With an endpoint: the appliance's CurveZMQ public key (40 Z85 characters);
#: absent, the daemon uses ``<keys-dir>/appliance.key``.
BE_PROTECT_KEY = "protect-key"
#: The VBD's stream identity (a UUID), written at attach and kept for the
#: VBD's life: the appliance's journal and the dom0 spill log are named by it.
BE_VBD_UUID = "vbd-uuid"

# --- backend node: written by the backend (read by blkfront) ------------------

#: Size in 512-byte sectors (blkif sector numbers are always 512 bytes).
BE_SECTORS = "sectors"
#: Logical sector size in bytes.
BE_SECTOR_SIZE = "sector-size"
#: Physical sector size in bytes.
BE_PHYSICAL_SECTOR_SIZE = "physical-sector-size"
#: VDISK_* flags (below), decimal.
BE_INFO = "info"
#: "1": BLKIF_OP_FLUSH_DISKCACHE works.
BE_FEATURE_FLUSH_CACHE = "feature-flush-cache"
#: "1": BLKIF_OP_WRITE_BARRIER works.
BE_FEATURE_BARRIER = "feature-barrier"
#: "1": BLKIF_OP_DISCARD works.
BE_FEATURE_DISCARD = "feature-discard"
#: Discard details, with feature-discard (bytes; secure: "1" if erased for good).
BE_DISCARD_GRANULARITY = "discard-granularity"
BE_DISCARD_ALIGNMENT = "discard-alignment"
BE_DISCARD_SECURE = "discard-secure"
#: "1": persistent grants: a frontend that asks for them too keeps its data
#: pages granted until it disconnects, and the shim keeps them mapped.
BE_FEATURE_PERSISTENT = "feature-persistent"
#: Most segments of one BLKIF_OP_INDIRECT request.
BE_FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
#: Largest ring-page-order the frontend may use.
BE_MAX_RING_PAGE_ORDER = "max-ring-page-order"
#: Most queues (rings) the frontend may use.
BE_MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
#: Why the backend gave up: ``"<errno> <reason>"``, as xenbus_dev_fatal words
#: it.  (Linux writes it at ``error/<backend node>/error`` in the backend's
#: home; we keep it next to ``state`` where ``xentap status`` reads it.)
BE_ERROR = "error"

#: Every feature key a backend may advertise; those we do not write are absent.
BE_FEATURE_KEYS = (BE_FEATURE_FLUSH_CACHE, BE_FEATURE_BARRIER, BE_FEATURE_DISCARD,
                   BE_DISCARD_GRANULARITY, BE_DISCARD_ALIGNMENT, BE_DISCARD_SECURE,
                   BE_FEATURE_PERSISTENT, BE_FEATURE_MAX_INDIRECT_SEGMENTS,
                   BE_MAX_RING_PAGE_ORDER, BE_MULTI_QUEUE_MAX_QUEUES)

#: ``info`` flags (xen/include/public/io/blkif.h).
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# --- frontend node: written by the toolstack ----------------------------------

#: Path of the backend node (blkfront follows it).
FE_BACKEND = "backend"
#: Domain id of the backend.
FE_BACKEND_ID = "backend-id"
#: The devid again, decimal.
FE_VIRTUAL_DEVICE = "virtual-device"
#: ``disk`` or ``cdrom``.
FE_DEVICE_TYPE = "device-type"

# --- frontend node: written by blkfront (untrusted) ---------------------------

#: Grant ref of a single-page ring (no ring-page-order key).
FE_RING_REF = "ring-ref"
#: log2 of ring pages; when present the refs are ring-ref0..ring-ref<2^order - 1>.
FE_RING_PAGE_ORDER = "ring-page-order"
#: The frontend's unbound event channel port for a ring.
FE_EVENT_CHANNEL = "event-channel"
#: Ring ABI: ``x86_64-abi`` (native here), ``x86_32-abi``; absent means native.
#: Which ones are served is the shim's business (shim.PROTOCOLS).
FE_PROTOCOL = "protocol"
#: Number of queues; when over 1, each queue's keys are under queue-<q>/.
FE_MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
#: "1": the frontend asks for persistent grants (with the backend's key).
FE_FEATURE_PERSISTENT = "feature-persistent"

#: ``protocol`` values.
PROTOCOL_X86_64 = "x86_64-abi"
PROTOCOL_X86_32 = "x86_32-abi"
#: The native ABI of a dom0 built for x86_64.
PROTOCOL_NATIVE = PROTOCOL_X86_64


def fe_ring_ref(page: int) -> str:
    """Key of page ``page`` of a multi-page ring."""
    return f"{FE_RING_REF}{page}"


def fe_queue_dir(queue: int) -> str:
    """Subdirectory of queue ``queue`` when multi-queue-num-queues > 1."""
    return f"queue-{queue}"


# --- xentap's own subtree ------------------------------------------------------

#: Root of what xentap publishes (owned by dom0, readable by dom0 only).
XENTAP_ROOT = f"/local/domain/{BACKEND_DOMID}/xentap"
#: The daemon: ``pid``, ``state`` (running/stopped), ``transport``, ``heartbeat``.
DAEMON_PATH = f"{XENTAP_ROOT}/daemon"
DAEMON_PID = "pid"
DAEMON_STATE = "state"
DAEMON_TRANSPORT = "transport"
#: Unix time of the last status round, decimal seconds.
DAEMON_HEARTBEAT = "heartbeat"
#: Per-VBD status, refreshed every second by the daemon.
STATUS_ROOT = f"{XENTAP_ROOT}/vbd"
#: The data-services appliances: one node per appliance domain, made by
#: `xentap appliance-grant`.  Dom0 owns everything; the appliance domain may
#: read its own node and write below its own ``status`` and nothing else.
#: What it writes there is untrusted input (see xenbus.read_appliance_status).
APPLIANCE_ROOT = f"{XENTAP_ROOT}/appliance"


def appliance_path(domid: int) -> str:
    """The node of appliance domain ``domid`` (``n0 r<domid>``)."""
    return f"{APPLIANCE_ROOT}/{domid}"


#: Below an appliance's node: what dom0 tells it (``name``), and its status
#: directory, the only place it may write (``n0 b<domid>``).
AP_NAME = "name"
AP_STATUS = "status"
#: Keys the appliance writes under ``status``, each validated when read:
#: ``state`` one of AP_STATES; ``endpoint`` ``tcp://HOST:PORT`` or ``ipc://PATH``;
#: ``public-key`` its CurveZMQ public key (40 Z85 characters); ``heartbeat``
#: unix seconds; ``vbd/<domid>/<devid>/{window-start, window-end, data-state}``.
APS_STATE = "state"
APS_ENDPOINT = "endpoint"
APS_PUBLIC_KEY = "public-key"
APS_HEARTBEAT = "heartbeat"
APS_VBD = "vbd"
APS_WINDOW_START = "window-start"
APS_WINDOW_END = "window-end"
APS_DATA_STATE = "data-state"
AP_STATES = ("starting", "ready", "degraded", "stopping")


def appliance_status_path(domid: int) -> str:
    """Where appliance domain ``domid`` writes its status."""
    return f"{appliance_path(domid)}/{AP_STATUS}"


#: The most VBDs an appliance publishes under ``status/vbd`` (the newest
#: ones; the rest are left out with a log line).  Each takes at most 5 nodes
#: (``vbd/<d>``, ``vbd/<d>/<v>`` and its 3 keys), all owned by the appliance
#: domain: 128 of them stay within xenstored's default quota of 1000 nodes
#: per domain.  Dom0 reads at most 256 x 256 entries whatever is there.
APS_MAX_VBDS = 128
#: Per-VBD keys under ``status/vbd/<domid>/<devid>/``: the journal's history
#: window, unix seconds (truncated) of its first and last write (absent
#: while it holds none), and the analyzer's data state (``aps_data_state``).
APS_VBD_KEYS = (APS_WINDOW_START, APS_WINDOW_END, APS_DATA_STATE)


def appliance_vbd_path(appliance: int, domid: int, devid: int) -> str:
    """Where appliance domain ``appliance`` publishes VBD ``devid`` of guest ``domid``."""
    return f"{appliance_status_path(appliance)}/{APS_VBD}/{domid}/{devid}"


def aps_data_state(state: str) -> str:
    """A data state as written to xenstore: the analyzer's name
    (analyzer.stream, ``encryption_suspected``) with hyphens for
    underscores, as xenstore values are spelt (``encryption-suspected``)."""
    return state.replace("_", "-")


def status_path(domid: int, devid: int) -> str:
    """The per-VBD status node of VBD ``devid`` of guest ``domid``."""
    return f"{STATUS_ROOT}/{domid}/{devid}"


#: Per-VBD status keys.  ``state`` is the backend's xenbus state label,
#: ``shim`` the shim's own state (open/connected/failed, or ``closed``).
ST_STATE = "state"
ST_SHIM = "shim"
ST_TARGET = "target"
ST_REQUESTS = "requests"          # every request served (read, write, flush, barrier, discard)
ST_BYTES = "bytes"                # bytes read + written
ST_ERRORS = "errors"              # requests answered with an error
ST_IN_FLIGHT = "in-flight"
ST_GRANTS_MAPPED = "grants-mapped"  # the guest's pages kept mapped (persistent grants)
ST_READS = "reads"
ST_WRITES = "writes"
ST_FLUSHES = "flushes"
ST_BYTES_READ = "bytes-read"
ST_BYTES_WRITTEN = "bytes-written"
ST_BARRIERS = "barriers"
ST_DISCARDS = "discards"
ST_INDIRECT = "indirect"          # requests that came as BLKIF_OP_INDIRECT
ST_NR_QUEUES = "queues"
ST_UPDATED = "updated"            # unix time of this sample
ST_ERROR = "error"                # the last handshake error, if any
#: Mirroring (protected VBDs only; absent otherwise).  ``mirror`` is
#: ``connected`` (a session with the appliance), ``disconnected`` (spilling,
#: reconnecting), ``draining`` (the session ended: the drainer drains, for a
#: bounded time, off the daemon's main loop), ``stopped`` (the guest is gone,
#: the stream is drained or spilled), ``starting`` or ``error``.
ST_MIRROR = "mirror"
ST_MIRROR_APPLIANCE = "mirror-appliance"    # the endpoint it sends to
ST_MIRROR_UUID = "mirror-uuid"              # the stream's VBD uuid
ST_MIRROR_ACKED_SEQ = "mirror-acked-seq"    # the appliance holds every seq up to this
ST_MIRROR_NEXT_SEQ = "mirror-next-seq"      # the seq the next write gets
ST_MIRROR_PENDING = "mirror-pending"        # seqs written, not yet acknowledged
ST_MIRROR_LAG_MS = "mirror-lag-ms"          # age of the oldest unacknowledged write (0: none)
ST_MIRROR_ACK_P99_MS = "mirror-ack-p99-ms"  # p99 write-to-ack time of the last 4096 frames (drainer.LAG_RECENT)
ST_MIRROR_SPILL_BYTES = "mirror-spill-bytes"
ST_MIRROR_RING_BYTES = "mirror-ring-bytes"  # bytes waiting in the mirror ring
ST_MIRROR_OVERFLOWS = "mirror-overflows"    # writes that missed the ring (dirty bitmap)
ST_MIRROR_GAPS = "mirror-gaps"              # GAPs sent (history not write-ordered)
ST_MIRROR_ERROR = "mirror-error"
ST_MIRROR_SYNC = "mirror-sync"              # a full resync under way: "initial" (a new stream's
                                            # data) or "restart" (after an unclean end); "": none
ST_MIRROR_SYNC_DONE = "mirror-sync-done"    # MiB of it the appliance acknowledged
ST_MIRROR_SYNC_TOTAL = "mirror-sync-total"  # MiB it sends in all
#: Mirror counters that add up over the VBD's life, like ST_CUMULATIVE.
ST_MIRROR_CUMULATIVE = (ST_MIRROR_OVERFLOWS, ST_MIRROR_GAPS)
#: Every mirror status key (removed when a VBD is not protected).
ST_MIRROR_KEYS = (ST_MIRROR, ST_MIRROR_APPLIANCE, ST_MIRROR_UUID, ST_MIRROR_ACKED_SEQ,
                  ST_MIRROR_NEXT_SEQ, ST_MIRROR_PENDING, ST_MIRROR_LAG_MS, ST_MIRROR_ACK_P99_MS,
                  ST_MIRROR_SPILL_BYTES, ST_MIRROR_RING_BYTES, ST_MIRROR_OVERFLOWS,
                  ST_MIRROR_GAPS, ST_MIRROR_ERROR, ST_MIRROR_SYNC, ST_MIRROR_SYNC_DONE,
                  ST_MIRROR_SYNC_TOTAL)
#: The counters that add up over the VBD's life (since attach, across
#: reconnections and daemon restarts); the rest are the current sample.
ST_CUMULATIVE = (ST_REQUESTS, ST_BYTES, ST_ERRORS, ST_READS, ST_WRITES, ST_FLUSHES,
                 ST_BARRIERS, ST_DISCARDS, ST_INDIRECT, ST_BYTES_READ, ST_BYTES_WRITTEN)

# --- permissions (libxl's) ----------------------------------------------------


def backend_perms(domid: int) -> list[str]:
    """Backend node: owned by dom0, readable by the guest."""
    return [f"n{BACKEND_DOMID}", f"r{domid}"]


def frontend_perms(domid: int) -> list[str]:
    """Frontend node: owned by the guest, readable by dom0."""
    return [f"n{domid}", f"r{BACKEND_DOMID}"]


#: xentap's own subtree (the root, ``daemon``, ``vbd``, ``appliance``): dom0 only.
XENTAP_PERMS = [f"n{BACKEND_DOMID}"]


def appliance_perms(domid: int) -> list[str]:
    """An appliance's node: owned by dom0, readable by the appliance."""
    return [f"n{BACKEND_DOMID}", f"r{domid}"]


def appliance_status_perms(domid: int) -> list[str]:
    """An appliance's ``status``: owned by dom0, writable by the appliance."""
    return [f"n{BACKEND_DOMID}", f"b{domid}"]

# --- virtual device names (Linux / libxl numbering) ---------------------------

XVD_MAJOR = 202
_XVD_RE = re.compile(r"^xvd([a-z]+)$")
#: Largest devid a plain number may name (libxl's extended scheme uses bit 28).
MAX_DEVID = (1 << 30) - 1


def vdev_to_devid(vdev: str) -> int:
    """The devid of a virtual device name, as libxl numbers them.

    ``xvda``..``xvdp`` -> ``202 << 8 | index << 4``; ``xvdq`` and later use the
    extended scheme ``1 << 28 | index << 8``; a plain decimal number is taken
    as the devid itself.  Raises ValueError for anything else (partitions are
    not disks).
    """
    if vdev.isdigit():
        devid = int(vdev)
        if not 0 < devid <= MAX_DEVID:
            raise ValueError(f"virtual device number {vdev} out of range")
        return devid
    m = _XVD_RE.match(vdev)
    if not m:
        raise ValueError(f"unknown virtual device {vdev!r} (want xvdX or a number)")
    index = 0
    for ch in m.group(1):               # bijective base 26: a=0, z=25, aa=26
        index = index * 26 + (ord(ch) - ord("a") + 1)
    index -= 1
    if index < 16:
        return (XVD_MAJOR << 8) | (index << 4)
    if index >= 1 << 20:
        raise ValueError(f"virtual device {vdev!r} out of range")
    return (1 << 28) | (index << 8)


def devid_to_vdev(devid: int) -> str:
    """The xvd name of a devid made by :func:`vdev_to_devid` (else the number)."""
    if devid >> 8 == XVD_MAJOR and devid & 0xF == 0:
        index = (devid >> 4) & 0xF
    elif devid & (1 << 28) and devid & 0xFF == 0:
        index = (devid >> 8) & 0xFFFFF
    else:
        return str(devid)
    name, n = "", index + 1
    while n:
        n, r = divmod(n - 1, 26)
        name = chr(ord("a") + r) + name
    return "xvd" + name
