# appliance-throughput: the mirror's throughput from dom0 to the appliance
# domain over its vif, and to an appliance process in dom0 over loopback,
# measured side by side in the same run and the same dom0 (emulated: only the
# ratio vif/loopback means anything).  Issue #9's last figure.
#
#   dom0: bridge xtbr9 10.0.9.1/24 (its own, not appliance-domu's xenbr0); the
#     suite's xentap daemon (it serves the appliance's journal and root disks)
#   `xentap appliance create` (as appliance-domu does, but the domain is
#     named after this case, address 10.0.9.2): the appliance domain, ready
#     when it announces its endpoint and key in xenstore
#   tests/xen/appliance-mirror.py (one interpreter): an appliance in dom0
#     (`python3 -m xentap.cli_appliance serve`, what the domain runs, its data
#     on dom0's tmpfs) on 127.0.0.1; two VBDs served by the shim to simulated
#     guests, each mirrored by the daemon's drainer with CurveZMQ, one to the
#     domain, one to the local appliance.  Rounds alternate between them
#     (5 per side, after an unmeasured 8 MiB one of each); a round: the
#     drainer held, the guest writes 30 MiB (1 MiB writes) into the mirror
#     ring, then the drainer is released and timed until the
#     appliance acknowledged the last record (its journal synced): the mirror
#     alone (drainer + CurveZMQ + TCP + appliance journal), not the guest.
#     CPU per part over each drain: drainer, libzmq, daemon, local
#     appliance, the appliance domain (xl list), all of dom0.  A reconnection
#     of the drainer during a drain (the appliance silent for 10 s, seen
#     under emulation) is reported and stays in that round's time; a spill,
#     overflow or gap, or the local appliance's replica differing from its
#     disk, fails the case.
# METRIC lines: `vif_mb_s= loopback_mb_s= ratio=`, per side, CPU, image,
# boot and memory of the appliance domain.
# xt-opt-in: a measurement, not a check (README's vif/loopback mirror figure; ~8 min of a run: the appliance's boot, 2 x 6 rounds); run it by naming it
# xt-lane: throughput
# xt-timeout: 1200
. "$XT_REPO/tests/xen/lib.sh"
set -u
ap=$XT_CASE                                # the appliance domain's name (run-cases.sh cleans up after it)
IMG=$XT_REPO/out/appliance
dlog=${XT_DAEMON_LOG:-$XT_OUT/cases/$XT_CASE.daemon.log}
journal=$XT_WORK/journal.img
br=xtbr9
trap 'xl destroy $ap >/dev/null 2>&1; xentap_daemon_stop' EXIT

[ -s "$IMG/appliance.cpio.gz" ] && [ -s "$IMG/vmlinuz" ] ||
    fail "no appliance image in $IMG: run 'make appliance-image' on the host first"
echo "METRIC $XT_CASE image boot_initramfs_bytes=$(stat -c %s "$IMG/appliance.cpio.gz")" \
     "root_disk_bytes=$(stat -c %s "$IMG/root.img" 2>/dev/null || echo 0)" \
     "root_disk_allocated=$(du -B1 "$IMG/root.img" 2>/dev/null | cut -f1)" \
     "kernel_bytes=$(stat -c %s "$IMG/vmlinuz")"

# --- dom0: the bridge, lo (dom0's init leaves it down), keys, the daemon
modprobe xen-netback || fail "modprobe xen-netback"
modprobe bridge || fail "modprobe bridge"
ip link add $br type bridge && ip addr add 10.0.9.1/24 dev $br && ip link set $br up ||
    fail "cannot make bridge $br"
ip link set lo up || fail "cannot bring lo up"
keys=${XT_KEYS:-$XT_WORK/keys}
if [ -z "${XT_KEYS:-}" ]; then
    "$XENTAP" keys --dir "$keys" --role dom0 >/dev/null || fail "xentap keys"
fi
# the image from dom0's tmpfs, the run's (uncompressed) kernel when it is the same (see appliance-domu)
mkdir -p "$XT_WORK/img"
cp "$IMG/appliance.cpio.gz" "$XT_WORK/img/" || fail "copy the image"
if [ -f "$IMG/root.img" ]; then
    cp --sparse=always "$IMG/root.img" "$XT_WORK/img/" || fail "copy the root disk"
fi
if [ "$(cat "$IMG/kernel-version" 2>/dev/null)" = "$XT_KVER" ]; then
    cp "$XT_GUEST_KERNEL" "$XT_WORK/img/vmlinuz"
else
    log "the image's kernel is not $XT_KVER: using its vmlinuz as is"
    cp "$IMG/vmlinuz" "$XT_WORK/img/vmlinuz"
fi
xentap_daemon_start "$dlog" --keys-dir "$keys" --state-dir "$XT_WORK/state" --drain-timeout 120 \
    --mirror-ring 4M --spill-limit 8M

# --- the appliance domain
t0=$SECONDS
"$XENTAP" appliance create --image "$XT_WORK/img" --ip 10.0.9.2/24 --keys "$keys" \
    --journal "$journal" --journal-size 512M --wait 600 --json "name='$ap'" \
    "vif=[ 'mac=00:16:3e:78:74:09, bridge=$br, script=$XT_REPO/xl_scripts/vif-xentap' ]" \
    > "$XT_WORK/create.out" ||
    { cat "$XT_WORK/create.out"; tail -n 30 "$(guest_log "$ap")"; tail -n 20 "$dlog"; fail "xentap appliance create"; }
boot=$((SECONDS - t0))
sed '$d' "$XT_WORK/create.out"
log "appliance $ap ready ${boot}s after xentap appliance create"
mem=$(xl list "$ap" | awk 'NR == 2 { print $3 }')
vcpus=$(xl list "$ap" | awk 'NR == 2 { print $4 }')
busybox ping -c 1 -W 5 10.0.9.2 >/dev/null || fail "dom0 cannot ping the appliance"
echo "METRIC $XT_CASE boot create_to_ready_s=$boot memory_mib=$mem vcpus=$vcpus"

# --- the measurement (dom0's and the domain's CPU: xl list; the daemon's: its pid)
"$XT_REPO/.venv/bin/python" "$XT_REPO/tests/xen/appliance-mirror.py" --name "$ap" --keys "$keys" \
    --workdir "$XT_WORK/mirror" --size-mib 30 --rounds 5 --daemon-pid "${XT_DAEMON_PID:-0}" \
    --metric "$XT_CASE" > "$XT_WORK/mirror.out" 2>&1
rc=$?
cat "$XT_WORK/mirror.out"
xl list | sed 's/^/xl list: /'
tr -d '\r' < "$(guest_log "$ap")" | grep '^appliance:' | tail -n 5 | sed 's/^/console: /'
[ $rc = 0 ] || fail "appliance-mirror.py exited $rc"
grep -q "^METRIC $XT_CASE vif_mb_s=" "$XT_WORK/mirror.out" || fail "no vif/loopback figure"
grep -q Traceback "$dlog" && fail "the daemon logged a traceback"
rm -rf "$XT_WORK/mirror" "$journal" "$XT_WORK/img"
exit 0
