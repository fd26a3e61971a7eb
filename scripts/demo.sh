#!/usr/bin/env bash
# Builds repblock (release) and runs `repd demo`: a single-node resource
# under ./repblock-demo exported over NBD at nbd://127.0.0.1:10809/r0.
# Extra arguments go to `repd demo` (--dir, --size, --nbd).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_toolchain
cd "$REPO_ROOT"
say "cargo build --release"
cargo build --release --bins
say "starting repd demo (Ctrl-C stops it)"
exec "$REPO_ROOT/target/release/repd" demo "$@"
