# shellcheck shell=bash
# The balancer configs of the comparison, shared by compare.sh, syscalls.sh and counts.sh, so
# that every bench measures stickylb, HAProxy and nginx set up the same way. Sourced, not run:
#
#   . "$ROOT/benches/lib.sh"
#   stickylb_conf PORT "TARGET PORTS" [EXTRA KEY LINE] > stickylb.json
#   haproxy_conf PORT "TARGET PORTS" haproxy|haproxy-splice > haproxy.cfg
#   nginx_conf PORT "TARGET PORTS" DIR [off] > nginx.conf (DIR: its pid file and error log;
#                                                         off: proxy_half_close off)
#   nginx_has_stream                                      (nginx with its stream module?)
#   STARTED+=("$pid"); stop_pid PID [SIGNAL]             (the processes a script started)
#   trap stop_started EXIT                                (ends them all, newest first, and
#                                                          restores use_congestion's sysctl)
#   LOAD=$(build_load)                                    (builds benches/load; its path)
#   build_run_copies                                      (stickylb and the load tool built and
#                                                          copied into $OUT/bin; sets LOAD)
#   start_iperf_servers "PORTS" LOGDIR                    (an `iperf3 -s` per port: IPERF_PIDS)
#   parse_options 2,27 "--reps REPS --out OUT" "$@"       (a script's options; see below)
#   use_congestion NAME                                   (TCP congestion control for the run,
#                                                          restored by stop_started; root)
#   tcp_setup                                             (congestion control and lo's qdisc,
#                                                          one line for machine.txt)
#
# Every address is 127.0.0.1.

# Processes the script started, ended by PID, never by name.
STARTED=()

