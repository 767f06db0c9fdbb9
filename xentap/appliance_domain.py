"""`xentap appliance create|destroy|status`: the appliance as a Xen domain.

The appliance domain is a normal xl config (``xl_scripts/appliance.cfg``)
booted with ``xentap create`` (xentap.create): its journal disk is a
xentap VBD served by the dom0 daemon, not mirrored, so the journal outlives
the domain and nothing depends on a hotplug script inside it.  What differs
per host is given as options and becomes ``KEY=VALUE`` overrides of the
config, as ``xl create`` takes them::

    --image DIR        kernel = DIR/vmlinuz, ramdisk = DIR/appliance.cpio.gz, and
                       DIR/root.img (when the image has one: the root disk,
                       read-only, a xentap VBD xvdb beside the journal)
    --ip ADDR/PREFIX   extra: xentap.ip=...   (the image's init reads xentap.*)
    --keys DIR         extra: xentap.allow=<DIR/dom0.key>  (or --insecure)
    --bridge NAME      vif: the same MAC, bridge=NAME
    --journal PATH     xentap_disks: vdev=xvda, target=PATH (made sparse if missing)

Once the domain runs, dom0 grants it its status directory in xenstore
(xentap.daemon.grant_appliance), where the image's announcer publishes its
endpoint, public key and state.  Every error is one line
(:class:`ApplianceDomainError`).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from xentap.appliance_node import is_z85_key

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CFG = REPO / "xl_scripts" / "appliance.cfg"
DEFAULT_IMAGE = REPO / "out" / "appliance"
KERNEL_FILE = "vmlinuz"
RAMDISK_FILE = "appliance.cpio.gz"
ROOT_FILE = "root.img"
DEFAULT_PORT = 7788
DEFAULT_JOURNAL_SIZE = 4 << 30
MIN_JOURNAL_SIZE = 64 << 20
JOURNAL_VDEV = "xvda"
ROOT_VDEV = "xvdb"
#: The kernel command-line words the image's init reads (appliance_domu/image/init).
EXTRA_KEYS = ("xentap.ip", "xentap.gw", "xentap.port", "xentap.allow", "xentap.insecure")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


class ApplianceDomainError(click.ClickException):
    """A user-facing error: ``xentap: <message>`` on stderr, exit status 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"xentap: {self.format_message()}", err=True)


@dataclass(frozen=True)
class Settings:
    """What ``create`` puts into the config, validated (:func:`settings`)."""

    ip: ipaddress.IPv4Interface | None = None
    gateway: ipaddress.IPv4Address | None = None
    port: int = DEFAULT_PORT
    allow_key: str | None = None          # dom0's Z85 public key
    insecure: bool = False
    bridge: str | None = None
    journal: str | None = None
    image: str | None = None

    @property
    def endpoint(self) -> str | None:
        return f"tcp://{self.ip.ip}:{self.port}" if self.ip else None


def settings(*, ip: str | None = None, gateway: str | None = None, port: int = DEFAULT_PORT,
             keys_dir: str | None = None, insecure: bool = False, bridge: str | None = None,
             journal: str | None = None, image: str | None = None) -> Settings:
    """Validates the options of ``create``; raises ApplianceDomainError
    naming the first bad one."""
    ipi = gw = None
    if ip is not None:
        if "/" not in ip:
            raise ApplianceDomainError(f"--ip {ip!r}: give ADDR/PREFIX, e.g. 10.0.0.2/24")
        try:
            ipi = ipaddress.IPv4Interface(ip)
        except ValueError:
            raise ApplianceDomainError(f"--ip {ip!r} is not an IPv4 ADDR/PREFIX") from None
        if ipi.network.prefixlen >= 31 or ipi.ip in (ipi.network.network_address,
                                                     ipi.network.broadcast_address):
            raise ApplianceDomainError(f"--ip {ip}: not a host address of its network")
    if gateway is not None:
        try:
            gw = ipaddress.IPv4Address(gateway)
        except ValueError:
            raise ApplianceDomainError(f"--gateway {gateway!r} is not an IPv4 address") from None
    if not 1 <= port <= 65535:
        raise ApplianceDomainError(f"--port {port}: not a TCP port")
    if insecure and keys_dir:
        raise ApplianceDomainError("--insecure and --keys exclude each other")
    key = None
    if keys_dir:
        key = dom0_public_key(keys_dir)
    if bridge is not None and not _BRIDGE_RE.match(bridge):
        raise ApplianceDomainError(f"--bridge {bridge!r} is not an interface name")
    if image is not None:
        for f in (KERNEL_FILE, RAMDISK_FILE):
            if not os.path.isfile(os.path.join(image, f)):
                raise ApplianceDomainError(
                    f"--image {image}: no {f} (build it with 'make appliance-image')")
        image = os.path.abspath(image)
    if journal is not None:
        journal = os.path.abspath(journal)
    return Settings(ip=ipi, gateway=gw, port=port, allow_key=key, insecure=insecure,
                    bridge=bridge, journal=journal, image=image)


