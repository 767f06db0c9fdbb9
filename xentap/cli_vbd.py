"""The VBD commands of the `xentap` CLI: daemon, attach, detach, create, list,
status.

Each is a plain click command holding no global state; ``xentap.cli``
registers them on its group.  ``python -m xentap.cli_vbd`` runs them on a
group of their own (tests, or before they are registered).  Errors are one
line on stderr and exit status 1.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import stat
import sys
import time
from typing import Any

import click

from xentap import protect as P
from xentap import shim
from xentap import xs_keys as K
from xentap.appliance_node import grant_appliance, read_appliance_status, revoke_appliance
from xentap.xenbus import PRINTABLE, Xs, sim_transports, xen_transports
from xentap.xs_keys import XenbusState

#: How long `detach` waits for the backend to reach Closed (libxl waits 10 s).
DETACH_TIMEOUT = 10.0


class VbdCliError(click.ClickException):
    """A user-facing error: ``xentap: <message>`` on stderr, exit status 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"xentap: {self.format_message()}", err=True)


def _one_line_errors(fn):
    """Turns the errors a command expects into one line on stderr."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except OSError as e:   # XenstoreError included
            raise VbdCliError(e.strerror or str(e)) from None
        except ValueError as e:
            raise VbdCliError(str(e)) from None
    return wrapper


_xs_option = click.option("--xenstore-socket", metavar="PATH", default=None,
                          help="xenstored's Unix socket (default: $XENSTORED_PATH or "
                               "/var/run/xenstored/socket).")


def _domid(xs: Xs, domain: str) -> int:
    """A domain id from a number or a domain name; refuses unknown domains."""
    if domain.isdigit():
        domid = int(domain)
    else:
        domid = None
        for d in xs.ls("/local/domain") or []:
            if d.isdigit() and xs.read(f"{K.domain_path(int(d))}/name") == domain:
                domid = int(d)
                break
        if domid is None:
            raise VbdCliError(f"unknown domain {domain!r}")
    if domid == K.BACKEND_DOMID or domid > 0x7FEF:
        raise VbdCliError(f"domain {domid} cannot have xentap disks")
    if not xs.exists(K.domain_path(domid)) or not xs.introduced(domid):
        raise VbdCliError(f"unknown domain {domain}")
    return domid


# --- daemon ---------------------------------------------------------------------------

@click.command("daemon")
@click.option("--transport", type=click.Choice(["xen", "sim"]), default="xen", show_default=True,
              help="How guests' rings are reached: real Xen, or sim domains.")
@click.option("--sim-dir", type=click.Path(file_okay=False), default=None,
              help="With --transport sim: domain N's sim directory is SIM_DIR/N.")
@click.option("--engine", type=click.Choice(list(shim.ENGINES)), default="auto",
              show_default=True, help="The shim's I/O engine.")
@click.option("--direct", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="O_DIRECT on images: auto uses it where the image takes direct I/O of its "
                   "sectors and the page cache elsewhere; on refuses images that do not.")
@click.option("--poll-us", type=click.IntRange(0, 1_000_000), default=shim.DEFAULT_POLL_US,
              show_default=True, metavar="US",
              help="Queue threads poll their rings and completions this long at most before "
                   "sleeping (adaptive; 0: never poll, least CPU, more latency).")
@click.option("--persistent-grants/--no-persistent-grants", default=True, show_default=True,
              help="Offer persistent grants: reads go straight into the guest's pages, mapped "
                   "once; Linux blkfront then allocates a page per grant of every ring slot "
                   "up front (with 16-page rings and 256 segments, 0.5 GiB per queue).")
@click.option("--keys-dir", default=P.DEFAULT_KEYS_DIR, show_default=True, metavar="DIR",
              help="dom0's CurveZMQ key pair (dom0.key_secret, from `xentap keys`) and the "
                   "appliance public key (appliance.key) used for endpoints given without one.")
@click.option("--state-dir", default=P.DEFAULT_STATE_DIR, show_default=True, metavar="DIR",
              help="dom0 state: protected VBDs spill under DIR/spill/<vbd-uuid>.")
@click.option("--mirror-ring", default="64M", show_default=True, metavar="SIZE",
              help="Mirror ring per protected VBD (a power of two).")
@click.option("--spill-limit", default="1G", show_default=True, metavar="SIZE",
              help="Spill log bound per protected VBD.")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=P.DRAIN_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="How long a protected VBD's mirror drains to the appliance when its guest "
                   "ends, it is detached or the daemon stops (the rest stays in the spill log).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@_xs_option
@_one_line_errors
def daemon(transport: str, sim_dir: str | None, engine: str, direct: str, poll_us: int,
           persistent_grants: bool, keys_dir: str, state_dir: str,
           mirror_ring: str, spill_limit: str, drain_timeout: float, verbose: bool,
           xenstore_socket: str | None) -> None:
    """Serve every xentap VBD in xenstore until SIGTERM."""
    from xentap.daemon import Daemon
    from xentap.xenbus import ServeOptions

    ring, limit = _size(mirror_ring, "--mirror-ring"), _size(spill_limit, "--spill-limit")
    if ring & (ring - 1) or ring < 1 << 20:
        raise VbdCliError(f"--mirror-ring {mirror_ring}: a power of two, at least 1M")
    if limit < 1 << 20:
        raise VbdCliError(f"--spill-limit {spill_limit}: at least 1M")

    if transport == "sim":
        if not sim_dir:
            raise VbdCliError("--transport sim needs --sim-dir")
        if not os.path.isdir(sim_dir):
            raise VbdCliError(f"sim directory {sim_dir} does not exist")
        factory = sim_transports(os.path.abspath(sim_dir))
    else:
        shim.Transport.xen().close()            # fail now, in one line, without Xen
        factory = xen_transports()
    # Times on each line when they go to a file (journald and a terminal need none).
    stamp = not sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format=("%(asctime)s.%(msecs)03d " if stamp else "") + "xentap: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    d = Daemon(factory, transport_name=transport, xenstore_socket=xenstore_socket,
               serve=ServeOptions(engine=engine, poll_us=poll_us, persistent=persistent_grants,
                                  direct={"auto": "auto", "on": True, "off": False}[direct]),
               keys_dir=os.path.abspath(keys_dir),
               state_dir=os.path.abspath(state_dir), mirror_ring=ring, spill_limit=limit,
               drain_timeout=drain_timeout)
    signal.signal(signal.SIGTERM, lambda *_: d.stop())
    signal.signal(signal.SIGINT, lambda *_: d.stop())
    d.run()


def _size(text: str, what: str) -> int:
    """``64M``, ``1G``, ``4096``... in bytes; VbdCliError when not a size."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    if not num.isdigit() or len(num) > 15:
        raise VbdCliError(f"{what} {text!r} is not a size (like 64M or 1G)")
    return int(num) * units[unit]


