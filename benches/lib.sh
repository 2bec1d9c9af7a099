# Shared by the harnesses in benches/ (sourced, not run). Expects $work to be set before
# steal_since is called.

# Nanoseconds since the epoch from bash itself: no fork on the measured path.
now() { local t=${EPOCHREALTIME/./}; echo "${t}000"; }

# CPU time stolen by the hypervisor while a phase ran, in percent: on a shared VM it varies
# over minutes and slows zfs-fuse more than anything measured here, so it is reported with
# each method's figures. cpu_sample prints "total steal" jiffies.
cpu_sample() {
    local _c u n s i w q sq st
    read -r _c u n s i w q sq st _ </proc/stat
    echo "$((u + n + s + i + w + q + sq + st)) $st"
}
steal_since() { # method n "total steal" (from cpu_sample)
    local t0 s0 t1 s1
    read -r t0 s0 <<<"$3"
    read -r t1 s1 <<<"$(cpu_sample)"
    echo "$1 $2 $(( (s1 - s0) * 100 / (t1 - t0 + 1) ))" >>"$work/steal.tsv"
}

# Sleeps what is left of period_ms since start_ns (bash arithmetic, no python per period).
pace() {
    local left=$(( $2 * 1000000 - ($(now) - $1) ))
    [ "$left" -gt 0 ] && sleep "$(printf '%d.%09d' $((left / 1000000000)) $((left % 1000000000)))"
    return 0
}

# CPU time (user + system) of process $1 so far, in clock ticks (0 if it is gone).
proc_cpu() {
    local f
    read -r -a f <"/proc/$1/stat" 2>/dev/null || { echo 0; return; }
    # Fields 14 and 15 (utime, stime); the command name (field 2) has no spaces here.
    echo $(( f[13] + f[14] ))
}

# Destroys pool $1, retrying while zfs-fuse reports it busy, and exports it if zfs-fuse
# keeps refusing ("could not unmount datasets" for a dataset it no longer has mounted).
drop_pool() {
    local _
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        zpool list "$1" >/dev/null 2>&1 || return 0
        zpool destroy -f "$1" 2>/dev/null && return 0
        sleep 0.3
    done
    zpool export -f "$1" 2>/dev/null || echo "warning: could not remove pool $1" >&2
}
