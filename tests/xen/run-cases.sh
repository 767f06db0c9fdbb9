#!/bin/bash
# Case runner, run in dom0 by dom0-init.sh.  A case is one file,
# tests/xen/cases/<name>.sh, run with bash in its own process; exit status 0
# means it passed.  The runner prints exactly one `PASS <name>` or
# `FAIL <name>` line per case on the console, and `TIME <name> <seconds>`;
# the case's own output goes to $XT_OUT/cases/<name>.log (out/xen/cases/ on
# the host) and, prefixed with [<name>], to the console.
#
# A case may declare a longer limit with a line `# xt-timeout: <seconds>`
# and a lane with `# xt-lane: <lane>` (default: main).  Cases of one lane run
# one after the other; lanes run side by side (most of a case is waiting on
# an emulated guest or on one single-threaded process, and dom0 has two
# vCPUs).  The lane `first` runs alone before every other (the canary: if
# user space is being corrupted, nothing after it counts).
#
# One xentap daemon serves every case (two daemons would fight over the
# backend tree): started here beside the `first` lane, with dom0's CurveZMQ
# key pair in $XT_KEYS (for protected VBDs) and its log in $XT_DAEMON_LOG;
# cases find it through lib.sh (xentap_daemon_start only checks it runs).
# Its mirror ring (4 MiB) and spill log (8 MiB) are small, so that an
# appliance's outage ends in an overflow, a GAP and a resync (appliance-domu).
# After the last case it is stopped, and a traceback in its log fails the run
# (`XT-DAEMON-TRACEBACK`).
# Helpers for cases are in tests/xen/lib.sh (sourced by the case itself).
cd /
. "$XT_REPO/tests/xen/lib.sh"

run_case() {   # run_case NAME: runs one case, prints its result lines
    local name=$1 file limit log start rc d
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
    # Leave none of its guests behind (they are named after the case; the
    # appliance domain belongs to appliance-domu).
    for d in $(xl list 2>/dev/null | awk 'NR > 1 { print $1 }'); do
        case $d in
            "$name"|"$name"-*) ;;
            xentap-appliance) [ "$name" = appliance-domu ] || continue;;
            *) continue;;
        esac
        echo "[$name] destroying leftover domain $d"; xl destroy "$d"
    done
    echo "TIME $name $(( $(date +%s) - start ))"
    if [ "$rc" = 0 ]; then echo "PASS $name"; else echo "FAIL $name"; fi
}

lane_of() {
    local l
    l=$(sed -n 's/^# xt-lane: *\([A-Za-z0-9_-]*\).*/\1/p' "$XT_REPO/tests/xen/cases/$1.sh" | head -1)
    echo "${l:-main}"
}

# The lanes, in the order the cases were given.
first= lanes=
declare -A lane_cases
for name in $(echo "$XT_CASES" | tr ':' ' '); do
    l=$(lane_of "$name")
    if [ "$l" = first ]; then first="$first $name"; continue; fi
    [ -n "${lane_cases[$l]+x}" ] || lanes="$lanes $l"
    lane_cases[$l]="${lane_cases[$l]} $name"
done

t0=$(date +%s)
# The suite's daemon (see above); it starts (seconds of emulated Python)
# while the `first` lane runs.
export XT_KEYS=/run/xt/keys XT_DAEMON_LOG=$XT_OUT/cases/daemon.log
mkdir -p "$XT_KEYS" /run/xt/state
XT_DAEMON_PID=
if [ -n "$lanes" ]; then
    t=$SECONDS
    # dom0's key pair, made by run.sh on the host (`xentap keys --role dom0`:
    # a second there, tens of seconds of emulated Python here).
    cp "$XT_OUT/keys/dom0.key" "$XT_OUT/keys/dom0.key_secret" "$XT_KEYS/" ||
        echo "XT-SUITE: no dom0 keys in $XT_OUT/keys"
    chmod 600 "$XT_KEYS/dom0.key_secret"
    "$XENTAP" daemon --transport xen -v --keys-dir "$XT_KEYS" --state-dir /run/xt/state \
        --drain-timeout 120 --mirror-ring 4M --spill-limit 8M > "$XT_DAEMON_LOG" 2>&1 &
    export XT_DAEMON_PID=$!
    # The lanes start now; a case that needs the daemon waits for it (lib.sh).
    ( until [ "$(xenstore-read $XT_XS_ROOT/daemon/state 2>/dev/null)" = running ]; do
          kill -0 "$XT_DAEMON_PID" 2>/dev/null || { echo "=== suite daemon: exited"; exit; }
          sleep 0.5
      done
      echo "=== suite daemon: pid $XT_DAEMON_PID, running after $((SECONDS - t))s" ) &
fi


for name in $first; do run_case "$name"; done

lane_pids=
for l in $lanes; do
    ( for name in ${lane_cases[$l]}; do run_case "$name"; done ) &
    lane_pids="$lane_pids $!"
done
[ -z "$lane_pids" ] || wait $lane_pids

if [ -n "$XT_DAEMON_PID" ]; then
    kill -TERM "$XT_DAEMON_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$XT_DAEMON_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$XT_DAEMON_PID" 2>/dev/null
    wait "$XT_DAEMON_PID" 2>/dev/null
    if grep -q Traceback "$XT_DAEMON_LOG"; then
        echo "XT-DAEMON-TRACEBACK (see cases/daemon.log)"
        grep -n -A12 Traceback "$XT_DAEMON_LOG" | head -60
    fi
fi
for d in $(xl list 2>/dev/null | awk 'NR > 2 { print $1 }'); do
    echo "=== destroying leftover domain $d"; xl destroy "$d"
done
echo "=== all cases done after $(( $(date +%s) - t0 ))s"
