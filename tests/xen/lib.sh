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
    local name=$1 cfg=$2 limit=${3:-900} domid start now
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

# --- xentap in dom0 -------------------------------------------------------------------
XENTAP=$XT_REPO/.venv/bin/xentap
XT_XS_ROOT=/local/domain/0/xentap
xentap_daemon_pid=

# xentap_daemon_start LOG [DAEMON ARGS...]: starts `xentap daemon --transport
# xen` and waits until it says in xenstore that it runs.  xentap_daemon_stop
# stops it (a case must not leave it to the next one: `trap xentap_daemon_stop
# EXIT`).
xentap_daemon_start() {
    local dlog=$1 t0=$SECONDS; shift
    if [ -n "${XT_DAEMON_PID:-}" ]; then
        # run-cases.sh's daemon serves every case (see there): wait until it runs.
        until [ "$(xenstore-read $XT_XS_ROOT/daemon/state 2>/dev/null)" = running ] &&
              [ "$(xenstore-read $XT_XS_ROOT/daemon/pid 2>/dev/null)" = "$XT_DAEMON_PID" ]; do
            kill -0 "$XT_DAEMON_PID" 2>/dev/null || fail "the suite's xentap daemon ($XT_DAEMON_PID) is gone"
            [ $((SECONDS - t0)) -lt 600 ] || fail "the suite's xentap daemon is not running after 600s"
            sleep 0.5
        done
        log "using the suite's xentap daemon (pid $XT_DAEMON_PID, log: ${XT_DAEMON_LOG#$XT_OUT/})"
        xentap_daemon_pid=
        return 0
    fi
    for d in /dev/xen/gntdev /dev/xen/evtchn; do
        [ -c "$d" ] || fail "$d is missing"
    done
    [ -x "$XENTAP" ] || fail "$XENTAP is missing"
    log "starting xentap daemon $* (log: ${dlog#$XT_OUT/})"
    "$XENTAP" daemon --transport xen -v "$@" > "$dlog" 2>&1 &
    xentap_daemon_pid=$!
    until [ "$(xenstore-read $XT_XS_ROOT/daemon/state 2>/dev/null)" = running ] &&
          [ "$(xenstore-read $XT_XS_ROOT/daemon/pid 2>/dev/null)" = "$xentap_daemon_pid" ]; do
        kill -0 "$xentap_daemon_pid" 2>/dev/null ||
            { cat "$dlog"; xentap_daemon_pid=; fail "xentap daemon exited"; }
        [ $((SECONDS - t0)) -lt 300 ] || { cat "$dlog"; fail "xentap daemon not running after 300s"; }
        sleep 0.5
    done
    log "xentap daemon running after $((SECONDS - t0))s"
}

xentap_daemon_stop() {
    [ -n "$xentap_daemon_pid" ] || return 0
    kill -TERM "$xentap_daemon_pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$xentap_daemon_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$xentap_daemon_pid" 2>/dev/null
    wait "$xentap_daemon_pid" 2>/dev/null
    xentap_daemon_pid=
}

# xentap_appliance_start DIR LOG: the appliance in dom0, as an administrator
# runs it: `xentap keys` makes dom0's and the appliance's key pairs in DIR/keys
# (dom0's public key allowed in DIR/keys/allowed), `xentap appliance serve`
# listens on $XT_APPLIANCE_ENDPOINT with its journals in DIR/data.
# xentap_appliance_stop stops it (SIGTERM: journals closed cleanly).
XT_APPLIANCE_ENDPOINT=tcp://127.0.0.1:7788
xentap_appliance_pid=
xentap_appliance_start() {
    local dir=$1 alog=$2 t0=$SECONDS
    mkdir -p "$dir/keys/allowed" "$dir/data" || fail "cannot make $dir"
    # dom0's init leaves lo down: binding 127.0.0.1 still works, connecting never does.
    ip link set lo up || fail "cannot bring lo up"
    if [ -n "${XT_KEYS:-}" ]; then      # the suite daemon's key pair (run-cases.sh)
        cp "$XT_KEYS/dom0.key" "$XT_KEYS/dom0.key_secret" "$dir/keys/" || fail "no dom0 keys in $XT_KEYS"
    else
        "$XENTAP" keys --dir "$dir/keys" --role dom0 > /dev/null || fail "xentap keys --role dom0"
    fi
    "$XENTAP" keys --dir "$dir/keys" --role appliance > /dev/null || fail "xentap keys --role appliance"
    cp "$dir/keys/dom0.key" "$dir/keys/allowed/" || fail "cannot allow dom0's key"
    log "starting xentap appliance serve on $XT_APPLIANCE_ENDPOINT (log: ${alog#$XT_OUT/})"
    "$XENTAP" appliance serve --listen "$XT_APPLIANCE_ENDPOINT" --data-dir "$dir/data" \
        --keys "$dir/keys" --allow "$dir/keys/allowed" -v > "$alog" 2>&1 &
    xentap_appliance_pid=$!
    until grep -q 'listening on' "$alog" 2>/dev/null; do
        kill -0 "$xentap_appliance_pid" 2>/dev/null ||
            { cat "$alog"; xentap_appliance_pid=; fail "xentap appliance exited"; }
        # 300 s for keys and start-up: with cases beside it on a loaded host,
        # `xentap keys` alone has taken a minute of emulated Python
        [ $((SECONDS - t0)) -lt 900 ] || { cat "$alog"; fail "appliance not listening after 900s"; }
        sleep 0.5
    done
    log "xentap appliance listening after $((SECONDS - t0))s"
}

