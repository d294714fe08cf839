#!/usr/bin/env bash
# Where stickylb's CPU goes per connection and per request (issue 5 §5), or a peer's.
#
#   benches/profile.sh [--seconds S] [--out DIR] [--balancer stickylb|haproxy|haproxy-splice|nginx]
#
# Starts the load tool's backends, then for the shortconn, keepalive and bulk4 scenarios a fresh
# balancer (default: a release stickylb with its default config; the peers configured as
# compare.sh configures them, benches/lib.sh), 4 fixed-reply or sink targets, and:
# - perf record (cpu-clock sampling, kernel and user stacks) of the balancer's processes (nginx:
#   its master and workers) while the load runs: perf-<scenario>.txt has the time inside each
#   syscall (inclusive), the share of kernel and user space, and the top functions by self time;
# - strace -c of the same processes during a second run: strace-<scenario>.txt has the count of
#   each syscall per connection (shortconn: divided by accepted connections) or per request
#   (keepalive: divided by the requests the client completed; bulk4: per MiB received).
#   strace slows the balancer down a lot; the counts per unit hold, the times do not (and
#   epoll_wait batches differently).
# Everything started here is ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/lib.sh"
# Where cargo builds: $CARGO_TARGET_DIR when set, as cargo itself does.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECONDS_RUN=8
OUT=""
BALANCER=stickylb
parse_options 2,17 "--seconds SECONDS_RUN --out OUT --balancer BALANCER" "$@"
case "$BALANCER" in
    stickylb|haproxy|haproxy-splice|nginx) ;;
    *) echo "profile.sh: --balancer is stickylb, haproxy, haproxy-splice or nginx" >&2; exit 2 ;;
esac
OUT=${OUT:-$TARGET/bench-profile/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/bin" "$OUT/conf"  # conf/: stickylb watches its config's directory
command -v perf >/dev/null && command -v strace >/dev/null \
    || { echo "profile.sh: needs perf and strace (apt-get install linux-perf strace)" >&2; exit 1; }

cd "$ROOT"
build_run_copies

trap stop_started EXIT

"$LOAD" backend --fixed 27031-27034 --sink 27011-27014 --max-seconds 900 >"$OUT/backend.log" 2>&1 &
STARTED+=("$!")
# The targets of each group: fixed-reply (shortconn, keepalive) and sink (bulk4).
declare -A PORTS=([fixed]="27031 27032 27033 27034" [sink]="27011 27012 27013 27014")
for group in fixed sink; do
    ports=${PORTS[$group]}
    case "$BALANCER" in
        stickylb) stickylb_conf 27000 "$ports" >"$OUT/conf/stickylb-$group.json" ;;
        haproxy*) haproxy_conf 27000 "$ports" "$BALANCER" >"$OUT/conf/$BALANCER-$group.cfg" ;;
        nginx) mkdir -p "$OUT/nginx-$group"
            nginx_conf 27000 "$ports" "$OUT/nginx-$group" >"$OUT/conf/nginx-$group.conf" ;;
    esac
done
"$LOAD" wait-port 127.0.0.1:27031
"$LOAD" wait-port 127.0.0.1:27011

for scenario in shortconn keepalive bulk4; do
    group=fixed
    [ "$scenario" = bulk4 ] && group=sink
    case "$BALANCER" in
        stickylb) cmd=("$OUT/bin/stickylb" --config "$OUT/conf/stickylb-$group.json") ;;
        haproxy*) cmd=(haproxy -db -f "$OUT/conf/$BALANCER-$group.cfg") ;;
        nginx) cmd=(nginx -c "$OUT/conf/nginx-$group.conf" -p "$OUT/nginx-$group"
            -e "$OUT/nginx-$group/error.log") ;;
    esac
    "${cmd[@]}" >>"$OUT/$BALANCER.log" 2>&1 &
    LB=$!
    STARTED+=("$LB")
    "$LOAD" wait-port 127.0.0.1:27000
    # The processes to record: the balancer and its children (nginx's workers, which its master
    # forks after it binds: waited for, up to 5 s). The load tool counts CPU over the whole tree
    # from $LB itself.
    CHILDREN=""
    for _ in $(seq 1 50); do
        CHILDREN=$(pgrep -P "$LB" | paste -sd, || true)
        [ "$BALANCER" != nginx ] || [ "$(tr ',' '\n' <<<"$CHILDREN" | grep -c .)" -ge 2 ] && break
        sleep 0.1
    done
    PIDS=$LB${CHILDREN:+,$CHILDREN}
    # strace: the processes that do the work (nginx's workers; its master does none per
    # connection).
    TRACED=${CHILDREN:-$LB}
    echo "== $scenario: perf (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$LOAD" run --scenario "$scenario" --label "$BALANCER" --target 127.0.0.1:27000 --pids "$LB" \
        --duration $((SECONDS_RUN + 2)) --warmup 1 >"$OUT/run-perf-$scenario.json" &
    CLIENT=$!
    sleep 1.5
    perf record -q -F 999 -e cpu-clock -g -p "$PIDS" -o "$OUT/perf-$scenario.data" -- sleep "$SECONDS_RUN" 2>/dev/null
    wait "$CLIENT"
    {
        echo "# $BALANCER under $scenario: $(cat "$OUT/run-perf-$scenario.json")"
        echo
        echo "## kernel vs user (self time by object)"
        perf report -i "$OUT/perf-$scenario.data" --no-children --sort dso --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -6
        echo
        echo "## time inside each syscall (inclusive) and top user-space entries"
        perf report -i "$OUT/perf-$scenario.data" --children --sort sym --stdio -g none 2>/dev/null \
            | grep -E '__x64_sys_|handle_softirqs' | head -20
        echo
        echo "## top functions by self time"
        perf report -i "$OUT/perf-$scenario.data" --no-children --sort sym --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -40
    } >"$OUT/perf-$scenario.txt" || true # (head closes the pipes early)

    echo "== $scenario: strace -c" >&2
    strace -c -f -p "$TRACED" -o "$OUT/strace-raw-$scenario.txt" 2>/dev/null &
    STRACE=$!
    STARTED+=("$STRACE")
    sleep 1
    "$LOAD" run --scenario "$scenario" --label "$BALANCER" --target 127.0.0.1:27000 --pids "$LB" \
        --duration 5 --warmup 0 >"$OUT/run-strace-$scenario.json"
    sleep 0.5
    stop_pid "$STRACE" INT
    if [ "$scenario" = shortconn ]; then
        # Connections = successful accept4 calls.
        units=$(awk '$NF=="accept4" {print $4 - (NF == 6 ? $5 : 0)}' "$OUT/strace-raw-$scenario.txt")
        unit=connection
    elif [ "$scenario" = keepalive ]; then
        units=$(grep -o '"requests":[0-9]*' "$OUT/run-strace-$scenario.json" | cut -d: -f2)
        unit=request
    else
        units=$(( $(grep -o '"bytes":[0-9]*' "$OUT/run-strace-$scenario.json" | cut -d: -f2) / 1048576 ))
        unit=MiB
    fi
    {
        echo "# syscalls per $unit ($units ${unit}s; strace -c -f on $BALANCER)"
        awk -v u="$units" '/^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ {
                errors = (NF == 6) ? $5 : 0; printf "%-14s %8.2f  (%.2f of them errors)\n", $NF, $4 / u, errors / u
            }' "$OUT/strace-raw-$scenario.txt"
    } >"$OUT/strace-$scenario.txt"
    cat "$OUT/strace-$scenario.txt"
    stop_pid "$LB"
done
echo "profiles in $OUT" >&2
