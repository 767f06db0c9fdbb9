#!/bin/bash
# xentap Xen-in-QEMU end-to-end suite (host side).
#
# Boots Debian's Xen 4.17 under QEMU TCG with a Debian 6.1 dom0 whose root is
# the host's root filesystem (read-only 9p + tmpfs overlay), runs every case in
# tests/xen/cases/ inside dom0, and collects one `PASS <case>` / `FAIL <case>`
# line per case from the serial console.  See /work/shared/XEN-IN-QEMU.md for
# why each QEMU/Xen flag is what it is.
#
# Usage: tests/xen/run.sh [case ...]        (default: every case)
# Environment:
#   XT_CACHE    cache of kernel, xen image, initramfs (default /var/cache/xentap-xen)
#   XT_OUT      logs (default <repo>/out/xen); wiped at the start of each run
#   XT_TIMEOUT  hard limit on the QEMU run in seconds (default 3600: a hang
#               guard; the cases run in lanes side by side, see run-cases.sh;
#               a whole run has taken 272 s on one host and 2103 s on another,
#               where QEMU got 0.8 of a core on average)
#   XT_CASE_TIMEOUT  per-case limit inside dom0 in seconds (default 300)
#   XT_CPU      QEMU -cpu (default max,xsave=off; only change it to show the
#               canary catching the corruption plain `max` causes)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
XT_CACHE=${XT_CACHE:-/var/cache/xentap-xen}
XT_OUT=${XT_OUT:-$REPO/out/xen}
XT_TIMEOUT=${XT_TIMEOUT:-3600}
XT_CASE_TIMEOUT=${XT_CASE_TIMEOUT:-300}
XT_CPU=${XT_CPU:-max,xsave=off}
T0=$(date +%s)

say() { echo "xen-test: $*" >&2; }
die() { say "$*"; exit 2; }

# The paths below travel on the kernel command line and in QEMU's
# comma-separated -initrd/-virtfs arguments.
case "$REPO$XT_CACHE$XT_OUT" in *[,\ ]*) die "paths must not contain commas or spaces";; esac

# One run at a time: runs share the cache and out/xen.
mkdir -p "$XT_CACHE"
exec 9>"$XT_CACHE/lock"
flock -n 9 || { say "waiting for another run to finish"; flock -w 1200 9 || die "gave up waiting for the lock"; }

# ---------------------------------------------------------------- packages --
# Checked with dpkg-query so that a second run installs (and updates) nothing.
# qemu-system-xen: Xen's device model in dom0, for fio-ratio's qdisk guest
PKGS="qemu-system-x86 qemu-system-xen xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils
      busybox-static cpio kmod e2fsprogs util-linux openssl python3.11 coreutils xz-utils fio"
missing=
for p in $PKGS; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "need root to install:$missing"
    say "installing:$missing"
    apt-get update -qq
    # The Xen packages' postinst try to reconfigure grub/services; harmless
    # here, and none of it is used (Xen runs inside QEMU only).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ------------------------------------------------------------------ kernel --
