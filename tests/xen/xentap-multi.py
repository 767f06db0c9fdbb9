"""Helper of the Xen suite's cases: several `xentap` commands in one
interpreter (click's CliRunner on xentap.cli), as journal-check.py does for
`xentap journal`: each command alone costs seconds of emulated Python
start-up in dom0.

Usage: xentap-multi.py OUTDIR CMD [ARG...] [:: CMD [ARG...]]...

Runs the commands in order; command N's output (stdout and stderr) goes to
OUTDIR/N.out and its exit status to OUTDIR/N.rc (N from 1).  Stops at the
first that fails, as `a && b` would; exits with its status (0 when all
passed).
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    outdir, rest = argv[0], argv[1:]
    cmds: list[list[str]] = [[]]
    for a in rest:
        if a == "::":
            cmds.append([])
        else:
            cmds[-1].append(a)
    if not all(cmds):
        print("xentap-multi.py: an empty command", file=sys.stderr)
        return 2
    from click.testing import CliRunner

    from xentap.cli import cli

    runner = CliRunner()
    os.makedirs(outdir, exist_ok=True)
    for n, args in enumerate(cmds, 1):
        r = runner.invoke(cli, args, prog_name="xentap")
        out = r.output
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback
            out += "".join(traceback.format_exception(r.exception))
        with open(os.path.join(outdir, f"{n}.out"), "w") as f:
            f.write(out)
        with open(os.path.join(outdir, f"{n}.rc"), "w") as f:
            f.write(f"{r.exit_code}\n")
        if r.exit_code != 0:
            return r.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
