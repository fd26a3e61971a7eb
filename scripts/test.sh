#!/usr/bin/env bash
# Installs what the test suite needs (with apt, only when something is
# missing), ensures a Rust toolchain, runs the static checks
# (scripts/check.sh: fmt, clippy, doc, no test hook in a release repd), and
# runs the whole suite with the
# test machinery compiled in (--all-features: `fault-injection` and
# `testkit`, see Cargo.toml): unit,
# property and end-to-end tests against real repd processes and real NBD
# clients (nbdinfo, qemu-img, nbdcopy, fio, nbdfuse + loop + ext4), and
# the metrics endpoint against Debian's promtool and prometheus.
# The end-to-end tests need root (loop devices, mount) and /dev/fuse.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need qemu-img qemu-utils
need nbdinfo libnbd-bin
need nbdcopy libnbd-bin
need nbdfuse libnbd-bin
need nbdkit nbdkit
need fio fio
need certtool gnutls-bin
need mkfs.ext4 e2fsprogs
need e2fsck e2fsprogs
need fusermount3 fuse3
need losetup util-linux
need systemd-analyze systemd
need ocf-tester resource-agents
need xmllint libxml2-utils
need mount mount
install_needed
# promtool and prometheus for tests/metrics.rs (which finds them on PATH or
# under this directory): unpacked, never installed as a service.
unpack_deb prometheus /opt/repblock-test/prometheus usr/bin/promtool
ensure_toolchain

[ "$(id -u)" -eq 0 ] || say "warning: not root: the ext4/loop-device tests will fail"
[ -e /dev/fuse ] || say "warning: /dev/fuse is missing: the nbdfuse tests will fail"

"$REPO_ROOT/scripts/check.sh"

cd "$REPO_ROOT"
start=$(date +%s)
if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run --all-targets --all-features"
    cargo nextest run --all-targets --all-features --no-fail-fast
else
    say "cargo test --all-targets --all-features (cargo-nextest not installed)"
    cargo test --all-targets --all-features --no-fail-fast
fi
say "test suite passed in $(( $(date +%s) - start ))s"
