#!/usr/bin/env bash
# stickylb against HAProxy and nginx on the same machine, in the same run (issue 5).
#
# One command:   benches/compare.sh            (3 repetitions, 10 s windows: about 30 minutes)
#                benches/compare.sh --quick    (1 repetition, 3 s windows: about 9 minutes)
# Options:       --reps N  --duration S  --scenarios "bulk1 shortconn ..."  --labels "..."
#                --out DIR (default $CARGO_TARGET_DIR or target/, then bench-compare/<UTC time>)
#                --alt PATH (another stickylb binary, run as label `stickylb-alt` on the same
#                configs: an A/B of two builds in one run; add the label to --labels)
#                --congestion NAME (the TCP congestion control every socket gets for the run,
#                e.g. cubic, Linux's default; the machine's own is put back at the end; root)
#
# What it does:
# 1. installs haproxy and nginx (with the stream module) from Debian packages when missing;
# 2. builds stickylb (release) and the load tool (benches/load, bench profile);
# 3. starts the backends once (`load backend`: sink, echo and fixed-reply ports; and an
#    `iperf3 -s` per iperf target port), the same for everything measured;
# 4. for each repetition, for each scenario, runs it against each of
#      direct (no balancer: the ceiling), stickylb, stickylb-pp (stickylb sending a PROXY v2
#      header to its targets; shortconn and keepalive only), stickylb-nobudget (stickylb run
#      as `nobody` with nobody's pipe budget spent by `load pipe-hog`, so every pipe it gets is
#      2 pages: bulk scenarios only, not in the default labels), haproxy (splice-auto),
#      haproxy-splice (splice-request + splice-response forced), nginx (stream)
#    in that order (A B C D E, A B C D E, ...). Every balancer is started fresh for each run
#    and stopped after it, so its CPU and memory figures are its own;
# 5. writes results.jsonl (one JSON line per run), report.md (medians, min–max, ratios
#    against stickylb, the goals of issue 5) and machine.txt into the output directory.
#
# Only loopback addresses are used. Every process started here is recorded by PID and ended
# by PID (never by name); every wait is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
# Where cargo builds: $CARGO_TARGET_DIR when set, as cargo itself does.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REPS=3
DURATION=10
SCENARIOS="bulk1 bulk4 iperf1 iperf4 iperf1-16k iperf4-16k shortconn keepalive idle5000 idle9000 overflow failover"
LABELS="direct stickylb stickylb-pp haproxy haproxy-splice nginx"
OUT=""
ALT=""
CONGESTION=""
# --quick: 1 repetition of 3 s windows, unless --reps or --duration says otherwise.
ARGS=()
for arg in "$@"; do
    if [ "$arg" = --quick ]; then REPS=1; DURATION=3; else ARGS+=("$arg"); fi
