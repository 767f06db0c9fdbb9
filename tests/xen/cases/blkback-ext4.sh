# blkback-ext4: a PV guest on a kernel-blkback raw disk (a file in dom0's
# /run on a loop device, set up by the suite's hotplug script tests/xen/block-loop)
# mkfs.ext4's it, writes files of known checksums, reads them back, times dd,
# fscks; then dom0 checks the image with e2fsck -fn and the files' checksums
# with debugfs.  The comparison point for xentap's own backend later.
# xt-timeout: 1800
# xt-lane: blkback
. "$XT_REPO/tests/xen/lib.sh"
set -u
name=blkback-ext4
img=/run/blkback-ext4.img

modprobe xen-blkback || fail "modprobe xen-blkback"
modprobe loop || fail "modprobe loop"
rm -f "$img"
truncate -s 256M "$img"

cfg=$(guest_cfg $name ext4 "disk = [ 'format=raw, vdev=xvda, access=rw, script=$XT_REPO/tests/xen/block-loop, target=$img' ]")
guest_run $name "$cfg" 700 || fail "guest did not finish"

glog=$(guest_log $name)
tr -d '\r' < "$glog" > "$XT_WORK/guest.log"
grep -E '^(guest|XT-)' "$XT_WORK/guest.log"
grep -qx 'XT-GUEST-RESULT PASS' "$XT_WORK/guest.log" || fail "guest did not report PASS"
sed -n 's/^XT-METRIC /METRIC blkback-ext4 /p' "$XT_WORK/guest.log"

# The loop device must be gone before dom0 reads the image.
losetup -a | grep -q "$img" && fail "image still attached: $(losetup -a)"
e2fsck -fn "$img" || fail "e2fsck -fn in dom0"
n=0
while read -r _ f sum; do
    debugfs -R "dump /$f $XT_WORK/$f" "$img" 2>/dev/null
    got=$(sha256sum < "$XT_WORK/$f" | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "$f in the image hashes $got, guest wrote $sum"
    n=$((n + 1))
done < <(grep '^XT-FILE ' "$XT_WORK/guest.log")
[ $n = 4 ] || fail "expected 4 files, checked $n"
log "dom0 verified $n files and the filesystem"
rm -f "$img"