# --- attach / detach -------------------------------------------------------------------

def check_target(target: str, mode: str) -> str:
    """The absolute path of an image ``target`` fit for ``mode`` ("r"/"w");
    raises VbdCliError with the reason."""
    path = os.path.abspath(target)
    if not all(ord(c) in PRINTABLE for c in path):     # as xenstore values are written
        raise VbdCliError(f"target path {target!r} must be printable ASCII")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VbdCliError(f"target {target} does not exist") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise VbdCliError(f"target {target} is neither a file nor a block device")
    if not os.access(path, os.R_OK | (os.W_OK if mode == "w" else 0)):
        raise VbdCliError(f"target {target} is not {'writable' if mode == 'w' else 'readable'}")
    return path


def protect_keys(xs: Xs, protect: str | None, key_file: str | None) -> dict[str, str]:
    """The backend keys that make a VBD protected by appliance ``protect``
    (see xentap.protect; empty without it).  VbdCliError when it names no
    appliance or the key file is bad."""
    if protect is None:
        if key_file:
            raise VbdCliError("--protect-key goes with --protect")
        return {}
    try:
        return P.check_protect_xs(xs, protect, key_file)
    except (OSError, ValueError) as e:
        raise VbdCliError(f"--protect {protect}: {getattr(e, 'strerror', None) or e}") from None


