# Guest workload for cases/fio-ratio.sh: the same fio jobs on /dev/xvda
# whatever serves it (kernel blkback, QEMU qdisk, xentap).  O_DIRECT with
# libaio so the guest's page cache is out of the picture; the sequential
# write is verified (crc32c of every block, read back) so that a backend that
# corrupts data fails instead of looking fast.  Prints one line per job,
# `XT-FIO <job> read_kBps=.. read_iops=.. write_kBps=.. write_iops=..`,
# and XT-GUEST-RESULT PASS|FAIL last.
# fio and its libraries come on xvdb, a read-only ext4 image
# (mkinitrd.sh fio-tools, served by the kernel's blkback in every run).
ok=1
give_up() { echo "guest: FAILED: $*"; echo "XT-GUEST-RESULT FAIL"; exit 1; }
i=0
while { [ ! -b /dev/xvda ] || [ ! -b /dev/xvdb ]; } && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/xvda ] || give_up "no /dev/xvda"
[ -b /dev/xvdb ] || give_up "no /dev/xvdb (fio's disk)"
mkdir -p /opt
mount -t ext4 -o ro /dev/xvdb /opt || give_up "cannot mount fio's disk"
export LD_LIBRARY_PATH=/opt/lib PATH=/opt/bin:$PATH
echo "guest: xvda is $(cat /sys/block/xvda/size) sectors"
common="--filename=/dev/xvda --direct=1 --ioengine=libaio --output-format=terse --terse-version=3"
job() {   # job NAME fio-args...
    name=$1; shift
    out=$(/opt/bin/fio --name="$name" $common "$@" 2>/tmp/fio.err) || { cat /tmp/fio.err; echo "guest: FAILED: fio $name"; ok=0; return; }
    echo "$out" | awk -F';' -v n="$name" '$1 == 3 {
        printf "XT-FIO %s read_kBps=%d read_iops=%d write_kBps=%d write_iops=%d\n", n, $7, $8, $48, $49 }'
}
job seqwrite --rw=write --bs=1M --size=32M --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1
job seqread  --rw=read  --bs=1M --size=32M --iodepth=8
job randrw   --rw=randrw --bs=4k --size=32M --iodepth=16 --time_based --runtime=5
if [ $ok = 1 ]; then echo "XT-GUEST-RESULT PASS"; else echo "XT-GUEST-RESULT FAIL"; exit 1; fi
