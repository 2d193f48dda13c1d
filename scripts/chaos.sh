#!/usr/bin/env bash
# The long chaos run (issue: hostile input and damaged state). Jobs stream from three clients
# into a loopback cluster (two coordinators, two attention workers, three expert workers, a
# real etcd) while a random role is kill -9'd every 15-30 s and restarted; at the end every
# accepted job must have finished exactly once with the tokens of a direct `generate`.
# Usage: scripts/chaos.sh [SECONDS]   (default 600; CI runs the same test for 60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "etcd is needed (scripts/test.sh installs etcd-server)" >&2; exit 1; }
RINGBOLT_CHAOS_SECS="${1:-600}" cargo test --release -p ringbolt --test cluster \
  chaos_kill_9_of_random_roles_loses_and_repeats_nothing -- --nocapture
