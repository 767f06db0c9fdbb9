#!/bin/bash
# PID 1 of dom0, run from the host's root (read-only 9p + tmpfs overlay) after
# the initramfs's switch_root.  Sets up what Xen's toolstack needs, runs the
# cases, prints XT-DONE and powers the machine off.  Must never exit: PID 1
# exiting panics the kernel.
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C LC_ALL=C
cd /

arg() { local w; for w in $(cat /proc/cmdline); do case $w in "$1"=*) echo "${w#*=}";; esac; done; }
export XT_REPO=$(arg xt_repo) XT_CACHE=$(arg xt_cache) XT_KVER=$(arg xt_kver)
export XT_INITRD=$(arg xt_initrd) XT_CASES=$(arg xt_cases)
export XT_CASE_TIMEOUT=$(arg xt_case_timeout)
export XT_OUT=/mnt/xtout
# Guest kernel (uncompressed ELF) and initramfs are copied into dom0's tmpfs
# below: xl mmaps them, and page faults on a cache=none 9p file are one 4 KiB
# round trip each (~90 s for the 63 MiB vmlinux, ~3 s from tmpfs).
export XT_GUEST_KERNEL=/run/xt-guest/vmlinux
export XT_GUEST_INITRD=/run/xt-guest/guest.cpio

finish() {
    # xl's per-domain logs, hotplug script output, xen-init-dom0's log.
    mkdir -p $XT_OUT/var-log-xen && cp -r /var/log/xen/. $XT_OUT/var-log-xen/ 2>/dev/null
    # Everything is on the host before XT-DONE (9p writes are synchronous):
    # run.sh may stop QEMU as soon as it sees it.
    sync
    echo "XT-DONE"
    # With ACPI the kernel's power-off makes QEMU exit; run.sh stops QEMU
    # itself if it does not.
    echo o > /proc/sysrq-trigger
    while :; do sleep 3600 2>/dev/null; done   # (9p goes away under it)
}

# Run a set-up step; report failures and anything slow (TCG on a busy host).
step() {
    local t=$SECONDS
    "$@" || echo "dom0-init: FAILED: $*"
    [ $((SECONDS - t)) -lt 3 ] || echo "dom0-init: $1 took $((SECONDS - t))s"
}

dmesg -n 1   # keep kernel chatter off the serial console
hostname dom0
step mount -t tmpfs -o mode=755 tmpfs /run
step mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
# Without devpts xl cannot make guest consoles.
step mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
step mount -t tmpfs tmpfs /dev/shm
# Debian's hotplug scripts (locking.sh: claim_lock) spin on `stat -L
# /dev/stdin`, which a devtmpfs /dev without udev lacks.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

# The repo (its .venv and built shim too) at the same path as on the host,
# in case the tmpfs mounts above hid it (a clone under /tmp or /run, as CI's
# may be). bash keeps reading this script through its open file.
mkdir -p "$XT_REPO"
step mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose xtrepo "$XT_REPO"

# Writable share of the host's out/xen: case logs and guest consoles.
mkdir -p $XT_OUT
step mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xtout $XT_OUT

# The host has a different kernel: point modprobe at the unpacked 6.1 tree
# (depmod already ran on the host).
rm -rf /lib/modules/$XT_KVER
mkdir -p /lib/modules
ln -s $XT_CACHE/kernel-$XT_KVER/lib/modules/$XT_KVER /lib/modules/$XT_KVER

mkdir -p /run/xt-guest
step cp $XT_CACHE/kernel-$XT_KVER/boot/vmlinux-$XT_KVER $XT_GUEST_KERNEL
step cp $XT_INITRD/guest.cpio $XT_GUEST_INITRD

step modprobe xenfs
step mount -t xenfs xenfs /proc/xen
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do step modprobe $m; done
mkdir -p /var/run/xen /var/run/xenstored /var/lib/xen /var/log/xen $XT_OUT/guests
step xenstored --pid-file=/var/run/xenstored.pid
step xen-init-dom0 >/var/log/xen/xen-init-dom0.log 2>&1
step xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=$XT_OUT/guests
echo "dom0 ready after $(cut -d' ' -f1 /proc/uptime)s"

bash $XT_REPO/tests/xen/run-cases.sh
finish
