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
            raise XentapError(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")) from None
        except Exception as e:  # a bug: still one line, with its type
            raise XentapError(f"{type(e).__name__}: {e}") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xentap")
def main() -> None:
    """xentap: hypervisor-level data services for Xen."""


@main.group(cls=Group)
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


if __name__ == "__main__":
    main()