def attach_vbd(xs: Xs, domid: int, path: str, vdev: str, mode: str,
               protect: dict[str, str] | None = None) -> str:
    """Writes the backend and frontend nodes of VBD ``vdev`` of ``domid`` on
    image ``path`` (checked by :func:`check_target`) in one transaction, with
    libxl's permissions; ``protect`` (from :func:`protect_keys`) adds the
    appliance and a fresh ``vbd-uuid``.  Returns the vdev's name; raises
    VbdCliError when the vdev or the image is in use."""
    import uuid

    devid = K.vdev_to_devid(vdev)
    extra = dict(protect or {})
    if extra:
        if mode != "w":
            raise VbdCliError(f"{vdev}: a read-only disk has no writes to protect")
        extra[K.BE_VBD_UUID] = str(uuid.uuid4())
    name = vdev if not vdev.isdigit() else K.devid_to_vdev(devid)
    be, fe = K.backend_path(domid, devid), K.frontend_path(domid, devid)
    vbd_dir = os.path.dirname(fe)

    def tx(t: Xs) -> None:
        if t.exists(be) or t.exists(fe):
            raise VbdCliError(f"{name} of domain {domid} is in use")
        for d in t.ls(K.BACKEND_ROOT) or []:
            vbds = [v for v in t.ls(f"{K.BACKEND_ROOT}/{d}") or [] if v.isdigit()]
            params = t.read_many(f"{K.BACKEND_ROOT}/{d}/{v}/{K.BE_PARAMS}" for v in vbds)
            for v, p in zip(vbds, params):
                if p == path:
                    raise VbdCliError(f"target {path} is already attached to domain {d} "
                                      f"as {K.devid_to_vdev(int(v))}")
        # each node's keys in one round trip (pipelined); a new node takes its
        # parent's permissions, so the keys get those set on be and fe first
        t.mkdir(be)
        t.set_perms(be, K.backend_perms(domid))
        t.write_many((f"{be}/{key}", value) for key, value in (
            (K.BE_FRONTEND, fe), (K.BE_FRONTEND_ID, domid),
            (K.BE_ONLINE, 1), (K.STATE, int(XenbusState.INITIALISING)),
            (K.BE_PARAMS, path), (K.BE_MODE, mode), (K.BE_DEV, name),
            (K.BE_TYPE, K.BACKEND_TYPE), (K.BE_DEVICE_TYPE, "disk"), *extra.items()))
        if not t.exists(vbd_dir):
            t.mkdir(vbd_dir)
            t.set_perms(vbd_dir, K.frontend_perms(domid))
        t.mkdir(fe)
        t.set_perms(fe, K.frontend_perms(domid))
        t.write_many((f"{fe}/{key}", value) for key, value in (
            (K.FE_BACKEND, be), (K.FE_BACKEND_ID, K.BACKEND_DOMID),
            (K.STATE, int(XenbusState.INITIALISING)),
            (K.FE_VIRTUAL_DEVICE, devid), (K.FE_DEVICE_TYPE, "disk")))

    xs.transaction(tx)
    return name


@click.command("attach")
@click.argument("domain")
@click.argument("target")
@click.argument("vdev")
@click.option("--mode", type=click.Choice(["r", "w"]), default="w", show_default=True,
              help="Read-only or read-write.")
@click.option("--protect", metavar="APPLIANCE", default=None,
              help="Mirror every write to APPLIANCE: an appliance domain's name "
                   "(`xentap appliance-grant`) or tcp://HOST:PORT / ipc:///PATH.")
@click.option("--protect-key", metavar="FILE", default=None,
              help="With an endpoint: the appliance's public key file (default: the "
                   "daemon's KEYS-DIR/appliance.key).")
