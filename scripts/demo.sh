#!/usr/bin/env bash
# The demo (README): builds ringbolt and runs `ringbolt demo` with no set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "Rust is needed: https://rustup.rs" >&2; exit 1; }
cargo build --release -q -p ringbolt
exec target/release/ringbolt demo "$@"
