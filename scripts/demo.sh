#!/usr/bin/env bash
# The demo (README): builds ringbolt and runs `ringbolt demo` with no set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "Rust is needed: https://rustup.rs" >&2; exit 1; }
# The gRPC code is generated at build time by protoc; a C compiler links the build.
. scripts/apt-need.sh
apt_need protoc:protobuf-compiler cc:gcc
cargo build --release -q -p ringbolt
exec target/release/ringbolt demo "$@"