@_xs_option
@_one_line_errors
def attach(domain: str, target: str, vdev: str, mode: str, protect: str | None,
           protect_key: str | None, xenstore_socket: str | None) -> None:
    """Give DOMAIN the image TARGET as virtual disk VDEV (xvda, xvdb... or a number)."""
    K.vdev_to_devid(vdev)                       # a bad vdev is refused before anything else
    if protect is not None:
        try:
            P.check_protect(protect)
        except ValueError as e:
            raise VbdCliError(f"--protect: {e}") from None
    path = check_target(target, mode)
    with Xs.open(xenstore_socket) as xs:
        domid = _domid(xs, domain)
        extra = protect_keys(xs, protect, protect_key)
        name = attach_vbd(xs, domid, path, vdev, mode, extra)
    click.echo(f"attached {path} to domain {domid} as {name} "
               f"({'read-only' if mode == 'r' else 'read-write'}"
               + (f", protected by {protect}" if protect else "") + ")")


def detach_vbd(xs: Xs, domid: int, devid: int, timeout: float = DETACH_TIMEOUT,
               force: bool = False) -> bool:
    """Asks the backend to close (online=0, state=Closing), waits up to
    ``timeout`` for Closed, then removes both nodes.  Returns whether it
    closed; when it did not, the nodes are removed only with ``force``."""
    be, fe = K.backend_path(domid, devid), K.frontend_path(domid, devid)

    def ask(t: Xs) -> None:
        t.write(f"{be}/{K.BE_ONLINE}", 0)
        if XenbusState.parse(t.read(f"{be}/{K.STATE}")) != XenbusState.CLOSED:
            t.write(f"{be}/{K.STATE}", int(XenbusState.CLOSING))

    xs.transaction(ask)
    deadline = time.monotonic() + timeout
    closed = False
    while True:
        state = XenbusState.parse(xs.read(f"{be}/{K.STATE}"))
        if state == XenbusState.CLOSED or not xs.exists(be):
            closed = True
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not closed and not force:
        return False

    def remove(t: Xs) -> None:
        t.rm(be)
        t.rm(fe)
        t.rm(K.status_path(domid, devid))      # the VBD's counters go with it
        for parent in (os.path.dirname(be), f"{K.STATUS_ROOT}/{domid}"):
            if t.ls(parent) == []:
                t.rm(parent)

    xs.transaction(remove)
    return closed


@click.command("detach")
@click.argument("domain")
@click.argument("vdev")
@click.option("--timeout", type=float, default=DETACH_TIMEOUT, show_default=True,
              help="Seconds to wait for the backend to close.")
@click.option("--force", is_flag=True, help="Remove the nodes even if it did not close.")
@_xs_option
@_one_line_errors
def detach(domain: str, vdev: str, timeout: float, force: bool,
           xenstore_socket: str | None) -> None:
    """Take virtual disk VDEV away from DOMAIN."""
    devid = K.vdev_to_devid(vdev)
    with Xs.open(xenstore_socket) as xs:
        if domain.isdigit():        # a dead domain's disks can still be detached
            domid = int(domain)
        else:
            domid = _domid(xs, domain)
        if not xs.exists(K.backend_path(domid, devid)):
            raise VbdCliError(f"domain {domid} has no xentap disk {vdev}")
        closed = detach_vbd(xs, domid, devid, timeout, force)
        if not closed and not force:
            raise VbdCliError(f"{vdev} of domain {domid} did not close within {timeout:g} s "
                              f"(still in use by the guest?); --force removes it anyway")
    click.echo(f"detached {vdev} from domain {domid}"
               + ("" if closed else " (forced: the guest had not let go)"))


# --- create ---------------------------------------------------------------------------

