"""Helper of cases/appliance-domu.sh: the journal checks after the outage, with
the `xentap journal` commands run in one interpreter (click's CliRunner on
xentap.cli; each command alone costs seconds of emulated Python start-up).

Usage: journal-check.py [--after FILE] DATA_DIR VBD S1 PHASE1_IMG DISK_IMG ACKED WORKDIR

--after FILE: import what the commands need, then wait until FILE exists
before looking at DATA_DIR (the case starts the interpreter, tens of seconds
of emulated imports, while the appliance shuts down and dom0 checks the disk).

Checks, printing one line each and `FAILED: ...` for the first that fails
(exit 1):
  - `xentap journal list` shows the VBD; `verify --json`: ok, seqs from 0
    (the empty disk) to ACKED, the daemon's last acknowledged seq
  - the journal's GAP..RESYNC_END windows (tests/xen/journal-window.py's
    reading of every frame's record table): exactly one, after S1, with
    RESYNC records in it
  - `checkpoints --json`: none inside the window is offered as consistent
  - `restore --seq S1` equals PHASE1_IMG and is write-ordered
  - `restore --checkpoint` at the last checkpoint up to S1 equals PHASE1_IMG
    (the disk as dom0 copied it when every write up to S1 was acknowledged)
    and is write-ordered; at the last checkpoint it equals DISK_IMG
  - `restore --seq` inside the window says not write-ordered; just before it,
    write-ordered
Prints `METRIC`-ready figures on a line starting with `FIGURES`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    args = sys.argv[1:]
    after = None
    if args[:1] == ["--after"]:
        after, args = args[1], args[2:]
    data, vbd, s1, phase1, disk, acked, work = args[:7]
    s1, acked = int(s1), int(acked)
    from click.testing import CliRunner

    from xentap.cli import cli

    if after:
        import time

        import engines.journal  # noqa: F401 - what `xentap journal` imports
        import xentap.cli_journal  # noqa: F401
        t0 = time.monotonic()
        while not os.path.exists(after):
            if time.monotonic() - t0 > 1500:
                print(f"FAILED: {after} did not appear within 1500 s", flush=True)
                return 1
            time.sleep(0.5)

    runner = CliRunner()

    def xentap(*args: str) -> str:
        r = runner.invoke(cli, list(args), catch_exceptions=False)
        out = r.stdout
        if r.exit_code != 0:
            print(f"xentap {' '.join(args)}: exit {r.exit_code}\n{r.output}")
            raise SystemExit(fail(f"xentap {' '.join(args[:2])} failed"))
        return out

    def fail(msg: str) -> int:
        print(f"FAILED: {msg}", flush=True)
        return 1

    dd = ("--data-dir", data)
    print(xentap("journal", "list", *dd).rstrip())
    v = json.loads(xentap("journal", "verify", vbd, *dd, "--json"))
    print(f"verify: ok={v['ok']} frames={v['frames']} records={v['records']} "
          f"seqs {v['first_seq']}..{v['last_seq']} problems={v['problems'][:3]}")
    if not v["ok"]:
        return fail("the journal does not verify")
    if v["first_seq"] != 0 or v["last_seq"] != acked:
        return fail(f"the journal holds seqs {v['first_seq']}..{v['last_seq']}, "
                    f"the daemon had {acked} acknowledged")

    # journal-window.py's reading of the record tables, in this interpreter
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location(
        "journal_window", Path(__file__).resolve().parent / "journal-window.py")
    jw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jw)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jw.main([os.path.join(data, vbd, "journal")])
    w_out = buf.getvalue()
    print(w_out.rstrip())
    wins = [ln.split() for ln in w_out.splitlines() if ln.startswith("WINDOW ")]
    if not wins:
        return fail("no GAP..RESYNC_END window in the journal")
    for wn in wins:
        g, e, n = int(wn[1]), int(wn[2]), int(wn[3].split("=")[1])
        if not (s1 < g < e) or n == 0:
            return fail(f"window {g}..{e} with {n} RESYNC records: expected windows after "
                        f"seq {s1}, closed, with RESYNC records")
    gap, end = int(wins[0][1]), int(wins[-1][2])     # from the first GAP to the last end
    nres = sum(int(wn[3].split("=")[1]) for wn in wins)

    cps = json.loads(xentap("journal", "checkpoints", vbd, *dd, "--json"))
    spans = [(int(wn[1]), int(wn[2])) for wn in wins]
    inside = [c for c in cps if any(g <= c["seq"] < e for g, e in spans)]
    bad = [c for c in inside if c["consistent"]]
    print(f"checkpoints: {len(cps)}, {len(inside)} inside the window, "
          f"{sum(c['consistent'] for c in cps)} consistent in all")
    if bad:
        return fail(f"{len(bad)} checkpoints inside the windows {spans} are marked "
                    f"consistent: {bad[:2]}")
    before = [c for c in cps if c["seq"] <= s1]
    if not before or not cps:
        return fail("no checkpoint up to the end of phase 1")
    cp1, cpl = before[-1], cps[-1]

    def restore(how: str, value: int) -> dict:
        out = os.path.join(work, "restored.img")
        if os.path.exists(out):
            os.unlink(out)
        r = json.loads(xentap("journal", "restore", vbd, *dd, "--to", out, how, str(value),
                              "--json"))
        return r

    def same(a: str, b: str) -> bool:
        # cmp(1): filecmp's Python loop over 256 MiB is many seconds emulated
        return subprocess.run(["cmp", "-s", a, b]).returncode == 0

    restored = os.path.join(work, "restored.img")
    # any point in time: the restore at S1 itself is the disk dom0 copied then
    r = restore("--seq", s1)
    if not same(restored, phase1):
        return fail(f"restore at seq {s1} differs from the disk at the end of phase 1")
    if not r["write_ordered"]:
        return fail(f"restore at seq {s1} says not write-ordered")
    print(f"restored at seq {s1}, the end of phase 1: equal to the disk then")
    r = restore("--checkpoint", cp1["id"])
    if not same(restored, phase1):
        return fail(f"restore at checkpoint {cp1['id']} (seq {cp1['seq']}) differs from the "
                    f"disk at the end of phase 1 (seq {s1})")
    if not r["write_ordered"]:
        return fail(f"restore at checkpoint {cp1['id']} says not write-ordered")
    print(f"restored at the last checkpoint of phase 1 ({cp1['id']}, seq {cp1['seq']}, "
          f"{cp1['kind']}): equal to the disk then")
    r = restore("--checkpoint", cpl["id"])
    if not same(restored, disk):
        return fail(f"restore at the last checkpoint ({cpl['id']}, seq {cpl['seq']}) differs "
                    f"from the disk")
    if not r["write_ordered"]:
        return fail("restore at the last checkpoint says not write-ordered")
    print(f"restored at the last checkpoint ({cpl['id']}, seq {cpl['seq']} of {acked}): "
          f"equal to the disk")
    r = restore("--seq", gap + 1)
    if r["write_ordered"]:
        return fail(f"restore at seq {gap + 1}, inside the window, says write-ordered")
    r = restore("--seq", gap - 1)
    if not r["write_ordered"]:
        return fail(f"restore at seq {gap - 1}, before the window, says not write-ordered")
    print(f"restores inside the window {gap}..{end} say not write-ordered; before it, "
          f"write-ordered")
    os.unlink(restored)
    print(f"FIGURES first_seq={v['first_seq']} last_seq={v['last_seq']} frames={v['frames']} "
          f"checkpoints={len(cps)} gap={gap} resync_end={end} windows={len(wins)} "
          f"resync_records={nres}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
