"""An appliance domain's xenstore node, from dom0: granting it (the one
subtree it may write), revoking it, and reading what it published there,
checked value by value (xs_keys has the paths).  Light on purpose: `xentap
appliance status` and the CLI's VBD commands import it, not the daemon.
The checks of an endpoint and of a CurveZMQ public key live here too, for
every caller."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from xentap import xs_keys as K

if TYPE_CHECKING:
    from xentap.xenbus import Xs

ENDPOINT_RE = re.compile(r"^(tcp://[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}|ipc:///[!-~]{1,200})$")
Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def is_z85_key(value: str) -> bool:
    """A CurveZMQ public key as text: 40 characters of Z85."""
    return len(value) == 40 and all(c in Z85 for c in value)


# ASCII digits only: str.isdigit() takes "\xb2" (latin-1 for a byte an appliance
# may write), which int() refuses
_DIGITS = re.compile(r"[0-9]{1,20}")


def grant_appliance(xs: Xs, domid: int, name: str) -> None:
    """Makes ``domid`` an appliance domain: its node (``n0 r<domid>``) with
    its name, and its ``status`` directory, the one place it may write
    (``n0 b<domid>``).  One transaction; an existing node is reset."""
    for path in (K.XENTAP_ROOT, K.APPLIANCE_ROOT):
        if not xs.exists(path):
            xs.mkdir(path)
            xs.set_perms(path, K.XENTAP_PERMS)
    node, status = K.appliance_path(domid), K.appliance_status_path(domid)

    def tx(t: Xs) -> None:
        t.rm(node)
        t.mkdir(node)
        t.set_perms(node, K.appliance_perms(domid))
        t.write(f"{node}/{K.AP_NAME}", name)
        t.set_perms(f"{node}/{K.AP_NAME}", K.appliance_perms(domid))
        t.mkdir(status)
        t.set_perms(status, K.appliance_status_perms(domid))

    xs.transaction(tx)


def revoke_appliance(xs: Xs, domid: int) -> bool:
    """Removes appliance ``domid``'s node; returns whether there was one."""
    node = K.appliance_path(domid)
    if not xs.exists(node):
        return False
    xs.rm(node)
    return True


def read_appliance_status(xs: Xs, domid: int, vbds: bool = True) -> dict[str, Any]:
    """What appliance ``domid`` published, validated: each value that is
    absent or not what the key allows is None and named in ``problems``.
    Nothing it wrote is used otherwise.  Without ``vbds`` its per-VBD
    entries are not read (``vbds`` is empty): what a drainer needs, cheaply."""
    st = K.appliance_status_path(domid)
    problems: list[str] = []

    def get(key: str, ok) -> str | None:
        raw = xs.read(f"{st}/{key}")
        if raw is None:
            return None
        if len(raw) > 256 or not ok(raw):
            problems.append(f"bad {key}")
            return None
        return raw

    out: dict[str, Any] = {
        "domain": domid,
        "name": xs.read(f"{K.appliance_path(domid)}/{K.AP_NAME}") or "",
        "state": get(K.APS_STATE, lambda v: v in K.AP_STATES),
        "endpoint": get(K.APS_ENDPOINT, lambda v: bool(ENDPOINT_RE.match(v))),
        "public_key": get(K.APS_PUBLIC_KEY, is_z85_key),
        "heartbeat": get(K.APS_HEARTBEAT, lambda v: bool(_DIGITS.fullmatch(v)) and len(v) <= 12),
    }
    if out["heartbeat"] is not None:
        out["heartbeat"] = int(out["heartbeat"])
    entries = []
    vdir = f"{st}/{K.APS_VBD}"
    for d in (xs.ls(vdir) or [])[:256] if vbds else []:
        for v in (xs.ls(f"{vdir}/{d}") or [])[:256]:
            if not (_DIGITS.fullmatch(d) and _DIGITS.fullmatch(v) and len(d) <= 5
                    and len(v) <= 10):
                problems.append("bad vbd entry")
                continue
            base = f"{vdir}/{d}/{v}"
            w = {}
            for key in (K.APS_WINDOW_START, K.APS_WINDOW_END):
                raw = xs.read(f"{base}/{key}")
                w[key] = int(raw) if raw is not None and _DIGITS.fullmatch(raw) else None
                if raw is not None and w[key] is None:
                    problems.append(f"bad {key} of {d}/{v}")
            ds = xs.read(f"{base}/{K.APS_DATA_STATE}")
            if ds is not None and (len(ds) > 64 or not re.fullmatch(r"[a-z0-9-]+", ds)):
                problems.append(f"bad {K.APS_DATA_STATE} of {d}/{v}")
                ds = None
            entries.append({"domain": int(d), "devid": int(v),
                         "window_start": w[K.APS_WINDOW_START],
                         "window_end": w[K.APS_WINDOW_END], "data_state": ds})
    out["vbds"] = entries
    out["problems"] = problems
    return out