class ConfigProblems(VbdCliError):
    """A config with problems: one ``xentap: <problem>`` line each, exit status 1."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems

    def show(self, file=None) -> None:  # noqa: D401 - click API
        for p in self.problems:
            click.echo(f"xentap: {p}", err=True)


@click.command("create")
@click.argument("cfg", metavar="CFG")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("-n", "--dry-run", is_flag=True, help="Only parse and check CFG.")
@click.option("--xl", "xl_cmd", default="xl", show_default=True, metavar="PATH",
              help="The xl to run.")
@click.option("--wait", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the daemon to open each image.")
@_xs_option
@_one_line_errors
def create(cfg: str, overrides: tuple[str, ...], dry_run: bool, xl_cmd: str, wait: float,
           xenstore_socket: str | None) -> None:
    """Create the guest of xl config CFG with the disks of its xentap_disks key.

    KEY=VALUE arguments override CFG's settings, as with `xl create`
    (e.g. "xentap_disks=['vdev=xvda, target=/srv/a.img']").

    xl gets CFG without xentap_disks (`xl create -p`); the xentap disks are
    attached, then the guest is unpaused.  On failure the domain is destroyed.
    """
    from xentap.create import create as do_create
    from xentap.xl_config import ConfigError

    try:
        do_create(cfg, overrides, xl=xl_cmd, xenstore_socket=xenstore_socket, dry_run=dry_run,
                  wait=wait, echo=click.echo)
    except ConfigError as e:
        raise ConfigProblems(e.problems) from None


# --- list / status ------------------------------------------------------------------

def read_vbds(xs: Xs) -> list[dict[str, Any]]:
    """Every xentap VBD with its backend keys and the daemon's last status."""
    out = []
    for d in sorted((x for x in xs.ls(K.BACKEND_ROOT) or [] if x.isdigit()), key=int):
        for v in sorted((x for x in xs.ls(f"{K.BACKEND_ROOT}/{d}") or [] if x.isdigit()),
                        key=int):
            domid, devid = int(d), int(v)
            be = K.backend_path(domid, devid)
            st = K.status_path(domid, devid)
            # the backend's and the status' keys in a few round trips, not one a key
            # (a status poll in a busy emulated dom0 took seconds a key), and in a
            # transaction: one status round's keys, not a key listed before a round
            # and its neighbours read after it
            known = xs.transaction(lambda t, be=be, st=st: {
                f"{d}/{k}": v for d in (be, st) for k, v in t.read_dir(d).items()})

            def r(p: str) -> str | None:
                return known.get(p) if p.rsplit("/", 1)[0] in (be, st) else xs.read(p)

            def num(key: str) -> int:
                raw = r(f"{st}/{key}")
                return int(raw) if raw and raw.isdigit() else 0

            out.append({
                "domain": domid,
                "vdev": r(f"{be}/{K.BE_DEV}") or K.devid_to_vdev(devid),
                "devid": devid,
                "target": r(f"{be}/{K.BE_PARAMS}") or "",
                "mode": r(f"{be}/{K.BE_MODE}") or "",
                "state": XenbusState.parse(r(f"{be}/{K.STATE}")).label,
                "frontend_state": XenbusState.parse(
                    r(f"{K.frontend_path(domid, devid)}/{K.STATE}")).label,
                "error": r(f"{be}/{K.BE_ERROR}") or "",
                "requests": num(K.ST_REQUESTS),
                "bytes": num(K.ST_BYTES),
                "errors": num(K.ST_ERRORS),
                "in_flight": num(K.ST_IN_FLIGHT),
                "grants_mapped": num(K.ST_GRANTS_MAPPED),
                "reads": num(K.ST_READS),
                "writes": num(K.ST_WRITES),
                "flushes": num(K.ST_FLUSHES),
                "barriers": num(K.ST_BARRIERS),
                "discards": num(K.ST_DISCARDS),
                "indirect": num(K.ST_INDIRECT),
                "bytes_read": num(K.ST_BYTES_READ),
                "bytes_written": num(K.ST_BYTES_WRITTEN),
                "updated": num(K.ST_UPDATED),
                "protect": r(f"{be}/{K.BE_PROTECT}") or "",
                "vbd_uuid": r(f"{be}/{K.BE_VBD_UUID}") or "",
                "mirror": _mirror_row(r, st),
            })
    return out


