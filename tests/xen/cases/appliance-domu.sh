# appliance-domu: the data-services appliance as its own PV domain, built by
# `make appliance-image` (out/appliance/, made on the host before the run).
#
#   dom0: bridge xenbr0 10.0.0.1/24, dom0's CurveZMQ key pair, xentap daemon
#   `xentap appliance create`: the appliance domain with its vif on xenbr0
#     (Debian's vif-bridge) and its journal disk a xentap VBD served by the
#     daemon; it formats the disk, makes its key pair there, serves, and
#     announces endpoint + public key + state in xenstore (granted by dom0)
#   tests/xen/appliance-mirror.py: dom0 finds the appliance in xenstore and
#     mirrors a guest's writes (the shim's simulated guest: the Xen daemon does
#     not mirror yet) over the vif with CurveZMQ until all are acknowledged
#   `xentap appliance destroy` (clean shutdown); the journal disk, read in
#     dom0 with debugfs, holds a replica equal to the guest's disk
#   `xentap journal restore` (in dom0, from the journal disk) at the last
#     checkpoint equals the guest's disk
#   a second `xentap appliance create` on the same journal disk: no new
#     format, the same public key, ready again; then `destroy --force`
# METRIC lines: boot time (create to ready), image size, memory, mirror MiB/s.
# xt-timeout: 1200
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=xentap-appliance
IMG=$XT_REPO/out/appliance
dlog=$XT_OUT/cases/$XT_CASE.daemon.log
journal=$XT_WORK/journal.img
trap 'xl destroy $name >/dev/null 2>&1; xentap_daemon_stop' EXIT

[ -s "$IMG/appliance.cpio.gz" ] && [ -s "$IMG/vmlinuz" ] ||
    fail "no appliance image in $IMG: run 'make appliance-image' on the host first"
echo "METRIC $XT_CASE image root_bytes=$(stat -c %s "$IMG/appliance.cpio.gz")" \
     "kernel_bytes=$(stat -c %s "$IMG/vmlinuz")"

# --- dom0: the bridge, keys, the daemon
modprobe xen-netback || fail "modprobe xen-netback"
modprobe bridge || fail "modprobe bridge"
ip link add xenbr0 type bridge && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up ||
    fail "cannot make bridge xenbr0"
"$XENTAP" keys --dir "$XT_WORK/keys" --role dom0 >/dev/null || fail "xentap keys"
# The image from dom0's tmpfs (xl reads it much faster than over 9p).  The
# suite's guest kernel is the same package's, uncompressed: xl then skips
# 10-30 s of emulated xz decompression.
mkdir -p "$XT_WORK/img"
cp "$IMG/appliance.cpio.gz" "$XT_WORK/img/" || fail "copy the image"
if [ "$(cat "$IMG/kernel-version" 2>/dev/null)" = "$XT_KVER" ]; then
    cp "$XT_GUEST_KERNEL" "$XT_WORK/img/vmlinuz"
else
    log "the image's kernel is not $XT_KVER: using its vmlinuz as is"
    cp "$IMG/vmlinuz" "$XT_WORK/img/vmlinuz"
fi
xentap_daemon_start "$dlog"

# appliance_up: xentap appliance create, waits for `ready` in xenstore.
appliance_up() {
    local t0=$SECONDS
    "$XENTAP" appliance create --image "$XT_WORK/img" --ip 10.0.0.2/24 --keys "$XT_WORK/keys" \
        --journal "$journal" --journal-size 512M --wait 240 ||
        { tail -n 30 "$(guest_log $name)"; tail -n 20 "$dlog"; fail "xentap appliance create"; }
    boot_s=$((SECONDS - t0))
    log "appliance ready ${boot_s}s after xentap appliance create"
    "$XENTAP" appliance status || fail "xentap appliance status"
    "$XENTAP" appliance status --json > "$XT_WORK/status.json" || fail "xentap appliance status --json"
}
key_of() { python3.11 -c 'import json,sys; print(json.load(open(sys.argv[1]))["public_key"])' "$1"; }

