"""Helper of the Xen suite's cases: one interpreter that runs a case's
`xentap` commands one after the other, as the case asks for them (click's
CliRunner on xentap.cli, as xentap-multi.py).  Each `xentap` command alone
costs tens of seconds of emulated Python start-up in dom0; a case whose
commands have shell checks between them (attach, then wait, then list,
then detach, ...) pays that once, and early (the imports run while the case
waits for its guest).

Usage: xentap-serve.py DIR [--preload MOD[,MOD...]]

Imports xentap.cli and the --preload modules, writes DIR/ready, then runs
request N = 1, 2, ... in order: DIR/N.cmd holds the arguments of `xentap`
(or of `--python FILE ARG...`: FILE run as a script, with those arguments),
each ended by a NUL byte.  The output (stdout and stderr) goes to DIR/N.out,
then the exit status to DIR/N.rc (written last: once it exists, N.out is
complete), and the status is also written into the FIFO DIR/N.done when
there is one (the case waits on it: no polling).  A byte written into the
FIFO DIR/requests (made by the case) wakes it for a new request; it looks
for one at least every second anyway.  It ends when DIR/stop exists, when
its parent is gone, or when no request came for XT_SERVE_IDLE seconds
(default 1500).  lib.sh's xentap_server_start / xentap_cmd are the case's
side.
"""
from __future__ import annotations

import importlib
import io
import os
import runpy
import select
import stat
import sys
import time
import traceback

import preload as preload_option


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _run_python(args: list[str]) -> tuple[str, int]:
    """A check script, in this interpreter (its output captured)."""
    out = io.StringIO()
    old = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = list(args), out, out
    rc = 0
    try:
        runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=out)
    except BaseException:  # noqa: BLE001 - reported as the request's failure
        traceback.print_exc(file=out)
        rc = 1
    finally:
        sys.argv, sys.stdout, sys.stderr = old
    return out.getvalue(), rc


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    d, opts = argv[0], argv[1:]
    preload = preload_option.parse("xentap-serve.py", opts)
    if preload is None:
        return 2
    parent = os.getppid()
    t0 = time.monotonic()
    from click.testing import CliRunner

    from xentap.cli import cli
    for mod in preload:
        importlib.import_module(mod)
    ad = sys.modules.get("xentap.appliance_domain")
    if ad is not None and hasattr(ad, "startup_override"):
        ad.startup_override = 0.0   # (create's timing line: no start-up of its own)
    runner = CliRunner()
    os.makedirs(d, exist_ok=True)
    _write(os.path.join(d, "ready"), f"{time.monotonic() - t0:.1f}\n")
    idle = float(os.environ.get("XT_SERVE_IDLE", "1500"))
    wake = -1
    try:
        if stat.S_ISFIFO(os.stat(os.path.join(d, "requests")).st_mode):
            wake = os.open(os.path.join(d, "requests"), os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        pass
    n, last = 1, time.monotonic()
    while True:
        cmd = os.path.join(d, f"{n}.cmd")
        if not os.path.exists(cmd):
            if os.path.exists(os.path.join(d, "stop")) or os.getppid() != parent \
                    or time.monotonic() - last > idle:
                return 0
            if wake >= 0:
                if select.select([wake], [], [], 1.0)[0]:
                    try:
                        os.read(wake, 4096)
                    except BlockingIOError:
                        pass
            else:
                time.sleep(0.5)
            continue
        with open(cmd, "rb") as f:
            args = [a.decode() for a in f.read().split(b"\0")[:-1]]
        if args[:1] == ["--python"]:
            out, rc = _run_python(args[1:])
        else:
            r = runner.invoke(cli, args, prog_name="xentap")
            out, rc = r.output, r.exit_code
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                out += "".join(traceback.format_exception(r.exception))
        _write(os.path.join(d, f"{n}.out"), out)
        _write(os.path.join(d, f"{n}.rc"), f"{rc}\n")
        try:   # (the case holds it open: never blocks)
            fd = os.open(os.path.join(d, f"{n}.done"), os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            try:
                os.write(fd, f"{rc}\n".encode())
            except OSError:
                pass
            os.close(fd)
        n, last = n + 1, time.monotonic()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