xentap_appliance_stop() {
    [ -n "$xentap_appliance_pid" ] || return 0
    kill -TERM "$xentap_appliance_pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$xentap_appliance_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$xentap_appliance_pid" 2>/dev/null
    wait "$xentap_appliance_pid" 2>/dev/null
    xentap_appliance_pid=
}

# xentap_guest_create NAME WORKLOAD VCPUS "EXTRA" DISK_SPEC...: boots the
# suite's guest with `xentap create` on xl_scripts/guest-xentap.cfg, the
# run's kernel/initramfs/workload and the xentap disks given as
# overrides, as an administrator would; sets $domid.  XT_GUEST_RAMDISK and
# XT_GUEST_MEMORY change the initramfs and the memory (MiB); XT_GUEST_DISK,
# when set, is the config's `disk` (disks of other backends beside xentap's).
# With a case's xentap server running (xentap_server_start, below), the
# command runs there.
xentap_guest_create() {
    _xt_create_args "$@"
    if [ -n "${xt_srv_pid:-}" ]; then
        xentap_cmd "${_xt_args[@]}" > "$XT_WORK/xentap-create.out" 2>&1
    else
        "$XENTAP" "${_xt_args[@]}" > "$XT_WORK/xentap-create.out" 2>&1
    fi || { cat "$XT_WORK/xentap-create.out"; return 1; }
    _xt_created "$1"
}
# xentap_guest_create_after GOFILE NAME WORKLOAD VCPUS "EXTRA" DISK_SPEC...: the
# same `xentap create`, its interpreter started now (tests/xen/xentap-after.py:
# tens of seconds of emulated imports while the case waits for something
# else), run once GOFILE exists; xentap_guest_create_wait NAME waits for it
# and sets $domid.
xentap_guest_create_after() {
    local go=$1; shift
    _xt_create_args "$@"
    "$XT_REPO/.venv/bin/python" "$XT_REPO/tests/xen/xentap-after.py" "$go"         --preload xentap.cli_vbd,xentap.create,xentap.xenbus,xentap.xl_config,xentap.appliance_node         -- "${_xt_args[@]}" > "$XT_WORK/xentap-create.out" 2>&1 &
    xt_guest_create_pid=$!
}
xentap_guest_create_wait() {
    wait "$xt_guest_create_pid" || { cat "$XT_WORK/xentap-create.out"; return 1; }
    _xt_created "$1"
}
_xt_create_args() {
    local name=$1 workload=$2 vcpus=$3 extra=$4 disks= d; shift 4
    for d in "$@"; do disks="$disks${disks:+, }'$d'"; done
    log "xentap create xl_scripts/guest-xentap.cfg (name=$name vcpus=$vcpus disks: $disks)"
    # (--wait: the daemon has taken more than create's default 30 s to open
    # an image while another case's mirror resynced, on a loaded host)
    _xt_args=(create --wait 600 "$XT_REPO/xl_scripts/guest-xentap.cfg"
        "name='$name'" "kernel='$XT_GUEST_KERNEL'" "ramdisk='${XT_GUEST_RAMDISK:-$XT_GUEST_INITRD}'"
        "extra='console=hvc0 quiet xt_workload=$workload${extra:+ $extra}'"
        "memory=${XT_GUEST_MEMORY:-256}" "vcpus=$vcpus" "on_reboot='destroy'" "on_crash='destroy'"
        "xentap_disks=[ $disks ]" ${XT_GUEST_DISK:+"disk=$XT_GUEST_DISK"})
}
# _xt_created NAME: create's output; $domid from its "created domain NAME (id
# N)" line, checked in xenstore (`xl domid` is seconds of emulated CPU), or
# from `xl domid`.
_xt_created() {
    local name=$1
    cat "$XT_WORK/xentap-create.out"
    domid=$(sed -n "s/^created domain $name (id \([0-9][0-9]*\)) .*/\1/p" "$XT_WORK/xentap-create.out" | tail -n 1)
    if [ -z "$domid" ] || [ "$(xenstore-read "/local/domain/$domid/name" 2>/dev/null)" != "$name" ]; then
        domid=$(xl domid "$name") || { log "xl domid $name failed"; return 1; }
    fi
    case $domid in ''|*[!0-9]*) log "xl domid printed '$domid'"; return 1;; esac
    log "guest $name is domain $domid (running)"
}

# wait_console NAME LINE TIMEOUT: waits for the exact line LINE on the guest's console.
wait_console() {
    local name=$1 line=$2 limit=$3 t0=$SECONDS
    until tr -d '\r' < "$(guest_log "$name")" 2>/dev/null | grep -qx "$line"; do
        [ $((SECONDS - t0)) -lt "$limit" ] || { log "no '$line' from $name after ${limit}s"; return 1; }
        sleep 1
    done
    log "guest $name: $line (after $((SECONDS - t0))s)"
}

