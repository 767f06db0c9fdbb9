"""`xentap create CFG`: boot a guest from an xl config with xentap disks.

The config is a normal xl config (xl.cfg(5)) plus ``xentap_disks = [...]``
(see xentap.xl_config).  The steps, as libxl does them for its own disks::

    parse + validate (every problem, one line each)   nothing done yet
    write CFG without xentap_disks to a temp file
    xl create -p TMP                                  the domain exists, paused
    xentap attach each disk (xentap.cli_vbd.attach_vbd)
    wait until the daemon advertised each (InitWait)  the image opened in dom0
    xl unpause

If a step after ``xl create -p`` fails, the disks attached so far are
detached, the paused domain is destroyed, and the error is one line.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from xentap import xs_keys as K
from xentap.protect import load_protect_key
from xentap.cli_vbd import VbdCliError, attach_vbd, check_target, detach_vbd, protect_keys
from xentap.xenbus import Xs, XenstoreError
from xentap.xl_config import XENTAP_DISKS_KEY, ConfigError, XentapDisk, \
    parse_with_overrides, without_keys, xentap_disks
from xentap.xs_keys import XenbusState

#: How long `create` waits for the daemon to open each image.
ADVERTISE_TIMEOUT = 30.0


class CreateError(VbdCliError):
    """`xentap create` failed; the message is one line."""


@dataclass
class Plan:
    """A validated config: the domain's name, its xentap disks (targets
    made absolute) and the text xl gets."""

    name: str
    disks: list[XentapDisk]
    xl_text: str


def load(cfg_path: str, overrides: tuple[str, ...] = ()) -> Plan:
    """Reads and validates ``cfg_path`` with ``KEY=VALUE`` overrides (as
    xl takes them).  Raises ConfigError (one line per problem) or
    CreateError (unreadable file)."""
    try:
        with open(cfg_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CreateError(f"config {cfg_path} does not exist") from None
    except UnicodeDecodeError:
        raise CreateError(f"config {cfg_path} is not UTF-8 text") from None
    except OSError as e:
        raise CreateError(f"cannot read config {cfg_path}: {e.strerror}") from None
    where = os.path.basename(cfg_path)
    cfg = parse_with_overrides(text, overrides, where)
    disks = xentap_disks(cfg)
    problems, checked = [], []
    line = cfg.line_of(XENTAP_DISKS_KEY)
    for n, disk in enumerate(disks, 1):
        try:
            path = check_target(disk.target, disk.mode)
        except VbdCliError as e:
            problems.append(f"{cfg.at(line)}: {XENTAP_DISKS_KEY} entry {n}: "
                            f"{e.format_message()}")
            continue
        key = disk.protect_key
        if key is not None:
            key = os.path.join(os.path.dirname(os.path.abspath(cfg_path)), key)
            try:
                load_protect_key(key)
            except (OSError, ValueError) as e:
                problems.append(f"{cfg.at(line)}: {XENTAP_DISKS_KEY} entry {n}: protect-key: "
                                f"{getattr(e, 'strerror', None) or e}")
                continue
        checked.append(XentapDisk(target=path, vdev=disk.vdev, devid=disk.devid,
                                  mode=disk.mode, protect=disk.protect, protect_key=key))
    if problems:
        raise ConfigError(problems)
    return Plan(name=str(cfg.get("name")), disks=checked,
                xl_text=without_keys(cfg, {XENTAP_DISKS_KEY}))


def _xl(xl: str, *args: str, timeout: float = 300.0) -> str:
    """Runs ``xl ARGS``; returns stdout, raises CreateError with xl's last
    error line."""
    try:
        r = subprocess.run([xl, *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CreateError(f"{xl} not found (is xen-utils installed?)") from None
    except subprocess.TimeoutExpired:
        raise CreateError(f"xl {args[0]} did not finish within {timeout:g} s") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {r.returncode}"
        raise CreateError(f"xl {args[0]} failed: {why}")
    return r.stdout


def _daemon_running(xs: Xs) -> bool:
    if xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_STATE}") != "running":
        return False
    pid = xs.read(f"{K.DAEMON_PATH}/{K.DAEMON_PID}") or ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _wait_advertised(xs: Xs, domid: int, disk: XentapDisk, timeout: float) -> None:
    """Waits for the daemon to open the image and reach InitWait."""
    be = K.backend_path(domid, disk.devid)
    deadline = time.monotonic() + timeout
    while True:
        state = XenbusState.parse(xs.read(f"{be}/{K.STATE}"))
        if state == XenbusState.INIT_WAIT:
            return
        error = xs.read(f"{be}/{K.BE_ERROR}")
        if error or state in (XenbusState.CLOSING, XenbusState.CLOSED):
            raise CreateError(f"the daemon refused {disk.vdev} ({disk.target}): "
                              f"{error or state.label}")
        if time.monotonic() >= deadline:
            raise CreateError(f"the daemon did not open {disk.vdev} ({disk.target}) within "
                              f"{timeout:g} s (state {state.label}); is `xentap daemon` running?")
        time.sleep(0.05)


def create(cfg_path: str, overrides: tuple[str, ...] = (), *, xl: str = "xl",
           xenstore_socket: str | None = None, dry_run: bool = False,
           wait: float = ADVERTISE_TIMEOUT, echo: Callable[[str], None] = print) -> int | None:
    """Creates the guest of ``cfg_path`` (with ``KEY=VALUE`` overrides) with
    its xentap disks; returns its domid (None with ``dry_run``, which only
    validates).  Raises ConfigError
    or CreateError; on failure after ``xl create -p`` the domain is gone."""
    plan = load(cfg_path, overrides)
    if dry_run:
        echo(f"{cfg_path}: ok: domain {plan.name!r}, xentap disks "
             + ", ".join(f"{d.vdev}={d.target} ({'ro' if d.mode == 'r' else 'rw'}"
                         + (f", protected by {d.protect}" if d.protect else "") + ")"
                         for d in plan.disks))
        return None
    with Xs.open(xenstore_socket) as xs:
        if not _daemon_running(xs):
            raise CreateError("the xentap daemon is not running (start `xentap daemon`)")
        protects = [protect_keys(xs, d.protect, d.protect_key) for d in plan.disks]
        with tempfile.TemporaryDirectory(prefix="xentap-create-") as tmp:
            tmp_cfg = os.path.join(tmp, os.path.basename(cfg_path))
            with open(tmp_cfg, "w", encoding="utf-8") as f:
                f.write(plan.xl_text)
            _xl(xl, "create", "-p", tmp_cfg)
        domid = None
        attached: list[XentapDisk] = []
        try:
            out = _xl(xl, "domid", plan.name, timeout=60).strip()
            if not out.isdigit() or int(out) == K.BACKEND_DOMID:
                raise CreateError(f"xl domid {plan.name} printed {out!r}")
            domid = int(out)
            for disk, extra in zip(plan.disks, protects):
                attach_vbd(xs, domid, disk.target, disk.vdev, disk.mode, extra)
                attached.append(disk)
            for disk in plan.disks:
                _wait_advertised(xs, domid, disk, wait)
            _xl(xl, "unpause", str(domid), timeout=60)
        except BaseException as e:
            _undo(xs, xl, plan.name, domid, attached)
            if isinstance(e, XenstoreError):
                raise CreateError(f"{e.strerror}; domain {plan.name} destroyed") from None
            if isinstance(e, VbdCliError):
                raise CreateError(f"{e.format_message()}; domain {plan.name} destroyed") \
                    from None
            raise
    echo(f"created domain {plan.name} (id {domid}) with xentap disks "
         + ", ".join(d.vdev for d in plan.disks))
    return domid


def _undo(xs: Xs, xl: str, name: str, domid: int | None, attached: list[XentapDisk]) -> None:
    """Best effort: detach what was attached, destroy the paused domain."""
    for disk in attached:
        try:
            detach_vbd(xs, domid, disk.devid, timeout=2.0, force=True)
        except (XenstoreError, VbdCliError):
            pass
    try:
        _xl(xl, "destroy", str(domid) if domid is not None else name, timeout=60)
    except CreateError:
        pass
