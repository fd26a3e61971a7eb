#!/usr/bin/env bash
# The static checks CI runs before the tests (scripts/test.sh calls this):
#   1. cargo fmt --check (the workspace, and the separate fuzz/ workspace);
#   2. cargo clippy -D warnings, with the default features and with all of
#      them (the test machinery behind `fault-injection` and `testkit`), on
#      every target; the lint levels are the [workspace.lints] of Cargo.toml;
#   3. cargo doc without warnings (broken intra-doc links included);
#   4. a release build of repd and repctl, whose binaries must contain no
#      test hook: no REPBLOCK_FAULTS or REPBLOCK_TEST_HOLD (read only by a
#      `fault-injection` build) and no FaultEngine or MemoryBackend.
# Run it alone while working: `scripts/check.sh`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need strings binutils
install_needed
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# A minimal rustup profile has neither rustfmt nor clippy.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo $tool is missing (and rustup too)"
        [ "$tool" = fmt ] && component=rustfmt || component=clippy
        say "rustup component add $component"
        rustup component add "$component"
    fi
done

cd "$REPO_ROOT"
start=$(date +%s)

say "cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo clippy --workspace --all-targets --all-features -- -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

say "cargo doc --no-deps (warnings are errors; default features, then all)"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked --quiet
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --all-features --locked --quiet

say "cargo build --release -p repblock --bins (must contain no test hook)"
cargo build --release -p repblock --bins --locked --quiet
found=0
for bin in target/release/repd target/release/repctl; do
    for hook in REPBLOCK_FAULTS REPBLOCK_TEST_HOLD FaultEngine MemoryBackend; do
        if strings "$bin" | grep -q "$hook"; then
            say "error: $bin contains $hook: test machinery reached a release build"
            found=1
        fi
    done
done
[ "$found" -eq 0 ] || exit 1
say "checks passed in $(( $(date +%s) - start ))s (fmt, clippy, doc, no test hook in release repd/repctl)"
