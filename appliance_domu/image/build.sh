#!/bin/bash
# appliance_domu/image/build.sh [OUT_DIR]  (`make appliance-image`)
#
# Builds the data-services appliance as a PV domain image, from files in this
# repo and Debian/PyPI packages only:
#
#   OUT_DIR/vmlinuz            the kernel of Debian's linux-image package that
#                              linux-image-amd64 depends on (6.1), as shipped
#   OUT_DIR/root.img           the root: a read-only ext4 disk image with busybox,
#                              mke2fs, Debian's python3.11 (trimmed stdlib), the
#                              project's packages, the wheels pinned in
#                              requirements.txt, xen-netfront/xen-blkfront/ext4
#                              and init (this directory); served as the
#                              appliance's xvdb by dom0's xentap daemon
#   OUT_DIR/appliance.cpio.gz  the boot initramfs: busybox, xen-blkfront, ext4
#                              and boot-init, which mounts root.img and runs
#                              its init
#   OUT_DIR/SHA256SUMS
#
# Reproducible: pinned wheels, files sorted, every mtime SOURCE_DATE_EPOCH,
# .pyc in unchecked-hash mode, gzip -n.  Network only for apt-get download and
# pip download (both cached in $XT_APPLIANCE_CACHE).  Checks the tree before
# packing it: `chroot TREE python3.11 -m xentap appliance serve --help` must run.
#
# Environment:
#   XT_APPLIANCE_CACHE  downloads (default /var/cache/xentap-appliance)
#   XT_CACHE            the Xen suite's cache: its unpacked kernel is reused
#                       when it is the same version (default /var/cache/xentap-xen)
#   SOURCE_DATE_EPOCH   timestamp of every file (default: the last commit's)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/out/appliance}
CACHE=${XT_APPLIANCE_CACHE:-/var/cache/xentap-appliance}
XT_CACHE=${XT_CACHE:-/var/cache/xentap-xen}
PY=/usr/bin/python3.11
PYVER=3.11
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)}
export LC_ALL=C

