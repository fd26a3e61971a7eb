#!/usr/bin/env bash
# Single-node repblock against qemu-nbd serving a raw file, same run, same disk,
# with fio's nbd engine. Prints IOPS/bandwidth per workload and the ratio
# repblock/qemu-nbd (higher is better for repblock), plus repd's peak RSS.
#
#   scripts/bench.sh [--runtime SECONDS] [--size SIZE] [--rounds N] [--engine auto|io_uring|sync]
#
# Workloads (issue 2):
#   qd1-write-fsync   4 KiB random write, QD1, fsync=1 (an NBD FLUSH after every write)
#   qd32-randwrite    4 KiB random write, QD32
#   seq-1m-qd8        1 MiB sequential write, QD8
# Each workload runs `rounds` times per server, alternating servers so both
# share the machine's drift; the median round is reported.
set -euo pipefail

runtime=10
size=1GiB
rounds=3
engine=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need fio fio
need qemu-nbd qemu-utils
need python3 python3
install_needed
ensure_toolchain
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

root=$REPO_ROOT
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin repd --bin repctl
repd="$root/target/release/repd"
repctl="$root/target/release/repctl"

work=$(mktemp -d /var/tmp/repblock-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

rb_port=$((20000 + RANDOM % 10000))
q_port=$((rb_port + 1))

cat > "$work/r0.toml" <<TOML
name = "r0"
size = "$size"
io_engine = "$engine"

[[node]]
name = "alpha"
nbd = "127.0.0.1:$rb_port"
control = "$work/alpha.sock"
dir = "$work/alpha"
TOML

"$repctl" --config "$work/r0.toml" --node alpha create-md >/dev/null
"$repd" --config "$work/r0.toml" --node alpha 2>"$work/repd.log" &
rb_pid=$!
pids+=("$rb_pid")
for _ in $(seq 100); do
  "$repctl" --config "$work/r0.toml" --node alpha status --json >/dev/null 2>&1 && break
  sleep 0.1
done
"$repctl" --config "$work/r0.toml" --node alpha promote --force >/dev/null

size_bytes=$(numfmt --from=iec-i "${size%B}")
qemu-img create -q -f raw "$work/qemu.img" "$size_bytes"
# preallocate so qemu-nbd does not pay for block allocation (repblock's WAL
# segments are preallocated too; its data file is sparse)
fallocate -l "$(stat -c %s "$work/qemu.img")" "$work/qemu.img"
qemu-nbd -f raw -t --cache=none --aio=io_uring -b 127.0.0.1 -p "$q_port" -x r0 "$work/qemu.img" &
pids+=("$!")
sleep 1

engine_used=$("$repctl" --config "$work/r0.toml" --node alpha status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["io_engine"])')
echo "repd: io_engine $engine_used; qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'); fio $(fio --version)"
echo "runtime ${runtime}s x ${rounds} rounds per server, volume $size, $(nproc) cores"
echo

run_fio() { # name uri extra-args...
  local name=$1 uri=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$uri" --size="$size" --time_based --runtime="$runtime" \
      --ramp_time=1 --output-format=json --output="$work/out.json" "$@" >/dev/null 2>&1
}

declare -A args=(
  [qd1-write-fsync]="--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
  [qd32-randwrite]="--rw=randwrite --bs=4k --iodepth=32"
  [seq-1m-qd8]="--rw=write --bs=1m --iodepth=8"
)
results="$work/results.tsv"
: > "$results"
for wl in qd1-write-fsync qd32-randwrite seq-1m-qd8; do
  for r in $(seq "$rounds"); do
    for srv in repblock qemu-nbd; do
      port=$rb_port; [ "$srv" = qemu-nbd ] && port=$q_port
      # shellcheck disable=SC2086
      run_fio "$wl" "nbd://127.0.0.1:$port/r0" ${args[$wl]}
      python3 - "$work/out.json" "$wl" "$srv" "$r" >> "$results" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]["write"]
lat = j.get("clat_ns") or j.get("lat_ns")
p = lat.get("percentile", {})
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], f'{j["iops"]:.1f}', f'{j["bw_bytes"]/1e6:.1f}',
                 f'{p.get("50.000000", 0)/1000:.1f}', f'{p.get("99.000000", 0)/1000:.1f}']))
PY
    done
  done
done

rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$rb_pid/status")
python3 - "$results" "$rss_kib" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.defaultdict(list)
for wl, srv, r, iops, mbs, p50, p99 in rows:
    by[(wl, srv)].append((float(iops), float(mbs), float(p50), float(p99)))
def med(xs, i): return statistics.median(x[i] for x in xs)
print(f'{"workload":<17} {"repblock IOPS":>13} {"MB/s":>8} {"p99 us":>8}  {"qemu-nbd IOPS":>13} {"MB/s":>8} {"p99 us":>8}  {"ratio":>6}')
for wl in ["qd1-write-fsync", "qd32-randwrite", "seq-1m-qd8"]:
    a, b = by[(wl, "repblock")], by[(wl, "qemu-nbd")]
    ratio = med(a, 0) / med(b, 0) if med(b, 0) else float("nan")
    print(f'{wl:<17} {med(a,0):>13.0f} {med(a,1):>8.1f} {med(a,3):>8.0f}  {med(b,0):>13.0f} {med(b,1):>8.1f} {med(b,3):>8.0f}  {ratio:>6.2f}')
print(f"\nrepd peak RSS (VmHWM): {int(sys.argv[2])/1024:.1f} MiB")
PY
