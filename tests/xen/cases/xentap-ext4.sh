# xentap-ext4: a PV guest whose xvda is served by xentap's shim over the real
# `xen` transport (ring grant-mapped through /dev/xen/gntdev; reads into the
# guest's pages, mapped once with persistent grants, which blkfront asks for
# by default; writes by grant copy; event channels through /dev/xen/evtchn),
# with `xentap daemon`
# doing the xenbus handshake.  The guest boots with `xentap create` on
# xl_scripts/guest-xentap.cfg (xl create -p without the xentap disk, xentap
# attach of a raw image in dom0's tmpfs as xvda, wait for the daemon to
# advertise it, xl unpause) and runs guest/ext4.sh (mkfs.ext4, files of known
# checksums, read back, fsck).  Dom0 then checks the image (e2fsck -fn, the
# files' checksums via debugfs), `xentap status`, and prints what blkfront
# negotiated as METRIC lines.
#
# Protection (off by default; XT_XENTAP_PROTECT=1 turns it on): the
# appliance runs in dom0 (`xentap appliance serve`, keys from `xentap keys`),
# the disk spec says protect=<its endpoint> with its public key, and the
# daemon mirrors every write to it.  After the guest ends: `xentap status`
# shows the mirror stopped with everything acknowledged, no error, no
# overflow, no gap; the appliance's journal verifies (checksums, every seq in
# order from the empty disk up to the last acknowledged one); restoring at
# its last checkpoint gives an image equal to the disk (cmp); `xentap journal
# export-trace` writes the journal as a write trace to
# $XT_OUT/traces/<case>.trace.gz.  The suite runs
# these checks on the appliance domain instead (cases/appliance-domu.sh,
# phase 1 and the end), where the appliance now lives; the suite daemon's
# small mirror ring and spill log (run-cases.sh) may overflow with an
# appliance in dom0 that falls behind.
#
# cases/xentap-negotiate.sh sources this file with
#   XT_XENTAP_GUEST_EXTRA  more guest kernel arguments (xen_blkfront.* options)
#   XT_XENTAP_GUEST_VCPUS  the guest's vcpus (blkfront makes at most one queue per cpu)
#   XT_XENTAP_EXPECT_FE    "key=value ..." the frontend node must hold once connected
#                          (default: feature-persistent=1, blkfront's default)
#   XT_XENTAP_EXPECT_GUEST "key=value ..." the guest's XT-BLKINFO line must hold
# xt-timeout: 1800
# xt-lane: xentap
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=$XT_CASE
extra=${XT_XENTAP_GUEST_EXTRA:-}
vcpus=${XT_XENTAP_GUEST_VCPUS:-1}
expect_fe=${XT_XENTAP_EXPECT_FE:-feature-persistent=1}
expect_guest=${XT_XENTAP_EXPECT_GUEST:-}
protect=${XT_XENTAP_PROTECT:-}
protect=${protect:-0}
img=$XT_WORK/disk.img
dlog=${XT_DAEMON_LOG:-$XT_OUT/cases/$name.daemon.log}
devid=51712                                  # xvda
ROOT=$XT_XS_ROOT
trap 'xentap_daemon_stop; xentap_appliance_stop' EXIT   # run-cases.sh runs the next case

# kv FILE KEY: the value of KEY (a path relative to the node) in a
# `xenstore-ls -f` dump of that node, or "absent".
kv() {
    local v
    v=$(sed -n "s|^[^ ]*/$2 = \"\(.*\)\"\$|\1|p" "$1" | head -1)
    echo "${v:-absent}"
}

rm -f "$img"
truncate -s 256M "$img" || fail "cannot make $img"
disk="vdev=xvda, access=rw, target=$img"
daemon_args=()
if [ "$protect" = 1 ]; then
    ap=$XT_WORK/appliance
    xentap_appliance_start "$ap" "$XT_OUT/cases/$name.appliance.log"
    daemon_args=(--keys-dir "$ap/keys" --state-dir "$XT_WORK/state" --drain-timeout 120)
    disk="vdev=xvda, access=rw, protect=$XT_APPLIANCE_ENDPOINT, protect-key=$ap/keys/appliance.key, target=$img"
fi
# Its `xentap` commands (create; status --json, status and detach after the
# guest; the status check below) run in one interpreter, started now
# (tests/xen/xentap-serve.py): its imports while the daemon starts.
xentap_server_start xentap.cli_vbd,xentap.create,xentap.xenbus,xentap.xl_config
xentap_daemon_start "$dlog" "${daemon_args[@]}"
daemon_pid=${XT_DAEMON_PID:-$xentap_daemon_pid}

