# appliance-domu: the data-services appliance as its own PV domain (built by
# `make appliance-image`, out/appliance/, made on the host before the run)
# protecting a real PV guest's xentap disk, and an outage of the appliance.
#
#   dom0: bridge xenbr0 10.0.0.1/24; the suite's xentap daemon (run-cases.sh:
#     dom0's CurveZMQ pair in $XT_KEYS, mirror ring 4 MiB, spill log 8 MiB)
#   `xentap appliance create`: the appliance domain (a boot initramfs and a
#     read-only root disk, root.img, served as xvdb by the daemon), its vif on xenbr0
#     (the project's xl_scripts/vif-xentap; Debian's vif-bridge has overrun
#     libxl's 40 s hotplug limit with cases side by side), its journal disk a xentap VBD served by the
#     daemon (not mirrored); it formats the disk, makes its key pair there,
#     serves, announces endpoint + public key + state in xenstore
#   the guest: `xentap create` with xvda `protect=xentap-appliance` (the
#     daemon finds the appliance's endpoint and key in xenstore) and a go
#     disk xvdb (read-only; dom0 writes goN into its first sector, the guest
#     polls it), booted as soon as the appliance domain exists: it waits for
#     go1 while the appliance starts.  guest/outage.sh runs an ext4 workload
#     in three phases:
#   1. (go1 once the appliance is ready) mkfs + files; dom0 waits until the
#      appliance acknowledged every write (status: no error, overflow or
#      gap) and copies the disk (seq S1)
#   2. go2, the guest writes 20 MiB; as soon as it starts, dom0 `xl
#      destroy`s the appliance: the guest goes on, the ring and spill log
#      overflow (more than their 12 MiB while no appliance runs, before it
#      is back: checked); once the spill log is half full, `xentap appliance create` again (same journal
#      disk: no format, the same key; the stale journal VBD of the dead
#      domain is cleared), while the guest may still write: the daemon's
#      drainer reconnects, sends what it kept, a GAP and a RESYNC of the
#      chunks it missed
#   3. once everything is acknowledged, go3: the guest writes one more
#      file, reads every file back, fscks, powers off
#   After the guest ended: `xentap status` shows the mirror stopped with every
#   write acknowledged, no error, and the overflow and GAP; the guest saw no
#   I/O error and its files are intact (guest and dom0 hashes, e2fsck);
#   `xentap appliance destroy` (clean), and the journal disk, mounted in
#   dom0, is checked with `xentap journal` (tests/xen/journal-check.py runs
#   the commands in one interpreter): verify (every seq from 0, the
#   empty disk, to the last acknowledged one, checksums); the restore at the
#   last checkpoint up to S1 equals the copy of phase 1; the restore at the
#   last checkpoint equals the disk, and so does the appliance's replica; the
#   journal holds one GAP..RESYNC_END window, after S1, whose checkpoints are
#   all marked not consistent and a restore inside which says it is not
#   write-ordered, while one before it is.
# METRIC lines: boot times, image size, memory, catch-up after the restart.
# xt-lane: appliance
# xt-timeout: 3000
. "$XT_REPO/tests/xen/lib.sh"
set -u
ap=xentap-appliance                        # the appliance domain's name
name=$XT_CASE                              # the guest's
IMG=$XT_REPO/out/appliance
dlog=${XT_DAEMON_LOG:-$XT_OUT/cases/$name.daemon.log}
journal=$XT_WORK/journal.img
disk=$XT_WORK/disk.img
sig=$XT_WORK/go.img
jm=$XT_WORK/jmnt
devid=51712
keys=${XT_KEYS:-$XT_WORK/keys}
trap 'xl destroy $ap >/dev/null 2>&1; xl destroy $name >/dev/null 2>&1; umount "$jm" 2>/dev/null; kill $(jobs -p) 2>/dev/null; xentap_daemon_stop' EXIT
log "appliance-domu starts"

[ -s "$IMG/appliance.cpio.gz" ] && [ -s "$IMG/vmlinuz" ] ||
    fail "no appliance image in $IMG: run 'make appliance-image' on the host first"
echo "METRIC $XT_CASE image boot_initramfs_bytes=$(stat -c %s "$IMG/appliance.cpio.gz")" \
     "root_disk_bytes=$(stat -c %s "$IMG/root.img" 2>/dev/null || echo 0)" \
     "root_disk_allocated=$(du -B1 "$IMG/root.img" 2>/dev/null | cut -f1)" \
     "kernel_bytes=$(stat -c %s "$IMG/vmlinuz")"