# The 6.1 kernel package linux-image-amd64 depends on, unpacked (never
# installed on the host), with depmod run once here rather than in dom0.
mkdir -p "$XT_CACHE"
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1; }
KPKG=$(kpkg)
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(kpkg); }   # no package lists yet
[ -n "$KPKG" ] || die "cannot find the package linux-image-amd64 depends on"
KVER=${KPKG#linux-image-}
KROOT=$XT_CACHE/kernel-$KVER
if [ ! -e "$KROOT/.done" ]; then
    say "fetching $KPKG"
    rm -rf "$KROOT" "$XT_CACHE/dl"; mkdir -p "$XT_CACHE/dl"
    chown _apt "$XT_CACHE/dl" 2>/dev/null || true   # else apt warns it downloads unsandboxed
    (cd "$XT_CACHE/dl" && apt-get download -q "$KPKG" >/dev/null)
    dpkg -x "$XT_CACHE"/dl/"$KPKG"_*.deb "$KROOT"
    depmod -b "$KROOT" "$KVER"
    rm -rf "$XT_CACHE/dl"
    touch "$KROOT/.done"
    # A kernel ABI bump leaves the previous tree behind: drop it.
    for d in "$XT_CACHE"/kernel-*; do [ "$d" = "$KROOT" ] || rm -rf "$d"; done
fi
VMLINUZ=$KROOT/boot/vmlinuz-$KVER
# Guests get the uncompressed ELF: xl's domain builder otherwise spends
# 10-30 s of emulated CPU xz-decompressing the bzImage at every xl create.
VMLINUX=$KROOT/boot/vmlinux-$KVER
if [ ! -s "$VMLINUX" ]; then
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | head -1 | cut -d: -f1)
    [ -n "$off" ] || die "no xz stream in $VMLINUZ"
    # xz complains about the bytes after the stream; the ELF is complete.
    tail -c +$((off + 1)) "$VMLINUZ" | xz -dc > "$VMLINUX.tmp" 2>/dev/null || true
    [ "$(head -c 4 "$VMLINUX.tmp" | od -An -c | tr -d ' ')" = '177ELF' ] || die "could not extract vmlinux"
    mv "$VMLINUX.tmp" "$VMLINUX"
fi

# Xen must be handed to QEMU's multiboot loader uncompressed.
XENGZ=$(ls /boot/xen-4.17-amd64.gz 2>/dev/null || ls /boot/xen-4.17*.gz | head -1)
XEN=$XT_CACHE/xen-4.17.elf
if [ ! -s "$XEN" ] || [ "$XENGZ" -nt "$XEN" ]; then
    zcat "$XENGZ" > "$XEN.tmp" && mv "$XEN.tmp" "$XEN"
fi

# Canary data: 32 MiB of random bytes plus a deterministic AES-CTR keystream
# spec; their hashes are computed here, on real hardware, and checked in dom0.
if [ ! -s "$XT_CACHE/canary.sha256" ]; then
    head -c 32M /dev/urandom > "$XT_CACHE/canary.bin"
    sha256sum < "$XT_CACHE/canary.bin" | cut -d' ' -f1 > "$XT_CACHE/canary.bin.sha256"
    # shellcheck source=canary-stream.sh
    . "$HERE/canary-stream.sh"
    canary_stream | sha256sum | cut -d' ' -f1 > "$XT_CACHE/canary.sha256"
fi

# -------------------------------------------------------------- initramfs --
# Keyed by the content of tests/xen/ and the kernel/busybox/e2fsprogs
# versions, so editing anything here rebuilds and a second run reuses.
KEY=$( { (cd "$HERE" && find . -type f ! -name '*.swp' | LC_ALL=C sort | xargs sha256sum)
         echo "$KVER"; dpkg-query -W busybox-static e2fsprogs fio; } | sha256sum | cut -c1-16)
IRD=$XT_CACHE/initrd-$KEY
if [ ! -e "$IRD/.done" ]; then
    say "building initramfs ($KEY)"
    rm -rf "$XT_CACHE"/initrd-*
    mkdir -p "$IRD"
    "$HERE/mkinitrd.sh" dom0  "$KROOT" "$KVER" "$IRD/dom0.cpio"
    "$HERE/mkinitrd.sh" guest "$KROOT" "$KVER" "$IRD/guest.cpio"
    "$HERE/mkinitrd.sh" fio-tools "$KROOT" "$KVER" "$IRD/fio-tools.img"
    touch "$IRD/.done"
fi

# Byte code for the repo's packages, by the .venv's interpreter that dom0
# runs: dom0 sees the repo read-only, so a stale or missing .pyc would be
# compiled again by every xentap command there (seconds each, emulated).
if [ -x "$REPO/.venv/bin/python" ]; then
    for p in xentap appliance_domu engines analyzer; do
        [ -d "$REPO/$p" ] && "$REPO/.venv/bin/python" -m compileall -q "$REPO/$p" >/dev/null 2>&1 || true
    done
fi