def dom0_public_key(keys_dir: str) -> str:
    """dom0's public key (``DIR/dom0.key``, made by ``xentap keys --role dom0``)."""
    from xentap import keys
    path = keys.paths(keys_dir, "dom0")[0]
    try:
        key = keys.load_public(path).decode()
    except (OSError, ValueError) as e:
        raise ApplianceDomainError(str(e).splitlines()[0]) from None
    if not is_z85_key(key):   # keys.load_public checked it; the cmdline needs it too
        raise ApplianceDomainError(f"{path}: key has characters a kernel command line cannot hold")
    return key


def merge_extra(extra: str, s: Settings) -> str:
    """The config's ``extra`` with the xentap.* words that ``s`` sets replaced."""
    words = [w for w in extra.split() if w.split("=", 1)[0] not in _set_keys(s)]
    return " ".join(words + _extra_words(s))


def _extra_words(s: Settings) -> list[str]:
    w = []
    if s.ip:
        w.append(f"xentap.ip={s.ip.with_prefixlen}")
    if s.gateway:
        w.append(f"xentap.gw={s.gateway}")
    if s.port != DEFAULT_PORT:
        w.append(f"xentap.port={s.port}")
    if s.allow_key:
        w.append(f"xentap.allow={s.allow_key}")
    if s.insecure:
        w.append("xentap.insecure=1")
    return w


def _set_keys(s: Settings) -> set[str]:
    keys = {w.split("=", 1)[0] for w in _extra_words(s)}
    if s.allow_key or s.insecure:        # one excludes the other
        keys |= {"xentap.allow", "xentap.insecure"}
    return keys


