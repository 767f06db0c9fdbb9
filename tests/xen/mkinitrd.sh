#!/bin/bash
# mkinitrd.sh dom0|guest|fio-tools <unpacked kernel root> <kernel version> <out>
#
# dom0:  busybox + the virtio/9p/overlay modules; its /init (dom0-initramfs-init)
#        mounts the host root over 9p and switch_roots into it.
# guest: busybox + xen-blkfront + mke2fs/e2fsck (host binaries and their
#        shared libraries) + guest/init and the workloads in guest/*.sh;
#        xfs.ko (not loaded by init) and mkfs.xfs (xfsprogs) for guest/xfs.sh.
# fio-tools: not an initramfs but a read-only ext4 disk image with Debian's
#        fio in /bin and every library it links in /lib (about 90 MiB: ceph,
#        gluster, ICU...), for cases/fio-ratio.sh's guests (their xvdb,
#        mounted on /opt by guest/fio.sh).  In the initramfs those 90 MiB cost
#        about a minute of emulated CPU per boot, unpacked into RAM; from a
#        disk only what fio touches is read.
# Uncompressed cpio: unpacking gzip costs more under TCG than loading the
# extra bytes does.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
kind=$1 KROOT=$2 KVER=$3 out=$4
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

mkdir -p "$T"/{bin,sbin,dev,proc,sys,run,tmp,mnt,etc,lib/modules,lib64}
cp /bin/busybox "$T/bin/busybox"
for a in $("$T/bin/busybox" --list); do
    [ -e "$T/bin/$a" ] || ln -s busybox "$T/bin/$a"
done

# Copy modules (and what they depend on, in load order) flat into
# /lib/modules, and write that order to /lib/modules/order.
add_modules() {
    local m f
    for m in "$@"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | while read -r kw f _; do
            [ "$kw" = insmod ] || continue   # "builtin x" lines need nothing
            local b; b=$(basename "$f"); b=${b%%.ko*}
            grep -qx "$b" "$T/lib/modules/order" 2>/dev/null && continue
            case "$f" in
                *.ko.xz) xz -dc "$f" > "$T/lib/modules/$b.ko";;
                *.ko.zst) zstd -qdc "$f" > "$T/lib/modules/$b.ko";;
                *) cp "$f" "$T/lib/modules/$b.ko";;
            esac
            echo "$b" >> "$T/lib/modules/order"
        done
    done
}
: > "$T/lib/modules/order"

# Copy a host binary with every shared library ldd names.
add_binary() {
    local bin=$1 lib
    cp -L "$bin" "$T/bin/"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        mkdir -p "$T$(dirname "$lib")"
        [ -e "$T$lib" ] || cp -L "$lib" "$T$lib"
    done
}

case $kind in
fio-tools)
    rm -rf "$T"; mkdir -p "$T/bin" "$T/lib"
    cp -L /usr/bin/fio "$T/bin/"
    for lib in $(ldd /usr/bin/fio | grep -o '/[^ ]*'); do cp -L "$lib" "$T/lib/"; done
    size=$(( $(du -sm "$T" | cut -f1) * 5 / 4 + 16 ))
    mke2fs -q -F -t ext4 -O ^has_journal -m 0 -L xt-fio-tools -d "$T" "$out" "${size}M"
    exit 0
    ;;
dom0)
    # The order the notes give (modprobe resolves the same dependencies).
    add_modules virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
                virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay
    cp "$HERE/dom0-initramfs-init" "$T/init"
    ;;
guest)
    add_modules xen-blkfront ext4
    # The busybox applets of the same name would shadow nothing: busybox has
    # no mke2fs/e2fsck, but remove any symlink first to be sure.
    for b in mke2fs e2fsck; do
        rm -f "$T/bin/$b"
        add_binary "/sbin/$b"
    done
    ln -sf mke2fs "$T/bin/mkfs.ext4"
    # XFS for guest/xfs.sh, which loads these itself from /lib/modules/xfs
    # (in its order file), so that the other guests spend no emulated CPU on
    # them; mkfs.xfs from Debian's xfsprogs on the host.
    mkdir -p "$T/lib/modules/xfs"
    : > "$T/lib/modules/xfs/order"
    modprobe -d "$KROOT" -S "$KVER" --show-depends xfs | while read -r kw f _; do
        [ "$kw" = insmod ] || continue
        b=$(basename "$f"); b=${b%%.ko*}
        grep -qx "$b" "$T/lib/modules/order" && continue   # init loads it already
        case "$f" in
            *.ko.xz) xz -dc "$f" > "$T/lib/modules/xfs/$b.ko";;
            *.ko.zst) zstd -qdc "$f" > "$T/lib/modules/xfs/$b.ko";;
            *) cp "$f" "$T/lib/modules/xfs/$b.ko";;
        esac
        echo "$b" >> "$T/lib/modules/xfs/order"
    done
    add_binary /usr/sbin/mkfs.xfs
    ln -sf e2fsck "$T/bin/fsck.ext4"
    cp /etc/mke2fs.conf "$T/etc/"
    cp "$HERE/guest/init" "$T/init"
    mkdir -p "$T/workloads"
    for w in "$HERE"/guest/*.sh; do cp "$w" "$T/workloads/"; done
    ;;
*) echo "usage: $0 dom0|guest|fio-tools KROOT KVER OUT" >&2; exit 2;;
esac
chmod 755 "$T/init"
(cd "$T" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$out"
