"""Helper of the Xen suite's cases: one `xentap` command whose interpreter
starts (and imports what the command needs) before the case wants it to run.
Each `xentap` command costs tens of seconds of emulated Python start-up in
dom0 before it does anything; started early, that time overlaps what the
case waits for anyway (the daemon starting, the appliance domain being
made, an outage overflowing the mirror).

Usage: xentap-after.py GOFILE [--preload MOD[,MOD...]] -- ARG...

Imports xentap.cli (what the `xentap` entry point imports) and the modules
--preload names (those the command imports when it runs), waits until
GOFILE exists, then runs `xentap ARG...` in this process, as the entry
point does (xentap.cli.main: the same output, the same exit status).  A
GOFILE holding `cancel` ends it with status 3 without running the command.
It gives up (status 4) when GOFILE does not appear within XT_AFTER_LIMIT
seconds (default 1500).  One line on stderr says how long the imports took
and how long it waited.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import preload as preload_option


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main(argv: list[str]) -> int:
    if len(argv) < 3 or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    go, opts, args = argv[0], argv[1:argv.index("--")], argv[argv.index("--") + 1:]
    preload = preload_option.parse("xentap-after.py", opts)
    if preload is None:
        return 2
    t0 = time.monotonic()
    from xentap.cli import main as xentap_main
    for mod in preload:
        importlib.import_module(mod)
    imported = time.monotonic()
    ad = sys.modules.get("xentap.appliance_domain")
    if ad is not None and hasattr(ad, "startup_override"):
        ad.startup_override = ad.process_age()   # (create's timing line: not the wait)
    limit = float(os.environ.get("XT_AFTER_LIMIT", "1500"))
    while not os.path.exists(go):
        if time.monotonic() - t0 > limit:
            print(f"xentap-after.py: {go} did not appear within {limit:g} s", file=sys.stderr)
            return 4
        time.sleep(0.5)
    with open(go) as f:
        if f.read().strip() == "cancel":
            return 3
    print(f"xentap-after.py: xentap {args[0] if args else ''} ran at {_uptime():.2f}: its "
          f"imports took {imported - t0:.1f} s, then it waited {time.monotonic() - imported:.1f} s "
          f"for {os.path.basename(go)}", file=sys.stderr, flush=True)
    xentap_main(args)   # exits (SystemExit) with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
