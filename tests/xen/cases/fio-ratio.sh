# fio-ratio: the same guest fio job (guest/fio.sh: verified sequential
# write, sequential read, 4 KiB random read/write; O_DIRECT, libaio) on a
# raw image served by the kernel's blkback (`phy` via the loop device),
# by QEMU's qdisk if it runs in this dom0, and by xentap (`xentap create`),
# one guest after the other in the same run; prints each backend's numbers
# and the ratios to blkback.  Emulated (TCG), so only the ratios mean
# anything.  Fails if blkback or xentap fails its job (data verified);
# qdisk is reported, not required.
# xt-timeout: 1800
# xt-lane: blkback
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=$XT_CASE
img=$XT_WORK/fio.img
tools=$XT_WORK/fio-tools.img
dlog=${XT_DAEMON_LOG:-$XT_OUT/cases/$name.daemon.log}
trap 'xentap_daemon_stop' EXIT
# fio and its libraries: a read-only disk, xvdb of every guest here, served
# by the kernel's blkback (mkinitrd.sh fio-tools; guest/fio.sh mounts it).
cp --sparse=always "$XT_INITRD/fio-tools.img" "$tools" || fail "no fio tools disk"
toolsdisk="'format=raw, vdev=xvdb, access=ro, script=$XT_REPO/tests/xen/block-loop, target=$tools'"
modprobe xen-blkback || fail "modprobe xen-blkback"
modprobe loop || fail "modprobe loop"

# results BACKEND: the guest's XT-FIO lines as METRIC lines; 1 if it failed.
results() {
    local b=$1 g=$XT_WORK/guest-$1.log
    tr -d '\r' < "$(guest_log "$name-$b")" > "$g"
    grep -E '^(guest|XT-)' "$g" | sed "s/^/$b: /"
    grep -qx 'XT-GUEST-RESULT PASS' "$g" || return 1
    sed -n "s/^XT-FIO /METRIC $name $b /p" "$g"
}

fresh_image() { rm -f "$img"; truncate -s 128M "$img"; }

# fio_cfg BACKEND DISKLINE: the suite's guest (and fio's disk).
fio_cfg() {
    guest_cfg "$name-$1" fio "$2"
}

ran=
# --- kernel blkback
fresh_image
cfg=$(fio_cfg blkback "disk = [ 'format=raw, vdev=xvda, access=rw, script=$XT_REPO/tests/xen/block-loop, target=$img', $toolsdisk ]")
guest_run "$name-blkback" "$cfg" 600 || fail "blkback guest did not finish"
results blkback || fail "the fio job failed on blkback"
ran="$ran blkback"

# --- QEMU qdisk (needs Xen's device model in dom0, Debian's qemu-system-xen;
# reported, not required)
dm=/usr/libexec/xen-qemu-system-i386
fresh_image
cfg=$(fio_cfg qdisk "disk = [ 'format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$img', $toolsdisk ]")
if [ ! -x "$dm" ]; then
    log "qdisk: no device model ($dm: install qemu-system-xen); skipped"
    echo "METRIC $name qdisk unavailable: no $dm (qemu-system-xen)"
elif guest_run "$name-qdisk" "$cfg" 600 && results qdisk; then
    ran="$ran qdisk"
else
    why=$(grep -ho 'Please install[^"]*\|qemu[^ ]*: [^"]*' "$XT_WORK/xl-create.out" /var/log/xen/qemu-dm-"$name-qdisk".log 2>/dev/null | head -1)
    log "qdisk did not run here: ${why:-see var-log-xen/}"
    echo "METRIC $name qdisk unavailable: ${why:-see var-log-xen/}"
    xl destroy "$name-qdisk" 2>/dev/null
fi

# --- xentap
# (its `xentap` commands and the ratios' script run in one interpreter,
# started now, after the blkback guest: tests/xen/xentap-serve.py; it only
# sleeps while the xentap guest's fio job runs)
xentap_server_start xentap.cli_vbd,xentap.create,xentap.xenbus,xentap.xl_config
fresh_image
xentap_daemon_start "$dlog"
XT_GUEST_DISK="[ $toolsdisk ]" \
    xentap_guest_create "$name-xentap" fio 1 "" "vdev=xvda, access=rw, target=$img" ||
    { tail -n 30 "$dlog"; fail "xentap create"; }
t0=$SECONDS
while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
    [ $((SECONDS - t0)) -lt 600 ] || { xl destroy "$domid"; fail "xentap guest did not finish"; }
    sleep 1
done
results xentap || { tail -n 30 "$dlog"; fail "the fio job failed on xentap"; }
# (--timeout: the guest is gone, but a loaded dom0's daemon has taken more
# than detach's default 10 s to close its VBD; the detach must still succeed)
xentap_cmd detach --timeout 600 "$domid" xvda || fail "xentap detach"
xentap_daemon_stop
grep -q Traceback "$dlog" && { cat "$dlog"; fail "the daemon logged a traceback"; }
ran="$ran xentap"

# --- ratios to blkback, per job and direction
cat > "$XT_WORK/ratios.py" <<'PY'
import re, sys
work, backends = sys.argv[1], sys.argv[2:]
res = {}
for b in backends:
    for line in open(f"{work}/guest-{b}.log"):
        m = re.match(r"XT-FIO (\S+) (.*)", line.strip())
        if m:
            res.setdefault(b, {})[m.group(1)] = {k: int(v) for k, v in
                                                  (kv.split("=") for kv in m.group(2).split())}
base = res["blkback"]
for b in backends:
    if b == "blkback":
        continue
    out = []
    for job, want in (("seqwrite", "write_kBps"), ("seqread", "read_kBps"),
                      ("randrw", "read_iops"), ("randrw", "write_iops")):
        x, y = res[b][job][want], base[job][want]
        out.append(f"{job}_{want}={x / y:.2f}" if y else f"{job}_{want}=n/a")
    print(f"METRIC fio-ratio {b}/blkback " + " ".join(out))
PY
xentap_cmd --python "$XT_WORK/ratios.py" "$XT_WORK" $ran || fail "cannot compute the ratios"
rm -f "$img" "$tools"