# --- the guest, through xentap create (it returns once the guest runs)
start=$(date +%s)
t0=$SECONDS
xentap_guest_create "$name" blkinfo-ext4 "$vcpus" "$extra" "$disk" ||
    { tail -n 30 "$dlog"; fail "xentap create"; }
log "xentap create took $((SECONDS - t0))s"
be=/local/domain/0/backend/xentap/$domid/$devid
fe=/local/domain/$domid/device/vbd/$devid

# Until the guest is gone: note when both ends are Connected and keep what
# they negotiated (the frontend's node goes with the domain).
connected=
while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
    if [ -z "$connected" ] && [ "$(xenstore-read $fe/state 2>/dev/null)" = 4 ] &&
       [ "$(xenstore-read $be/state 2>/dev/null)" = 4 ]; then
        connected=$(( $(date +%s) - start ))
        xenstore-ls -f "$fe" > "$XT_WORK/fe.ls"
        xenstore-ls -f "$be" > "$XT_WORK/be.ls"
        log "frontend and backend Connected ${connected}s after xentap create began"
        sed 's/^/frontend: /' "$XT_WORK/fe.ls"
    fi
    if [ $(( $(date +%s) - start )) -ge 700 ]; then
        log "guest still running after 700s; destroying"
        xl destroy "$domid"
        tail -n 30 "$dlog"
        fail "guest did not finish"
    fi
    sleep 2
done
gone=$(date +%s)
log "guest gone after $(( gone - start ))s"
# The daemon keeps a VBD's counters after its guest ends and publishes them
# every second: take a sample published after the guest was gone (a sample
# taken while it ran may predate its writes; a loaded dom0 polls slowly).
t0=$SECONDS
while :; do
    xenstore-ls -f "$ROOT/vbd/$domid/$devid" > "$XT_WORK/st.ls" 2>/dev/null || : > "$XT_WORK/st.ls"
    [ "$(kv "$XT_WORK/st.ls" updated)" -gt "$gone" ] 2>/dev/null && break
    [ $((SECONDS - t0)) -lt 600 ] ||
        { tail -n 30 "$dlog"; fail "the daemon published no status for the VBD after its guest ended"; }
    sleep 1
done
[ -n "$connected" ] || { tail -n 40 "$dlog"; fail "the VBD never reached Connected on both ends"; }

# --- what the guest said
tr -d '\r' < "$(guest_log "$name")" > "$XT_WORK/guest.log"
grep -E '^(guest|XT-)' "$XT_WORK/guest.log"
grep -qx 'XT-GUEST-RESULT PASS' "$XT_WORK/guest.log" || { tail -n 30 "$dlog"; fail "guest did not report PASS"; }
sed -n "s/^XT-METRIC /METRIC $name /p" "$XT_WORK/guest.log"
blkinfo=$(sed -n 's/^XT-BLKINFO //p' "$XT_WORK/guest.log" | head -1)
[ -n "$blkinfo" ] || fail "guest printed no XT-BLKINFO line"
echo "METRIC $name guest $blkinfo"

# --- what was negotiated (xenstore, while Connected)
fekeys="protocol ring-page-order multi-queue-num-queues feature-persistent"
bekeys="max-ring-page-order multi-queue-max-queues feature-max-indirect-segments
        feature-flush-cache feature-barrier feature-discard feature-persistent sectors"
m="METRIC $name frontend"
for k in $fekeys; do m="$m $k=$(kv "$XT_WORK/fe.ls" "$k")"; done
# Multi-queue frontends put their rings under queue-<q>/.
m="$m queue_dirs=$(grep -c "^$fe/queue-[0-9]*/event-channel = " "$XT_WORK/fe.ls")"
m="$m ring_refs=$(grep -Ec "^$fe/(queue-[0-9]+/)?ring-ref[0-9]* = " "$XT_WORK/fe.ls")"
echo "$m"
m="METRIC $name backend"
for k in $bekeys; do m="$m $k=$(kv "$XT_WORK/be.ls" "$k")"; done
echo "$m"
for kvp in $expect_fe; do
    got=$(kv "$XT_WORK/fe.ls" "${kvp%%=*}")
    [ "$got" = "${kvp#*=}" ] || fail "frontend ${kvp%%=*} is $got, expected ${kvp#*=}"
done
for kvp in $expect_guest; do
    echo " $blkinfo " | grep -q " $kvp " || fail "guest's blkinfo lacks $kvp: $blkinfo"