# verify_image IMG GUESTLOG N: e2fsck -fn of IMG in dom0, and the N files the
# guest listed as `XT-FILE <name> <sha256>` read from IMG with debugfs.
# (One debugfs for all the files: each run is seconds of emulated CPU.)
verify_image() {
    local img=$1 glog=$2 want=$3 n=0 f sum got
    e2fsck -fn "$img" || fail "e2fsck -fn $img in dom0"
    mkdir -p "$XT_WORK/verify" && rm -f "$XT_WORK"/verify/* || fail "cannot make $XT_WORK/verify"
    grep '^XT-FILE ' "$glog" | while read -r _ f _; do echo "dump /$f $XT_WORK/verify/$f"; done \
        > "$XT_WORK/verify.cmds"
    debugfs -f "$XT_WORK/verify.cmds" "$img" > /dev/null 2>&1
    while read -r _ f sum; do
        got=$(sha256sum < "$XT_WORK/verify/$f" | cut -d' ' -f1)
        [ "$got" = "$sum" ] || fail "$f in $img hashes $got, guest wrote $sum"
        n=$((n + 1))
    done < <(grep '^XT-FILE ' "$glog")
    rm -rf "$XT_WORK/verify"
    [ "$n" = "$want" ] || fail "expected $want files in $img, checked $n"
    log "dom0 verified $n files and the filesystem of $img"
}

# --- one interpreter for a case's `xentap` commands (tests/xen/xentap-serve.py)
# xentap_server_start [PRELOAD_MODULES]: starts it now (its imports, tens of
# seconds of emulated Python, while the case waits for something else);
# xentap_cmd ARG... then runs `xentap ARG...` in it, prints the command's
# output and returns its exit status (xentap_cmd --python FILE ARG... runs a
# check script there).  It ends with the case (its parent).
xentap_server_start() {
    xt_srv=$XT_WORK/xentap-serve
    rm -rf "$xt_srv"; mkdir -p "$xt_srv"
    # (the wake-ups go through a FIFO, the answers through one per request:
    # no polling loop on either side, each turn of one being a process start
    # or a Python wake-up in the emulated dom0)
    mkfifo "$xt_srv/requests" && exec {xt_srv_wfd}<>"$xt_srv/requests" ||
        fail "xentap_server_start: cannot make $xt_srv/requests"
    "$XT_REPO/.venv/bin/python" "$XT_REPO/tests/xen/xentap-serve.py" "$xt_srv" \
        ${1:+--preload "$1"} > "$xt_srv/server.log" 2>&1 &
    xt_srv_pid=$!
}
xentap_cmd() {
    local n t0=$SECONDS fd rc=
    n=$(( $(cat "$xt_srv/seq" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$xt_srv/seq"
    mkfifo "$xt_srv/$n.done" && exec {fd}<>"$xt_srv/$n.done" ||
        { log "xentap_cmd: cannot make $xt_srv/$n.done"; return 1; }
    printf '%s\0' "$@" > "$xt_srv/$n.cmd.tmp" && mv "$xt_srv/$n.cmd.tmp" "$xt_srv/$n.cmd" ||
        { exec {fd}<&-; log "xentap_cmd: cannot write request $n"; return 1; }
    echo >&"$xt_srv_wfd"
    # (the FIFO only wakes us; the status is read from N.rc, written before:
    # bash reads a FIFO a byte at a time, and a timeout between the "0" and
    # its newline once left an empty line as the status)
    until read -r -t 5 -u "$fd" _; do
        if ! kill -0 "$xt_srv_pid" 2>/dev/null; then
            exec {fd}<&-
            log "xentap_cmd: the server exited: $(cat "$xt_srv/server.log")"; return 1
        fi
        [ $((SECONDS - t0)) -lt 1500 ] || { exec {fd}<&-; log "xentap_cmd $*: no answer after 1500s"; return 1; }
    done
    exec {fd}<&-
    rc=$(cat "$xt_srv/$n.rc" 2>/dev/null)
    cat "$xt_srv/$n.out"
    [ -n "$rc" ] || { log "xentap_cmd $*: no status in $xt_srv/$n.rc"; return 1; }
    return "$rc"
}
# xentap_cmds OUTDIR CMD [ARG...] [:: CMD [ARG...]]...: as tests/xen/xentap-multi.py,
# in the case's interpreter: the commands in order, command N's output in
# OUTDIR/N.out and its exit status in OUTDIR/N.rc, stopping at the first that
# fails (its status is returned).
xentap_cmds() {
    local out=$1 n=1 rc a; shift
    local -a cmd=()
    rm -rf "$out"; mkdir -p "$out"
    for a in "$@" ::; do
        if [ "$a" != :: ]; then cmd+=("$a"); continue; fi
        xentap_cmd "${cmd[@]}" > "$out/$n.out" 2>&1
        rc=$?
        echo "$rc" > "$out/$n.rc"
        [ "$rc" = 0 ] || return "$rc"
        n=$((n + 1)) cmd=()
    done
}