say() { echo "appliance-image: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------- packages --
PKGS="python3.11 busybox-static e2fsprogs kmod cpio xz-utils gzip"
missing=
for p in $PKGS; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "need root to install:$missing"
    say "installing:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
[ -x "$PY" ] || die "$PY is missing"
ls "$REPO"/xentap/_shim_c*.so >/dev/null 2>&1 || die "the shim is not built: run 'make build' first"

# ------------------------------------------------------------------ kernel --
mkdir -p "$CACHE"
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1; }
KPKG=$(kpkg)
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(kpkg); }
[ -n "$KPKG" ] || die "cannot find the package linux-image-amd64 depends on"
KVER=${KPKG#linux-image-}
if [ -e "$XT_CACHE/kernel-$KVER/.done" ]; then
    KROOT=$XT_CACHE/kernel-$KVER           # the Xen suite unpacked the same package
else
    KROOT=$CACHE/kernel-$KVER
    if [ ! -e "$KROOT/.done" ]; then
        say "fetching $KPKG"
        rm -rf "$KROOT" "$CACHE/dl"; mkdir -p "$CACHE/dl"
        chown _apt "$CACHE/dl" 2>/dev/null || true
        (cd "$CACHE/dl" && apt-get download -q "$KPKG" >/dev/null)
        dpkg -x "$CACHE"/dl/"$KPKG"_*.deb "$KROOT"
        depmod -b "$KROOT" "$KVER"
        rm -rf "$CACHE/dl"
        touch "$KROOT/.done"
    fi
fi

# --------------------------------------------------------------- up to date --
# The inputs: this directory, the project's packages (and the built shim),
# the pinned wheels, the kernel and the interpreter.  The same inputs make the
# same image (see above), so a build whose inputs did not change is skipped
# (XT_APPLIANCE_REBUILD=1 forces one).
INPUTS=$( { (cd "$HERE" && find . -type f ! -name '*.swp' | sort | xargs sha256sum)
            (cd "$REPO" && find xentap appliance_domu engines analyzer \( -name '*.py' -o -name '_shim_c*.so' \) \
                 ! -path 'appliance_domu/image/*' | sort | xargs sha256sum)
            echo "$KVER $SOURCE_DATE_EPOCH"; dpkg-query -W python3.11 busybox-static e2fsprogs; } |
          sha256sum | cut -c1-16)
if [ "${XT_APPLIANCE_REBUILD:-0}" != 1 ] && [ "$(cat "$OUT/.inputs" 2>/dev/null)" = "$INPUTS" ] &&
   (cd "$OUT" && sha256sum --quiet -c SHA256SUMS 2>/dev/null); then
    echo "appliance-image: $OUT is up to date (inputs $INPUTS): root.img $(du -B1 "$OUT/root.img" | cut -f1) bytes allocated, appliance.cpio.gz $(stat -c %s "$OUT/appliance.cpio.gz") bytes"
    exit 0
fi

# ------------------------------------------------------------------ wheels --
WHEELS=$CACHE/wheels
REQ=$HERE/requirements.txt
PLAT=
for v in 2_5 2_17 2_24 2_26 2_28 2_31 2_34 2_35 2_36; do PLAT="$PLAT --platform manylinux_${v}_x86_64"; done
PLAT="$PLAT --platform manylinux1_x86_64 --platform manylinux2014_x86_64"
if ! cmp -s "$REQ" "$WHEELS/requirements.txt"; then
    say "downloading wheels (requirements.txt)"
    rm -rf "$WHEELS.tmp"; mkdir -p "$WHEELS.tmp"
    PIP=$REPO/.venv/bin/pip; [ -x "$PIP" ] || PIP="$PY -m pip"
    $PIP download -q --no-deps --only-binary=:all: $PLAT --python-version $PYVER \
        --implementation cp --abi cp311 --abi abi3 --abi none -d "$WHEELS.tmp" -r "$REQ" \
        2> >(grep -v "^WARNING: Location 'file:" >&2) || die "pip download failed"
    cp "$REQ" "$WHEELS.tmp/requirements.txt"
    rm -rf "$WHEELS"; mv "$WHEELS.tmp" "$WHEELS"
fi

# -------------------------------------------------------------------- tree --
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
R=$T/root
mkdir -p "$R"/{bin,dev,proc,sys,run,tmp,journal,etc,lib/modules,lib64,usr/bin,usr/lib}
ln -s bin "$R/sbin"

cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do
    [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
done

# Modules flat in /lib/modules, load order in /lib/modules/order.
: > "$R/lib/modules/order"
for m in xen-netfront xen-blkfront ext4; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | while read -r kw f _; do
        [ "$kw" = insmod ] || continue
        b=$(basename "$f"); b=${b%%.ko*}
        grep -qx "$b" "$R/lib/modules/order" && continue
        case "$f" in
            *.ko.xz) xz -dc "$f" > "$R/lib/modules/$b.ko";;
            *.ko.zst) zstd -qdc "$f" > "$R/lib/modules/$b.ko";;
            *) cp "$f" "$R/lib/modules/$b.ko";;
        esac
        echo "$b" >> "$R/lib/modules/order"
    done
done