def _quote(v: str) -> str:
    """An xl string literal."""
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides(cfg_text: str, s: Settings, where: str = "appliance.cfg") -> tuple[str, ...]:
    """``KEY=VALUE`` overrides of the config (as ``xl create`` takes them)
    that apply ``s``.  Raises ApplianceDomainError when the config lacks
    what they would edit or is not a valid xl config."""
    from xentap.xl_config import ConfigError, parse

    try:
        cfg = parse(cfg_text, where)
    except ConfigError as e:
        raise ApplianceDomainError(e.problems[0]) from None
    out: list[str] = []
    if s.image:
        out.append(f"kernel={_quote(os.path.join(s.image, KERNEL_FILE))}")
        out.append(f"ramdisk={_quote(os.path.join(s.image, RAMDISK_FILE))}")
    extra = cfg.get("extra")
    if not isinstance(extra, (str, type(None))):
        raise ApplianceDomainError(f"{where}: extra must be a string")
    if _extra_words(s):
        out.append(f"extra={_quote(merge_extra(extra or '', s))}")
    if s.bridge:
        vifs = cfg.get("vif") or []
        if not isinstance(vifs, list) or not vifs:
            raise ApplianceDomainError(f"{where}: no vif to put on bridge {s.bridge}")
        new = []
        for spec in vifs:
            parts = [p.strip() for p in str(spec).split(",") if p.strip()]
            parts = [p for p in parts if not p.startswith("bridge=")] + [f"bridge={s.bridge}"]
            new.append(_quote(", ".join(parts)))
        out.append(f"vif=[ {', '.join(new)} ]")
    root = os.path.join(s.image, ROOT_FILE) if s.image else None
    if root and not os.path.isfile(root):
        root = None
    if s.journal or root:
        journal = s.journal
        if journal is None:          # the config's own journal disk, kept
            from xentap.xl_config import ConfigError, xentap_disks
            try:
                disks = xentap_disks(cfg)
            except ConfigError as e:
                raise ApplianceDomainError(e.problems[0]) from None
            j = [d for d in disks if d.vdev == JOURNAL_VDEV]
            journal = j[0].target if j else None
        specs = []
        for path, what in ((journal, "--journal"), (root, "--image")):
            if path and "," in path:
                raise ApplianceDomainError(f"{what} {path}: a path with a comma")
        if journal:
            specs.append(f"vdev={JOURNAL_VDEV}, access=rw, target={journal}")
        if root:
            specs.append(f"vdev={ROOT_VDEV}, access=ro, target={root}")
        out.append(f"xentap_disks=[ {', '.join(_quote(x) for x in specs)} ]")
    return tuple(out)


def cfg_view(cfg_text: str, ovr: tuple[str, ...], where: str) -> dict[str, Any]:
    """What the config says once overridden: name, extra words, bridges, journal."""
    from xentap.xl_config import ConfigError, parse_with_overrides, xentap_disks

    try:
        cfg = parse_with_overrides(cfg_text, ovr, where)
        disks = xentap_disks(cfg)
    except ConfigError as e:
        raise ApplianceDomainError(e.problems[0]) from None
    extra = str(cfg.get("extra") or "")
    words = dict(w.split("=", 1) for w in extra.split() if w.startswith("xentap.") and "=" in w)
    bridges = []
    for spec in cfg.get("vif") or []:
        for p in str(spec).split(","):
            p = p.strip()
            if p.startswith("bridge="):
                bridges.append(p[len("bridge="):])
    journal = [d for d in disks if d.vdev == JOURNAL_VDEV]
    root = [d for d in disks if d.vdev == ROOT_VDEV]
    return {"name": str(cfg.get("name") or ""), "words": words, "bridges": bridges,
            "journal": journal[0].target if journal else None,
            "root": root[0].target if root else None,
            "kernel": cfg.get("kernel"), "ramdisk": cfg.get("ramdisk")}


def check_view(view: dict[str, Any], sysfs_net: str = "/sys/class/net") -> None:
    """What must hold before ``xl create``: a name, an address and a key (or
    insecure) for the init, the bridges, the kernel and ramdisk files."""
    if not view["name"]:
        raise ApplianceDomainError("the config names no domain")
    w = view["words"]
    if "xentap.ip" not in w:
        raise ApplianceDomainError("no address for the appliance: pass --ip ADDR/PREFIX")
    if "xentap.allow" not in w and w.get("xentap.insecure") != "1":
        raise ApplianceDomainError(
            "no dom0 key for the appliance: pass --keys DIR (holding dom0.key, from "
            "'xentap keys --role dom0') or --insecure")
    for b in view["bridges"]:
        if not os.path.isdir(os.path.join(sysfs_net, b, "bridge")):
            raise ApplianceDomainError(
                f"bridge {b} does not exist (e.g. 'ip link add {b} type bridge; "
                f"ip addr add 10.0.0.1/24 dev {b}; ip link set {b} up')")
    for k in ("kernel", "ramdisk"):
        f = view[k]
        if not isinstance(f, str) or not os.path.isfile(f):
            raise ApplianceDomainError(f"{k} {f} does not exist (pass --image DIR, "
                                       "built by 'make appliance-image')")
    if not view["journal"]:
        raise ApplianceDomainError(f"the config has no xentap disk {JOURNAL_VDEV} (the journal)")