# --- first boot: formats the journal disk
appliance_up
boot1=$boot_s
key1=$(key_of "$XT_WORK/status.json")
dom1=$(python3.11 -c 'import json,sys; print(json.load(open(sys.argv[1]))["domain"])' "$XT_WORK/status.json")
[ ${#key1} = 40 ] || fail "no public key in xenstore: $(cat "$XT_WORK/status.json")"
mem=$(xl list $name | awk 'NR == 2 { print $3 }')
busybox ping -c 1 -W 5 10.0.0.2 >/dev/null || fail "dom0 cannot ping the appliance"

# --- dom0 finds it in xenstore and mirrors a guest's writes to it
"$XT_REPO/.venv/bin/python" "$XT_REPO/tests/xen/appliance-mirror.py" --name $name \
    --keys "$XT_WORK/keys" --image "$XT_WORK/disk.img" --workdir "$XT_WORK/mirror" \
    --size-mib 32 --seconds 4 > "$XT_WORK/mirror.out" 2>&1
rc=$?
cat "$XT_WORK/mirror.out"
[ $rc = 0 ] || { tail -n 20 "$(guest_log $name)"; fail "mirroring to the appliance domain"; }
grep '^METRIC ' "$XT_WORK/mirror.out"
read -r _ vbd want < <(grep '^VBD ' "$XT_WORK/mirror.out")
[ -n "$vbd" ] || fail "no VBD line"

# --- clean shutdown; the journal disk is read in dom0
t0=$SECONDS
"$XENTAP" appliance destroy || fail "xentap appliance destroy"
log "appliance shut down in $((SECONDS - t0))s"
tr -d '\r' < "$(guest_log $name)" | grep '^appliance:' | sed 's/^/console: /'
xenstore-exists "$XT_XS_ROOT/appliance/$dom1" 2>/dev/null && fail "appliance node left in xenstore"
debugfs -R "ls -l /data/$vbd" "$journal" 2>/dev/null | sed 's/^/journal disk: /'
rm -f "$XT_WORK/replica.img"
debugfs -R "dump /data/$vbd/replica.img $XT_WORK/replica.img" "$journal" 2>/dev/null
[ -s "$XT_WORK/replica.img" ] || fail "no replica of $vbd on the journal disk"
got=$(sha256sum < "$XT_WORK/replica.img" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "the appliance's replica hashes $got, the guest's disk $want"
log "the journal disk's replica equals the guest's disk ($want)"
# The journal: restored at its last checkpoint (the one the writer tagged
# after its last write), the disk again.
rm -rf "$XT_WORK/data"; mkdir -p "$XT_WORK/data"
debugfs -R "rdump /data/$vbd $XT_WORK/data" "$journal" 2>/dev/null
"$XENTAP" journal checkpoints "$vbd" --data-dir "$XT_WORK/data" --last 1 --json > "$XT_WORK/cp.json" ||
    fail "xentap journal checkpoints"
cp_id=$(python3.11 -c 'import json,sys; c=json.load(open(sys.argv[1]))[-1]; assert c["label"] == "appliance-domu-end", c; print(c["id"])' "$XT_WORK/cp.json") ||
    fail "the last checkpoint is not the writer's: $(cat "$XT_WORK/cp.json")"
"$XENTAP" journal restore "$vbd" --data-dir "$XT_WORK/data" --checkpoint "$cp_id" --to "$XT_WORK/restored.img" ||
    fail "xentap journal restore"
got=$(sha256sum < "$XT_WORK/restored.img" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "restore at checkpoint $cp_id hashes $got, the guest's disk $want"
log "restore at the last checkpoint ($cp_id) equals the guest's disk"
rm -rf "$XT_WORK/data" "$XT_WORK/restored.img" "$XT_WORK/replica.img"

# --- second boot on the same journal disk: no format, the same key
appliance_up
key2=$(key_of "$XT_WORK/status.json")
[ "$key2" = "$key1" ] || fail "the appliance's key changed across restart: $key1 -> $key2"
# (The key lives on the journal disk: the same key means it was not reformatted.)
n=$(tr -d '\r' < "$(guest_log $name)" | grep -c 'formatting the journal disk')
[ "$n" -le 1 ] || fail "the journal disk was formatted $n times"
"$XENTAP" appliance destroy --force || fail "xentap appliance destroy --force"
"$XENTAP" appliance status > /dev/null 2>&1 && fail "status says running after destroy"
echo "METRIC $XT_CASE boot create_to_ready_s=$boot1 second_boot_s=$boot_s memory_mib=$mem"
grep -q Traceback "$dlog" && fail "the daemon logged a traceback"
exit 0
