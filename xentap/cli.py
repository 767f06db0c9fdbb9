"""The `xentap` command line (click), in xl's idiom: short verbs, groups for
the appliance side.  Errors are one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys

import click


class XentapError(click.ClickException):
    """A user-facing error: printed as one line, exit status 1."""

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"xentap: {self.format_message()}", err=True)


class Group(click.Group):
    """Turns any exception that escapes a command into one line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("xentap: interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            from xentap.cli_journal import one_line
            raise XentapError(one_line(e)) from None
        except Exception as e:  # a bug: still one line, with its type
            raise XentapError(f"{type(e).__name__}: {e}") from None


class LazyGroup(Group):
    """A group whose commands in other modules are imported when one is run
    (or listed by --help): `xentap status` need not import the appliance's,
    the journal's and the analyzer's modules.  Under emulated Xen each dom0
    command's start-up is seconds of Python."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kw):
        super().__init__(*args, **kw)
        self.lazy = dict(lazy or {})       # command name -> (module, attribute)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib
            module, attr = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


_VBD = "xentap.cli_vbd"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"daemon": (_VBD, "daemon"), "attach": (_VBD, "attach"),
                   "detach": (_VBD, "detach"), "create": (_VBD, "create"),
                   "list": (_VBD, "list_vbds"), "status": (_VBD, "status"),
                   "appliance-grant": (_VBD, "appliance_grant"),
                   "appliance-revoke": (_VBD, "appliance_revoke"),
                   "appliance": ("xentap.cli_appliance", "appliance"),
                   "keys": ("xentap.cli_appliance", "keys"),
                   "journal": ("xentap.cli_journal", "journal"),
                   "analyze": ("xentap.cli_analyze", "analyze")})
@click.version_option(package_name="xentap")
def cli() -> None:
    """xentap: hypervisor-level data services for Xen."""


def main(argv: list[str] | None = None) -> None:
    """The `xentap` entry point: every error, usage errors too, is one line."""
    try:
        rv = cli.main(args=argv, prog_name="xentap", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"xentap: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("xentap: aborted", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


@cli.group(cls=LazyGroup, lazy={"analyzer": ("xentap.bench_analyzer", "command")})
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


def _size(text: str) -> int:
    """'512M', '1G', '4096' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 512M, 1G)") from None


@bench.command("datapath")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True),
              help="Where to put the image (default: the system temp dir).")
@click.option("--size", default="1G", show_default=True, help="Image size.")
@click.option("--seconds", default=2.0, show_default=True, help="Length of each run.")
@click.option("--repeat", default=9, show_default=True, help="Pairs of runs (fio and shim).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_datapath(directory, size, seconds, repeat, as_json) -> None:
    """fio and the shim on the same file and jobs; prints shim/fio ratios."""
    import json

    from xentap import bench_datapath as bd

    nbytes = _size(size)
    if nbytes < 64 << 20:
        raise XentapError("--size must be at least 64M")
    if seconds <= 0 or repeat < 1:
        raise XentapError("--seconds must be > 0 and --repeat at least 1")
    progress = (lambda m: click.echo(f"bench: {m}", err=True))
    result = bd.run(directory, nbytes, seconds, repeat, progress)
    click.echo(json.dumps(result, indent=2) if as_json else bd.format_table(result))


@bench.command("mirror")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True),
              help="Where to put the images (default: the system temp dir).")
@click.option("--size", default="1G", show_default=True, help="Image size.")
@click.option("--seconds", default=5.0, show_default=True, help="Length of each run.")
@click.option("--repeat", default=3, show_default=True, help="Alternating runs per side.")
@click.option("--ring", default="64M", show_default=True, help="Mirror ring size.")
@click.option("--appliance-dir", type=click.Path(file_okay=False, exists=True),
              help="Where the appliance keeps its journal and replica (default: tmpfs under "
                   "/dev/shm, its own storage, as an appliance domain's disk would be).")
