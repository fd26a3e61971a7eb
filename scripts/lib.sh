# Shared helpers for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Debian/Ubuntu: installs what is missing with apt (sudo when not root),
# and a Rust toolchain with rustup when cargo is missing or too old.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

APT_UPDATED=0
# apt_install PKG... : installs the packages, running `apt-get update` once.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand (Debian/Ubuntu expected)"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -q </dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    as_root apt-get install -y -q --no-install-recommends "$@" </dev/null
}

# need CMD PKG : remembers PKG when CMD is missing (install with install_needed).
NEEDED=()
need() {
    if ! command -v "$1" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$1" ] && ! [ -x "/sbin/$1" ]; then
        NEEDED+=("$2")
    fi
}

install_needed() {
    if [ "${#NEEDED[@]}" -gt 0 ]; then
        # De-duplicate while keeping order.
        local uniq=() p q seen
        for p in "${NEEDED[@]}"; do
            seen=0
            for q in "${uniq[@]+"${uniq[@]}"}"; do [ "$p" = "$q" ] && seen=1; done
            [ "$seen" -eq 0 ] && uniq+=("$p")
        done
        apt_install "${uniq[@]}"
        NEEDED=()
    fi
}

# unpack_deb PKG DIR FILE : unpacks the Debian package PKG into DIR (with
# `apt-get download` + `dpkg-deb -x`, no install: a package such as
# prometheus would start a system service), unless DIR/FILE exists.
unpack_deb() {
    local pkg="$1" dir="$2" file="$3" tmp
    [ -e "$dir/$file" ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: unpack the Debian package $pkg into $dir by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -q </dev/null
        APT_UPDATED=1
    fi
    tmp="$(mktemp -d)"
    chmod 755 "$tmp"  # apt downloads as the _apt user
    say "unpacking the Debian package $pkg into $dir (not installed: no service starts)"
    (cd "$tmp" && apt-get download -q "$pkg" </dev/null) || die "apt-get download $pkg failed"
    as_root mkdir -p "$dir"
    as_root dpkg-deb -x "$tmp"/"$pkg"_*.deb "$dir"
    rm -rf "$tmp"
    [ -e "$dir/$file" ] || die "$pkg unpacked into $dir has no $file"
}

# version_ge A B : true when version A >= version B (dotted numbers).
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

ensure_toolchain() {
    # C toolchain and pkg-config for crates with build scripts.
    need cc build-essential
    need pkg-config pkg-config
    install_needed
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    local want have=""
    want="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$REPO_ROOT/Cargo.toml" | head -n1)"
    if command -v cargo >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1; then
        have="$(rustc --version | awk '{print $2}')"
    fi
    if [ -n "$have" ] && version_ge "$have" "$want"; then
        say "Rust $have (crate needs $want)"
        return
    fi
    if command -v rustup >/dev/null 2>&1; then
        say "updating the Rust toolchain with rustup (have ${have:-none}, need $want)"
        rustup toolchain install stable --profile minimal
        rustup default stable
    else
        say "installing Rust with rustup (have ${have:-none}, need $want)"
        need curl curl
        install_needed
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal </dev/null
    fi
    . "$HOME/.cargo/env"
    have="$(rustc --version | awk '{print $2}')"
    version_ge "$have" "$want" || die "Rust $have is older than the crate's rust-version $want"
}
