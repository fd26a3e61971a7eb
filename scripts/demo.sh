#!/usr/bin/env bash
# Builds repblock (release) and runs a demo pair on loopback: two repd
# processes, alpha (primary) and beta (secondary), replicating a 1 GiB
# volume with protocol C. The volume is exported by alpha over NBD at
# nbd://127.0.0.1:10809/r0. Everything lives under ./repblock-demo-pair
# (config, logs, metadata, WAL, data); running it again serves the same data.
# Ctrl-C stops both nodes cleanly.
#
#   scripts/demo.sh              # the pair
#   scripts/demo.sh --single ... # one node only (`repd demo`, extra args go to it)
#
# Environment: DEMO_DIR (default ./repblock-demo-pair), DEMO_SIZE (1GiB),
# DEMO_PROTOCOL (C).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_toolchain
cd "$REPO_ROOT"
say "cargo build --release"
cargo build --release --bins
BIN="$REPO_ROOT/target/release"

if [ "${1:-}" = "--single" ]; then
    shift
    say "starting repd demo (single node; Ctrl-C stops it)"
    exec "$BIN/repd" demo "$@"
fi

DIR="${DEMO_DIR:-$REPO_ROOT/repblock-demo-pair}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/r0.toml"
if [ ! -f "$CONF" ]; then
    secret="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
    cat >"$CONF" <<EOF
# Written by scripts/demo.sh: a demo pair on loopback; see docs/config.md.
name = "r0"
size = "${DEMO_SIZE:-1GiB}"
protocol = "${DEMO_PROTOCOL:-C}"
secret = "$secret"

[[node]]
name = "alpha"
replication = "127.0.0.1:7790"
nbd = "127.0.0.1:10809"
control = "alpha.sock"
dir = "alpha"

[[node]]
name = "beta"
replication = "127.0.0.1:7791"
nbd = "127.0.0.1:10810"
control = "beta.sock"
dir = "beta"
EOF
    say "wrote $CONF"
fi

repctl() { "$BIN/repctl" --config "$CONF" --node "$@"; }

fresh=0
for n in alpha beta; do
    if [ ! -e "$DIR/$n/meta" ]; then
        repctl "$n" create-md
        fresh=1
    fi
done

PIDS=()
stop() {
    trap - INT TERM
    say "stopping the pair"
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    exit 0
}
trap stop INT TERM

for n in alpha beta; do
    "$BIN/repd" --config "$CONF" --node "$n" >>"$DIR/$n.log" 2>&1 &
    PIDS+=($!)
done
for n in alpha beta; do
    for _ in $(seq 1 100); do
        repctl "$n" status >/dev/null 2>&1 && break
        sleep 0.1
    done
    repctl "$n" status >/dev/null || die "repd $n did not start: see $DIR/$n.log"
done

if [ "$fresh" -eq 1 ]; then
    # Two blank volumes: nothing to copy (DRBD's new-current-uuid --clear-bitmap).
    say "new volumes: skipping the initial sync"
    ok=0
    for _ in $(seq 1 30); do
        if repctl alpha new-current-uuid --clear-bitmap 2>"$DIR/ncu.err"; then ok=1; break; fi
        sleep 1   # the nodes are still connecting
    done
    [ "$ok" -eq 1 ] || die "new-current-uuid --clear-bitmap: $(cat "$DIR/ncu.err")"
fi
repctl alpha promote
say "waiting for the pair to be in sync"
repctl beta wait-sync --timeout 600

repctl alpha status
repctl beta status
cat >&2 <<EOF

==> the demo pair runs (logs: $DIR/alpha.log, $DIR/beta.log). The volume:
      nbdinfo nbd://127.0.0.1:10809/r0
      qemu-img info nbd://127.0.0.1:10809/r0
      nbd-client 127.0.0.1 10809 /dev/nbd0 -N r0     # on a host with the nbd module
    Try: $BIN/repctl --config $CONF --node beta status --json
         $BIN/repctl --config $CONF --node alpha events
    Ctrl-C stops both nodes.
EOF
wait