def _mirror_row(r, st: str) -> dict[str, Any] | None:
    """A protected VBD's mirror figures as the daemon published them (None
    when it published none)."""
    state = r(f"{st}/{K.ST_MIRROR}")
    if state is None:
        return None

    def num(key: str) -> int:
        raw = r(f"{st}/{key}")
        return int(raw) if raw and raw.isdigit() else 0

    def ms(key: str) -> float:
        try:
            return float(r(f"{st}/{key}") or "0")
        except ValueError:
            return 0.0

    return {"state": state, "appliance": r(f"{st}/{K.ST_MIRROR_APPLIANCE}") or "",
            "acked_seq": num(K.ST_MIRROR_ACKED_SEQ), "next_seq": num(K.ST_MIRROR_NEXT_SEQ),
            "pending": num(K.ST_MIRROR_PENDING), "lag_ms": ms(K.ST_MIRROR_LAG_MS),
            "ack_p99_ms": ms(K.ST_MIRROR_ACK_P99_MS),
            "spill_bytes": num(K.ST_MIRROR_SPILL_BYTES),
            "ring_bytes": num(K.ST_MIRROR_RING_BYTES),
            "overflows": num(K.ST_MIRROR_OVERFLOWS), "gaps": num(K.ST_MIRROR_GAPS),
            "error": r(f"{st}/{K.ST_MIRROR_ERROR}") or "",
            "sync": {"kind": sync if (sync := r(f"{st}/{K.ST_MIRROR_SYNC}") or "")
                     in ("initial", "restart") else "",
                     "done": num(K.ST_MIRROR_SYNC_DONE), "total": num(K.ST_MIRROR_SYNC_TOTAL)}}


def _mirror_cells(rows: list[dict[str, Any]]) -> None:
    """Adds the table cells of the mirror columns to each row."""
    for row in rows:
        m = row["mirror"]
        if not row["protect"]:
            row["_m"], row["_lag"], row["_ovf"], row["_spill"] = "-", "-", "-", "-"
        elif m is None:
            row["_m"], row["_lag"], row["_ovf"], row["_spill"] = "waiting", "-", "-", "-"
        else:
            row["_m"] = f"{m['state']} {m['acked_seq']}/{m['next_seq'] - 1}"
            sync = m["sync"]
            if sync["kind"]:                  # long work: how far it got
                done, total = sync["done"], sync["total"]
                pct = f", {100 * done // total}%" if total else ""
                row["_m"] += f" ({sync['kind']} sync {done}/{total} MiB{pct})"
            row["_lag"] = f"{m['pending']} ({m['lag_ms']:g} ms)"     # writes, the oldest's age
            row["_ovf"] = f"{m['overflows']}/{m['gaps']}"
            row["_spill"] = str(m["spill_bytes"])


