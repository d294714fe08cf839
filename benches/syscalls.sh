#!/usr/bin/env bash
# Syscalls per short connection and per keepalive request of stickylb, HAProxy and nginx,
# counted the same way in the same run (issue 18, item 4: no more than nginx's per connection).
#
#   benches/syscalls.sh [--seconds S] [--labels "stickylb haproxy nginx nginx-nohalfclose"]
#                       [--scenarios "shortconn keepalive"] [--stickylb PATH] [--out DIR]
#
# Starts the load tool's fixed-reply backends (4 ports), then for each scenario and label a
# fresh balancer in front of them, configured as benches/compare.sh configures it (stickylb:
# every key at its default; haproxy: balance source, hash-type consistent, splice-auto, health
# checks; nginx: stream, hash $remote_addr consistent, 2 workers, proxy_half_close on;
# nginx-nohalfclose, not in the default labels: the same at nginx's default, proxy_half_close
# off, which closes both sides at the client's FIN and so skips a read and a shutdown), and:
# - attaches `strace -c -f` to it (nginx: to each of its workers, the master's children; the
#   master takes no part in a connection) and waits until every thread is traced;
# - runs the client for S seconds (default 5): `load run --scenario shortconn|keepalive
#   --concurrency 50 --warmup 0`;
# - detaches strace (SIGINT) half a second after the client ends, and divides every count by
#     shortconn  the connections the balancer accepted (successful accept4 and accept calls)
#     keepalive  the requests the client completed (its 50 connections' set-up included).
# Writes into the output directory (default $CARGO_TARGET_DIR or target/, then
# bench-syscalls/<UTC time>): strace-<label>-<scenario>.txt (each syscall per unit, and how
# many of those calls failed), syscalls.md (one row per label and scenario; printed at the end),
# raw/ (strace's own tables, the client's JSON lines), conf/ and logs/.
# --stickylb PATH measures that binary as label stickylb instead of building one (an older
# build, say). strace slows every balancer down a lot: the counts per unit hold, times and rates
# do not. Needs strace, and haproxy / nginx with its stream module for their labels. Loopback
# only; every process started here is ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
# Where cargo builds: $CARGO_TARGET_DIR when set, as cargo itself does.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# The command as given, for the summary (arguments with spaces in double quotes).
COMMAND=benches/syscalls.sh
for arg in "$@"; do
    case "$arg" in *[[:space:]]*|"") COMMAND+=" \"$arg\"" ;; *) COMMAND+=" $arg" ;; esac
done
SECS=5
LABELS="stickylb haproxy nginx"
SCENARIOS="shortconn keepalive"
STICKYLB_GIVEN=""
OUT=""
parse_options 2,28 "--seconds SECS --labels LABELS --scenarios SCENARIOS --stickylb STICKYLB_GIVEN --out OUT" "$@"
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "syscalls.sh: --seconds takes whole seconds, not $SECS" >&2; exit 2; }
for label in $LABELS; do
    case "$label" in
        stickylb|haproxy|nginx|nginx-nohalfclose) ;;
        *) echo "syscalls.sh: unknown label $label (stickylb, haproxy, nginx, nginx-nohalfclose)" >&2; exit 2 ;;
    esac
done
for scenario in $SCENARIOS; do
    case "$scenario" in
        shortconn|keepalive) ;;
        *) echo "syscalls.sh: unknown scenario $scenario (shortconn, keepalive)" >&2; exit 2 ;;
    esac
