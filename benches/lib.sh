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

# Starts the SSH baselines' sshd: its own config, host key, random port and a throw-away
# uid-0 account $user whose shell is /bin/sh (no start-up files: a fair baseline), on
# 127.0.0.1 or ADDR, optionally inside network namespace SERVER_NS and checked from
# CLIENT_NS. Installs openssh-server if missing. Needs $work, $user and the pids array;
# sets the sshopt array (ControlMaster in $work/cm). The caller's cleanup calls
# stop_ssh_master and removes $user.
start_sshd() { # harness-name [ADDR [SERVER_NS CLIENT_NS]]
    local addr=${2:-127.0.0.1} sns=() cns=()
    [ -n "${3:-}" ] && sns=(ip netns exec "$3") && cns=(ip netns exec "$4")
    if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ]; then
        echo "$1: installing openssh-server for the baseline" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
    fi
    mkdir -p "$work/home/.ssh" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"
    ssh-keygen -q -t ed25519 -N '' -f "$work/id"
    cp "$work/id.pub" "$work/home/.ssh/authorized_keys"
    chmod 700 "$work/home" "$work/home/.ssh"
    # '*' rather than useradd's '!': sshd refuses a locked account even for key logins.
    useradd -o -u 0 -g 0 -M -d "$work/home" -s /bin/sh -p '*' "$user"
    local port ok=
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf '%s\n' "ListenAddress $addr" "Port $port" "HostKey $work/hostkey" \
        "PidFile $work/sshd.pid" "PermitRootLogin yes" "PasswordAuthentication no" \
        "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" \
        "AuthorizedKeysFile $work/home/.ssh/authorized_keys" >"$work/sshd_config"
    "${sns[@]}" /usr/sbin/sshd -f "$work/sshd_config" -D -e 2>"$work/sshd.log" &
    pids+=($!)
    sshopt=(-p "$port" -i "$work/id" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
        -o LogLevel=ERROR -o ControlPath="$work/cm" -o ControlMaster=auto -o ControlPersist=600)
    for _ in $(seq 50); do
        "${cns[@]}" ssh "${sshopt[@]}" -o BatchMode=yes "$user@$addr" true 2>/dev/null && { ok=1; break; }
        sleep 0.1
    done
    [ -n "$ok" ] || { echo "$1: cannot log in to the baseline's sshd:" >&2; cat "$work/sshd.log" >&2; exit 1; }
}

# Ends the ControlMaster start_sshd's login check (or a baseline) left in $work/cm: it
# would outlive the harness by its ControlPersist.
stop_ssh_master() {
    ssh -S "$work/cm" -O exit x 2>/dev/null || true
}
