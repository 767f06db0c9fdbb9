#!/bin/bash
# Case runner, run in dom0 by dom0-init.sh.  A case is one file,
# tests/xen/cases/<name>.sh, run with bash in its own process; exit status 0
# means it passed.  The runner prints exactly one `PASS <name>` or
# `FAIL <name>` line per case on the console; the case's own output goes to
# $XT_OUT/cases/<name>.log (out/xen/cases/ on the host) and to the console.
#
# A case may declare a longer limit with a line `# xt-timeout: <seconds>`.
# Helpers for cases are in tests/xen/lib.sh (sourced by the case itself).
cd /
for name in $(echo "$XT_CASES" | tr ':' ' '); do
    file=$XT_REPO/tests/xen/cases/$name.sh
    limit=$(sed -n 's/^# xt-timeout: *\([0-9]*\).*/\1/p' "$file" | head -1)
    limit=${limit:-$XT_CASE_TIMEOUT}
    log=$XT_OUT/cases/$name.log
    mkdir -p "$XT_OUT/cases" "/run/xt/$name"
    echo "=== case $name (limit ${limit}s)"
    start=$(date +%s)
    # The case's output is prefixed so that a stray "PASS x" in it cannot be
    # mistaken for a result line.
    XT_CASE=$name XT_WORK=/run/xt/$name \
        timeout -k 5 "$limit" bash "$file" </dev/null 2>&1 |
        tee "$log" | sed -u "s/^/[$name] /"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "[$name] timed out after ${limit}s"
    echo "=== case $name: exit $rc after $(( $(date +%s) - start ))s"
    if [ "$rc" = 0 ]; then echo "PASS $name"; else echo "FAIL $name"; fi
    # Leave no guest behind for the next case.
    for d in $(xl list 2>/dev/null | awk 'NR > 2 { print $1 }'); do
        echo "[$name] destroying leftover domain $d"; xl destroy "$d"
    done
done