done
parse_options 2,30 "--reps REPS --duration DURATION --scenarios SCENARIOS --labels LABELS --out OUT --alt ALT --congestion CONGESTION" ${ARGS[@]+"${ARGS[@]}"}
OUT=${OUT:-$TARGET/bench-compare/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/conf"
RESULTS=$OUT/results.jsonl

# Ports (all on 127.0.0.1, below the ephemeral range): the balancer listens on LB_PORT.
LB_PORT=27000
SINK_PORTS="27011 27012 27013 27014"
ECHO_PORTS="27021 27022 27023 27024"
FIXED_PORTS="27031 27032 27033 27034"
# stickylb-pp sends a PROXY v2 header: its fixed-reply targets read it first.
FIXED_PP_PORTS="27051 27052 27053 27054"
FAILOVER_PORTS="27041 27042 27043"
# One `iperf3 -s` per target port (iperf scenarios): a sticky balancer sends a test's control
# connection and all its data connections (one client address) to the same one.
IPERF_PORTS="27061 27062 27063 27064"
VICTIM_PORT=27043

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Processes we start (STARTED, stop_pid: benches/lib.sh), all ended on exit.
trap stop_started EXIT
trap 'exit 130' INT TERM
use_congestion "$CONGESTION"

# ---------------------------------------------------------------------------------------------
# 1. HAProxy and nginx
if ! command -v haproxy >/dev/null 2>&1 || ! nginx_has_stream; then
    if [ "$(id -u)" != 0 ]; then
        echo "compare.sh: haproxy and nginx (stream) are needed: run as root, or" \
            "apt-get install haproxy nginx-light libnginx-mod-stream" >&2
        exit 1
    fi
    log "installing haproxy and nginx from Debian packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy nginx-light libnginx-mod-stream >"$OUT/apt.log" 2>&1
fi

# ---------------------------------------------------------------------------------------------
# 2. Build
cd "$ROOT"
log "building stickylb (release) and the load tool"
build_run_copies
STICKYLB=$OUT/bin/stickylb
if [ -n "$ALT" ]; then
    cp "$ALT" "$OUT/bin/stickylb-alt"
    ALT=$OUT/bin/stickylb-alt
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "memory: $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "kernel: $(uname -r)"
    tcp_setup
    echo "rustc: $(rustc -V)"
    echo "stickylb: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
        "(uncommitted changes to src/: $(git -C "$ROOT" status --short -- src 2>/dev/null | wc -l) files," \
        "diff sha256 $(git -C "$ROOT" diff HEAD -- src 2>/dev/null | sha256sum | cut -c1-12))"
    echo "haproxy: $(haproxy -v 2>&1 | head -1)"
    echo "iperf3: $(iperf3 --version 2>&1 | head -1)"
    echo "nginx: $(nginx -v 2>&1)"
    echo "fd limit: soft $(ulimit -Sn), hard $(ulimit -Hn)"
    echo "reps: $REPS, duration: ${DURATION}s, scenarios: $SCENARIOS"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# ---------------------------------------------------------------------------------------------
# 3. Configs: one per balancer and target group.
group_of() {
    case "$1" in
        bulk*) echo sink ;;
        iperf*) echo iperf ;;
        shortconn|keepalive) echo fixed ;;
        idle*|overflow) echo echo ;;
        failover) echo failover ;;
    esac
}
ports_of() {
    case "$1" in
        sink) echo "$SINK_PORTS" ;;
        echo) echo "$ECHO_PORTS" ;;
        fixed) echo "$FIXED_PORTS" ;;
        failover) echo "$FAILOVER_PORTS" ;;
        iperf) echo "$IPERF_PORTS" ;;
    esac
}
for group in sink echo fixed failover iperf; do
    ports=$(ports_of $group)
    stickylb_conf $LB_PORT "$ports" >"$OUT/conf/stickylb-$group.json"
    # stickylb-pp: the same with `proxyProtocol: "v2"` (the cost of sending the header), on
    # the fixed-reply targets only, whose copies on FIXED_PP_PORTS read the header first.
    if [ $group = fixed ]; then
        stickylb_conf $LB_PORT "$FIXED_PP_PORTS" '"proxyProtocol": "v2",' \
            >"$OUT/conf/stickylb-pp-$group.json"
    fi
    for variant in haproxy haproxy-splice; do
        haproxy_conf $LB_PORT "$ports" $variant >"$OUT/conf/$variant-$group.cfg"
    done
    mkdir -p "$OUT/nginx-$group"
    nginx_conf $LB_PORT "$ports" "$OUT/nginx-$group" >"$OUT/conf/nginx-$group.conf"
done

# Starts balancer $1 for target group $2; sets LB_PID. Returns 1 if it does not listen.
LB_PID=""
start_lb() {
    local label=$1 group=$2 logf="$OUT/logs/$1-$2.log"
    mkdir -p "$OUT/logs"
    case "$label" in
        stickylb) "$STICKYLB" --config "$OUT/conf/stickylb-$group.json" >>"$logf" 2>&1 & ;;
        stickylb-pp) "$STICKYLB" --config "$OUT/conf/stickylb-pp-$group.json" >>"$logf" 2>&1 & ;;
        stickylb-alt) "${ALT:?--alt PATH names the binary of label stickylb-alt}" \
            --config "$OUT/conf/stickylb-$group.json" >>"$logf" 2>&1 & ;;
        stickylb-nobudget) setpriv --reuid=65534 --regid=65534 --clear-groups \
            "$STICKYLB" --no-watch --config "$OUT/conf/stickylb-$group.json" >>"$logf" 2>&1 & ;;
        haproxy|haproxy-splice) haproxy -db -f "$OUT/conf/$label-$group.cfg" >>"$logf" 2>&1 & ;;
        nginx) nginx -c "$OUT/conf/nginx-$group.conf" -p "$OUT/nginx-$group" \
            -e "$OUT/nginx-$group/error.log" >>"$logf" 2>&1 & ;;
    esac
    LB_PID=$!
    STARTED+=("$LB_PID")
    if ! "$LOAD" wait-port "127.0.0.1:$LB_PORT" --timeout 10 2>>"$logf"; then
        log "$label did not start; see $logf"
        tail -5 "$logf" >&2
        stop_lb
        return 1
    fi
}
stop_lb() {
    [ -n "$LB_PID" ] && stop_pid "$LB_PID"
    LB_PID=""
}

# ---------------------------------------------------------------------------------------------
# 4. Backends, then the runs.
log "starting backends"
"$LOAD" backend --sink "${SINK_PORTS// /,}" --echo "${ECHO_PORTS// /,}" \
    --fixed "${FIXED_PORTS// /,},27041,27042" --fixed-proxy "${FIXED_PP_PORTS// /,}" \
    --max-seconds 7200 >"$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
STARTED+=("$BACKEND_PID")
for p in $SINK_PORTS $ECHO_PORTS $FIXED_PORTS $FIXED_PP_PORTS 27041 27042; do
    "$LOAD" wait-port "127.0.0.1:$p" --timeout 10 || { echo "backend did not start" >&2; exit 1; }