def _utc(t: int) -> str:
    """Unix seconds an appliance published (validated digits) as UTC."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    except (OverflowError, OSError, ValueError):  # 20 digits: far beyond time_t
        return str(t)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in cols]] + [[str(r[k]) for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@_xs_option
@_one_line_errors
def list_vbds(as_json: bool, xenstore_socket: str | None) -> None:
    """List xentap virtual disks."""
    with Xs.open(xenstore_socket) as xs:
        rows = read_vbds(xs)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["_p"] = row["protect"] or "-"
    click.echo(_table(rows, [("Domain", "domain"), ("Vdev", "vdev"), ("Mode", "mode"),
                             ("State", "state"), ("Target", "target"), ("Protect", "_p")]))


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@_xs_option
@_one_line_errors
def status(as_json: bool, xenstore_socket: str | None) -> None:
    """Per-VBD state and counters, as the daemon last published them."""
    with Xs.open(xenstore_socket) as xs:
        rows = read_vbds(xs)
        dpath = K.DAEMON_PATH
        daemon_info = {"state": xs.read(f"{dpath}/{K.DAEMON_STATE}") or "absent",
                       "pid": xs.read(f"{dpath}/{K.DAEMON_PID}") or "",
                       "transport": xs.read(f"{dpath}/{K.DAEMON_TRANSPORT}") or "",
                       "heartbeat": xs.read(f"{dpath}/{K.DAEMON_HEARTBEAT}") or ""}
        appliances = [read_appliance_status(xs, int(d))
                      for d in sorted((x for x in xs.ls(K.APPLIANCE_ROOT) or [] if x.isdigit()),
                                      key=int)]
    if as_json:
        click.echo(json.dumps({"daemon": daemon_info, "vbds": rows, "appliances": appliances},
                              indent=2))
        return
    click.echo(f"daemon: {daemon_info['state']}"
               + (f" (pid {daemon_info['pid']}, {daemon_info['transport']})"
                  if daemon_info["pid"] else ""))
    _mirror_cells(rows)
    click.echo(_table(rows, [("Domain", "domain"), ("Vdev", "vdev"), ("Target", "target"),
                             ("State", "state"), ("Requests", "requests"), ("Bytes", "bytes"),
                             ("Errors", "errors"), ("Mirror acked/written", "_m"),
                             ("Lag: pending (oldest)", "_lag"), ("Overflows/gaps", "_ovf"),
                             ("Spill bytes", "_spill")]))
    for r in rows:
        if r["error"]:
            click.echo(f"domain {r['domain']} {r['vdev']}: {r['error']}")
        if r["mirror"] and r["mirror"]["error"]:
            click.echo(f"domain {r['domain']} {r['vdev']}: mirror to {r['protect']}: "
                       f"{r['mirror']['error']}")
    for a in appliances:
        click.echo(f"appliance {a['name'] or '?'} (domain {a['domain']}): "
                   f"{a['state'] or 'no state'}"
                   + (f", {a['endpoint']}" if a["endpoint"] else "")
                   + (f"; ignored: {', '.join(a['problems'])}" if a["problems"] else ""))
        for e in sorted(a["vbds"], key=lambda e: (e["domain"], e["devid"])):
            ws, we = e["window_start"], e["window_end"]
            win = (f"{_utc(ws)} .. {_utc(we)} ({we - ws}s)" if ws is not None and we is not None
                   and ws <= we else "-")
            click.echo(f"  domain {e['domain']} {K.devid_to_vdev(e['devid'])}: window {win}, "
                       f"data state {e['data_state'] or '-'}")


# --- appliance domains ----------------------------------------------------------------

@click.command("appliance-grant")
@click.argument("domain")
@_xs_option
@_one_line_errors
def appliance_grant(domain: str, xenstore_socket: str | None) -> None:
    """Let DOMAIN, a data-services appliance, publish its status in xenstore."""
    with Xs.open(xenstore_socket) as xs:
        domid = _domid(xs, domain)
        name = xs.read(f"{K.domain_path(domid)}/name") or str(domid)
        grant_appliance(xs, domid, name)
    click.echo(f"domain {domid} ({name}) may write {K.appliance_status_path(domid)}")


@click.command("appliance-revoke")
@click.argument("domain")
@_xs_option
@_one_line_errors
def appliance_revoke(domain: str, xenstore_socket: str | None) -> None:
    """Remove DOMAIN's appliance node (and what it published)."""
    with Xs.open(xenstore_socket) as xs:
        domid = int(domain) if domain.isdigit() else _domid(xs, domain)
        if not revoke_appliance(xs, domid):
            raise VbdCliError(f"domain {domid} is not an appliance")
    click.echo(f"domain {domid} is no longer an appliance")


#: This module's own group (``python -m xentap.cli_vbd``); xentap.cli names them lazily.
COMMANDS = (daemon, attach, detach, create, list_vbds, status, appliance_grant,
            appliance_revoke)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """xentap's VBD commands (also registered on `xentap`)."""


for _c in COMMANDS:
    cli.add_command(_c)

if __name__ == "__main__":
    cli()