done
[ -z "$expect_fe$expect_guest" ] || log "negotiated as expected: $expect_fe $expect_guest"
# Reads into grant-mapped pages worked: no queue fell back to copying.
if grep "domain $domid queue [0-9]*: the kernel cannot read into mapped grant pages" "$dlog"; then
    fail "direct reads into the guest's persistently granted pages failed"
fi

# --- the daemon's view: its counters after the guest ended, and now
sed 's/^/status: /' "$XT_WORK/st.ls"
st() { kv "$XT_WORK/st.ls" "$1"; }
echo "METRIC $name status requests=$(st requests) reads=$(st reads) writes=$(st writes)" \
     "flushes=$(st flushes) indirect=$(st indirect) bytes_read=$(st bytes-read)" \
     "bytes_written=$(st bytes-written) errors=$(st errors) queues=$(st queues)"
[ "$(st errors)" = 0 ] || fail "the daemon counted $(st errors) errored requests"
[ "$(st error)" = absent ] || fail "the daemon reported an error: $(st error)"
[ "$(st requests)" -gt 0 ] 2>/dev/null || fail "the daemon counted no requests"
# Indirect requests, seen from dom0: without them a request carries at most
# 11 segments (44 KiB); a larger average write means indirect ones were used.
avg=$(( $(st bytes-written) / ($(st writes) + 1) ))
echo "METRIC $name avg_write_bytes=$avg (44 KiB without indirect)"
if [ "$(kv "$XT_WORK/be.ls" feature-max-indirect-segments)" != absent ] &&
   grep -q 'indirect descriptors: enabled' "$XT_WORK/guest.log"; then
    [ "$avg" -gt 45056 ] || fail "blkfront says indirect is on, but writes average $avg bytes"
    [ "$(st indirect)" -gt 0 ] 2>/dev/null || fail "blkfront says indirect is on, the daemon counted $(st indirect)"
fi
kill -0 "$daemon_pid" 2>/dev/null || { xentap_daemon_pid=; fail "xentap daemon died"; }
if [ "$protect" = 1 ]; then
    # The guest is gone: the mirror drains what is left (bounded) and stops.
    t0=$SECONDS
    until "$XENTAP" status --json | python3.11 -c 'import json, sys
m = [r["mirror"] for r in json.load(sys.stdin)["vbds"] if r["domain"] == int(sys.argv[1])]
sys.exit(0 if m and m[0] and m[0]["state"] in ("stopped", "error") else 1)' "$domid"; do
        [ $((SECONDS - t0)) -lt 150 ] || break      # the daemon drains for up to 120 s
        sleep 1
    done
    log "mirror stopped $((SECONDS - t0))s after the guest ended"
fi
# `xentap status --json`, `xentap status` and `xentap detach`, in order,
# stopping at the first that fails, in the case's interpreter (started
# above); command N's output in cli/N.out, its status in cli/N.rc; the
# status, taken before the detach, is checked after it
xentap_cmds "$XT_WORK/cli" status --json :: status :: detach "$domid" xvda
[ "$(cat "$XT_WORK/cli/1.rc" 2>/dev/null)" = 0 ] ||
    { cat "$XT_WORK/cli/1.out"; fail "xentap status --json"; }
cp "$XT_WORK/cli/1.out" "$XT_WORK/status.json"
cat "$XT_WORK/status.json"
sed 's/^/xentap status: /' "$XT_WORK/cli/2.out"
# (run by the case's xentap interpreter: no emulated python3.11 start-up)
cat > "$XT_WORK/status-check.py" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
bad = []
if s["daemon"]["state"] != "running":
    bad.append(f"daemon state {s['daemon']['state']}")
rows = [r for r in s["vbds"] if r["domain"] == int(sys.argv[2])]
if len(rows) != 1:
    bad.append(f"{len(rows)} VBDs of domain {sys.argv[2]}")
