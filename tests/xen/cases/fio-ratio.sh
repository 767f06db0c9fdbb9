# fio-ratio: the same guest fio job (guest/fio.sh: verified sequential
# write, sequential read, 4 KiB random read/write; O_DIRECT, libaio) on a
# raw image served by the kernel's blkback (`phy` via the loop device),
# by QEMU's qdisk if it runs in this dom0, and by xentap (`xentap create`),
# one guest after the other in the same run; prints each backend's numbers
# and the ratios to blkback.  Emulated (TCG), so only the ratios mean
# anything.  Fails if blkback or xentap fails its job (data verified);
# qdisk is reported, not required.
# xt-timeout: 600
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=$XT_CASE
img=$XT_WORK/fio.img
initrd=/run/xt-guest/guest-fio.cpio
dlog=$XT_OUT/cases/$name.daemon.log
trap 'xentap_daemon_stop' EXIT
cp "$XT_INITRD/guest-fio.cpio" "$initrd" || fail "no fio guest initramfs"
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

# fio_cfg BACKEND DISKLINE: the suite's guest with the fio initramfs.
fio_cfg() {
    local cfg
    cfg=$(guest_cfg "$name-$1" fio "$2")
    sed -i "s|^ramdisk = .*|ramdisk = '$initrd'|; s|^memory = .*|memory = 512|" "$cfg"
    echo "$cfg"
}

ran=
# --- kernel blkback
fresh_image
cfg=$(fio_cfg blkback "disk = [ 'format=raw, vdev=xvda, access=rw, target=$img' ]")
guest_run "$name-blkback" "$cfg" 200 || fail "blkback guest did not finish"
results blkback || fail "the fio job failed on blkback"
ran="$ran blkback"

# --- QEMU qdisk (needs Xen's device model in dom0, Debian's qemu-system-xen;
# reported, not required)
dm=/usr/libexec/xen-qemu-system-i386
fresh_image
cfg=$(fio_cfg qdisk "disk = [ 'format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$img' ]")
if [ ! -x "$dm" ]; then
    log "qdisk: no device model ($dm: install qemu-system-xen); skipped"
    echo "METRIC $name qdisk unavailable: no $dm (qemu-system-xen)"
elif guest_run "$name-qdisk" "$cfg" 200 && results qdisk; then
    ran="$ran qdisk"
else
    why=$(grep -ho 'Please install[^"]*\|qemu[^ ]*: [^"]*' "$XT_WORK/xl-create.out" /var/log/xen/qemu-dm-"$name-qdisk".log 2>/dev/null | head -1)
    log "qdisk did not run here: ${why:-see var-log-xen/}"
    echo "METRIC $name qdisk unavailable: ${why:-see var-log-xen/}"
    xl destroy "$name-qdisk" 2>/dev/null
fi

# --- xentap
fresh_image
xentap_daemon_start "$dlog"
XT_GUEST_RAMDISK=$initrd XT_GUEST_MEMORY=512 \
    xentap_guest_create "$name-xentap" fio 1 "" "vdev=xvda, access=rw, target=$img" ||
    { tail -n 30 "$dlog"; fail "xentap create"; }
t0=$SECONDS
while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
    [ $((SECONDS - t0)) -lt 200 ] || { xl destroy "$domid"; fail "xentap guest did not finish"; }
    sleep 1
done
results xentap || { tail -n 30 "$dlog"; fail "the fio job failed on xentap"; }
"$XENTAP" detach "$domid" xvda || fail "xentap detach"
xentap_daemon_stop
grep -q Traceback "$dlog" && { cat "$dlog"; fail "the daemon logged a traceback"; }
ran="$ran xentap"

# --- ratios to blkback, per job and direction
python3.11 - "$XT_WORK" $ran <<'PY' || fail "cannot compute the ratios"
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
rm -f "$img" "$initrd"
