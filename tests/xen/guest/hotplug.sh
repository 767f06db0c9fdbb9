# Guest workload for cases/xentap-hotplug.sh: a disk given and taken away
# while the guest runs.  Reads xvda (its boot disk) and prints its hash, says
# XT-HOTPLUG-READY, waits for dom0 to `xentap attach` xvdb, makes ext4 on it,
# writes files of known checksums, reads them back after dropping caches,
# fscks, says XT-HOTPLUG-USED, then waits for dom0's `xentap detach` to take
# xvdb away, and reads xvda again.  XT-GUEST-RESULT PASS|FAIL last.
ok=1
bad() { echo "guest: FAILED: $*"; ok=0; }
give_up() { echo "guest: FAILED: $*"; echo "XT-GUEST-RESULT FAIL"; exit 1; }
wait_dev() {   # wait_dev present|absent DEV TENTHS
    i=0
    while [ $i -lt "$3" ]; do
        if [ "$1" = present ]; then [ -b "/dev/$2" ] && return 0
        else [ -e "/sys/block/$2" ] || return 0; fi
        sleep 0.1; i=$((i + 1))
    done
    return 1
}

wait_dev present xvda 600 || give_up "no /dev/xvda"
echo "XT-XVDA $(head -c 4194304 /dev/xvda | sha256sum | cut -d' ' -f1)"
echo "XT-HOTPLUG-READY"

wait_dev present xvdb 6000 || give_up "no /dev/xvdb after 600s"
echo "guest: xvdb appeared ($(cat /sys/block/xvdb/size) sectors) at $(cut -d' ' -f1 /proc/uptime)s"
dmesg | grep -i 'blkfront.*xvdb' | sed 's/^\[[ 0-9.]*\] //; s/^/guest-dmesg: /'
mkfs.ext4 -F -q /dev/xvdb || give_up "mkfs xvdb"
mkdir -p /mnt/b
mount -t ext4 /dev/xvdb /mnt/b || give_up "mount xvdb"
mkdir -p /tmp/src
for n in 1 2; do
    head -c $((n * 1048576 + n * 4097)) /dev/urandom > /tmp/src/h$n
    echo "XT-FILE h$n $(sha256sum /tmp/src/h$n | cut -d' ' -f1)"
    cp /tmp/src/h$n /mnt/b/h$n || bad "write h$n"
done
sync
echo 3 > /proc/sys/vm/drop_caches
for n in 1 2; do
    a=$(sha256sum /tmp/src/h$n | cut -d' ' -f1)
    b=$(sha256sum /mnt/b/h$n | cut -d' ' -f1)
    [ "$a" = "$b" ] || bad "h$n read back $b, wrote $a"
done
umount /mnt/b || bad "umount xvdb"
e2fsck -fn /dev/xvdb >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; bad "e2fsck xvdb"; }
echo "XT-HOTPLUG-USED"

wait_dev absent xvdb 6000 || bad "xvdb still there 600s after use"
[ -e /sys/block/xvdb ] || echo "XT-HOTPLUG-GONE"
# xvda is untouched by xvdb's detach: read it again, uncached.
echo 3 > /proc/sys/vm/drop_caches
[ -b /dev/xvda ] || bad "xvda went away too"
echo "XT-XVDA-AFTER $(head -c 4194304 /dev/xvda | sha256sum | cut -d' ' -f1)"
if [ $ok = 1 ]; then echo "XT-GUEST-RESULT PASS"; else echo "XT-GUEST-RESULT FAIL"; exit 1; fi
