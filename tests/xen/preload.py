"""The `--preload MOD[,MOD...]` option of xentap-after.py and xentap-serve.py:
the modules a command will import, imported ahead while the case waits."""
from __future__ import annotations

import sys


def parse(prog: str, opts: list[str]) -> list[str] | None:
    """The modules named by `opts` (only --preload options); None, with a line
    on stderr, for anything else."""
    mods: list[str] = []
    while opts:
        if opts[0] == "--preload" and len(opts) > 1:
            mods += [m for m in opts[1].split(",") if m]
            opts = opts[2:]
        else:
            print(f"{prog}: unknown option {opts[0]!r}", file=sys.stderr)
            return None
    return mods
