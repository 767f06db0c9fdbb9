# xentap-ext4: a PV guest whose xvda is served by xentap's shim over the real
# `xen` transport (ring grant-mapped through /dev/xen/gntdev, data moved by
# grant copy, event channels through /dev/xen/evtchn), with `xentap daemon`
# doing the xenbus handshake.  The guest boots with `xentap create` on
# xl_scripts/guest-xentap.cfg (xl create -p without the xentap disk, xentap
# attach of a raw image in dom0's tmpfs as xvda, wait for the daemon to
# advertise it, xl unpause) and runs guest/ext4.sh (mkfs.ext4, files of known
# checksums, read back, fsck).  Dom0 then checks the image (e2fsck -fn, the
# files' checksums via debugfs), `xentap status`, and prints what blkfront
# negotiated as METRIC lines.
#
# cases/xentap-negotiate.sh sources this file with
#   XT_XENTAP_GUEST_EXTRA  more guest kernel arguments (xen_blkfront.* options)
#   XT_XENTAP_GUEST_VCPUS  the guest's vcpus (blkfront makes at most one queue per cpu)
#   XT_XENTAP_EXPECT_FE    "key=value ..." the frontend node must hold once connected
#   XT_XENTAP_EXPECT_GUEST "key=value ..." the guest's XT-BLKINFO line must hold
# xt-timeout: 450
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=$XT_CASE
extra=${XT_XENTAP_GUEST_EXTRA:-}
vcpus=${XT_XENTAP_GUEST_VCPUS:-1}
expect_fe=${XT_XENTAP_EXPECT_FE:-}
expect_guest=${XT_XENTAP_EXPECT_GUEST:-}
img=$XT_WORK/disk.img
dlog=$XT_OUT/cases/$name.daemon.log
devid=51712                                  # xvda
ROOT=$XT_XS_ROOT
trap 'xentap_daemon_stop' EXIT               # run-cases.sh runs the next case

# kv FILE KEY: the value of KEY (a path relative to the node) in a
# `xenstore-ls -f` dump of that node, or "absent".
kv() {
    local v
    v=$(sed -n "s|^[^ ]*/$2 = \"\(.*\)\"\$|\1|p" "$1" | head -1)
    echo "${v:-absent}"
}

rm -f "$img"
truncate -s 256M "$img" || fail "cannot make $img"
xentap_daemon_start "$dlog"
daemon_pid=$xentap_daemon_pid

# --- the guest, through xentap create (it returns once the guest runs)
start=$(date +%s)
t0=$SECONDS
xentap_guest_create "$name" blkinfo-ext4 "$vcpus" "$extra" "vdev=xvda, access=rw, target=$img" ||
    { tail -n 30 "$dlog"; fail "xentap create"; }
log "xentap create took $((SECONDS - t0))s"
be=/local/domain/0/backend/xentap/$domid/$devid
fe=/local/domain/$domid/device/vbd/$devid

# Until the guest is gone: note when both ends are Connected and keep what
# they negotiated (the frontend's node goes with the domain), and keep the
# last status the daemon published while the guest ran.
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
    xenstore-ls -f "$ROOT/vbd/$domid/$devid" > "$XT_WORK/st.tmp" 2>/dev/null &&
        mv "$XT_WORK/st.tmp" "$XT_WORK/st.ls"
    if [ $(( $(date +%s) - start )) -ge 330 ]; then
        log "guest still running after 330s; destroying"
        xl destroy "$domid"
        tail -n 30 "$dlog"
        fail "guest did not finish"
    fi
    sleep 2
done
log "guest gone after $(( $(date +%s) - start ))s"
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

# --- the daemon's view: the last status while the guest ran, and now
[ -s "$XT_WORK/st.ls" ] || fail "the daemon published no status for the VBD"
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
"$XENTAP" status --json > "$XT_WORK/status.json" || fail "xentap status --json"
cat "$XT_WORK/status.json"
python3.11 - "$XT_WORK/status.json" "$domid" <<'EOF' || fail "xentap status --json shows a problem"
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
print("status:", "; ".join(bad) or "ok")
sys.exit(1 if bad else 0)
EOF
"$XENTAP" detach "$domid" xvda || fail "xentap detach"
xenstore-exists "$be" 2>/dev/null && fail "backend node still there after detach"
xentap_daemon_stop
grep -n 'Traceback\|WARNING\|error' "$dlog" && log "(daemon log lines above)"
grep -q Traceback "$dlog" && fail "the daemon logged a traceback"

# --- the image, in dom0
verify_image "$img" "$XT_WORK/guest.log" 4
rm -f "$img"