done
has_label() { case " $LABELS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if [ -n "$STICKYLB_GIVEN" ] && [ ! -x "$STICKYLB_GIVEN" ]; then
    echo "syscalls.sh: --stickylb $STICKYLB_GIVEN is not an executable file" >&2
    exit 2
fi

command -v strace >/dev/null || { echo "syscalls.sh: needs strace (apt-get install strace)" >&2; exit 1; }
if has_label haproxy && ! command -v haproxy >/dev/null; then
    echo "syscalls.sh: label haproxy needs haproxy (apt-get install haproxy)" >&2
    exit 1
fi
if { has_label nginx || has_label nginx-nohalfclose; } && ! nginx_has_stream; then
    echo "syscalls.sh: label nginx needs nginx with the stream module" \
        "(apt-get install nginx-light libnginx-mod-stream)" >&2
    exit 1
fi

OUT=${OUT:-$TARGET/bench-syscalls/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/bin" "$OUT/conf" "$OUT/logs" "$OUT/raw"  # conf/: stickylb watches its config's directory

# Ports (all on 127.0.0.1, the same as compare.sh's): the balancer listens on LB_PORT.
LB_PORT=27000
FIXED_PORTS="27031 27032 27033 27034"
# stickylb's admin endpoint, on by default.
METRICS_PORT=9898

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Build (run copies: target/ is shared, and a rebuild during the run must not change what is
# measured).
cd "$ROOT"
if has_label stickylb && [ -z "$STICKYLB_GIVEN" ]; then
    log "building stickylb (release) and the load tool"
    cargo build --release --bin stickylb 2>&1 | tail -1 >&2
    [ -x "$TARGET/release/stickylb" ] || { echo "syscalls.sh: building stickylb failed" >&2; exit 1; }
    cp "$TARGET/release/stickylb" "$OUT/bin/stickylb"
    STICKYLB_FROM="built from $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
else
    log "building the load tool"
fi
if has_label stickylb && [ -n "$STICKYLB_GIVEN" ]; then
    cp "$STICKYLB_GIVEN" "$OUT/bin/stickylb"
    STICKYLB_FROM="$STICKYLB_GIVEN (sha256 $(sha256sum "$STICKYLB_GIVEN" | cut -c1-12))"
fi
LOAD=$(build_load)
[ -x "$LOAD" ] || { echo "syscalls.sh: building the load tool failed" >&2; exit 1; }
cp "$LOAD" "$OUT/bin/load"
LOAD=$OUT/bin/load
STICKYLB=$OUT/bin/stickylb

# Processes we start (STARTED, stop_pid: benches/lib.sh), all ended on exit.
trap stop_started EXIT
trap 'exit 130' INT TERM

# A port someone else listens on would be measured instead of ours.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $LB_PORT $FIXED_PORTS $(has_label stickylb && echo $METRICS_PORT); do
    if port_busy "$p"; then
        echo "syscalls.sh: something already listens on 127.0.0.1:$p (another bench?)" >&2
        exit 1
    fi
done

# ---------------------------------------------------------------------------------------------
# Configs: compare.sh's (benches/lib.sh), for its fixed-reply target group.
stickylb_conf $LB_PORT "$FIXED_PORTS" >"$OUT/conf/stickylb.json"
haproxy_conf $LB_PORT "$FIXED_PORTS" haproxy >"$OUT/conf/haproxy.cfg"
mkdir -p "$OUT/nginx" "$OUT/nginx-nohalfclose"
nginx_conf $LB_PORT "$FIXED_PORTS" "$OUT/nginx" >"$OUT/conf/nginx.conf"
nginx_conf $LB_PORT "$FIXED_PORTS" "$OUT/nginx-nohalfclose" off >"$OUT/conf/nginx-nohalfclose.conf"

# ---------------------------------------------------------------------------------------------
# Starts balancer $1; sets LB_PID (what the client measures) and TRACED (the PIDs strace
# attaches to). Returns 1 if it does not listen.
LB_PID=""
TRACED=""
start_lb() {
    local label=$1 logf="$OUT/logs/$1.log" workers=""
    case "$label" in
        stickylb) "$STICKYLB" --config "$OUT/conf/stickylb.json" >>"$logf" 2>&1 & ;;
        haproxy) haproxy -db -f "$OUT/conf/haproxy.cfg" >>"$logf" 2>&1 & ;;
        nginx|nginx-nohalfclose) nginx -c "$OUT/conf/$label.conf" -p "$OUT/$label" \
            -e "$OUT/$label/error.log" >>"$logf" 2>&1 & ;;
    esac
    LB_PID=$!
    STARTED+=("$LB_PID")
    TRACED=$LB_PID
    if ! "$LOAD" wait-port "127.0.0.1:$LB_PORT" --timeout 10 2>>"$logf"; then
        log "$label did not start; see $logf"
        tail -5 "$logf" >&2
        stop_pid "$LB_PID"
        return 1
    fi
    if [ "${label%-nohalfclose}" = nginx ]; then
        # The master listens before it forks its workers: wait for both (our own children's
        # children, listed by parent PID).
        for _ in $(seq 1 100); do
            workers=$(pgrep -P "$LB_PID" | sort -n | tr '\n' ' ' || true)
            [ "$(wc -w <<<"$workers")" -ge 2 ] && break
            sleep 0.1
        done
        if [ "$(wc -w <<<"$workers")" -lt 2 ]; then
            log "nginx started ${workers:-no} workers, not 2; see $OUT/$label/error.log"
            stop_pid "$LB_PID"
            return 1
        fi
        TRACED=${workers% }
    fi
}