for r in rows:
    if r["error"] or r["errors"]:
        bad.append(f"{r['vdev']}: error {r['error']!r}, {r['errors']} errors")
    if r["state"] != "Closed":
        bad.append(f"{r['vdev']}: backend {r['state']} after the guest ended")
    if r["requests"] == 0 or r["bytes_written"] == 0:   # the final counters stay
        bad.append(f"{r['vdev']}: counters gone after the guest ended: {r}")
    m = r["mirror"]
    if sys.argv[3] == "1":
        if not m:
            bad.append(f"{r['vdev']}: protected, but no mirror status")
        else:
            if m["state"] != "stopped" or m["error"]:
                bad.append(f"{r['vdev']}: mirror {m['state']} {m['error']!r}")
            if m["overflows"] or m["gaps"]:
                bad.append(f"{r['vdev']}: mirror overflows {m['overflows']} gaps {m['gaps']}")
            if m["pending"] or m["spill_bytes"] or m["acked_seq"] != m["next_seq"] - 1 \
                    or m["acked_seq"] == 0:
                bad.append(f"{r['vdev']}: mirror not all acknowledged: {m}")
            print(f"METRIC {sys.argv[4]} mirror acked_seq={m['acked_seq']} "
                  f"lag_p99_ms={m['lag_ms']} overflows={m['overflows']} gaps={m['gaps']} "
                  f"spill_bytes={m['spill_bytes']}")
            open(sys.argv[1] + ".mirror", "w").write(f"{r['vbd_uuid']} {m['acked_seq']}\n")
    elif m is not None:
        bad.append(f"{r['vdev']}: not protected, but mirror status {m}")
print("status:", "; ".join(bad) or "ok")
sys.exit(1 if bad else 0)
EOF
xentap_cmd --python "$XT_WORK/status-check.py" "$XT_WORK/status.json" "$domid" "$protect" "$name" ||
    fail "xentap status --json shows a problem"
[ "$(cat "$XT_WORK/cli/2.rc" 2>/dev/null)" = 0 ] || fail "xentap status"
[ "$(cat "$XT_WORK/cli/3.rc" 2>/dev/null)" = 0 ] || { cat "$XT_WORK/cli/3.out"; fail "xentap detach"; }
cat "$XT_WORK/cli/3.out"
xenstore-exists "$be" 2>/dev/null && fail "backend node still there after detach"
xentap_daemon_stop
grep -n 'Traceback\|WARNING\|error' "$dlog" && log "(daemon log lines above)"
grep -q Traceback "$dlog" && fail "the daemon logged a traceback"

# --- the image, in dom0
verify_image "$img" "$XT_WORK/guest.log" 4

# --- the appliance's journal: every write in order; the last checkpoint is the disk
if [ "$protect" = 1 ]; then
    read -r vbd acked < "$XT_WORK/status.json.mirror" || fail "no mirror figures"
    xentap_appliance_stop
    data=$ap/data
    "$XENTAP" journal verify "$vbd" --data-dir "$data" --json > "$XT_WORK/verify.json" ||
        { cat "$XT_WORK/verify.json"; fail "xentap journal verify $vbd"; }
    "$XENTAP" journal checkpoints "$vbd" --data-dir "$data" --json > "$XT_WORK/cps.json" ||
        fail "xentap journal checkpoints $vbd"
    read -r first last frames cps cp < <(python3.11 -c 'import json, sys
v = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2]))
print(v["first_seq"], v["last_seq"], v["frames"], len(c), c[-1]["id"] if c else "none")' \
        "$XT_WORK/verify.json" "$XT_WORK/cps.json") || fail "cannot read the journal's figures"
    log "journal of $vbd: seqs $first..$last in $frames frames, $cps checkpoints, the last $cp"
    echo "METRIC $name journal first_seq=$first last_seq=$last frames=$frames checkpoints=$cps"
    # first_seq is the journal's base: 0, the empty disk before write 1.
    [ "$first" = 0 ] && [ "$last" = "$acked" ] ||
        fail "the journal holds seqs $first..$last, the daemon had $acked acknowledged"
    [ "$cp" != none ] || fail "the journal has no checkpoint"
    "$XENTAP" journal restore "$vbd" --checkpoint "$cp" --to "$XT_WORK/restored.img" \
        --data-dir "$data" || fail "xentap journal restore $vbd --checkpoint $cp"
    cmp "$XT_WORK/restored.img" "$img" ||
        fail "the image restored at the last checkpoint ($cp) differs from the disk"
    log "restored at the last checkpoint ($cp of $last): equal to the disk"
    # The guest's writes as the appliance journaled them, as an analyzer
    # write trace (host: out/xen/traces/; the small ones kept in tests/data
    # come from cases/xentap-xfs.sh, whose workload is made for it).
    mkdir -p "$XT_OUT/traces"
    "$XENTAP" journal export-trace "$vbd" -o "$XT_OUT/traces/$name.trace.gz" --force \
        --data-dir "$data" || fail "xentap journal export-trace $vbd"
    echo "METRIC $name trace_bytes=$(stat -c %s "$XT_OUT/traces/$name.trace.gz")"
    rm -rf "$XT_WORK/restored.img" "$ap" "$XT_WORK/state"
fi
rm -f "$img"
