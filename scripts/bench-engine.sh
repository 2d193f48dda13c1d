#!/usr/bin/env bash
# Engine speed against in-run baselines (docs/BENCHMARKS.md records the output):
#   - prefill and decode of the `small` preset vs transformers on the same checkpoint
#     (needs the reference environment: pip install -r scripts/reference/requirements.txt;
#     set PYTHON to its interpreter; skipped when torch is missing)
#   - prefill vs the f32 GEMM throughput measured by the same command
#   - lightning-only config: time(32K)/time(4K), and decode-state memory vs context length
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
work=${WORK:-$(mktemp -d)}
cargo build --release -q -p ringbolt
R=target/release/ringbolt
[ -d "$work/small" ] || $R init-checkpoint --preset small --seed 1 --dtype bf16 --out "$work/small"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
ours=$($R --threads "$THREADS" bench engine --checkpoint "$work/small" --prefill 4096 --decode-context 512 --repeat 3)
echo "$ours"
if $PYTHON -c "import torch, transformers" 2>/dev/null; then
  theirs=$($PYTHON scripts/reference/bench_transformers.py --checkpoint "$work/small" --threads "$THREADS" --repeat 3 2>/dev/null | tail -1)
  echo "$theirs"
  $PYTHON - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({
  "prefill_speedup_vs_transformers": t["prefill_seconds"] / o["prefill_seconds"],
  "decode_speedup_vs_transformers": t["decode_ms_per_token"] / o["decode_ms_per_token"],
  "prefill_fraction_of_gemm": o["prefill_fraction_of_gemm"],
}))
PY
else
  echo "transformers baseline skipped: torch/transformers not importable by $PYTHON"
fi
# Lightning-only model: every layer linear attention.
if [ ! -d "$work/linear" ]; then
  $PYTHON - "$work" <<'PY'
import json, sys
c = json.load(open(sys.argv[1] + "/small/config.json"))
c["layer_types"] = ["linear_attention"] * c["num_hidden_layers"]
json.dump(c, open(sys.argv[1] + "/linear.json", "w"))
PY
  $R init-checkpoint --config "$work/linear.json" --seed 1 --dtype bf16 --out "$work/linear"
fi
$R --threads "$THREADS" bench scaling --checkpoint "$work/linear" --lengths 4096,32768 --chunk 4096