# A host (Debian) binary or shared object and every library ldd names.
add_libs() {
    local lib
    for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do
        case $lib in "$R"/*) continue;; esac        # a wheel's own bundled library
        mkdir -p "$R$(dirname "$lib")"
        [ -e "$R$lib" ] || cp -L "$lib" "$R$lib"
    done
}
for b in /sbin/mke2fs; do
    rm -f "$R/bin/$(basename "$b")"; cp -L "$b" "$R/bin/"; add_libs "$b"
done
cp /etc/mke2fs.conf "$R/etc/"

# Debian's interpreter and its standard library, without what a server never
# imports (tests, GUI, the compiler-building and packaging parts).
cp -L $PY "$R/usr/bin/python$PYVER"; add_libs $PY
ln -s python$PYVER "$R/usr/bin/python3"
SL=/usr/lib/python$PYVER
tar -C /usr/lib -cf - \
    --exclude="python$PYVER/test" --exclude="python$PYVER/*/test" --exclude="python$PYVER/*/tests" \
    --exclude="python$PYVER/idlelib" --exclude="python$PYVER/tkinter" --exclude="python$PYVER/turtledemo" \
    --exclude="python$PYVER/ensurepip" --exclude="python$PYVER/lib2to3" --exclude="python$PYVER/pydoc_data" \
    --exclude="python$PYVER/config-$PYVER-*" --exclude="python$PYVER/distutils" \
    --exclude="python$PYVER/unittest" --exclude="python$PYVER/sqlite3" --exclude="python$PYVER/curses" \
    --exclude="python$PYVER/dbm" --exclude="python$PYVER/venv" --exclude="python$PYVER/site-packages" \
    --exclude="python$PYVER/dist-packages" --exclude='__pycache__' --exclude="python$PYVER/lib-dynload" \
    "python$PYVER" | tar -C "$R/usr/lib" -xf -
mkdir -p "$R$SL/lib-dynload"
for so in $SL/lib-dynload/*.so; do
    case $(basename "$so") in
        _tkinter*|_sqlite3*|_curses*|_dbm*|_gdbm*|readline*|_test*|xxlimited*|_xxtest*|_ctypes_test*|\
        audioop*|nis*|_crypt*|_codecs_*|_multibytecodec*|_ssl*|_hashlib*|ossaudiodev*|_lsprof*|\
        _xxsubinterpreters*) continue;;       # (hashlib falls back to its built-in hashes)
    esac
    cp "$so" "$R$SL/lib-dynload/"; add_libs "$so"
done
# Python's sysconfig reads this module at start-up (site.py).
cp /usr/lib/python$PYVER/_sysconfigdata__x86_64-linux-gnu.py "$R$SL/" 2>/dev/null || true

# The wheels, unpacked (a wheel is a zip laid out as site-packages), where
# Debian's interpreter looks: /usr/lib/python3/dist-packages.
SP=$R/usr/lib/python3/dist-packages
mkdir -p "$SP"
for w in "$WHEELS"/*.whl; do
    $PY -m zipfile -e "$w" "$SP"
done
rm -rf "$SP"/*.dist-info/RECORD "$SP"/zmq/tests "$SP"/*/tests "$SP"/zmq/*.pxd "$SP"/zmq/*/*.pxd \
       "$SP"/zmq/utils/*.h "$SP"/zmq/backend/cffi "$SP"/zstandard/*.pyi "$SP"/cffi/*.h \
       "$SP"/zstandard/_cffi.* "$SP"/zstandard/backend_cffi.py
# numpy: its tests, headers, type stubs, f2py and the typing/testing helpers
# are not imported by a server.
rm -rf "$SP"/numpy/*/tests "$SP"/numpy/_core/include "$SP"/numpy/f2py "$SP"/numpy/testing \
       "$SP"/numpy/typing "$SP"/numpy/_pyinstaller "$SP"/numpy/doc "$SP"/numpy/distutils
find "$SP/numpy" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.h' \) -delete 2>/dev/null || true
# Extension modules ship with symbols (zstandard's is 11 MiB, 1 MiB stripped);
# the libraries auditwheel bundled (*.libs/) are left as they are.
find "$SP" -name '*.so' ! -path '*.libs/*' -exec strip --strip-unneeded {} +
find "$SP" -name '*.so*' -exec chmod 755 {} +
for so in $(find "$SP" -name '*.so' | sort); do add_libs "$so"; done

# The project: its packages as in the repo (with the built shim, whose
# libraries come along), and the `xentap` entry point.
for p in xentap appliance_domu engines analyzer; do
    (cd "$REPO" && find "$p" -name '*.py' -o -name '_shim_c*.so') | while read -r f; do
        case $f in appliance_domu/image/*) continue;; esac
        mkdir -p "$SP/$(dirname "$f")"; cp "$REPO/$f" "$SP/$f"
    done
done
for so in "$SP"/xentap/_shim_c*.so; do add_libs "$so"; done
cat > "$R/usr/bin/xentap" <<'EOF'
#!/usr/bin/python3.11
import sys
from xentap.cli import main
sys.exit(main())
EOF
chmod 755 "$R/usr/bin/xentap"
printf 'from xentap.cli import main\nmain()\n' > "$SP/xentap/__main__.py"

# The appliance's own files: init and the xenstore announcer.
cp "$HERE/init" "$R/init"; chmod 755 "$R/init"
mkdir -p "$R/usr/lib/xentap"
cp "$HERE/announce.py" "$R/usr/lib/xentap/announce.py"
echo "root:x:0:0:root:/:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
printf 'hosts: files\n' > "$R/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"

# Byte code, made once here by the same interpreter (start-up under TCG is
# slow enough); unchecked-hash: no timestamps, the same bytes every build.
# The standard library goes sourceless (.pyc beside where the .py was: half
# the size); the project and its dependencies keep their sources.
$PY -m compileall -q -j 0 -b --invalidation-mode unchecked-hash -s "$R" -p / "$R$SL" >/dev/null 2>&1 || true
find "$R$SL" -name '*.py' ! -name '_sysconfigdata_*' -delete
$PY -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$R" -p / "$SP" >/dev/null 2>&1 || true

# ------------------------------------------------------------------- check --
# The tree must run the appliance before it is packed.
chroot "$R" /usr/bin/python$PYVER -c 'import zmq, zstandard, xxhash, construct, pyxs, appliance_domu.receiver, xentap.cli; assert zmq.has("curve")' ||
    die "the tree's python cannot import the appliance"
chroot "$R" /usr/bin/xentap appliance serve --help >/dev/null || die "'xentap appliance serve --help' fails in the tree"
chroot "$R" /usr/bin/python$PYVER -m xentap.cli_appliance serve --help >/dev/null ||
    die "'python3 -m xentap.cli_appliance serve --help' (what init runs) fails in the tree"
chroot "$R" /usr/bin/python$PYVER -c 'import sys; sys.path.insert(0, "/usr/lib/xentap"); import announce' ||
    die "announce.py does not import in the tree"
find "$R" -name __pycache__ -path '*usr/lib/xentap*' -exec rm -rf {} + 2>/dev/null || true

# -------------------------------------------------------------------- pack --
# root.img: the tree as a read-only ext4 disk image (the appliance's xvdb);
# appliance.cpio.gz: a boot initramfs with busybox, xen-blkfront and ext4
# that mounts it (boot-init).  Fixed UUID and hash seed, every mtime and
# mke2fs's clock at SOURCE_DATE_EPOCH: the same bytes every build.
mkdir -p "$OUT"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
unpacked=$(du -sb "$R" | cut -f1)
nfiles=$(find "$R" | wc -l)
size_mib=$(( (unpacked * 5 / 4 + nfiles * 4096) / 1048576 + 16 ))
FSUUID=78656e74-6170-4170-8000-726f6f74696d
rm -f "$OUT/root.img.tmp"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -O ^has_journal,^resize_inode -m 0 -b 4096 \
    -L xentap-root -U "$FSUUID" -E "hash_seed=$FSUUID,root_owner=0:0" -d "$R" \
    "$OUT/root.img.tmp" "${size_mib}M" || die "mke2fs -d of the root image failed"
e2fsck -fn "$OUT/root.img.tmp" >/dev/null || die "the root image does not fsck clean"
mv "$OUT/root.img.tmp" "$OUT/root.img"

B=$T/boot
mkdir -p "$B"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$B/bin/busybox"
for a in $("$B/bin/busybox" --list); do
    [ -e "$B/bin/$a" ] || ln -s busybox "$B/bin/$a"
done
: > "$B/lib/modules/order"
for m in xen-blkfront ext4; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | while read -r kw f _; do
        [ "$kw" = insmod ] || continue
        b=$(basename "$f"); b=${b%%.ko*}
        grep -qx "$b" "$B/lib/modules/order" && continue
        cp "$R/lib/modules/$b.ko" "$B/lib/modules/$b.ko"
        echo "$b" >> "$B/lib/modules/order"
    done
done
cp "$HERE/boot-init" "$B/init"; chmod 755 "$B/init"
find "$B" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$B" && find . | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 > "$OUT/appliance.cpio.gz.tmp"
mv "$OUT/appliance.cpio.gz.tmp" "$OUT/appliance.cpio.gz"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kernel-version"
(cd "$OUT" && sha256sum vmlinuz appliance.cpio.gz root.img > SHA256SUMS)
echo "$INPUTS" > "$OUT/.inputs"

boot=$(stat -c %s "$OUT/appliance.cpio.gz")
root=$(stat -c %s "$OUT/root.img")
rootused=$(du -B1 "$OUT/root.img" | cut -f1)
kern=$(stat -c %s "$OUT/vmlinuz")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "appliance-image: $OUT/root.img $(mib "$root") ($(mib "$rootused") allocated; the tree is $(mib "$unpacked")), boot initramfs $OUT/appliance.cpio.gz $(mib "$boot"), vmlinuz $(mib "$kern") (kernel $KVER)"
echo "appliance-image: sha256 $(cut -c1-16 < "$OUT/SHA256SUMS" | tr '\n' ' ')"
