# Guest workload for cases/appliance-domu.sh: an ext4 workload on a xentap
# disk protected by the appliance domain, in three phases; dom0 destroys and
# restarts the appliance while it runs.  dom0 gives the go for each phase by
# writing `go1`, `go2`, `go3` into the first sector of a second disk (xvdb,
# read-only here), which the guest reads with O_DIRECT every half second: no
# `xentap attach`/`detach` (seconds of emulated Python each) on the way.
#   1. (dom0: once the appliance is ready; the guest boots while it starts)
#      mkfs.ext4 xvda, mount (noatime, no lazy inode-table zeroing: nothing
#      writes once the workload idles), four files of known checksums, sync,
#      read back; XT-PHASE1-DONE.  dom0 checks that the appliance
#      acknowledged every write and copies the disk.
#   2. XT-PHASE2-START, 20 MiB in five files (sync after each): dom0
#      `xl destroy`s the appliance as soon as it sees XT-PHASE2-START, so
#      most of this is written while no appliance runs; more than the mirror
#      ring and spill log hold (12 MiB, run-cases.sh).  XT-PHASE2-DONE.
#   3. one more file, sync, every file read back uncached, umount, e2fsck;
#      no I/O error in the kernel log.
# Prints XT-FILE <name> <sha256> for dom0 (debugfs), XT-GUEST-RESULT last.
ok=1
bad() { echo "guest: FAILED: $*"; ok=0; }
give_up() { echo "guest: FAILED: $*"; echo "XT-GUEST-RESULT FAIL"; exit 1; }
up() { cut -d' ' -f1 /proc/uptime; }
wait_dev() {   # wait_dev present|absent DEV TENTHS
    i=0
    while [ $i -lt "$3" ]; do
        if [ "$1" = present ]; then [ -b "/dev/$2" ] && return 0
        else [ -e "/sys/block/$2" ] || return 0; fi
        sleep 0.1; i=$((i + 1))
    done
    return 1
}
# wait_go N TENTHS: waits until xvdb's first sector says goN (dom0 writes it
# into the image the daemon serves; O_DIRECT: never this guest's cache).
wait_go() {
    i=0
    while [ $i -lt "$2" ]; do
        [ "$(dd if=/dev/xvdb bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)" = "go$1" ] &&
            return 0
        sleep 0.5; i=$((i + 5))
    done
    return 1
}
# flush_dev: a cache flush of xvda itself (fsync of the block device), so that
# a phase ends with a FLUSH in the mirror stream: ext4's last write of a sync
# is a jbd2 commit block written with FUA *after* its pre-flush, and a point
# in the journal is a checkpoint only at a FLUSH.
flush_dev() {
    dd if=/dev/null of=/dev/xvda bs=512 count=0 conv=notrunc,fsync 2>/dev/null ||
        sync /dev/xvda || bad "flush /dev/xvda"
}
# put NAME BYTES: a file of random bytes written through a pipe that hashes
# what it writes (no copy kept in the guest's memory).
put() {
    sum=$(head -c "$2" /dev/urandom | tee "/mnt/d/$1" | sha256sum | cut -d' ' -f1)
    [ -s "/mnt/d/$1" ] || bad "write $1"
    echo "XT-FILE $1 $sum"
}

wait_dev present xvda 600 || give_up "no /dev/xvda"
wait_dev present xvdb 600 || give_up "no /dev/xvdb (the go disk)"
echo "XT-WAITING"
wait_go 1 18000 || give_up "no go for phase 1 after 1800s"
echo "guest: xvda is $(cat /sys/block/xvda/size) sectors"
mkfs.ext4 -F -q -E lazy_itable_init=1,lazy_journal_init=1 /dev/xvda || give_up mkfs
mkdir -p /mnt/d
mount -t ext4 -o noatime,noinit_itable /dev/xvda /mnt/d || give_up mount

# --- phase 1
for n in 1 2 3 4; do put f$n $((n * 262144 + n * 4097)); done
sync
flush_dev
echo "guest: phase 1 done at $(up)s"
echo "XT-PHASE1-DONE"
wait_go 2 18000 || give_up "no go for phase 2 after 1800s"

# --- phase 2: the appliance goes away while this runs
echo "XT-PHASE2-START"
t0=$(up)
for n in 1 2 3 4 5; do put g$n 4194304; sync; done
echo "guest: phase 2 wrote 20 MiB in $(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')s"
echo "XT-PHASE2-DONE"
wait_go 3 18000 || give_up "no go for phase 3 after 1800s"

# --- phase 3
put h1 1048576
sync
echo 3 > /proc/sys/vm/drop_caches
n=0
for f in f1 f2 f3 f4 g1 g2 g3 g4 g5 h1; do
    [ -f "/mnt/d/$f" ] || { bad "$f missing"; continue; }
    n=$((n + 1))
done
echo "XT-COUNT $n"
umount /mnt/d || bad umount
echo "XT-READBACK"   # dom0 compares the hashes below with the XT-FILE lines
mount -t ext4 -o ro,noatime /dev/xvda /mnt/d || bad "mount ro"
for f in f1 f2 f3 f4 g1 g2 g3 g4 g5 h1; do
    echo "XT-READ $f $(sha256sum "/mnt/d/$f" | cut -d' ' -f1)"
done
umount /mnt/d || bad "umount ro"
e2fsck -fn /dev/xvda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; bad "e2fsck"; }
flush_dev
if dmesg | grep -Ei 'i/o error|blk_update_request|buffer i/o|ext4-fs error|aborting journal'; then
    bad "I/O errors in the kernel log"
else
    echo "XT-IO-ERRORS none"
fi
if [ $ok = 1 ]; then echo "XT-GUEST-RESULT PASS"; else echo "XT-GUEST-RESULT FAIL"; exit 1; fi