# Waits (up to 10 s) until strace $1 traces every thread of the PIDs that follow.
wait_traced() {
    local tracer=$1 pid task tp all
    shift
    for _ in $(seq 1 200); do
        all=1
        for pid in "$@"; do
            for task in /proc/"$pid"/task/*; do
                tp=$(awk '/^TracerPid:/ {print $2}' "$task/status" 2>/dev/null || echo 0)
                [ "$tp" = "$tracer" ] || { all=0; break 2; }
            done
        done
        [ "$all" = 1 ] && return 0
        kill -0 "$tracer" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# Writes strace-$1-$2.txt from raw/strace-$1-$2.txt (strace -c's table) and appends the row of
# syscalls.md: every count divided by $3 units of kind $4 (connection, request). $5: a note for
# the file's head.
summarise() {
    local label=$1 scenario=$2 units=$3 unit=$4 note=$5
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall (the errors column
    # is empty when none failed). As "calls errors name", most calls first.
    awk '/^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ && $NF != "total" { print $4, (NF == 6 ? $5 : 0), $NF }' \
        "$OUT/raw/strace-$label-$scenario.txt" | sort -k1,1nr -k3,3 \
        | awk -v u="$units" -v unit="$unit" -v label="$label" -v scenario="$scenario" \
            -v note="$note" -v file="$OUT/strace-$label-$scenario.txt" '
            # 2 decimals without trailing zeros: 4, 1.06, 0.1.
            function f(x,  s) { s = sprintf("%.2f", x); sub(/0+$/, "", s); sub(/\.$/, "", s); return s }
            # Whole numbers with thousands separators: 12,193.
            function g(x,  s) { s = sprintf("%d", x); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); return s }
            { n[NR] = $3; c[NR] = $1; e[NR] = $2; calls += $1; errs += $2 }
            END {
                printf "# %s under %s: syscalls per %s over %d %ss (%s)\n", label, scenario, unit, u, unit, note > file
                printf "%-18s %12s %12s %12s\n", "syscall", "per " unit, "of them err", "calls" > file
                printf "%-18s %12.2f %12.2f %12d\n", "total", calls / u, errs / u, calls > file
                for (i = 1; i <= NR; i++)
                    printf "%-18s %12.2f %12.2f %12d\n", n[i], c[i] / u, e[i] / u, c[i] > file
                b = ""; fl = ""; rare = 0
                for (i = 1; i <= NR; i++) {
                    if (c[i] / u >= 0.005) b = b (b == "" ? "" : ", ") n[i] " " f(c[i] / u)
                    else rare++
                    if (e[i] / u >= 0.005) fl = fl (fl == "" ? "" : ", ") n[i] " " f(e[i] / u)
                }
                if (rare) b = b ", " rare " more under 0.005"
                printf "| %s | %s | %s per %s | %s %ss | %s | %s |\n", label, scenario, f(calls / u), unit, g(u), unit, b, (fl == "" ? "none" : fl)
            }' >>"$OUT/raw/rows.md"
}

# ---------------------------------------------------------------------------------------------
# Backends, then the runs: for each scenario, each label (one balancer at a time).
log "starting backends"
"$LOAD" backend --fixed "${FIXED_PORTS// /,}" --max-seconds 3600 >"$OUT/logs/backend.log" 2>&1 &
BACKEND_PID=$!
STARTED+=("$BACKEND_PID")
for p in $FIXED_PORTS; do
    "$LOAD" wait-port "127.0.0.1:$p" --timeout 10 || { echo "syscalls.sh: the backend did not start" >&2; exit 1; }
done

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$OUT/raw/rows.md"
for scenario in $SCENARIOS; do
    for label in $LABELS; do
        raw=$OUT/raw/strace-$label-$scenario.txt
        client=$OUT/raw/client-$label-$scenario.json
        if ! start_lb "$label"; then
            echo "| $label | $scenario | did not start | | see logs/$label.log | |" >>"$OUT/raw/rows.md"
            continue
        fi
        attach=()
        for pid in $TRACED; do attach+=(-p "$pid"); done
        strace -c -f "${attach[@]}" -o "$raw" 2>>"$OUT/logs/strace-$label-$scenario.log" &
        STRACE_PID=$!
        STARTED+=("$STRACE_PID")
        # shellcheck disable=SC2086 # TRACED is a list of PIDs
        if ! wait_traced "$STRACE_PID" $TRACED; then
            log "strace did not attach to $label ($TRACED); see logs/strace-$label-$scenario.log"
            stop_pid "$STRACE_PID" INT
            stop_pid "$LB_PID"
            echo "| $label | $scenario | strace did not attach | | | |" >>"$OUT/raw/rows.md"
            continue
        fi
        log "$scenario via $label (strace on ${TRACED// /, }; load average $(cut -d' ' -f1-3 /proc/loadavg))"
        timeout $((SECS + 60)) "$LOAD" run --scenario "$scenario" --label "$label" \
            --target "127.0.0.1:$LB_PORT" --pids "$LB_PID" --duration "$SECS" --warmup 0 \
            --concurrency 50 >"$client" || log "the client failed: $scenario via $label"
        # The balancer's last closes follow the client's within milliseconds.
        sleep 0.5
        # SIGINT: strace detaches and writes its table.
        stop_pid "$STRACE_PID" INT
        stop_pid "$LB_PID"
        # strace writes its table when it detaches: none, nothing to divide.
        [ -s "$raw" ] || : >"$raw"
        if [ "$scenario" = shortconn ]; then
            units=$(awk '$NF == "accept4" || $NF == "accept" { n += $4 - (NF == 6 ? $5 : 0) } END { print n + 0 }' "$raw")
            unit=connection
            note="connections: successful accept4/accept calls; the client completed $(grep -o '"conns":[0-9]*' "$client" | head -1 | cut -d: -f2 || true) in its window"
        else
            units=$(grep -o '"requests":[0-9]*' "$client" | head -1 | cut -d: -f2 || true)
            unit=request
            note="requests: completed by the client"
        fi
        errors=$(grep -o '"errors":[0-9]*' "$client" | head -1 | cut -d: -f2 || true)
        note="$note, ${errors:-?} client errors; strace -c -f -p ${TRACED// /,}"
        if [ "${units:-0}" -gt 0 ]; then
            summarise "$label" "$scenario" "$units" "$unit" "$note"
            sed -n '1,12p' "$OUT/strace-$label-$scenario.txt" >&2
        else
            log "no ${unit}s counted for $label under $scenario; see $raw and $client"
            echo "| $label | $scenario | no ${unit}s counted | | | |" >>"$OUT/raw/rows.md"
        fi
    done
done

# ---------------------------------------------------------------------------------------------
# Summary
{
    echo "# Syscalls per connection and per request"
    echo
    echo "\`$COMMAND\`, $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECS} s per run, $(( $(date +%s) - START )) s in all;" \
        "load average $LOAD_BEFORE before, $(cut -d' ' -f1-3 /proc/loadavg) after."
    echo
    has_label stickylb && echo "- stickylb: $STICKYLB_FROM"
    has_label haproxy && echo "- haproxy: $(haproxy -v 2>&1 | head -1)"
    { has_label nginx || has_label nginx-nohalfclose; } && echo "- nginx: $(nginx -v 2>&1)"
    echo "- $(strace -V | head -1), kernel $(uname -r), $(nproc) CPUs"
    echo
    echo "Every count is strace -c -f's (all threads; nginx: its 2 workers) divided by the" \
        "connections the balancer accepted (shortconn) or the requests the client completed" \
        "(keepalive). \"Failed\" is strace's count of calls that returned an error: every" \
        "non-blocking connect's EINPROGRESS, EAGAIN. Per syscall: strace-<label>-<scenario>.txt."
    echo
    echo "| label | scenario | syscalls | over | breakdown (per unit, most first) | of them failed |"
    echo "|---|---|---|---|---|---|"
    cat "$OUT/raw/rows.md"
} >"$OUT/syscalls.md"
cat "$OUT/syscalls.md"
log "results in $OUT"