done
case " $LABELS " in
    *" stickylb-nobudget "*)
        [ "$(id -u)" = 0 ] || { echo "compare.sh: stickylb-nobudget needs root (it runs stickylb as nobody)" >&2; exit 1; }
        chmod a+rx "$OUT" "$OUT/bin" "$OUT/conf" && chmod a+r "$OUT"/conf/*
        "$LOAD" pipe-hog --uid 65534 --max-seconds 7200 >"$OUT/pipe-hog.log" 2>&1 &
        STARTED+=("$!")
        for _ in $(seq 1 100); do grep -q spent "$OUT/pipe-hog.log" && break; sleep 0.1; done
        grep -q spent "$OUT/pipe-hog.log" || { echo "compare.sh: the pipe hog failed: $(cat "$OUT/pipe-hog.log")" >&2; exit 1; }
        ;;
esac
case " $SCENARIOS " in
    *" iperf"*)
        command -v iperf3 >/dev/null 2>&1 \
            || { echo "compare.sh: the iperf scenarios need iperf3 (apt-get install iperf3)" >&2; exit 1; }
        start_iperf_servers "$IPERF_PORTS" "$OUT" || exit 1
        ;;
esac

args_of() {
    case "$1" in
        bulk1|bulk4|iperf*) echo "--scenario $1 --duration $DURATION" ;;
        shortconn|keepalive) echo "--scenario $1 --duration $DURATION --warmup 1 --concurrency 50" ;;
        idle*) echo "--scenario idle --conns ${1#idle}" ;;
        overflow) echo "--scenario overflow --conns 11000" ;;
        failover) echo "--scenario failover --duration 6 --kill-after 2 --concurrency 50 --victim-port $VICTIM_PORT" ;;
    esac
}

START=$(date +%s)
for rep in $(seq 1 "$REPS"); do
    log "repetition $rep of $REPS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    for scenario in $SCENARIOS; do
        # Behaviour, not speed: the overflow flood runs in the first repetition only.
        if [ "$scenario" = overflow ] && [ "$rep" -gt 1 ]; then continue; fi
        group=$(group_of "$scenario")
        for label in $LABELS; do
            # The PROXY header's cost is measured where it is paid per connection and request.
            if [ "$label" = stickylb-pp ] && [ "$group" != fixed ]; then continue; fi
            # The pipe budget matters where bytes are spliced.
            if [ "$label" = stickylb-nobudget ]; then
                case "$group" in sink|iperf) ;; *) continue ;; esac
            fi
            if [ "$label" = direct ]; then
                case "$scenario" in overflow|failover) continue ;; esac
                target=""
                for p in $(ports_of "$group"); do target="$target${target:+,}127.0.0.1:$p"; done
                pids=""
            else
                target="127.0.0.1:$LB_PORT"
            fi
            victim=""
            if [ "$scenario" = failover ]; then
                "$LOAD" backend --fixed $VICTIM_PORT --max-seconds 300 >>"$OUT/backend.log" 2>&1 &
                VICTIM_PID=$!
                STARTED+=("$VICTIM_PID")
                "$LOAD" wait-port "127.0.0.1:$VICTIM_PORT" --timeout 10
                victim="--victim-pid $VICTIM_PID"
            fi
            if [ "$label" != direct ]; then
                start_lb "$label" "$group" || continue
                pids=$LB_PID
            fi
            # The backends' processes, measured beside the balancer (`backend_cpu_*`: on
            # loopback the balancer's own CPU holds a share of its backends' TCP work that
            # moves with the scheduler).
            backends=$BACKEND_PID
            [ "$group" = iperf ] && backends=$(IFS=,; echo "${IPERF_PIDS[*]}")
            log "rep $rep: $scenario via $label"
            # shellcheck disable=SC2046
            timeout 180 "$LOAD" run $(args_of "$scenario") $victim --label "$label" --rep "$rep" \
                --target "$target" --pids "$pids" --backend-pids "$backends" --out "$RESULTS" >/dev/null \
                || log "run failed: $scenario via $label"
            tail -1 "$RESULTS" 2>/dev/null | cut -c1-400 >&2 || true
            [ "$label" != direct ] && stop_lb
            if [ -n "$victim" ]; then stop_pid "$VICTIM_PID"; fi
            sleep 0.5
        done
    done
done
log "runs done in $(( $(date +%s) - START )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); runs took $(( $(date +%s) - START )) s" >>"$OUT/machine.txt"

# ---------------------------------------------------------------------------------------------
# 5. Report
{
    echo '```'
    cat "$OUT/machine.txt"
    echo '```'
    echo
    "$LOAD" report "$RESULTS"
} >"$OUT/report.md"
cat "$OUT/report.md"
log "results: $RESULTS; report: $OUT/report.md"
