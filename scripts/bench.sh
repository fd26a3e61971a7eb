#!/usr/bin/env bash
# repblock against qemu-nbd serving a raw file (unreplicated), same run, same
# disk, with fio's nbd engine. Prints, per workload, the median IOPS, MB/s and
# p99 latency of every target and its ratio to qemu-nbd (higher is better for
# repblock), plus repd's peak RSS.
#
#   scripts/bench.sh [--targets single,A,B,C] [--runtime SECONDS] [--size SIZE]
#                    [--rounds N] [--engine auto|io_uring|sync]
#
# Targets: `single` is a one-node resource (issue 2); `A`, `B`, `C` are a
# two-node pair on loopback under that protocol (issue 3), measured on the
# primary. Default: single.
# Workloads:
#   qd1-write-fsync   4 KiB random write, QD1, fsync=1 (an NBD FLUSH after every write)
#   qd32-randwrite    4 KiB random write, QD32
#   seq-1m-qd8        1 MiB sequential write, QD8
# Each workload runs `rounds` times per server, alternating the servers so all
# share the machine's drift; the median round is reported.
#
# The project's benchmark suite is repbench (docs/benchmarks.md: protocols
# A/B/C at several RTTs, qemu-nbd, nbdkit, the local file, charts); this
# script stays as an independent measurement with another client (fio).
set -euo pipefail

runtime=10
size=1GiB
rounds=3
engine=auto
targets=single
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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

cargo build --release --quiet --manifest-path "$REPO_ROOT/Cargo.toml" --bin repd --bin repctl
repd="$REPO_ROOT/target/release/repd"
repctl="$REPO_ROOT/target/release/repctl"

work=$(mktemp -d /var/tmp/repblock-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 10000))
# next_port VAR: the next free-looking port into VAR (no subshell, so the counter advances).
next_port() { port=$((port + 1)); printf -v "$1" %s "$port"; }

wait_control() { # config node
  for _ in $(seq 100); do
    "$repctl" --config "$1" --node "$2" status --json >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "repd $2 ($1) did not come up: $(tail -5 "$work/$2-$(basename "$1" .toml).log")"
}

declare -A uri pid_of
# start_single NAME: a one-node resource; sets uri[NAME].
start_single() {
  local t=$1 cfg="$work/$1.toml" nbd
  next_port nbd
  cat > "$cfg" <<TOML
name = "r0"
size = "$size"
io_engine = "$engine"

[[node]]
name = "alpha"
nbd = "127.0.0.1:$nbd"
control = "$work/$t-alpha.sock"
dir = "$work/$t-alpha"
TOML
  "$repctl" --config "$cfg" --node alpha create-md >/dev/null
  "$repd" --config "$cfg" --node alpha 2>"$work/alpha-$t.log" &
  pids+=("$!"); pid_of[$t]=$!
  wait_control "$cfg" alpha
  "$repctl" --config "$cfg" --node alpha promote --force >/dev/null
  uri[$t]="nbd://127.0.0.1:$nbd/r0"
}

# start_pair PROTOCOL: alpha (primary) + beta on loopback; sets uri[PROTOCOL].
start_pair() {
  local t=$1 cfg="$work/$1.toml" nbd ra rb nbd_b
  next_port nbd; next_port ra; next_port rb; next_port nbd_b
  cat > "$cfg" <<TOML
name = "r0"
size = "$size"
io_engine = "$engine"
protocol = "$t"
secret = "bench"

[[node]]
name = "alpha"
replication = "127.0.0.1:$ra"
nbd = "127.0.0.1:$nbd"
control = "$work/$t-alpha.sock"
dir = "$work/$t-alpha"

[[node]]
name = "beta"
replication = "127.0.0.1:$rb"
nbd = "127.0.0.1:$nbd_b"
control = "$work/$t-beta.sock"
dir = "$work/$t-beta"
TOML
  local n
  for n in alpha beta; do
    "$repctl" --config "$cfg" --node $n create-md >/dev/null
    "$repd" --config "$cfg" --node $n 2>"$work/$n-$t.log" &
    pids+=("$!")
    [ $n = alpha ] && pid_of[$t]=$!
  done
  wait_control "$cfg" alpha
  wait_control "$cfg" beta
  # Both volumes are new and blank: skip the initial full sync (DRBD's
  # new-current-uuid --clear-bitmap) once the link is up.
  for _ in $(seq 100); do
    "$repctl" --config "$cfg" --node alpha new-current-uuid --clear-bitmap >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$repctl" --config "$cfg" --node alpha promote >/dev/null
  "$repctl" --config "$cfg" --node beta wait-sync --timeout 60 >/dev/null 2>&1 \
    || die "protocol $t pair did not reach established/uptodate: $("$repctl" --config "$cfg" --node alpha status)"
  uri[$t]="nbd://127.0.0.1:$nbd/r0"
}