# --------------------------------------------------------------- the run --
# All cases, or those named on the command line.
# canary runs first: if user space is being corrupted, nothing after it counts.
ALL=$(cd "$HERE/cases" && ls ./*.sh | sed 's|^\./||; s|\.sh$||' | LC_ALL=C sort | awk '$0 == "canary" { print; next } { rest = rest $0 "\n" } END { printf "%s", rest }')
# A case marked `# xt-known-bug: <reason>` fails for a bug not fixed yet, one
# marked `# xt-opt-in: <reason>` passes but is too long for every run: a whole
# run skips either with one line saying why (it is not counted as a pass);
# naming it on the command line runs it.
SKIPPED=
if [ $# -gt 0 ]; then
    CASES="$*"
else
    CASES=
    for c in $ALL; do
        why=$(sed -n 's/^# xt-known-bug: *//p' "$HERE/cases/$c.sh" | head -1)
        opt=$(sed -n 's/^# xt-opt-in: *//p' "$HERE/cases/$c.sh" | head -1)
        if [ -n "$why" ]; then SKIPPED="$SKIPPED $c"; echo "SKIP $c: known bug: $why"
        elif [ -n "$opt" ]; then SKIPPED="$SKIPPED $c"; echo "SKIP $c: opt-in: $opt"
        else CASES="$CASES $c"; fi
    done
    CASES=$(echo $CASES)
fi
for c in $CASES; do [ -f "$HERE/cases/$c.sh" ] || die "no such case: $c"; done
# ':'-separated: a comma would split QEMU's -initrd module list.
CASES_LIST=$(echo $CASES | tr ' ' ':')

rm -rf "$XT_OUT"; mkdir -p "$XT_OUT/guests" "$XT_OUT/cases"
# dom0's CurveZMQ key pair for the suite's daemon (run-cases.sh copies it).
"$REPO/.venv/bin/xentap" keys --dir "$XT_OUT/keys" --role dom0 >/dev/null || die "xentap keys --role dom0"
SERIAL=$XT_OUT/serial.log
: > "$SERIAL"

# dom0's command line carries the run's parameters; the initramfs's /init and
# dom0-init.sh read them from /proc/cmdline.
DOM0_ARGS="console=hvc0 earlyprintk=xen rdinit=/init quiet xt_repo=$REPO xt_cache=$XT_CACHE xt_kver=$KVER xt_initrd=$IRD xt_cases=$CASES_LIST xt_case_timeout=$XT_CASE_TIMEOUT"
# bootscrub=0: Xen would otherwise scrub the guests' free RAM in its idle
# loop, emulated CPU taken from dom0 and the guests.
XEN_ARGS="dom0_mem=1536M,max:1536M console=com1 com1=115200 noreboot smep=0 smap=0 bootscrub=0"

say "booting Xen in QEMU (cases: $CASES; logs in $XT_OUT)"
T1=$(date +%s)
# -cpu max,xsave=off: without xsave=off user space sees clobbered vector
# registers (see the notes).  The out/ share is writable: guest consoles and
# case logs land there directly.
timeout -k 10 "$XT_TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -smp 2 -cpu "$XT_CPU" -m 4096 \
    -display none -vga none -monitor none -no-reboot \
    -chardev file,id=ser0,path="$SERIAL" -serial chardev:ser0 \
    -kernel "$XEN" -append "$XEN_ARGS" \
    -initrd "$VMLINUZ $DOM0_ARGS,$IRD/dom0.cpio" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$XT_OUT",mount_tag=xtout,security_model=none,multidevs=remap \
    -virtfs local,path="$REPO",mount_tag=xtrepo,security_model=none,readonly=on,multidevs=remap \
    </dev/null >"$XT_OUT/qemu.log" 2>&1 9>&- &
QPID=$!
trap 'kill $QPID 2>/dev/null || true' EXIT INT TERM

# dom0 prints XT-DONE when every case has run and its logs are synced.  Xen
# then "enters ACPI S5" but QEMU does not exit (seen here), so stop it.
qrc=
qcpu=0
while kill -0 $QPID 2>/dev/null; do
    # QEMU's CPU time (user + system, in clock ticks) so far
    # ($QPID is timeout(1); QEMU is its child)
    # (none yet in the first second: pgrep's status must not end the run, set -e)
    qp=$(pgrep -P $QPID 2>/dev/null | head -1) || qp=
    [ -z "$qp" ] || qcpu=$(awk '{ print $14 + $15 }' /proc/$qp/stat 2>/dev/null || echo "$qcpu")
    if grep -q '^XT-DONE' "$SERIAL" 2>/dev/null; then
        for _ in 1 2 3; do kill -0 $QPID 2>/dev/null || break; sleep 1; done
        kill $QPID 2>/dev/null || true
        break
    fi
    sleep 1
done
wait $QPID 2>/dev/null && qrc=0 || qrc=$?
T2=$(date +%s)
trap - EXIT INT TERM

# ---------------------------------------------------------------- results --
tr -d '\r' < "$SERIAL" > "$XT_OUT/serial.txt"
timed_out=0
grep -q '^XT-DONE' "$XT_OUT/serial.txt" || timed_out=1
pass=0; fail=0; failed=
for c in $CASES; do
    if grep -qx "PASS $c" "$XT_OUT/serial.txt"; then
        echo "PASS $c"; pass=$((pass + 1))
    else
        # No line at all (hang, timeout, crash) counts as a failure too.
        grep -qx "FAIL $c" "$XT_OUT/serial.txt" || say "no result line for $c"
        echo "FAIL $c"; fail=$((fail + 1)); failed="$failed $c"
    fi
done
sed -En 's/^(\[[^]]*\] )?(METRIC .*)/\2/p' "$XT_OUT/serial.txt"
grep 'RETRY' "$XT_OUT/serial.txt" | sed 's/^/xen-test: warning: /' >&2 || true
if grep -q '^XT-DAEMON-TRACEBACK' "$XT_OUT/serial.txt"; then
    say "the suite's xentap daemon logged a traceback (out/xen/cases/daemon.log)"
    fail=$((fail + 1)); failed="$failed daemon-log"
fi

if [ $fail -gt 0 ] || [ $timed_out = 1 ]; then
    [ $timed_out = 1 ] && say "dom0 never reported XT-DONE (QEMU exit $qrc; limit ${XT_TIMEOUT}s)"
    echo "----- tail of $XT_OUT/serial.txt"; tail -n 60 "$XT_OUT/serial.txt"
    [ -s "$XT_OUT/qemu.log" ] && { echo "----- $XT_OUT/qemu.log"; tail -n 20 "$XT_OUT/qemu.log"; }
    for c in $failed; do
        [ -f "$XT_OUT/cases/$c.log" ] && { echo "----- tail of $XT_OUT/cases/$c.log"; tail -n 40 "$XT_OUT/cases/$c.log"; }
    done
    for g in "$XT_OUT"/guests/*.log; do
        [ -f "$g" ] && { echo "----- tail of $g"; tail -n 30 "$g"; }
    done
fi
say "wall time: qemu $((T2 - T1))s, total $((T2 - T0))s; qemu cpu $((qcpu / $(getconf CLK_TCK)))s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
# The last lines say where the time went (each case's wall time, cases in
# different lanes overlap, and the suite daemon's start) and what failed: a
# CI log that keeps only its head and tail still shows them.
sed -En 's/^(TIME [^ ]+ [0-9]+)$/\1 s/p; s/^=== (suite daemon: .*)/TIME \1/p' "$XT_OUT/serial.txt"
for c in $failed; do
    why=$(sed -n 's/^[0-9.]* FAILED: //p' "$XT_OUT/cases/$c.log" 2>/dev/null | head -1 | cut -c1-400)
    [ -n "$why" ] || why=$(grep -m1 -x "\[$c\] timed out after [0-9]*s" "$XT_OUT/serial.txt" | sed 's/^\[[^]]*\] //')
    say "$c failed: ${why:-no FAILED line (see $XT_OUT/cases/$c.log)}"
done
skipped=$(echo $SKIPPED | wc -w)
for c in $SKIPPED; do echo "SKIP $c (make xen-test CASES=$c runs it)"; done
echo "$pass passed, $fail failed, $skipped skipped"
[ $fail -eq 0 ] && [ $timed_out = 0 ]
