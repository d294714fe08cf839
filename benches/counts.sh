#!/usr/bin/env bash
# Syscalls and wake-ups per MiB of a balancer under each bulk client (issue 18, item 1).
#
#   benches/counts.sh [--seconds S] [--reps N] [--scenarios "bulk1 iperf4-16k ..."]
#                     [--labels "stickylb haproxy-splice"] [--out DIR]
#                     [--alt PATH] [--alt-key '"balancerCount": 1,']
#                     [--congestion NAME]  (TCP congestion control for the run; see compare.sh)
#
# For each repetition, scenario and label (interleaved, like compare.sh), starts the balancer
# fresh, attaches `perf stat` to it (tracepoint and software counters: they count, they do not
# sample, so they do not depend on the machine's load the way CPU seconds do), runs the client
# (`load run`: bulk1/bulk4, or iperf3 through it: iperf1, iperf4, iperf1-16k, iperf4-16k), and
# divides every count by the MiB the sink or iperf3 server received:
#   splice       splice(2) calls (socket → pipe and pipe → socket)
#   EAGAIN       of those, the ones that found nothing to read or no room to write
#   read, send   read(2)/recvfrom(2) and write(2)/sendto(2): the copy path (a direction copies
#                small messages and switches to splice when a read fills its 16 KiB buffer)
#   pipe2, fcntl, close   pipes made, sized and closed: the pipe pools' churn
#   epoll_wait   calls: each one a wake-up of a thread waiting for events, or a poll
#   epoll_ctl    registrations added, changed or removed (stickylb takes a blocked direction's
#                source off epoll and puts it back: a DEL and an ADD each way)
#   cs           context switches of the balancer's threads (voluntary + involuntary)
#   CPU ms       the balancer's task-clock, ms per MiB (= CPU s per GB × 1.05; this one does
#                depend on the load)
# Label `stickylb-alt` (not in the defaults) is a second stickylb in the same run, to measure a
# change side by side: the binary PATH of `--alt` (default: the same build), with the config key
# line of `--alt-key` added to its config when given.
# Writes counts.jsonl (one line per run) and counts.md (medians) into the output directory.
# Needs perf (linux-perf), iperf3 and, for the HAProxy labels, haproxy. Loopback only; every
# process started here is ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECS=5
REPS=3
SCENARIOS="bulk1 bulk4 iperf1 iperf4 iperf1-16k iperf4-16k"
LABELS="stickylb haproxy-splice"
OUT=""
ALT=""
ALT_KEY=""
CONGESTION=""
parse_options 2,28 "--seconds SECS --reps REPS --scenarios SCENARIOS --labels LABELS --out OUT --alt ALT --alt-key ALT_KEY --congestion CONGESTION" "$@"
OUT=${OUT:-$TARGET/bench-counts/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/bin" "$OUT/conf" "$OUT/logs"
for tool in perf iperf3; do
    command -v $tool >/dev/null || { echo "counts.sh: needs $tool" >&2; exit 1; }
done

cd "$ROOT"
build_run_copies
cp "${ALT:-$OUT/bin/stickylb}" "$OUT/bin/stickylb-alt"

# Processes we start (STARTED, stop_pid: benches/lib.sh), all ended on exit.
trap stop_started EXIT
trap 'exit 130' INT TERM
use_congestion "$CONGESTION"

SINK="27011 27012 27013 27014"
IPERF="27061 27062 27063 27064"
"$LOAD" backend --sink "${SINK// /,}" --max-seconds 7200 >"$OUT/logs/backend.log" 2>&1 &
STARTED+=("$!")
for p in $SINK; do "$LOAD" wait-port "127.0.0.1:$p" --timeout 10; done
start_iperf_servers "$IPERF" "$OUT/logs"

for group in sink iperf; do
    ports=$SINK
    [ $group = iperf ] && ports=$IPERF
    # The same configs as compare.sh's (benches/lib.sh).
    stickylb_conf 27000 "$ports" >"$OUT/conf/stickylb-$group.json"
    stickylb_conf 27000 "$ports" "$ALT_KEY" >"$OUT/conf/stickylb-alt-$group.json"
    for variant in haproxy haproxy-splice; do
        haproxy_conf 27000 "$ports" $variant >"$OUT/conf/$variant-$group.cfg"
    done
done

EVENTS=task-clock,context-switches,syscalls:sys_enter_splice,syscalls:sys_enter_epoll_wait
EVENTS=$EVENTS,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom
EVENTS=$EVENTS,syscalls:sys_enter_write,syscalls:sys_enter_sendto
EVENTS=$EVENTS,syscalls:sys_enter_pipe2,syscalls:sys_enter_fcntl,syscalls:sys_enter_close
EVENTS=$EVENTS,syscalls:sys_enter_epoll_ctl
RESULTS=$OUT/counts.jsonl
for rep in $(seq 1 "$REPS"); do
    for scenario in $SCENARIOS; do
        group=sink
        case $scenario in iperf*) group=iperf ;; esac
        for label in $LABELS; do
            logf=$OUT/logs/$label.log
            case $label in
                stickylb|stickylb-alt) "$OUT/bin/$label" --config "$OUT/conf/$label-$group.json" \
                    >>"$logf" 2>&1 & ;;
                haproxy|haproxy-splice) haproxy -db -f "$OUT/conf/$label-$group.cfg" >>"$logf" 2>&1 & ;;
                *) echo "counts.sh: unknown label $label" >&2; exit 2 ;;
            esac
            LB=$!
            STARTED+=("$LB")
            "$LOAD" wait-port 127.0.0.1:27000 --timeout 10
            perf stat -x, -e "$EVENTS" -e syscalls:sys_exit_splice --filter 'ret == -11' \
                -p "$LB" -o "$OUT/perf-stat.csv" &
            PERF=$!
            sleep 0.3
            load1=$(cut -d' ' -f1 /proc/loadavg)
            "$LOAD" run --scenario "$scenario" --label "$label" --rep "$rep" \
                --target 127.0.0.1:27000 --pids "$LB" --duration "$SECS" >"$OUT/run.json" \
                2>>"$OUT/logs/client.log" || echo "run failed: $scenario via $label" >&2
            kill -INT "$PERF"
            wait "$PERF" 2>/dev/null || true
            stop_pid "$LB"
            bytes=$(grep -o '"bytes":[0-9]*' "$OUT/run.json" | cut -d: -f2)
            [ -n "$bytes" ] && [ "$bytes" -gt 0 ] || continue
            # One JSON line: counts per MiB.
            awk -F, -v mib="$(awk "BEGIN{print $bytes/1048576}")" -v s="$scenario" -v l="$label" \
                -v r="$rep" -v load1="$load1" '
                $1 ~ /^[0-9.]+$/ {
                    name = $3; sub(/^syscalls:sys_enter_/, "", name)
                    if ($3 == "syscalls:sys_exit_splice") name = "splice_eagain"
                    if ($3 == "task-clock") name = "cpu_ms"
                    if ($3 == "context-switches") name = "cs"
                    v[name] = $1 / mib
                }
                END {
                    printf "{\"scenario\":\"%s\",\"label\":\"%s\",\"rep\":%d,\"load1\":%s,\"mib\":%.0f", s, l, r, load1, mib
                    for (k in v) printf ",\"%s\":%.4f", k, v[k]
                    print "}"
                }' "$OUT/perf-stat.csv" >>"$RESULTS"
            tail -1 "$RESULTS" >&2
            sleep 0.3
        done
    done
