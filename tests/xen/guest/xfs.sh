# Guest workload for cases/xentap-xfs.sh: a small filesystem workload on
# each of two disks, whose writes the appliance journals and dom0 exports as
# write traces (tests/data/xen-*.trace.gz): xvda ext4, xvdb XFS.  Per disk:
# mkfs, mount, 12 small text files, sync, a directory tree, unlink, a log
# appended and fsync'd 16 times, rename, sync, umount.  Text, not random
# bytes, so that the traces stay small once compressed.  After umount each
# file is read back (after a fresh mount) against its checksum, and ext4 is
# fsck'd.  Prints XT-FILE <name> <sha256> for xvda's files (dom0 checks them
# in the image) and XT-GUEST-RESULT PASS|FAIL last.
ok=1
bad() { echo "guest: FAILED: $*"; ok=0; }
give_up() { echo "guest: FAILED: $*"; echo "XT-GUEST-RESULT FAIL"; exit 1; }

i=0
while { [ ! -b /dev/xvda ] || [ ! -b /dev/xvdb ]; } && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
[ -b /dev/xvda ] && [ -b /dev/xvdb ] || give_up "no /dev/xvda and /dev/xvdb"
echo "guest: xvda $(cat /sys/block/xvda/size) sectors, xvdb $(cat /sys/block/xvdb/size) sectors"
for m in $(cat /lib/modules/xfs/order); do
    insmod /lib/modules/xfs/$m.ko || give_up "insmod $m"
done

# text N SEED: N bytes of text (numbers from SEED on)
text() { seq "$2" 3 $(($2 + $1 * 3)) | head -c "$1"; }

workload() {   # workload DEV FSTYPE
    dev=$1 fs=$2 mnt=/mnt/$2
    mkdir -p $mnt
    case $fs in
        ext4) mkfs.ext4 -F -q -b 4096 $dev || give_up "mkfs.ext4 $dev"
              mount -t ext4 -o commit=1 $dev $mnt || give_up "mount $dev";;
        xfs)  mkfs.xfs -q -f $dev || give_up "mkfs.xfs $dev"
              mount -t xfs $dev $mnt || give_up "mount $dev";;
    esac
    mkdir $mnt/docs
    for n in 0 1 2 3 4 5 6 7 8 9 10 11; do
        text $((6000 + n * 1500)) $((n * 100000)) > $mnt/docs/f$n || bad "write $fs f$n"
    done
    sync
    mkdir -p $mnt/tree/etc $mnt/tree/workloads
    cp /etc/* $mnt/tree/etc/ 2>/dev/null
    cp /workloads/* $mnt/tree/workloads/ || bad "cp tree on $fs"
    rm $mnt/docs/f0
    for n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
        text 4096 $((5000000 + n * 1000)) >> $mnt/log
        sync $mnt/log || bad "fsync $fs log"      # busybox sync FILE: fsync
    done
    mv $mnt/docs $mnt/docs2
    sync
    (cd $mnt && find docs2 tree log -type f | sort | while read -r f; do
        echo "$f $(sha256sum < "$f" | cut -d' ' -f1)"; done) > /tmp/$fs.sums
    umount $mnt || bad "umount $dev"
    echo "guest: $fs workload on $dev done, $(wc -l < /tmp/$fs.sums) files"
}

workload /dev/xvda ext4
workload /dev/xvdb xfs

# Read back from a fresh mount (nothing cached) and compare.
echo 3 > /proc/sys/vm/drop_caches
for d in "xvda ext4" "xvdb xfs"; do
    set -- $d
    mount -t $2 -o ro /dev/$1 /mnt/$2 || { bad "mount $1 again"; continue; }
    while read -r f sum; do
        got=$(sha256sum < /mnt/$2/$f | cut -d' ' -f1)
        [ "$got" = "$sum" ] || bad "$2 $f read back $got, wrote $sum"
        [ $2 = ext4 ] && echo "XT-FILE $f $sum"
    done < /tmp/$2.sums
    umount /mnt/$2 || bad "umount $1 again"
done
e2fsck -fn /dev/xvda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; bad "e2fsck xvda"; }
if [ $ok = 1 ]; then echo "XT-GUEST-RESULT PASS"; else echo "XT-GUEST-RESULT FAIL"; exit 1; fi
