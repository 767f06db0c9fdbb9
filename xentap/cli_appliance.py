"""`xentap appliance ...` and `xentap keys`: the appliance side's commands (click).

Registered by xentap/cli.py::

    cli.add_command(cli_appliance.appliance)
    cli.add_command(cli_appliance.keys_cmd)       # named "keys"

Errors are one line and a non-zero exit (:class:`ApplianceError`).
"""
from __future__ import annotations

import os

import click

# (xentap.keys imports zmq: the `xentap appliance create|status|destroy` that
# dom0 runs need none of it, and each import costs seconds of emulated CPU
# under Xen-in-QEMU; serve and keys import it when they run.)
#: = xentap.keys.ROLES (whose pair `xentap keys --role` makes)
ROLES = ("dom0", "appliance")

DEFAULT_LISTEN = "tcp://127.0.0.1:7788"
DEFAULT_DATA_DIR = "/var/lib/xentap/appliance"


def _one_line(e: BaseException) -> str:
    from xentap.cli_journal import one_line
    return one_line(e)


class ApplianceError(click.ClickException):
    """A user-facing error: printed as one line ("xentap: ..."), exit status 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"xentap: {self.format_message()}", err=True)


def _size_arg(text: str) -> int:
    """'512M', '16G', '4096' -> bytes (ValueError otherwise)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        n = -1
    if n <= 0:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 16G)")
    return n


@click.group("appliance")
def appliance() -> None:
    """The data-services appliance (runs in its own domU, or locally for development)."""


@appliance.command("serve")
@click.option("--listen", "endpoint", default=DEFAULT_LISTEN, show_default=True,
              metavar="ENDPOINT", help="tcp://HOST:PORT or ipc://PATH to bind.")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Where the replicas live.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory holding appliance.key_secret / appliance.key.")
@click.option("--allow", "allow_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory of the dom0 public keys (*.key) to accept "
                   "[default: KEYS/allowed].")
@click.option("--insecure", is_flag=True,
              help="Plain TCP/IPC: no encryption, no authentication.")
@click.option("--make-keys", is_flag=True,
              help="First make the appliance's key pair in KEYS when it has none (what "
                   "'xentap keys --role appliance' does; one interpreter start-up less "
                   "for an appliance domain's first boot).")
@click.option("--credit-mib", default=16, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Bytes (MiB) a dom0 may send beyond what is durable.")
@click.option("--sync-ms", default=5.0, show_default=True, type=click.FloatRange(0.1, 10000),
              help="Longest time data stays unsynced (group commit).")
@click.option("--retention", default="24h", show_default=True, metavar="DURATION",
              help="Journal history kept per VBD (e.g. 30m, 24h, 7d).")
@click.option("--journal-max", default="16G", show_default=True, metavar="SIZE",
              help="Journal bytes per VBD; past it the oldest history is trimmed (warning).")
@click.option("-v", "--verbose", is_flag=True, help="Also log sessions and syncs (INFO); rejections are always logged.")
def serve(endpoint: str, data_dir: str, keys_dir: str | None, allow_dir: str | None,
          insecure: bool, make_keys: bool, credit_mib: int, sync_ms: float, retention: str,
          journal_max: str, verbose: bool) -> None:
    """Receive mirror streams and keep a replica per VBD, until SIGINT/SIGTERM."""
    import logging
    import signal
    import threading

    from appliance_domu.receiver import Receiver
    from xentap import keys as keys_mod
    from xentap.cli_journal import parse_duration

    try:
        jopts = dict(retention_seconds=parse_duration(retention),
                     retention_bytes=_size_arg(journal_max))
    except ValueError as e:
        raise ApplianceError(str(e)) from None
    curve = None
    if insecure:
        if keys_dir or allow_dir or make_keys:
            raise ApplianceError("--insecure and --keys/--allow/--make-keys exclude each other")
    else:
        if not keys_dir:
            raise ApplianceError(
                "no keys: pass --keys DIR (create them with 'xentap keys --dir DIR "
                "--role appliance') or run with --insecure")
        allow = allow_dir or os.path.join(keys_dir, "allowed")
        try:
            if make_keys and not keys_mod.paths(keys_dir, keys_mod.APPLIANCE_NAME)[1].exists():
                pub, _ = keys_mod.create(keys_dir, keys_mod.APPLIANCE_NAME)   # (fsynced)
                click.echo(f"xentap appliance: made the key pair {pub} "
                           f"({keys_mod.load_public(pub).decode()})", err=True)
            curve = keys_mod.CurveServer.from_dir(keys_dir, allow)
        except (OSError, ValueError) as e:
            raise ApplianceError(_one_line(e)) from None
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="xentap appliance: %(levelname)s %(message)s")
    try:
        rcv = Receiver(endpoint, data_dir, curve=curve, insecure=insecure,
                       credit_bytes=credit_mib << 20, sync_interval=sync_ms / 1000,
                       journal=jopts)
        rcv.bind()
    except (OSError, ValueError) as e:
        raise ApplianceError(_one_line(e)) from None
    mode = f"CurveZMQ, {len(curve.allowed)} dom0 key(s) allowed" if curve else \
        "INSECURE: no encryption, no authentication"
    age = _appliance_domain.process_age()
    click.echo(f"xentap appliance: listening on {rcv.endpoint} ({mode}), replicas in {data_dir}"
               + (f" ({age:.1f} s after its start)" if age is not None else ""), err=True)

    if threading.current_thread() is threading.main_thread():
        def _stop(signum, frame):
            rcv.stop(timeout=0)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        rcv.run()
    except (OSError, ValueError) as e:
        raise ApplianceError(_one_line(e)) from None
    click.echo("xentap appliance: stopped", err=True)


@click.command("keys")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              metavar="DIR", help="Where to write the key pair (made if missing).")
@click.option("--role", type=click.Choice(ROLES), default="dom0", show_default=True,
              help="Whose pair: dom0.key* or appliance.key*.")
@click.option("--name", default=None, metavar="NAME",
              help="File name stem instead of the role (e.g. one per dom0 host).")
@click.option("--force", is_flag=True, help="Replace an existing secret key.")
def keys_cmd(directory: str, role: str, name: str | None, force: bool) -> None:
    """Create a CurveZMQ key pair: NAME.key (public) and NAME.key_secret (0600)."""
    from xentap import keys as keys_mod
    stem = name or role
    try:
        pub, sec = keys_mod.create(directory, stem, force=force)
        public = keys_mod.load_public(pub).decode()
    except (OSError, ValueError) as e:
        raise ApplianceError(_one_line(e)) from None
    click.echo(f"secret key: {sec} (mode 0600, keep it on this host)")
    click.echo(f"public key: {pub} ({public})")
    if role == "dom0":
        click.echo("next: copy the public key into the appliance's --allow directory")
    else:
        click.echo("next: give the public key to each dom0 (its drainer trusts only this one)")


keys = keys_cmd  # the name the brief uses


# `xentap appliance create|destroy|status`: the appliance as a Xen domain.
from xentap import appliance_domain as _appliance_domain  # noqa: E402
_appliance_domain.register(appliance)


if __name__ == "__main__":
    # `python3 -m xentap.cli_appliance serve ...`: what the appliance domain's
    # init runs.  The same commands as `xentap appliance`, without importing
    # the rest of the CLI (the VBD commands, the shim, the daemon, the benches):
    # emulated, every module counts in how soon the appliance is ready.
    appliance(prog_name="xentap appliance")