done

# Medians per scenario and label, under the TCP settings of the run.
{ tcp_setup; echo; } >"$OUT/counts.md"
python3 - "$RESULTS" >>"$OUT/counts.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = [("splice", "splice"), ("splice_eagain", "EAGAIN"), ("read", "read"),
        ("recvfrom", "recvfrom"), ("write", "write"), ("sendto", "sendto"),
        ("pipe2", "pipe2"), ("fcntl", "fcntl"), ("close", "close"),
        ("epoll_wait", "epoll_wait"), ("epoll_ctl", "epoll_ctl"), ("cs", "cs"),
        ("cpu_ms", "CPU ms")]
loads = [r["load1"] for r in rows]
print(f"Per MiB received, median of {max(r['rep'] for r in rows)} repetitions; "
      f"1-minute load average before each run: median {statistics.median(loads):.2f}, "
      f"min {min(loads):.2f}, max {max(loads):.2f}.\n")
print("| scenario | balancer | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|" + "---|" * len(cols))
seen = []
for r in rows:
    k = (r["scenario"], r["label"])
    if k not in seen:
        seen.append(k)
order = ["bulk1", "bulk4", "iperf1", "iperf4", "iperf1-16k", "iperf4-16k"]
seen.sort(key=lambda k: (order.index(k[0]) if k[0] in order else 99))
for s, l in seen:
    sel = [r for r in rows if r["scenario"] == s and r["label"] == l]
    cells = []
    for key, _ in cols:
        vals = [r.get(key, 0.0) for r in sel]
        digits = 3 if key == "cpu_ms" else 2
        cells.append(f"{statistics.median(vals):.{digits}f}")
    print(f"| {s} | {l} | " + " | ".join(cells) + " |")
PY
cat "$OUT/counts.md"
echo "counts in $OUT" >&2
