#!/usr/bin/env bash
# Measures a full resync and its effect on application QD1 latency, on
# loopback, with the release binaries (the numbers in docs/replication.md and
# the issue 4 closing note):
#   1. alpha (primary) with SIZE of random data, beta blank: the initial full
#      sync's duration;
#   2. repbench qd1-write / qd1-write-flush on the established pair;
#   3. `repctl invalidate` on beta (a full resync) and the same workloads
#      while it runs.
# Usage: scripts/resync_bench.sh [SIZE_MIB]   (default 4096; needs that much
# free space twice in $TMPDIR). Builds nothing: run
# `cargo build --release -p repbench -p repblock` first.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MIB="${1:-4096}"
B="$REPO_ROOT/target/release"
for b in repd repctl repbench; do [ -x "$B/$b" ] || die "$B/$b missing: cargo build --release -p repbench -p repblock"; done
D="$(mktemp -d "${TMPDIR:-/tmp}/resync-bench.XXXXXX")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
cat >"$D/r0.toml" <<EOT
name = "r0"
size = "${MIB}MiB"
protocol = "C"
secret = "bench"
[[node]]
name = "alpha"
replication = "127.0.0.1:17790"
nbd = "127.0.0.1:20809"
control = "alpha.sock"
dir = "alpha"
[[node]]
name = "beta"
replication = "127.0.0.1:17791"
nbd = "127.0.0.1:20810"
control = "beta.sock"
dir = "beta"
EOT
rc() { "$B/repctl" --config "$D/r0.toml" --node "$@"; }
last_sync() { rc alpha status --json | python3 -c 'import json,sys; s=json.load(sys.stdin)["last_sync"]; print("%s %d bytes in %.2f s = %.0f MB/s" % (s["kind"], s["bytes"], s["seconds"], s["bytes"] / s["seconds"] / 1e6))'; }
load() { "$B/repbench" run --protocols none --peers none --nodes "$1=nbd://127.0.0.1:20809/r0" \
    --workloads qd1-write,qd1-write-flush --rounds 1 --duration 2s --warmup 100ms --out "$D/res" 2>&1 | grep -E "^\| (target|$1)"; }
rc alpha create-md; rc beta create-md
say "filling alpha with $MIB MiB of random data"
dd if=/dev/urandom of="$D/alpha/data" bs=1M count="$MIB" conv=notrunc status=none
"$B/repd" --config "$D/r0.toml" --node alpha >"$D/alpha.log" 2>&1 & PIDS+=($!)
for _ in $(seq 1 100); do rc alpha status >/dev/null 2>&1 && break; sleep 0.1; done
rc alpha promote --force
"$B/repd" --config "$D/r0.toml" --node beta >"$D/beta.log" 2>&1 & PIDS+=($!)
rc beta wait-sync --timeout 600 2>/dev/null
say "initial full sync: $(last_sync)"
say "QD1 on the established pair"
load established
rc beta invalidate
say "QD1 during a full resync (invalidate on beta)"
load during-resync
rc beta wait-sync --timeout 600 2>/dev/null
say "resync after invalidate (partly under the load above): $(last_sync)"
