#!/usr/bin/env bash
# Compares repd (single-node resource) with qemu-nbd serving a raw file, in
# the same run, with fio's nbd engine:
#   1. 4 KiB random write, QD1, fsync after every write
#   2. 4 KiB random write, QD32
#   3. 1 MiB sequential write, QD8
# and prints IOPS/bandwidth, the repd/qemu-nbd ratio, and repd's peak RSS.
#
# Environment: BENCH_DIR (default target/bench; must support O_DIRECT, so not
# tmpfs), BENCH_RUNTIME seconds per job (default 20), BENCH_SIZE (1GiB).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need fio fio
need qemu-nbd qemu-utils
need python3 python3
install_needed
ensure_toolchain

cd "$REPO_ROOT"
cargo build --release --bins
REPD="$REPO_ROOT/target/release/repd"
REPCTL="$REPO_ROOT/target/release/repctl"

DIR="${BENCH_DIR:-$REPO_ROOT/target/bench}"
RUNTIME="${BENCH_RUNTIME:-20}"
SIZE="${BENCH_SIZE:-1GiB}"
rm -rf "$DIR" && mkdir -p "$DIR"
REPD_PORT=$(( 20000 + RANDOM % 10000 ))
QEMU_PORT=$(( REPD_PORT + 1 ))

cat > "$DIR/r0.toml" <<TOML
name = "r0"
size = "$SIZE"
[[node]]
name = "bench"
nbd = "127.0.0.1:$REPD_PORT"
control = "control.sock"
dir = "repd"
TOML

pids=()
cleanup() { for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$REPCTL" --config "$DIR/r0.toml" --node bench create-md
RUST_LOG=warn "$REPD" --config "$DIR/r0.toml" --node bench 2>"$DIR/repd.log" &
REPD_PID=$!
pids+=("$REPD_PID")
for _ in $(seq 100); do "$REPCTL" --config "$DIR/r0.toml" --node bench status >/dev/null 2>&1 && break; sleep 0.1; done
"$REPCTL" --config "$DIR/r0.toml" --node bench promote --force
STATUS=$("$REPCTL" --config "$DIR/r0.toml" --node bench status --json)
ENGINE=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["io_engine"])' "$STATUS")
BYTES=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["size"])' "$STATUS")

# Preallocated, as repd's data file is: compare IO paths, not allocation.
fallocate -l "$BYTES" "$DIR/qemu.raw"
qemu-nbd -f raw -t --cache=none --aio=io_uring -p "$QEMU_PORT" -b 127.0.0.1 -x r0 "$DIR/qemu.raw" &
pids+=("$!")
sleep 1

run_fio() { # NAME URI ARGS...
    local name=$1 uri=$2; shift 2
    fio --name="$name" --ioengine=nbd --uri="$uri" --direct=1 --time_based --runtime="$RUNTIME" \
        --ramp_time=2 --output-format=json "$@" > "$DIR/$name.json"
}

declare -A JOBS=(
    [randwrite-4k-qd1-fsync]="--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
    [randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
    [seqwrite-1m-qd8]="--rw=write --bs=1m --iodepth=8"
)
ORDER=(randwrite-4k-qd1-fsync randwrite-4k-qd32 seqwrite-1m-qd8)
for job in "${ORDER[@]}"; do
    say "fio $job: qemu-nbd"
    # shellcheck disable=SC2086
    run_fio "qemu-$job" "nbd://127.0.0.1:$QEMU_PORT/r0" ${JOBS[$job]}
    say "fio $job: repd ($ENGINE)"
    # shellcheck disable=SC2086
    run_fio "repd-$job" "nbd://127.0.0.1:$REPD_PORT/r0" ${JOBS[$job]}
done

RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$REPD_PID/status")
python3 - "$DIR" "$RSS_KB" "$ENGINE" "${ORDER[@]}" <<'PY'
import json, sys
d, rss_kb, engine, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def load(name):
    text = open(f"{d}/{name}.json").read()
    # fio may print notes ("fio: connected to NBD server") before the JSON.
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    return w["iops"], w["bw_bytes"] / 2**20
print(f"\n{'job':<26}{'qemu-nbd':>20}{'repd (' + engine + ')':>22}{'ratio':>8}")
for j in jobs:
    qi, qb = load(f"qemu-{j}")
    ri, rb = load(f"repd-{j}")
    if j.startswith("seq"):
        print(f"{j:<26}{qb:>15.1f} MiB/s{rb:>17.1f} MiB/s{rb / qb:>8.2f}")
    else:
        print(f"{j:<26}{qi:>16.0f} IOPS{ri:>18.0f} IOPS{ri / qi:>8.2f}")
print(f"\nrepd peak RSS: {rss_kb / 1024:.1f} MiB")
PY