def parse_size(text: str) -> int:
    """'4G', '512M', '1073741824' -> bytes; ApplianceDomainError otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError, OverflowError):
        n = -1
    if n <= 0:
        raise ApplianceDomainError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return n


def ensure_journal(path: str, size: int) -> bool:
    """Makes the journal image (sparse, ``size`` bytes) unless it exists;
    returns whether it made it.  An existing one must be a regular file or a
    block device of at least MIN_JOURNAL_SIZE."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if size < MIN_JOURNAL_SIZE:
            raise ApplianceDomainError(f"--journal-size: at least {MIN_JOURNAL_SIZE >> 20} MiB")
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise ApplianceDomainError(f"journal {path}: directory {parent} does not exist")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return True
    if stat.S_ISREG(st.st_mode):
        n = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as f:
            n = f.seek(0, os.SEEK_END)
    else:
        raise ApplianceDomainError(f"journal {path} is neither a file nor a block device")
    if n < MIN_JOURNAL_SIZE:
        raise ApplianceDomainError(f"journal {path} is {n >> 20} MiB; at least "
                                   f"{MIN_JOURNAL_SIZE >> 20} MiB needed")
    return False


# --- talking to Xen --------------------------------------------------------------------

def find_domain(xs, name: str) -> int | None:
    """The id of the running domain called ``name``, or None."""
    for d in xs.ls("/local/domain") or []:
        if d.isdigit() and int(d) != 0 and xs.read(f"/local/domain/{d}/name") == name:
            return int(d)
    return None


def appliance_status(xs, domid: int) -> dict[str, Any]:
    """What appliance ``domid`` published, validated (xentap.daemon)."""
    from xentap.appliance_node import read_appliance_status
    return read_appliance_status(xs, domid)