@click.option("--spill-dir", type=click.Path(file_okay=False, exists=True),
              help="Where the drainer's spill log goes (default: beside the images).")
@click.option("--appliance-cpus", metavar="LIST",
              help="Run the appliance on these CPUs (e.g. 2-3) and the guest, the shim and "
                   "the drainer on the others, as an appliance domain with vCPUs of its own "
                   "(default: all share every CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_mirror(directory, size, seconds, repeat, ring, appliance_dir, spill_dir,
                 appliance_cpus, as_json) -> None:
    """The shim with mirroring off and on; prints on/off ratios and the lag."""
    import json

    from xentap import bench_mirror as bm

    nbytes, ring_bytes = _size(size), _size(ring)
    if nbytes < 64 << 20:
        raise XentapError("--size must be at least 64M")
    if seconds <= 0 or repeat < 1:
        raise XentapError("--seconds must be > 0 and --repeat at least 1")
    if ring_bytes < 1 << 20 or ring_bytes & (ring_bytes - 1):
        raise XentapError("--ring must be a power of two, at least 1M")
    cpus = None
    if appliance_cpus is not None:
        try:
            cpus = bm.parse_cpus(appliance_cpus)
            bm.split_cpus(cpus)
        except ValueError as e:
            raise XentapError(f"--appliance-cpus {e}") from None
    progress = (lambda m: click.echo(f"bench: {m}", err=True))
    result = bm.run(directory, nbytes, seconds, repeat, ring_bytes, progress,
                    appliance_dir=appliance_dir, spill_dir=spill_dir, appliance_cpus=cpus)
    click.echo(json.dumps(result, indent=2) if as_json else bm.format_table(result))


@bench.command("journal")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True),
              help="Where to put the journals (default: the system temp dir).")
@click.option("--size", default="1G", show_default=True, help="Disk size for the restore.")
@click.option("--history", default="10m", show_default=True, help="History's time span.")
@click.option("--history-size", default="512M", show_default=True,
              help="Bytes of 4 KiB random writes in the history.")
@click.option("--ingest-size", default="512M", show_default=True, help="Bytes per ingest run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_journal(directory, size, history, history_size, ingest_size, as_json) -> None:
    """Journal ingest (4 KiB, 1 MiB), restore and metadata, against dd's speed."""
    import json

    from xentap import bench_journal as bj
    from xentap.cli_journal import parse_duration

    nbytes, hist, ing = _size(size), _size(history_size), _size(ingest_size)
    try:
        secs = parse_duration(history)
    except ValueError as e:
        raise XentapError(str(e)) from None
    if nbytes < 64 << 20 or nbytes % (1 << 20) or hist < 1 << 20 or ing < 4 << 20 or secs <= 0:
        raise XentapError("--size must be whole MiB >= 64M, --history-size >= 1M, "
                          "--ingest-size >= 4M, --history > 0")
    progress = (lambda m: click.echo(f"bench: {m}", err=True))
    result = bj.run(directory, nbytes, secs, hist, ing, progress)
    click.echo(json.dumps(result, indent=2) if as_json else bj.format_table(result))


@cli.command()
@click.option("--dir", "workdir", default="out/demo", show_default=True,
              help="Where the demo keeps its disk image.")
@click.option("--size", default="256M", show_default=True, help="The guest disk's size.")
@click.option("--seconds", default=10.0, show_default=True,
              help="Length of the mixed workload.")
def demo(workdir, size, seconds) -> None:
    """A simulated guest's disk I/O through the shim, verified end to end; then a
    replayed ext4 guest hit by ransomware: detected, restored from the journal, checked."""
    from xentap import demo as demo_mod

    nbytes = _size(size)
    if nbytes < 16 << 20 or nbytes % (1 << 20):
        raise XentapError("--size must be a whole number of MiB, at least 16M")
    if not seconds > 0:
        raise XentapError("--seconds must be > 0")
    if not demo_mod.run(workdir, nbytes, seconds, click.echo):
        sys.exit(1)


if __name__ == "__main__":
    main()
