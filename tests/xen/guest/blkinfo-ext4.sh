# Guest workload for cases/xentap-*.sh: what blkfront negotiated, as the
# guest sees it (queue limits, hardware queues, blkfront's own summary line),
# then the ext4 workload of guest/ext4.sh (which prints XT-GUEST-RESULT).
# A userspace backend in an emulated dom0 may take a while to connect: wait
# longer for /dev/xvda than ext4.sh does.
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
if [ -b /dev/xvda ]; then
    q=/sys/block/xvda/queue
    echo "XT-BLKINFO max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) max_segments=$(cat $q/max_segments)" \
         "hw_queues=$(ls -d /sys/block/xvda/mq/* 2>/dev/null | wc -l)" \
         "write_cache=$(cat $q/write_cache 2>/dev/null | tr ' ' _)" \
         "discard_max_bytes=$(cat $q/discard_max_bytes 2>/dev/null)"
    # "blkfront: xvda: flush diskcache: enabled; persistent grants: ...;
    # indirect descriptors: enabled; bounce buffer: ..."
    dmesg | grep -i 'blkfront' | sed 's/^\[[ 0-9.]*\] //; s/^/guest-dmesg: /'
    echo "guest: connected after $(cut -d' ' -f1 /proc/uptime)s"
fi
exec sh /workloads/ext4.sh
