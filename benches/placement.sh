#!/usr/bin/env bash
# Bulk cost against where the scheduler puts the balancer (issue 18, item 1).
#
#   benches/placement.sh [--seconds S] [--reps N] [--scenarios "iperf4 iperf4-16k"]
#                        [--labels "stickylb haproxy-splice"] [--placements "free lb+server lb+client"]
#                        [--out DIR] [--congestion NAME]  (TCP congestion control; see compare.sh)
#
# On loopback a sender's transmit runs the receiver's TCP work (the receive path, its ACK, the
# wake-up) in the sender's context, unless the receiver holds its socket at that moment, in which
# case the receiver does it when it lets go. So how much of its backends' work a balancer's own
# CPU figure holds depends on which process shares its core: with iperf3's client, iperf3's
# server and the balancer on two cores, the scheduler decides that afresh in every run, and the
# balancer's figure under four streams lands in a cheap or a dear regime (docs/benchmarks.md,
# "Which core the balancer shares"). This bench takes the draw out: for each repetition,
# scenario, placement and label (interleaved) it runs iperf3 through a fresh balancer with
#   free        nothing pinned (what compare.sh does)
#   lb+server   the balancer (all its threads) and the iperf3 servers on the first core, the
#               iperf3 client on the second
#   lb+client   the balancer and the iperf3 client on the first core, the servers on the second
# and reports, per GB received: the balancer's CPU, the iperf3 servers' CPU (`backend`), the
# two together (which the placement does not move from one to the other) and the machine's,
# with Gbit/s, as medians and as ratios of each label to haproxy-splice in the same placement.
# Every balancer gets the same placements, so the ratios compare like with like.
# Writes placement.jsonl (one line per run) and placement.md into the output directory. Needs
# iperf3, taskset and, for the HAProxy labels, haproxy; two cores or more. Loopback only; every
# process started here is ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECS=5
REPS=4
SCENARIOS="iperf4 iperf4-16k"
LABELS="stickylb haproxy-splice"
PLACEMENTS="free lb+server lb+client"
OUT=""
CONGESTION=""
parse_options 2,26 "--seconds SECS --reps REPS --scenarios SCENARIOS --labels LABELS --placements PLACEMENTS --out OUT --congestion CONGESTION" "$@"
OUT=${OUT:-$TARGET/bench-placement/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/bin" "$OUT/conf" "$OUT/logs"
for tool in iperf3 taskset python3; do
    command -v $tool >/dev/null || { echo "placement.sh: needs $tool" >&2; exit 1; }
done
# The first two cores this script may run on: A holds the balancer, B the other party.
mapfile -t CORES < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0))[:2], sep="\n")')
[ "${#CORES[@]}" -ge 2 ] || { echo "placement.sh: needs two cores" >&2; exit 1; }
A=${CORES[0]}
B=${CORES[1]}
ALL=$(python3 -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))')

cd "$ROOT"
build_run_copies

# Processes we start (STARTED, stop_pid: benches/lib.sh), all ended on exit.
trap stop_started EXIT
trap 'exit 130' INT TERM
use_congestion "$CONGESTION"

IPERF="27061 27062 27063 27064"
start_iperf_servers "$IPERF" "$OUT/logs"
# The same configs as compare.sh's (benches/lib.sh).
stickylb_conf 27000 "$IPERF" >"$OUT/conf/stickylb.json"
haproxy_conf 27000 "$IPERF" haproxy >"$OUT/conf/haproxy.cfg"
haproxy_conf 27000 "$IPERF" haproxy-splice >"$OUT/conf/haproxy-splice.cfg"