def _xl(xl: str, *args: str, timeout: float = 120.0):
    import subprocess   # (here: `status` needs none of it, seconds emulated)
    try:
        return subprocess.run([xl, *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ApplianceDomainError(f"{xl} not found (is xen-utils installed?)") from None
    except subprocess.TimeoutExpired:
        raise ApplianceDomainError(f"xl {args[0]} did not finish within {timeout:g} s") from None


#: the start-up to report in create's timing line instead of the process's
#: age, set by a caller whose interpreter started well before the command ran
#: (tests/xen/xentap-after.py: its imports, without the wait for its go)
startup_override: float | None = None


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None: what the
    interpreter's start-up and imports took, for the timing line of create."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def create(cfg_path: str, s: Settings, extra_overrides: tuple[str, ...] = (), *,
           journal_size: int = DEFAULT_JOURNAL_SIZE, xl: str = "xl",
           xenstore_socket: str | None = None, wait_ready: float = 0.0, dry_run: bool = False,
           sysfs_net: str = "/sys/class/net", as_json: bool = False,
           open_wait: float | None = None, echo: Callable[[str], None] = print) -> int | None:
    """Starts the appliance domain; returns its domid (None with ``dry_run``).
    With ``wait_ready`` and ``as_json`` the last line is what ``status
    --json`` prints (read when it became ready): no second process for it.
    ``open_wait``: seconds ``xentap create`` waits for the daemon to open each
    disk (its default when None)."""
    age = process_age() if startup_override is None else startup_override
    t0 = time.monotonic()
    steps: list[str] = [] if age is None else [f"start-up {age:.1f}"]

    def step(what: str, since: float) -> float:
        now = time.monotonic()
        steps.append(f"{what} {now - since:.1f}")
        return now

    from xentap import create as create_mod
    from xentap.xenbus import Xs
    from xentap.xl_config import ConfigError

    try:
        text = Path(cfg_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApplianceDomainError(f"config {cfg_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ApplianceDomainError(f"cannot read config {cfg_path}: {e}") from None
    where = os.path.basename(cfg_path)
    ovr = overrides(text, s, where) + tuple(extra_overrides)
    view = cfg_view(text, ovr, where)
    check_view(view, sysfs_net)
    if dry_run:
        import shlex
        echo(f"{cfg_path}: ok: appliance {view['name']!r} at "
             f"{view['words']['xentap.ip']}, journal {view['journal']}, bridges "
             f"{', '.join(view['bridges']) or '-'}; xl overrides: {shlex.join(ovr)}")
        return None
    with Xs.open(xenstore_socket) as xs:
        if find_domain(xs, view["name"]) is not None:
            raise ApplianceDomainError(f"domain {view['name']} is already running")
        for domid, devid in clear_stale_vbds(xs, [view["journal"], view["root"]]):
            echo(f"removed VBD {devid} of domain {domid}, which is gone "
                 f"(an appliance destroyed with xl destroy)")
    if ensure_journal(view["journal"], journal_size):
        echo(f"made the journal disk {view['journal']} ({journal_size >> 20} MiB, sparse)")
    t = step("checks", t0)
    try:
        kw = {} if open_wait is None else {"wait": open_wait}
        domid = create_mod.create(cfg_path, ovr, xl=xl, xenstore_socket=xenstore_socket,
                                  echo=echo, **kw)
    except ConfigError as e:
        raise ApplianceDomainError(e.problems[0]) from None
    except click.ClickException as e:
        raise ApplianceDomainError(e.format_message()) from None
    t = step("xentap create (xl create -p, disks, unpause)", t)
    with Xs.open(xenstore_socket) as xs:
        try:
            from xentap.appliance_node import grant_appliance
        except ImportError:   # pragma: no cover - the daemon without appliance support
            echo("warning: this xentap cannot grant the appliance its xenstore directory")
        else:
            grant_appliance(xs, domid, view["name"])
        t = step("grant", t)
        echo(f"appliance {view['name']} is domain {domid}; it announces itself in xenstore")
        if wait_ready > 0:
            st = wait_for_ready(xs, domid, wait_ready)
            step("unpaused to ready", t)
            echo(f"appliance ready: {st['endpoint']} (public key {st['public_key'] or 'none'})")
    echo(f"timing (s): {', '.join(steps)}")
    if wait_ready > 0 and as_json:
        st.update(name=view["name"], domain=domid, running=True)
        echo(json.dumps(st, sort_keys=True))
    return domid


def clear_stale_vbds(xs, targets) -> list[tuple[int, int]]:
    """Detaches the xentap VBDs that serve one of ``targets`` (the journal,
    the root disk) to a domain that is gone (an appliance ended by ``xl
    destroy`` or a crash leaves its VBDs behind, Closed) and drops the
    appliance nodes of such domains, so that ``create`` after ``xl destroy``
    starts the appliance again without a by-hand ``xentap detach``.  A VBD
    of a running domain is left alone (``xentap create`` then refuses the
    image, which is in use).  Returns the (domid, devid) pairs removed."""
    wanted = {os.path.abspath(t) for t in targets if t}
    from xentap import xs_keys as K
    from xentap.cli_vbd import detach_vbd

    removed = []
    for d in xs.ls(K.BACKEND_ROOT) or []:
        if not d.isdigit() or xs.exists(f"/local/domain/{d}"):
            continue
        for v in xs.ls(f"{K.BACKEND_ROOT}/{d}") or []:
            if not v.isdigit():
                continue
            params = xs.read(f"{K.backend_path(int(d), int(v))}/{K.BE_PARAMS}")
            if params is not None and os.path.abspath(params) in wanted:
                detach_vbd(xs, int(d), int(v), timeout=5.0, force=True)
                removed.append((int(d), int(v)))
        if removed and removed[-1][0] == int(d):
            try:
                from xentap.appliance_node import revoke_appliance
                revoke_appliance(xs, int(d))
            except ImportError:   # pragma: no cover
                pass
    return removed


def wait_for_ready(xs, domid: int, timeout: float, poll: float = 0.5) -> dict[str, Any]:
    """Waits until appliance ``domid`` says ``ready`` with a valid endpoint."""
    deadline = time.monotonic() + timeout
    while True:
        if not xs.exists(f"/local/domain/{domid}"):
            raise ApplianceDomainError(f"appliance domain {domid} went away while starting")
        st = appliance_status(xs, domid)
        if st.get("state") == "ready" and st.get("endpoint"):
            return st
        if time.monotonic() >= deadline:
            raise ApplianceDomainError(
                f"appliance domain {domid} not ready within {timeout:g} s "
                f"(state {st.get('state') or 'none'}; see its console)")
        time.sleep(poll)


def destroy(name: str, *, force: bool = False, timeout: float = 60.0, xl: str = "xl",
            xenstore_socket: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Stops appliance ``name``: ``xl shutdown`` (its init stops serving, syncs
    and unmounts the journal) unless ``force`` or it overruns ``timeout``,
    then ``xl destroy``; then the journal VBD is detached and the
    appliance's xenstore node removed.  Returns the domid it had."""
    from xentap.cli_vbd import detach_vbd
    from xentap.xenbus import Xs

    with Xs.open(xenstore_socket) as xs:
        domid = find_domain(xs, name)
        if domid is None:
            raise ApplianceDomainError(f"no running domain {name}")
        how = "destroyed"
        if not force:
            _xl(xl, "shutdown", str(domid), timeout=30)
            deadline = time.monotonic() + timeout
            while xs.exists(f"/local/domain/{domid}") and time.monotonic() < deadline:
                time.sleep(0.5)
            how = "shut down"
        if xs.exists(f"/local/domain/{domid}"):
            r = _xl(xl, "destroy", str(domid))
            if r.returncode != 0 and xs.exists(f"/local/domain/{domid}"):
                why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
                raise ApplianceDomainError(f"xl destroy {domid} failed: {why}")
            how = "destroyed" if force else "destroyed (it did not shut down in time)"
        be_root = f"/local/domain/0/backend/xentap/{domid}"
        for devid in xs.ls(be_root) or []:
            if devid.isdigit():
                detach_vbd(xs, domid, int(devid), timeout=5.0, force=True)
        if xs.exists(be_root):
            xs.rm(be_root)
        try:
            from xentap.appliance_node import revoke_appliance
            revoke_appliance(xs, domid)
        except ImportError:   # pragma: no cover
            pass
    echo(f"appliance {name} (domain {domid}) {how}; its journal disk is kept")
    return domid


def status(name: str, *, xenstore_socket: str | None = None) -> dict[str, Any]:
    """The appliance domain ``name`` as xenstore shows it (validated)."""
    from xentap.xenbus import Xs

    with Xs.open(xenstore_socket) as xs:
        domid = find_domain(xs, name)
        if domid is None:
            return {"name": name, "domain": None, "running": False}
        st = appliance_status(xs, domid)
        st.update(name=name, domain=domid, running=True)
        return st


# --- click ---------------------------------------------------------------------------

_xs_option = click.option("--xenstore-socket", metavar="PATH", default=None,
                          help="xenstored's Unix socket (default: $XENSTORED_PATH or the standard one).")
_name_option = click.option("--name", default="xentap-appliance", show_default=True,
                            help="The appliance domain's name.")


def _one_line(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except click.ClickException:
            raise
        except OSError as e:   # XenstoreError included
            from xentap.cli_journal import one_line
            raise ApplianceDomainError(one_line(e)) from None
        except ValueError as e:
            raise ApplianceDomainError(str(e).splitlines()[0] if str(e) else "bad value") from None
    return wrapper


@click.command("create")
@click.argument("overrides_", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "cfg", default=str(DEFAULT_CFG), show_default=True,
              metavar="CFG", help="The appliance's xl config.")
@click.option("--image", default=None, metavar="DIR",
              help=f"Where vmlinuz and appliance.cpio.gz are [default: {DEFAULT_IMAGE} if built].")
@click.option("--ip", default=None, metavar="ADDR/PREFIX", help="The appliance's address.")
@click.option("--gateway", default=None, metavar="ADDR", help="Its default route.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Its ZeroMQ port.")
@click.option("--keys", "keys_dir", default=None, metavar="DIR",
              help="dom0's key directory: DIR/dom0.key is the one key the appliance accepts.")
@click.option("--insecure", is_flag=True, help="No CurveZMQ (experiments only).")
@click.option("--bridge", default=None, metavar="NAME", help="Put the vif on this bridge.")
@click.option("--journal", default=None, metavar="PATH", help="The journal disk (file or block device).")
@click.option("--journal-size", default="4G", show_default=True, metavar="SIZE",
              help="Size of a journal image made because it is missing.")
@click.option("--wait", "wait_ready", default=0.0, type=float, metavar="SECONDS",
              help="Wait until the appliance says it is ready.")
@click.option("--json", "as_json", is_flag=True,
              help="With --wait: end with the line 'status --json' prints, once ready.")
@click.option("--open-wait", default=30.0, show_default=True, type=float, metavar="SECONDS",
              help="Seconds to wait for the daemon to open each disk (xentap create --wait).")
@click.option("-n", "--dry-run", is_flag=True, help="Only check and show what would run.")
@click.option("--xl", "xl_cmd", default="xl", show_default=True, metavar="PATH")
@_xs_option
@_one_line
def create_cmd(overrides_, cfg, image, ip, gateway, port, keys_dir, insecure, bridge, journal,
               journal_size, wait_ready, as_json, open_wait, dry_run, xl_cmd,
               xenstore_socket) -> None:
    """Start the appliance domain: its vif, and its journal disk as a xentap VBD."""
    if image is None and (DEFAULT_IMAGE / RAMDISK_FILE).is_file():
        image = str(DEFAULT_IMAGE)
    s = settings(ip=ip, gateway=gateway, port=port, keys_dir=keys_dir, insecure=insecure,
                 bridge=bridge, journal=journal, image=image)
    if as_json and not wait_ready > 0 and not dry_run:
        raise ApplianceDomainError("--json needs --wait SECONDS (the status once ready)")
    create(cfg, s, tuple(overrides_), journal_size=parse_size(journal_size), xl=xl_cmd,
           xenstore_socket=xenstore_socket, wait_ready=wait_ready, dry_run=dry_run,
           as_json=as_json, open_wait=open_wait, echo=click.echo)


@click.command("destroy")
@_name_option
@click.option("--force", is_flag=True, help="xl destroy at once (no clean shutdown).")
@click.option("--timeout", default=60.0, show_default=True, type=float,
              help="Seconds to wait for a clean shutdown before xl destroy.")
@click.option("--xl", "xl_cmd", default="xl", show_default=True, metavar="PATH")
@_xs_option
@_one_line
def destroy_cmd(name, force, timeout, xl_cmd, xenstore_socket) -> None:
    """Stop the appliance domain; its journal disk stays for the next create."""
    destroy(name, force=force, timeout=timeout, xl=xl_cmd, xenstore_socket=xenstore_socket,
            echo=click.echo)


@click.command("status")
@_name_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@_xs_option
@_one_line
def status_cmd(name, as_json, xenstore_socket) -> None:
    """The appliance domain as xenstore shows it (exit 1 when not running)."""
    st = status(name, xenstore_socket=xenstore_socket)
    if as_json:
        click.echo(json.dumps(st, sort_keys=True))
    elif not st["running"]:
        click.echo(f"appliance {name}: not running")
    else:
        click.echo(f"appliance {name}: domain {st['domain']}, state {st.get('state') or '-'}, "
                   f"endpoint {st.get('endpoint') or '-'}, key {st.get('public_key') or '-'}")
        for p in st.get("problems") or []:
            click.echo(f"  untrusted value refused: {p}")
    if not st["running"]:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    """Adds create/destroy/status to the ``xentap appliance`` group."""
    group.add_command(create_cmd)
    group.add_command(destroy_cmd)
    group.add_command(status_cmd)
