# Helpers for cases (tests/xen/cases/*.sh): `. "$XT_REPO/tests/xen/lib.sh"`.
# Environment set by dom0-init.sh / run-cases.sh:
#   XT_REPO XT_CACHE XT_KVER XT_OUT (writable share = host out/xen)
#   XT_GUEST_KERNEL XT_GUEST_INITRD XT_CASE XT_WORK (per-case dir in dom0's /run)

log() { echo "$(cut -d' ' -f1 /proc/uptime) $*"; }
fail() { log "FAILED: $*"; exit 1; }

# `xl list` must show a header and a Domain-0 row with ID 0: xl has been seen
# to exit 0 with garbage output when vector registers got clobbered.
xl_list_sane() {
    local out; out=$(xl list 2>&1) || { echo "$out"; return 1; }
    echo "$out" | head -1 | grep -q '^Name *ID *Mem *VCPUs' || { echo "xl list header: $out"; return 1; }
    echo "$out" | grep -Eq '^Domain-0 +0 +[0-9]+ +[0-9]+ ' || { echo "xl list dom0 row: $out"; return 1; }
}

# guest_cfg NAME WORKLOAD [xl config lines...]: writes $XT_WORK/NAME.cfg for a
# PV guest booting the suite's guest initramfs, which runs
# tests/xen/guest/WORKLOAD.sh and powers off.
guest_cfg() {
    local name=$1 workload=$2; shift 2
    {
        echo "name = '$name'"
        echo "type = 'pv'"
        echo "kernel = '$XT_GUEST_KERNEL'"
        echo "ramdisk = '$XT_GUEST_INITRD'"
        echo "extra = 'console=hvc0 quiet xt_workload=$workload'"
        echo "memory = 256"
        echo "vcpus = 1"
        echo "on_poweroff = 'destroy'"
        echo "on_reboot = 'destroy'"
        echo "on_crash = 'destroy'"
        for l in "$@"; do echo "$l"; done
    } > "$XT_WORK/$name.cfg"
    echo "$XT_WORK/$name.cfg"
}

guest_log() { echo "$XT_OUT/guests/guest-$1.log"; }

# guest_run NAME CFG [TIMEOUT]: create the guest and wait for it to go away.
# (`xl create -c` hangs here.)  Polls xenstore for /local/domain/<domid>
# rather than `xl list`: every xl call costs seconds of emulated CPU that the
# guest would otherwise get.
guest_run() {
    local name=$1 cfg=$2 limit=${3:-240} domid start now
    log "xl create $cfg"
    start=$(date +%s)
    if ! xl create "$cfg" > "$XT_WORK/xl-create.out" 2>&1; then
        cat "$XT_WORK/xl-create.out"
        # libxl gives a hotplug script 40 s; Debian's `block` script (dozens
        # of fork+execs, slow in an emulated PV dom0) has overrun that once
        # on a heavily loaded host.  Retry that case once, loudly.
        grep -q 'because of timeout' "$XT_WORK/xl-create.out" || { log "xl create failed"; return 1; }
        log "RETRY: hotplug script timed out; xl create once more"
        xl destroy "$name" 2>/dev/null
        xl create "$cfg" || { log "xl create failed again"; return 1; }
    else
        cat "$XT_WORK/xl-create.out"
    fi
    domid=$(xl domid "$name") || { log "xl domid $name failed"; return 1; }
    case $domid in ''|*[!0-9]*) log "xl domid printed '$domid'"; return 1;; esac
    log "guest $name is domain $domid"
    while xenstore-exists "/local/domain/$domid" 2>/dev/null; do
        sleep 1
        now=$(date +%s)
        if [ $((now - start)) -ge "$limit" ]; then
            log "guest $name still running after ${limit}s; destroying"
            xl destroy "$name"
            return 1
        fi
    done
    log "guest $name gone after $(( $(date +%s) - start ))s"
}