# `xentap appliance create` (it waits for `ready` in xenstore), in the
# background; appliance_up waits for it.  The first one's interpreter starts
# with the case (appliance_prestart: tests/xen/xentap-after.py, its imports,
# tens of seconds of emulated Python in dom0, while the suite's daemon
# starts) and goes on at appliance_start 1; the second runs in the case's
# xentap interpreter (xentap-serve.py, started after the first boot: its
# imports during phase 1), appliance_start 2.  create's last line is what
# `xentap appliance status --json` prints (apstatus.json: no second CLI
# start-up).  appliance_up sets boot_s, apkey and apdom.
create_args=(appliance create --image "$XT_WORK/img" --ip 10.0.0.2/24 --keys "$keys"
    --journal "$journal" --journal-size 512M --wait 900 --open-wait 600 --json
    "vif=[ 'mac=00:16:3e:78:74:02, bridge=xenbr0, script=$XT_REPO/xl_scripts/vif-xentap' ]")
appliance_prestart() {
    rm -f "$XT_WORK/create-go"
    "$XT_REPO/.venv/bin/python" "$XT_REPO/tests/xen/xentap-after.py" "$XT_WORK/create-go" \
        --preload xentap.cli_appliance,xentap.appliance_domain,xentap.keys,xentap.create,xentap.xenbus,xentap.xl_config,xentap.appliance_node,xentap.cli_vbd \
        -- "${create_args[@]}" > "$XT_WORK/create.out" 2> "$XT_WORK/create.err" &
    create_pid=$!
}
appliance_start() {
    create_t0=$SECONDS
    if [ "$1" = 1 ]; then
        touch "$XT_WORK/create-go"
    else
        xentap_cmd "${create_args[@]}" > "$XT_WORK/create.out" 2> "$XT_WORK/create.err" &
        create_pid=$!
    fi
    log "xentap appliance create (pid $create_pid; its interpreter started before)"
}
appliance_up() {
    wait "$create_pid" ||
        { cat "$XT_WORK/create.out" "$XT_WORK/create.err"; tail -n 30 "$(guest_log $ap)"; tail -n 20 "$dlog"; fail "xentap appliance create"; }
    boot_s=$((SECONDS - create_t0))
    cat "$XT_WORK/create.err"
    sed '$d' "$XT_WORK/create.out"
    tail -n 1 "$XT_WORK/create.out" > "$XT_WORK/apstatus.json"
    log "appliance ready ${boot_s}s after xentap appliance create"
    cat "$XT_WORK/apstatus.json"
    read -r apkey apdom < <(jget "$XT_WORK/apstatus.json" public_key domain)
}
# jget FILE KEY...: the values of the JSON object's keys (strings without
# escapes, numbers, true/false), on one line: the first occurrence of each
# key, which for `json.dumps(..., sort_keys=True)` of status (domain,
# endpoint, ..., public_key, running, state, vbds) is the top level's.
# (sed, not python3.11: each emulated interpreter start is 20-40 s.)
jget() {
    local f=$1 k v out=; shift
    for k in "$@"; do
        v=$(tr -d '\n' < "$f" | grep -o "\"$k\": *\(\"[^\"\\]*\"\|[-0-9.a-z]*\)" | head -n 1 |
            sed 's/^[^:]*: *//; s/^"\(.*\)"$/\1/')
        out="$out${out:+ }$v"
    done
    echo "$out"
}

# --- the interpreters of the first `xentap appliance create` and of the
# guest's `xentap create` start now (their imports while the rest of the
# set-up and the suite's daemon start); they go on once the daemon runs and
# once the appliance domain exists.
appliance_prestart
rm -f "$XT_WORK/guest-go"
xentap_guest_create_after "$XT_WORK/guest-go" "$name" outage 1 "" \
    "vdev=xvda, access=rw, protect=$ap, target=$disk" "vdev=xvdb, access=ro, target=$sig"

# --- dom0: the bridge, keys, the daemon
modprobe xen-netback || fail "modprobe xen-netback"
modprobe bridge || fail "modprobe bridge"
ip link add xenbr0 type bridge && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up ||
    fail "cannot make bridge xenbr0"
if [ -z "${XT_KEYS:-}" ]; then
    "$XENTAP" keys --dir "$keys" --role dom0 >/dev/null || fail "xentap keys"
