# xentap-hotplug: a disk attached to and detached from a running guest.
# The guest boots with `xentap create` on its xentap xvda (dom0 checks the
# hash of what it read); once it runs, dom0 `xentap attach`es a second raw
# image as xvdb, which the guest's blkfront picks up, makes ext4 on, writes,
# reads back and fscks; dom0 then `xentap detach`es it while the guest still
# runs and checks in xenstore that both xvdb nodes and its status are gone;
# the guest sees xvdb vanish, reads xvda again (same hash) and powers off.  Last, dom0
# checks the xvdb image (e2fsck -fn, the files' checksums via debugfs).
# xt-timeout: 1800
# xt-lane: xentap
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=$XT_CASE
boot=$XT_WORK/boot.img
data=$XT_WORK/data.img
dlog=${XT_DAEMON_LOG:-$XT_OUT/cases/$name.daemon.log}
trap 'xentap_daemon_stop' EXIT

rm -f "$boot" "$data"
head -c 4M /dev/urandom > "$boot" && truncate -s 64M "$boot" || fail "cannot make $boot"
boot_sum=$(head -c 4194304 "$boot" | sha256sum | cut -d' ' -f1)
truncate -s 128M "$data" || fail "cannot make $data"
# Its `xentap` commands (create, attach, list, detach, list, detach) run in
# one interpreter, started now (tests/xen/xentap-serve.py: five emulated
# Python start-ups less)
xentap_server_start xentap.cli_vbd,xentap.create,xentap.xenbus,xentap.xl_config
xentap_daemon_start "$dlog"

xentap_guest_create "$name" hotplug 1 "" "vdev=xvda, access=ro, target=$boot" ||
    { tail -n 30 "$dlog"; fail "xentap create"; }
be_a=/local/domain/0/backend/xentap/$domid/51712
be_b=/local/domain/0/backend/xentap/$domid/51728
fe_b=/local/domain/$domid/device/vbd/51728
st_b=$XT_XS_ROOT/vbd/$domid/51728

wait_console "$name" XT-HOTPLUG-READY 400 || { tail -n 30 "$dlog"; fail "guest not ready"; }
t0=$SECONDS
xentap_cmd attach "$domid" "$data" xvdb || fail "xentap attach"
log "xentap attach took $((SECONDS - t0))s"
# (the limit counts from attach's return: its own start-up, emulated Python,
# has taken 80 s of a 90 s limit on a loaded host)
t0=$SECONDS
until [ "$(xenstore-read $be_b/state 2>/dev/null)" = 4 ] &&
      [ "$(xenstore-read $fe_b/state 2>/dev/null)" = 4 ]; do
    [ $((SECONDS - t0)) -lt 120 ] || { xenstore-ls -f "$be_b"; tail -n 30 "$dlog"; fail "xvdb not Connected 120s after attach"; }
    sleep 0.5
done
log "xvdb Connected on both ends $((SECONDS - t0))s after attach returned"
xentap_cmd list | tee "$XT_WORK/list.txt"
grep -Eq "^$domid +xvdb +w +Connected +$data( +-)?\$" "$XT_WORK/list.txt" || fail "xentap list does not show xvdb Connected"

wait_console "$name" XT-HOTPLUG-USED 400 || { tail -n 30 "$dlog"; fail "guest did not use xvdb"; }
# The counters from a status sample published after the guest said it used
# xvdb (its writes completed before it said so): a loaded dom0's daemon has
# published its samples more than 2 s late, and a status round of emulated
# dom0 writes for tens of seconds (every key of 6 VBDs: 36 s).
used=$(date +%s)
stv() { sed -n "s|^$st_b/$1 = \"\(.*\)\"\$|\1|p" "$XT_WORK/st_b.ls"; }
t0=$SECONDS
while :; do
    xenstore-ls -f "$st_b" > "$XT_WORK/st_b.ls" 2>/dev/null || : > "$XT_WORK/st_b.ls"
    [ "$(stv updated)" -gt "$used" ] 2>/dev/null && break
    [ $((SECONDS - t0)) -lt 180 ] ||
        { tail -n 30 "$dlog"; fail "the daemon published no status for xvdb after the guest used it"; }
    sleep 1
done
sed 's/^/status: /' "$XT_WORK/st_b.ls"
[ "$(stv errors)" = 0 ] || fail "xvdb: $(stv errors) errored requests"
[ "$(stv writes)" -gt 0 ] 2>/dev/null || fail "xvdb: no writes counted"
echo "METRIC $name xvdb requests=$(stv requests) writes=$(stv writes) reads=$(stv reads) bytes_written=$(stv bytes-written)"

t0=$SECONDS
# (--timeout: the guest's blkfront has taken more than detach's default 10 s
# to let go on a loaded host, with another case's appliance restarting)
xentap_cmd detach --timeout 600 "$domid" xvdb || { tail -n 30 "$dlog"; fail "xentap detach"; }
log "detached after $((SECONDS - t0))s"
for p in "$be_b" "$fe_b" "$st_b"; do
    xenstore-exists "$p" 2>/dev/null && fail "$p still there after detach"
done
xentap_cmd list > "$XT_WORK/list2.txt" || fail "xentap list"
grep -Eq "^$domid +xvdb " "$XT_WORK/list2.txt" && fail "xentap list still shows xvdb"

# The guest sees xvdb go and powers off.
t0=$SECONDS
while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
    [ $((SECONDS - t0)) -lt 900 ] || { xl destroy "$domid"; fail "guest did not finish"; }
    sleep 1
done
tr -d '\r' < "$(guest_log "$name")" > "$XT_WORK/guest.log"
grep -E '^(guest|XT-)' "$XT_WORK/guest.log"
grep -qx 'XT-HOTPLUG-GONE' "$XT_WORK/guest.log" || fail "the guest did not see xvdb go"
grep -qx 'XT-GUEST-RESULT PASS' "$XT_WORK/guest.log" || fail "guest did not report PASS"
for when in XT-XVDA XT-XVDA-AFTER; do      # before xvdb came, and after it went
    got=$(sed -n "s/^$when //p" "$XT_WORK/guest.log")
    [ "$got" = "$boot_sum" ] || fail "$when: the guest read xvda as $got, dom0 wrote $boot_sum"
done

# (--timeout: the guest is gone; a loaded dom0's daemon has taken more than
# detach's default 10 s to close a VBD)
xentap_cmd detach --timeout 600 "$domid" xvda || fail "xentap detach xvda"
xentap_daemon_stop
grep -q Traceback "$dlog" && { cat "$dlog"; fail "the daemon logged a traceback"; }
verify_image "$data" "$XT_WORK/guest.log" 2
rm -f "$boot" "$data"