RESULTS=$OUT/placement.jsonl
for rep in $(seq 1 "$REPS"); do
    for scenario in $SCENARIOS; do
        for placement in $PLACEMENTS; do
            case $placement in
                free) lb_cpus=$ALL server_cpus=$ALL client_cpus=$ALL ;;
                lb+server) lb_cpus=$A server_cpus=$A client_cpus=$B ;;
                lb+client) lb_cpus=$A server_cpus=$B client_cpus=$A ;;
                *) echo "placement.sh: unknown placement $placement" >&2; exit 2 ;;
            esac
            for pid in "${IPERF_PIDS[@]}"; do taskset -a -p -c "$server_cpus" "$pid" >/dev/null; done
            for label in $LABELS; do
                logf=$OUT/logs/$label.log
                case $label in
                    stickylb) taskset -c "$lb_cpus" "$OUT/bin/stickylb" \
                        --config "$OUT/conf/stickylb.json" >>"$logf" 2>&1 & ;;
                    haproxy|haproxy-splice) taskset -c "$lb_cpus" haproxy -db \
                        -f "$OUT/conf/$label.cfg" >>"$logf" 2>&1 & ;;
                    *) echo "placement.sh: unknown label $label" >&2; exit 2 ;;
                esac
                LB=$!
                STARTED+=("$LB")
                "$LOAD" wait-port 127.0.0.1:27000 --timeout 10
                servers=$(IFS=,; echo "${IPERF_PIDS[*]}")
                if taskset -c "$client_cpus" "$LOAD" run --scenario "$scenario" --label "$label" \
                    --rep "$rep" --target 127.0.0.1:27000 --pids "$LB" --backend-pids "$servers" \
                    --duration "$SECS" >"$OUT/run.json" 2>>"$OUT/logs/client.log"; then
                    sed "s/^{/{\"placement\":\"$placement\",/" "$OUT/run.json" >>"$RESULTS"
                    tail -1 "$RESULTS" | cut -c1-300 >&2
                else
                    echo "run failed: $scenario, $placement, via $label" >&2
                fi
                stop_pid "$LB"
                sleep 0.3
            done
        done
    done
done
for pid in "${IPERF_PIDS[@]}"; do taskset -a -p -c "$ALL" "$pid" >/dev/null; done

# Medians per scenario, placement and label; ratios to haproxy-splice in the same placement.
{ tcp_setup; echo; } >"$OUT/placement.md"
python3 - "$RESULTS" >>"$OUT/placement.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = [("gbit_s", "Gbit/s"), ("lb_cpu_per_gb", "balancer CPU s/GB"),
        ("backend_cpu_per_gb", "iperf3 servers CPU s/GB"),
        ("lb_backend_cpu_per_gb", "balancer + servers"), ("machine_cpu_per_gb", "machine CPU s/GB")]
def med(sel, key):
    return statistics.median(r[key] for r in sel)
keys = []
for r in rows:
    k = (r["scenario"], r["placement"], r["label"])
    if k not in keys:
        keys.append(k)
print(f"Medians of {max(r['rep'] for r in rows)} repetitions (min–max of the balancer's CPU).\n")
print("| scenario | placement | balancer | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
for s, p, l in keys:
    sel = [r for r in rows if (r["scenario"], r["placement"], r["label"]) == (s, p, l)]
    cells = [f"{med(sel, k):.3f}" if k != "gbit_s" else f"{med(sel, k):.2f}" for k, _ in cols]
    lo = min(r["lb_cpu_per_gb"] for r in sel)
    hi = max(r["lb_cpu_per_gb"] for r in sel)
    cells[1] += f" ({lo:.3f}–{hi:.3f})"
    print(f"| {s} | {p} | {l} | " + " | ".join(cells) + " |")
print("\nEach label ÷ haproxy-splice in the same scenario and placement (medians):\n")
print("| scenario | placement | balancer | " + " | ".join(c[1] for c in cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
for s, p, l in keys:
    if l == "haproxy-splice":
        continue
    sel = [r for r in rows if (r["scenario"], r["placement"], r["label"]) == (s, p, l)]
    ref = [r for r in rows if (r["scenario"], r["placement"], r["label"]) == (s, p, "haproxy-splice")]
    if not ref:
        continue
    cells = [f"×{med(sel, k) / med(ref, k):.2f}" for k, _ in cols]
    print(f"| {s} | {p} | {l} | " + " | ".join(cells) + " |")
PY
cat "$OUT/placement.md"
echo "results in $OUT" >&2