fi
# The image from dom0's tmpfs (xl reads it much faster than over 9p).  The
# suite's guest kernel is the same package's, uncompressed: xl then skips
# 10-30 s of emulated xz decompression.
mkdir -p "$XT_WORK/img"
cp "$IMG/appliance.cpio.gz" "$XT_WORK/img/" || fail "copy the image"
# The root disk (when the image has one; `xentap appliance create` serves it
# as the appliance's read-only xvdb).
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

# st KEY: the guest VBD's status key (what the daemon publishes each second)
st() { xenstore-read "$XT_XS_ROOT/vbd/$domid/$devid/$1" 2>/dev/null; }
# snap: all of them at once into S[KEY] (one xenstore-ls, not one
# xenstore-read per key: each process is seconds in a loaded emulated dom0,
# and mirror_line's ten took 20 s before go1 once)
declare -A S
snap() {
    local line k
    S=()
    while IFS= read -r line; do
        k=${line%% = *} && k=${k##*/}
        line=${line#* = \"} && S[$k]=${line%\"}
    done < <(xenstore-ls -f "$XT_XS_ROOT/vbd/$domid/$devid" 2>/dev/null)
}
mirror_line() {
    snap
    echo "mirror ${S[mirror]:-} acked=${S[mirror-acked-seq]:-} next=${S[mirror-next-seq]:-}" \
         "pending=${S[mirror-pending]:-} spill=${S[mirror-spill-bytes]:-} ring=${S[mirror-ring-bytes]:-}" \
         "overflows=${S[mirror-overflows]:-} gaps=${S[mirror-gaps]:-} errors=${S[errors]:-} error='${S[mirror-error]:-}'"
}
# go N: the go for the guest's phase N (guest/outage.sh reads xvdb's first
# sector with O_DIRECT; the daemon serves the file through the page cache).
go() {
    printf 'go%s\n' "$1" | dd of="$sig" bs=512 count=1 conv=notrunc,fsync 2>/dev/null ||
        fail "cannot write go$1"
    log "go$1"
}
# caught_up LIMIT: waits until the appliance acknowledged every write made so
# far and nothing is pending or spilled (two samples, 2 s apart, agree).
caught_up() {
    local limit=$1 t0=$SECONDS a n prev=
    while :; do
        snap      # (one sample: the keys of one status round)
        a=${S[mirror-acked-seq]:-} n=${S[mirror-next-seq]:-}
        if [ "${S[mirror]:-}" = connected ] && [ -n "$a" ] && [ -n "$n" ] && [ "$a" = $((n - 1)) ] &&
           [ "${S[mirror-pending]:-}" = 0 ] && [ "${S[mirror-spill-bytes]:-}" = 0 ]; then
            [ "$prev" = "$a" ] && { log "caught up: $(mirror_line)"; return 0; }
            prev=$a
        else
            prev=
        fi
        [ $((SECONDS - t0)) -lt "$limit" ] || { log "not caught up after ${limit}s: $(mirror_line)"; return 1; }
        sleep 2
    done
}

# --- the appliance, first boot (it formats the journal disk), and the guest,
# its disk protected by the appliance domain, booted meanwhile: it waits for
# go1 before it writes (until the appliance announces its endpoint the
# daemon's drainer cannot start, and the mirror ring alone is 4 MiB)
rm -f "$disk" "$sig"
truncate -s 256M "$disk" && truncate -s 8M "$sig" || fail "cannot make the images"
appliance_start 1
# `xentap create` names the appliance (protect=): it must be granted its
# xenstore node, which create does right after `xl create`
t0=$SECONDS
until grep -q "^appliance $ap is domain" "$XT_WORK/create.out" 2>/dev/null; do
    kill -0 "$create_pid" 2>/dev/null || appliance_up
    [ $((SECONDS - t0)) -lt 900 ] || fail "no appliance domain after 900s: $(cat "$XT_WORK/create.out")"
    sleep 1
done
log "the appliance domain exists; the guest boots while it starts"
touch "$XT_WORK/guest-go"
xentap_guest_create_wait "$name" || { tail -n 30 "$dlog"; fail "xentap create"; }
vbd=$(xenstore-read "/local/domain/0/backend/xentap/$domid/$devid/vbd-uuid") || fail "no vbd-uuid"
log "guest $name: domain $domid, its xvda is stream $vbd"
appliance_up
boot1=$boot_s key1=$apkey dom1=$apdom
[ ${#key1} = 40 ] || fail "no public key in xenstore: $(cat "$XT_WORK/apstatus.json")"
# (xenstore, where xl looks too: each xl call is seconds of emulated CPU)
[ "$(xenstore-read "/local/domain/$dom1/name" 2>/dev/null)" = "$ap" ] ||
    fail "create --json names domain $dom1, which is not $ap: $(xenstore-read "/local/domain/$dom1/name" 2>&1)"
# `xentap appliance status --json` must say the same: in the background,
# while the guest starts (its check is after phase 1)
# The case's xentap interpreter (xentap_cmd) starts now: its imports while
# the guest starts and phase 1 runs; it runs this, the second appliance
# create and the commands at the end.
xentap_server_start xentap.cli_appliance,xentap.appliance_domain,xentap.keys,xentap.create,xentap.xenbus,xentap.xl_config,xentap.appliance_node,xentap.cli_vbd,xentap.cli_journal,engines.journal
xentap_cmd appliance status --json > "$XT_WORK/apstatus-cli.json" 2>&1 &
status_pid=$!
mem=$(( $(xenstore-read "/local/domain/$dom1/memory/target") / 1024 ))
busybox ping -c 1 -W 5 10.0.0.2 >/dev/null || fail "dom0 cannot ping the appliance"

# --- phase 1: every write acknowledged; the disk as it is now
wait_console "$name" XT-WAITING 900 || fail "guest: no XT-WAITING"
# The daemon's drainer has a session with the appliance before the guest
# writes: the appliance being ready does not say the drainer has started (it
# starts once the appliance announced its endpoint and key, in the daemon's
# next status round); a drainer that starts after the guest wrote takes the
# disk as it is then as the stream's initial sync (a GAP..RESYNC_END window
# at seq 1, not what this case checks).
t0=$SECONDS
until [ "$(st mirror)" = connected ]; do
    [ $((SECONDS - t0)) -lt 900 ] || { tail -n 30 "$dlog"; fail "no mirror session 900s after the appliance was ready: $(mirror_line)"; }
    sleep 1
done
log "mirror session up $((SECONDS - t0))s after the guest waited: $(mirror_line)"
go 1
wait_console "$name" XT-PHASE1-DONE 900 || { tail -n 30 "$dlog"; fail "guest: no phase 1"; }
caught_up 900 || { tail -n 30 "$dlog"; fail "the appliance did not acknowledge phase 1"; }
[ "$(st mirror-overflows)" = 0 ] && [ "$(st mirror-gaps)" = 0 ] && [ "$(st errors)" = 0 ] &&
    [ -z "$(st mirror-error)" ] || fail "phase 1: $(mirror_line)"
wait $status_pid || fail "xentap appliance status --json: $(cat "$XT_WORK/apstatus-cli.json")"
[ "$(jget "$XT_WORK/apstatus-cli.json" domain public_key running)" = "$dom1 $key1 true" ] ||
    fail "xentap appliance status --json differs from create's: $(cat "$XT_WORK/apstatus-cli.json")"
s1=$(st mirror-acked-seq)
cp --sparse=always "$disk" "$XT_WORK/phase1.img" || fail "cannot copy the disk"
[ "$(st mirror-next-seq)" = $((s1 + 1)) ] || fail "the guest wrote while dom0 copied its disk"
log "phase 1: the appliance holds seqs up to $s1; disk copied"
echo "METRIC $XT_CASE phase1 acked_seq=$s1 lag_p99_ms=$(st mirror-lag-ms)"

# --- phase 2: the go, and the appliance destroyed while the guest writes
# (The limits below are for a stuck run, not a slow one: hosts differ; this
# suite's whole run has taken 4.5 min on one and 35 on another.)
go 2
wait_console "$name" XT-PHASE2-START 400 || fail "guest: no phase 2"
t_down=$SECONDS
xl destroy "$ap" || fail "xl destroy $ap"
log "xl destroy $ap (domain $dom1) while the guest writes: $(mirror_line)"
# The appliance again once the spill log is half full (its start takes
# minutes, 130 s at the very least to ready here, while the guest fills the
# rest of ring and spill log in tens of seconds; the guest may still be
# writing when it is back, as after a real outage).  The overflow must come
# while the appliance is away: checked below, on the first sample that shows
# it.
# (The status is a sample: once the guest is done, what a sample taken
# after that shows is final; a round of the emulated dom0's daemon can take
# tens of seconds.)
p2_done=
phase2_final() {
    [ -n "$p2_done" ] || { tr -d '\r' < "$(guest_log "$name")" | grep -qx XT-PHASE2-DONE &&
                           p2_done=$(date +%s); }
    [ -n "$p2_done" ] && [ "${S[updated]:-0}" -gt "$p2_done" ] 2>/dev/null
}
# The drainer notices the outage first: until it has heard nothing for
# drainer.DEAD_AFTER (10 s) its session looks alive, and a `connected` seen
# later can only be the appliance back.  (On a fast host the guest fills half
# the spill log within a second of the destroy.)
t0=$SECONDS
until snap; [ "${S[mirror]:-}" != connected ]; do
    [ $((SECONDS - t0)) -lt 300 ] || fail "the drainer still says connected 300s after xl destroy: $(mirror_line)"
    sleep 1
done
log "the drainer noticed the outage $((SECONDS - t_down))s after xl destroy: $(mirror_line)"
until snap; [ "${S[mirror-overflows]:-0}" -gt 0 ] 2>/dev/null ||
      [ "${S[mirror-spill-bytes]:-0}" -ge $((4 << 20)) ] 2>/dev/null; do
    phase2_final && break
    [ $((SECONDS - t0)) -lt 900 ] || break
    sleep 1
done
log "the spill log holds ${S[mirror-spill-bytes]:-?} bytes $((SECONDS - t_down))s after xl destroy: the appliance again"
appliance_start 2
until snap; [ "${S[mirror-overflows]:-0}" -gt 0 ] 2>/dev/null; do
    [ "${S[mirror]:-}" = connected ] && break       # back before the overflow: fails below
    phase2_final && break
    [ $((SECONDS - t0)) -lt 900 ] || break
    sleep 1
done
[ "${S[mirror-overflows]:-0}" -gt 0 ] 2>/dev/null && [ "${S[mirror]:-}" != connected ] ||
    fail "no overflow while the appliance was away (ring + spill log, 12 MiB, should not hold 20 MiB): $(mirror_line)"
log "overflow while the appliance is away: mirror ${S[mirror]:-} acked=${S[mirror-acked-seq]:-}" \
    "next=${S[mirror-next-seq]:-} pending=${S[mirror-pending]:-} spill=${S[mirror-spill-bytes]:-}" \
    "ring=${S[mirror-ring-bytes]:-} overflows=${S[mirror-overflows]:-} gaps=${S[mirror-gaps]:-}"
wait_console "$name" XT-PHASE2-DONE 900 || { tail -n 30 "$dlog"; fail "guest: phase 2 did not finish"; }
log "the guest wrote 20 MiB, most without the appliance: $(mirror_line)"
[ "$(st errors)" = 0 ] || fail "the daemon counted errored requests: $(mirror_line)"

# --- the appliance again: the same journal disk, no format, the same key
appliance_up
boot2=$boot_s key2=$apkey
[ "$key2" = "$key1" ] || fail "the appliance's key changed across restart: $key1 -> $key2"
n=$(tr -d '\r' < "$(guest_log $ap)" | grep -c 'formatting the journal disk')
[ "$n" -le 1 ] || fail "the journal disk was formatted $n times"
t_up=$SECONDS
caught_up 900 || { tail -n 40 "$dlog"; fail "the mirror did not catch up after the restart"; }
catchup=$((SECONDS - t_up))
[ "$(st mirror-gaps)" -gt 0 ] 2>/dev/null || fail "no GAP after the outage: $(mirror_line)"
log "caught up ${catchup}s after the appliance was ready again (outage $((t_up - t_down))s)"
grep -E 'GAP|resync|overflow|takeover' "$dlog" | tail -n 8 | sed 's/^/daemon: /'

# --- phase 3: the go; the guest ends
go 3
t0=$SECONDS
while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
    [ $((SECONDS - t0)) -lt 900 ] || { xl destroy "$domid"; fail "guest did not finish"; }
    sleep 1
done
log "guest $name ended $((SECONDS - t0))s after go3"
tr -d '\r' < "$(guest_log "$name")" > "$XT_WORK/guest.log"
grep -E '^(guest|XT-)' "$XT_WORK/guest.log"
grep -qx 'XT-GUEST-RESULT PASS' "$XT_WORK/guest.log" || fail "guest did not report PASS"
grep -qx 'XT-IO-ERRORS none' "$XT_WORK/guest.log" || fail "the guest saw I/O errors"
# what the guest read back (uncached, after a remount) is what it wrote
while read -r _ f sum; do
    got=$(sed -n "s/^XT-READ $f //p" "$XT_WORK/guest.log")
    [ "$got" = "$sum" ] || fail "the guest read $f back as $got, wrote $sum"
done < <(grep '^XT-FILE ' "$XT_WORK/guest.log")

# the mirror drains what is left (bounded) and stops
t0=$SECONDS
until [ "$(st mirror)" = stopped ] || [ "$(st mirror)" = error ]; do
    [ $((SECONDS - t0)) -lt 150 ] || break
    sleep 1
done
xenstore-ls -f "$XT_XS_ROOT/vbd/$domid/$devid" > "$XT_WORK/st.ls"
acked=$(st mirror-acked-seq)
log "after the guest: $(mirror_line)"
[ "$(st mirror)" = stopped ] && [ -z "$(st mirror-error)" ] || fail "mirror not stopped cleanly: $(mirror_line)"
[ "$acked" = $(( $(st mirror-next-seq) - 1 )) ] && [ "$(st mirror-pending)" = 0 ] &&
    [ "$(st mirror-spill-bytes)" = 0 ] || fail "mirror not all acknowledged: $(mirror_line)"
[ "$(st errors)" = 0 ] || fail "errored requests: $(mirror_line)"
echo "METRIC $XT_CASE mirror acked_seq=$acked overflows=$(st mirror-overflows) gaps=$(st mirror-gaps)" \
     "outage_s=$((t_up - t_down)) catchup_s=$catchup"
data=$jm/data
# `xentap status` (for the log: its figures were checked from xenstore
# above), the guest's VBDs detached and the appliance's clean shutdown (next
# section), in the case's xentap interpreter (no emulated Python start-up),
# while dom0 checks the disk
t0=$SECONDS
xentap_cmds "$XT_WORK/tail" status :: detach --timeout 600 "$domid" xvda :: \
    detach --timeout 600 "$domid" xvdb :: appliance destroy \
    > "$XT_WORK/tail.out" 2>&1 &
tail_pid=$!
verify_image "$disk" "$XT_WORK/guest.log" 10

# --- the journal: a clean shutdown, then the journal disk mounted in dom0
wait $tail_pid ||
    { cat "$XT_WORK/tail.out" "$XT_WORK"/tail/*.out; fail "xentap status, detach xvda, detach xvdb, appliance destroy: command $(ls "$XT_WORK"/tail/*.rc | wc -l) of 4 failed"; }
sed 's/^/xentap status: /' "$XT_WORK/tail/1.out"
cat "$XT_WORK/tail/2.out" "$XT_WORK/tail/3.out" "$XT_WORK/tail/4.out"
log "appliance shut down $((SECONDS - t0))s after status, detaches and appliance destroy began (its check of the disk in between)"
tr -d '\r' < "$(guest_log $ap)" | grep '^appliance:' | sed 's/^/console: /'
modprobe loop; modprobe ext4 2>/dev/null
mkdir -p "$jm"
mount -o loop "$journal" "$jm" || fail "cannot mount the journal disk"
ls -l "$data/$vbd" | sed 's/^/journal disk: /'
cmp "$data/$vbd/replica.img" "$disk" || fail "the appliance's replica differs from the disk"
log "the appliance's replica equals the disk"
# xentap journal list / verify / checkpoints / restore: journal-check.py,
# run by the case's xentap interpreter (its imports, engines.journal's too,
# were done during phase 1)
xentap_cmd --python "$XT_REPO/tests/xen/journal-check.py" \
    "$data" "$vbd" "$s1" "$XT_WORK/phase1.img" "$disk" "$acked" "$XT_WORK" \
    > "$XT_WORK/journal-check.out" 2>&1
rc=$?
sed 's/^/journal: /' "$XT_WORK/journal-check.out"
[ $rc = 0 ] || fail "$(grep '^FAILED: ' "$XT_WORK/journal-check.out" | head -1 | cut -c9-)"
echo "METRIC $XT_CASE journal $(sed -n 's/^FIGURES //p' "$XT_WORK/journal-check.out")"
rm -f "$XT_WORK/phase1.img"
umount "$jm" || fail "umount the journal disk"

echo "METRIC $XT_CASE boot create_to_ready_s=$boot1 restart_s=$boot2 memory_mib=$mem"
grep -q Traceback "$dlog" && fail "the daemon logged a traceback"
rm -f "$disk" "$sig" "$journal"
exit 0
