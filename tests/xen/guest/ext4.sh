# Guest workload for cases/blkback-ext4.sh: mkfs.ext4 /dev/xvda, write files
# of known checksums, read them back after dropping caches, time a dd
# write/read, fsck.  Prints XT-FILE <name> <sha256> for dom0 to check the
# image against, XT-METRIC lines, and XT-GUEST-RESULT PASS|FAIL last.
ok=1
bad() { echo "guest: FAILED: $*"; ok=0; }
give_up() { echo "guest: FAILED: $*"; echo "XT-GUEST-RESULT FAIL"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }

i=0
while [ ! -b /dev/xvda ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
[ -b /dev/xvda ] || give_up "no /dev/xvda"
echo "guest: xvda is $(cat /sys/block/xvda/size) sectors"

mkfs.ext4 -F -q /dev/xvda || give_up mkfs
mkdir -p /mnt/d
mount -t ext4 /dev/xvda /mnt/d || give_up mount

# Odd sizes so that partial blocks are covered too.
mkdir -p /tmp/src
for n in 1 2 3 4; do
    head -c $((n * 1048576 + n * 4097)) /dev/urandom > /tmp/src/f$n
    sum=$(sha256sum /tmp/src/f$n | cut -d' ' -f1)
    echo "XT-FILE f$n $sum"
    cp /tmp/src/f$n /mnt/d/f$n || bad "write f$n"
done
sync
echo 3 > /proc/sys/vm/drop_caches
for n in 1 2 3 4; do
    a=$(sha256sum /tmp/src/f$n | cut -d' ' -f1)
    b=$(sha256sum /mnt/d/f$n | cut -d' ' -f1)
    [ "$a" = "$b" ] || bad "f$n read back $b, wrote $a"
done

# Timed sequential dd through the filesystem (emulated: only ratios between
# backends mean anything).
MB=16
t0=$(now)
dd if=/dev/zero of=/mnt/d/bench bs=1M count=$MB conv=fsync 2>/dev/null || bad "dd write"
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
t2=$(now)
dd if=/mnt/d/bench of=/dev/null bs=1M 2>/dev/null || bad "dd read"
t3=$(now)
awk -v mb=$MB -v t0=$t0 -v t1=$t1 -v t2=$t2 -v t3=$t3 'BEGIN {
    printf "XT-METRIC dd_write_MBps=%.1f dd_read_MBps=%.1f (%d MiB, %.2fs / %.2fs)\n",
        mb / (t1 - t0 + 0.001), mb / (t3 - t2 + 0.001), mb, t1 - t0, t3 - t2 }'
rm -f /mnt/d/bench

umount /mnt/d || bad umount
e2fsck -fn /dev/xvda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; bad "e2fsck"; }
if [ $ok = 1 ]; then echo "XT-GUEST-RESULT PASS"; else echo "XT-GUEST-RESULT FAIL"; exit 1; fi