IFS=, read -r -a tlist <<< "$targets"
for t in "${tlist[@]}"; do
  case "$t" in
    single) start_single single ;;
    A|B|C) start_pair "$t" ;;
    *) die "unknown target $t (single, A, B, C)" ;;
  esac
done

size_bytes=$(numfmt --from=iec-i "${size%B}")
qemu-img create -q -f raw "$work/qemu.img" "$size_bytes"
# preallocate so qemu-nbd does not pay for block allocation (repblock's WAL
# segments are preallocated too; its data file is sparse)
fallocate -l "$size_bytes" "$work/qemu.img"
next_port q_port
qemu-nbd -f raw -t --cache=none --aio=io_uring -b 127.0.0.1 -p "$q_port" -x r0 "$work/qemu.img" &
pids+=("$!")
uri[qemu-nbd]="nbd://127.0.0.1:$q_port/r0"
sleep 1

first_cfg="$work/${tlist[0]}.toml"
engine_used=$("$repctl" --config "$first_cfg" --node alpha status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["io_engine"])')
echo "repd: io_engine $engine_used; qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'); fio $(fio --version)"
echo "runtime ${runtime}s x ${rounds} rounds per server, volume $size, $(nproc) cores, targets: qemu-nbd ${tlist[*]}"
echo

declare -A args=(
  [qd1-write-fsync]="--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
  [qd32-randwrite]="--rw=randwrite --bs=4k --iodepth=32"
  [seq-1m-qd8]="--rw=write --bs=1m --iodepth=8"
)
results="$work/results.tsv"
: > "$results"
for wl in qd1-write-fsync qd32-randwrite seq-1m-qd8; do
  for r in $(seq "$rounds"); do
    for srv in qemu-nbd "${tlist[@]}"; do
      # shellcheck disable=SC2086
      fio --name="$wl" --ioengine=nbd --uri="${uri[$srv]}" --size="$size" --time_based --runtime="$runtime" \
          --ramp_time=1 --output-format=json --output="$work/out.json" ${args[$wl]} >/dev/null 2>&1 \
        || die "fio $wl against $srv failed"
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

rss=""
for t in "${tlist[@]}"; do
  rss+="$t=$(awk '/VmHWM/ {print $2}' "/proc/${pid_of[$t]}/status") "
done
python3 - "$results" "$rss" qemu-nbd "${tlist[@]}" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rss = dict(kv.split("=") for kv in sys.argv[2].split())
servers = sys.argv[3:]
by = collections.defaultdict(list)
for wl, srv, r, iops, mbs, p50, p99 in rows:
    by[(wl, srv)].append((float(iops), float(mbs), float(p50), float(p99)))
def med(xs, i): return statistics.median(x[i] for x in xs)
name = lambda s: s if s in ("qemu-nbd", "single") else f"protocol {s}"
print(f'{"workload":<17} {"server":<11} {"IOPS":>9} {"MB/s":>8} {"p50 us":>8} {"p99 us":>8} {"vs qemu-nbd":>12}')
for wl in ["qd1-write-fsync", "qd32-randwrite", "seq-1m-qd8"]:
    base = med(by[(wl, "qemu-nbd")], 0)
    for s in servers:
        xs = by[(wl, s)]
        ratio = "" if s == "qemu-nbd" else f"{med(xs, 0) / base:.2f}"
        print(f'{wl:<17} {name(s):<11} {med(xs,0):>9.0f} {med(xs,1):>8.1f} {med(xs,2):>8.0f} {med(xs,3):>8.0f} {ratio:>12}')
print()
for t in servers[1:]:
    print(f"repd peak RSS ({name(t)}, primary): {int(rss[t])/1024:.1f} MiB")
PY
