#!/usr/bin/env bash
# Runs every measurement quoted in BENCHMARKS.md: release build, loopback only, each run
# bounded in count and time (about 20 minutes in all on 2 cores). Results (JSON and the
# printed tables) go to $OUT, by default crates/reborn-bench/results; the servers' logs
# of the light-load runs to $OUT/logs (for phases.py). ONLY=REGEX runs only the runs
# whose name matches, e.g. ONLY='^steady' ./crates/reborn-bench/run-benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -p reborn-bench -p reborn-cli
B=$CARGO_TARGET_DIR/release
OUT=${OUT:-crates/reborn-bench/results}
mkdir -p "$OUT"
run() { # name, then reborn-bench arguments
    local name=$1; shift
    if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then return; fi
    echo "== $name: reborn-bench $*" | tee "$OUT/$name.txt"
    echo "load average before: $(cat /proc/loadavg)" | tee -a "$OUT/$name.txt"
    "$B/reborn-bench" "$@" --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt"
    echo "load average after: $(cat /proc/loadavg)" | tee -a "$OUT/$name.txt"
}

# 100 restarts at concurrency 64, closed loop, for every path and connection mode.
for path in self master stop-start; do
    for mode in keepalive newconn h2; do
        run "restart-$path-$mode" restart --path "$path" --mode "$mode" -c 64 \
            --restarts 100 --interval-ms 250 --max-time-s 300
    done
done

# The same with CPU headroom: 64 clients paced to 20,000 requests/s in all.
for path in self master; do
    for mode in keepalive newconn; do
        run "paced-$path-$mode" restart --path "$path" --mode "$mode" -c 64 --rate 20000 \
            --restarts 100 --interval-ms 250 --max-time-s 300
    done
done

# Light load: the handoff itself, with the CPU mostly free (4 clients, 4,000 req/s in
# all, evenly spaced; with a new connection per request the first answer from the new
# generation comes at most 0.25 ms after it can; with keep-alive and HTTP/2 a client
# first gets `Connection: close` or GOAWAY from the old one and reconnects). The servers'
# logs of the new-connection runs are kept for phases.py.
for path in self master; do
    rm -rf "$OUT/logs/light-$path"
    # 300 restarts: the handoff's median over more samples than the machine's moods.
    run "light-$path-newconn" --work-dir "$OUT/logs/light-$path" restart --path "$path" \
        --mode newconn -c 4 --rate 4000 --restarts 300 --interval-ms 250 --max-time-s 300
    for mode in keepalive h2; do
        run "light-$path-$mode" restart --path "$path" --mode "$mode" -c 4 --rate 4000 \
            --restarts 100 --interval-ms 250 --max-time-s 300
    done
done

# Steady state: reborn's serve against plain axum::serve, same handler, same load, in
# 20 rounds of 2 s, alternating which server goes first (the median of the per-round
# ratios is the robust figure on a shared machine).
for mode in keepalive newconn h2; do
    run "steady-$mode" steady --mode "$mode" -c 64 --rounds 20 --duration-s 2 --warmup-s 0.5
done

# Keep-alive connections handed over (no probation, so each moves at once).
run "restart-self-keepalive-p0" restart --path self --mode keepalive -c 64 \
    --restarts 100 --interval-ms 250 --max-time-s 300 --server-arg=--probation-ms=0
run "light-self-keepalive-p0" restart --path self --mode keepalive -c 4 --rate 4000 \
    --restarts 100 --interval-ms 250 --max-time-s 300 --server-arg=--probation-ms=0

# 10,000 idle keep-alive connections through an upgrade, idle grace 1 s.
for path in self master; do
    run "idle-$path" idle --path "$path" --connections 10000 --idle-grace-ms 1000
done

# 10,000 WebSocket clients through 3 upgrades under paced HTTP load (8 keep-alive
# clients, 2,000 req/s): each must get 1012 at its moment in a 2 s eviction window and
# reconnect to the new generation; probation 1 s, so the window decides when the old
# generation may go.
for path in self master; do
    run "websocket-$path" websocket --path "$path" --clients 10000 --upgrades 3 \
        --window-ms 2000 --probation-ms 1000
done

# The master's memory over 1,000 upgrades in quick succession (light load, no slow
# requests): its RSS at the start and at the end.
run "master-memory-1000" restart --path master --mode newconn -c 2 --rate 500 \
    --restarts 1000 --interval-ms 20 --slow-per-restart 0 --max-time-s 300
# The same over 5,000: does it level off? (About 4 minutes; only with ONLY=...5000.)
if [[ ${ONLY:-} =~ 5000 ]]; then
    run "master-memory-5000" restart --path master --mode newconn -c 2 --rate 500 \
        --restarts 5000 --interval-ms 20 --slow-per-restart 0 --max-time-s 2400
fi

# A fleet: 3 bench-servers, each in a network namespace of its own (root; loopback ports
# without), behind Debian's haproxy (GET /readyz every 100 ms, fall 2, rise 2, retries 0),
# 4 keep-alive and 2 new-connection clients that never retry: 50 rounds of rolling
# in-place upgrades (150 upgrades: an upgrade takes a few ms, so fewer carry few
# requests), a rolling replacement with a 1 s shutdown delay, one without.
run "fleet" fleet --instances 3 --rounds 50 --shutdown-delay-ms 1000 --keep-alive 4 --new-conn 2

# The handoff with a statically linked, non-PIE bench-server (no dynamic loader, no
# relocations at exec), light load, beside the default build.
if [[ -z ${ONLY:-} || static =~ $ONLY ]]; then
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_TARGET_DIR="$CARGO_TARGET_DIR/static" \
        cargo build --release -p reborn-bench --bin bench-server --target x86_64-unknown-linux-gnu
    rm -rf "$OUT/logs/light-self-static"
    run "light-self-newconn-static" --work-dir "$OUT/logs/light-self-static" restart \
        --server "$CARGO_TARGET_DIR/static/x86_64-unknown-linux-gnu/release/bench-server" \
        --path self --mode newconn -c 4 --rate 4000 --restarts 300 --interval-ms 250 --max-time-s 300
    # The build the crate docs recommend: static, still position-independent (static-pie).
    RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_TARGET_DIR="$CARGO_TARGET_DIR/static-pie" \
        cargo build --release -p reborn-bench --bin bench-server --target x86_64-unknown-linux-gnu
    run "light-self-newconn-static-pie" restart \
        --server "$CARGO_TARGET_DIR/static-pie/x86_64-unknown-linux-gnu/release/bench-server" \
        --path self --mode newconn -c 4 --rate 4000 --restarts 300 --interval-ms 250 --max-time-s 300
fi