# Ends one of our processes: signal $2 (default TERM), up to 15 s to exit, then SIGKILL; reaps
# it and forgets its PID (so a PID reused later by someone else is never signalled).
stop_pid() {
    local pid=$1 sig=${2:-TERM} keep=() p
    if kill -"$sig" "$pid" 2>/dev/null; then
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            # A child that exited but is not reaped yet (a zombie) counts as gone.
            [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" = Z ] && break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for p in "${STARTED[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    STARTED=("${keep[@]}")
}

# A script's options: SPEC pairs each option with the variable it sets ("--reps REPS --out
# OUT"; every option takes a value). -h/--help prints the script's header comment (its lines
# HELP, e.g. 2,27) and exits 0; an unknown option, or one without its value, exits 2 naming it.
parse_options() {
    local help=$1 spec=$2 var i
    local -a words
    local -A vars=()
    shift 2
    read -ra words <<<"$spec"
    for ((i = 0; i + 1 < ${#words[@]}; i += 2)); do
        vars[${words[i]}]=${words[i + 1]}
    done
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) sed -n "${help}p" "$0"; exit 0 ;;
        esac
        var=${vars[$1]:-}
        [ -n "$var" ] || { echo "${0##*/}: unknown option $1 (see --help)" >&2; exit 2; }
        [ $# -ge 2 ] || { echo "${0##*/}: $1 needs a value" >&2; exit 2; }
        printf -v "$var" '%s' "$2"
        shift 2
    done
}

# Ends every process in STARTED, newest first (a tracer is detached before the process it
# traces is stopped): a script's `trap stop_started EXIT`.
stop_started() {
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED[i]}"
    done
    if [ -n "${CONGESTION_RESTORE:-}" ]; then
        sysctl -q -w net.ipv4.tcp_congestion_control="$CONGESTION_RESTORE" || true
        CONGESTION_RESTORE=""
    fi
}

# Sets the machine's default TCP congestion control (net.ipv4.tcp_congestion_control) to $1 for
# the run: every socket opened from then on uses it (the balancers', the clients', the
# backends'), and stop_started puts the old value back. Nothing to do when $1 is empty or
# already in force. Why a bench needs it: a pacing congestion control (BBR) without the fq
# qdisc paces in TCP itself, with a high-resolution timer per socket, and on loopback that
# timer's softirq work is charged to whichever process runs when it fires; see
# docs/benchmarks.md, "Congestion control".
CONGESTION_RESTORE=""
use_congestion() {
    local want=$1 now
    [ -n "$want" ] || return 0
    now=$(sysctl -n net.ipv4.tcp_congestion_control)
    [ "$want" != "$now" ] || return 0
    [ "$(id -u)" = 0 ] || { echo "${0##*/}: --congestion needs root (it sets a sysctl)" >&2; exit 1; }
    case " $(sysctl -n net.ipv4.tcp_available_congestion_control) " in
        *" $want "*) ;;
        *) modprobe -q "tcp_$want" 2>/dev/null || true ;;
    esac
    sysctl -q -w net.ipv4.tcp_congestion_control="$want" 2>/dev/null \
        || { echo "${0##*/}: congestion control $want is not available here" \
            "(available: $(sysctl -n net.ipv4.tcp_available_congestion_control))" >&2; exit 1; }
    CONGESTION_RESTORE=$now
    # Said on stderr, so that a run killed before it could restore (SIGKILL) leaves the way
    # back in its log.
    echo "${0##*/}: congestion control $want for this run; the machine's $now is put back at" \
        "the end (by hand: sysctl -w net.ipv4.tcp_congestion_control=$now)" >&2
}

# The TCP settings every figure depends on, as one line: the congestion control new sockets
# get, and the qdisc on loopback (fq paces in the qdisc; without it, a pacing congestion
# control paces in TCP).
tcp_setup() {
    local lo
    lo=$(tc qdisc show dev lo 2>/dev/null | awk 'NR == 1 {print $2}')
    echo "tcp: congestion control $(sysctl -n net.ipv4.tcp_congestion_control)," \
        "lo qdisc ${lo:-unknown}, default qdisc $(sysctl -n net.core.default_qdisc)"
}

# Builds the load tool (benches/load, bench profile) from the current directory (the
# repository's root) and prints the path of its executable; empty when the build failed.
build_load() {
    cargo bench --bench load --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*/load-[^"]*"' | tail -1 | cut -d'"' -f4
}

# Builds stickylb (release) and the load tool from the repository's root (the current
# directory) and copies both into $OUT/bin: run copies, because target/ is shared and a
# rebuild during a run must not change what is measured. Sets LOAD to the load tool's copy
# (stickylb's is $OUT/bin/stickylb). Exits naming the script when either build failed.
build_run_copies() {
    local target=${CARGO_TARGET_DIR:-$PWD/target} load
    cargo build --release --bin stickylb 2>&1 | tail -1 >&2
    load=$(build_load)
    [ -x "$load" ] && [ -x "$target/release/stickylb" ] \
        || { echo "${0##*/}: building stickylb or the load tool failed" >&2; exit 1; }
    mkdir -p "$OUT/bin"
    cp "$target/release/stickylb" "$OUT/bin/stickylb"
    cp "$load" "$OUT/bin/load"
    LOAD=$OUT/bin/load
}

# Starts an `iperf3 -s` on each of PORTS (on 127.0.0.1; logs in LOGDIR/iperf3-PORT.log) and waits
# until each listens (needs $LOAD). Their PIDs go to STARTED and to the array IPERF_PIDS.
IPERF_PIDS=()
start_iperf_servers() {
    local ports=$1 logdir=$2 p
    for p in $ports; do
        # --idle-timeout: a server left in a broken test resets itself within 30 s.
        iperf3 -s -B 127.0.0.1 -p "$p" --idle-timeout 30 >>"$logdir/iperf3-$p.log" 2>&1 &
        STARTED+=("$!")
        IPERF_PIDS+=("$!")
    done
    for p in $ports; do
        "$LOAD" wait-port "127.0.0.1:$p" --timeout 10 \
            || { echo "iperf3 -s did not start on port $p" >&2; return 1; }
    done
}

# nginx's stream module, when Debian ships it as a module (nginx-light + libnginx-mod-stream).
NGINX_STREAM_SO=/usr/lib/nginx/modules/ngx_stream_module.so

# Whether nginx is there with its stream module: built in, or a dynamic module to load.
nginx_has_stream() {
    command -v nginx >/dev/null 2>&1 || return 1
    [ -f "$NGINX_STREAM_SO" ] && return 0
    nginx -V 2>&1 | grep -q -- '--with-stream\( \|$\)'
}

# stickylb: every key at its default (metrics on at 127.0.0.1:9898, sessions, splice), plus
# one extra key line when given (`"proxyProtocol": "v2",`).
stickylb_conf() {
    local port=$1 ports=$2 extra=${3:-} sep="" p
    echo '{'
    echo "  \"sourceHost\": \"127.0.0.1\","
    echo "  \"sourcePort\": $port,"
    if [ -n "$extra" ]; then
        echo "  $extra"
    fi
    echo '  "targets": ['
    for p in $ports; do
        printf '%s    {"host": "127.0.0.1", "port": %s}' "$sep" "$p"
        sep=$',\n'
    done
    printf '\n  ]\n}\n'
}

# HAProxy: as its users configure a sticky TCP balancer, with health checks. maxconn: HAProxy
# derives about 8,000 from a 20,000 fd limit by itself (it reserves fds for maxconn/4 pipes) and
# refuses to start with maxconn 9,990 (it wants 25,000 fds), so, as a user holding 9,000
# connections would, set maxconn 9,500 and maxpipes 250 (2 × 9,500 + 2 × 250 < 20,000; 250
# pipes are more than these scenarios splice at once). `haproxy`: splice-auto (HAProxy splices
# when it sees fit); `haproxy-splice`: splice forced both ways.
haproxy_conf() {
    local port=$1 ports=$2 variant=$3 splice p
    if [ "$variant" = haproxy ]; then
        splice="    option splice-auto"
    else
        splice=$'    option splice-request\n    option splice-response'
    fi
    cat <<EOF
global
    nbthread 2
    maxconn 9500
    maxpipes 250
    log stderr format short local0 notice

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 5m
    timeout server 5m
    retries 3
    option redispatch 1

frontend fe
    bind 127.0.0.1:$port
    default_backend be

backend be
    balance source
    hash-type consistent
$splice
EOF
    for p in $ports; do
        echo "    server t$p 127.0.0.1:$p check"
    done
}

# nginx: stream proxy with a consistent hash of the client address, 2 workers, each allowed the
# whole fd limit (a worker counts both sides of a connection). A fourth argument `off` leaves
# proxy_half_close at nginx's default (off), for syscalls.sh's `nginx-nohalfclose`.
nginx_conf() {
    local port=$1 ports=$2 dir=$3 half_close=${4:-on} load_module="" p
    if [ -f "$NGINX_STREAM_SO" ]; then
        load_module="load_module $NGINX_STREAM_SO;"
    fi
    cat <<EOF
$load_module
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 19000;
}
stream {
    upstream be {
        hash \$remote_addr consistent;
EOF
    for p in $ports; do
        echo "        server 127.0.0.1:$p;"
    done
    cat <<EOF
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        proxy_pass be;
        proxy_connect_timeout 5s;
        proxy_timeout 5m;
        # Off by default: a client's FIN would close both directions, cutting the reply the
        # bulk scenario reads after it (stickylb and HAProxy pass half-closes on).
        proxy_half_close $half_close;
    }
}
EOF
}
