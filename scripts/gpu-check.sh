#!/usr/bin/env bash
# The one prepared script for a lent GPU (../.library/device/): every CUDA kernel against the
# CPU backend on random inputs, `ringbolt kernels compile` for the device's architecture, the
# whole model's logits on cuda vs cpu, and the kernel benchmarks against PyTorch baselines
# measured in the same run (results in $OUT/bench.txt).
#
# It also serves a job through `ringbolt standalone --device cuda:0` and compares its greedy
# tokens with the same job on `--device cpu` ($OUT/standalone.txt).
#
# The GPU machine has no Rust toolchain and no network, so this runs in two steps:
#   scripts/gpu-check.sh build   # here: builds with --features cuda, stages stripped binaries in .gpu/
#   scripts/gpu-check.sh run     # there (device `run` with carry [".gpu"]): results under $OUT
# A dry run of the plumbing without a GPU (every step but the benchmarks, with `cpu` standing in
# for the GPU, so that a broken step is found before device time is spent on it):
#   OUT=$(mktemp -d) GPU_CHECK_DEVICE=cpu scripts/gpu-check.sh run
#
# Benchmarks (targets from the CUDA issue): lightning prefill TFLOP/s at 8K/64K tokens (64 heads
# x 128) against the bf16 GEMM (>= 50%), the lightning decode step's bandwidth against HBM
# (device copy, >= 70%), causal softmax attention against PyTorch's SDPA (>= 0.8x).
#
# Tolerances: kernels vs CPU 1e-4 of the largest value for the scalar f32 kernels, 1e-2 for the
# tensor-core ones (bf16 operands, f32 accumulation; reasoning in kernels/tests/cuda.rs).
# Whole-model logits cuda vs cpu on a bf16 checkpoint: 2e-2 of max|logit| — the CUDA backend
# rounds every GEMM's activations to bf16 (relative error 2^-8 at most), the CPU backend keeps
# them f32, and 8 layers of residual sums carry that forward.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
  cargo build --release -p ringbolt --features cuda
  test_bin=$(cargo test --release -p ringbolt-kernels --features cuda --test cuda --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  strip -o .gpu/ringbolt target/release/ringbolt
  strip -o .gpu/kernel-tests "$test_bin"
  du -sh .gpu
  ;;
run)
  : "${OUT:?run this on the device machine, where \$OUT is set}"
  set -o pipefail
  site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
  cu="$site/nvidia/cu13"
  export LD_LIBRARY_PATH="$cu/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export RINGBOLT_CUDA_INCLUDE="${RINGBOLT_CUDA_INCLUDE:-$cu/include}"
  [ -e "$RINGBOLT_CUDA_INCLUDE/cuda_bf16.h" ] || export RINGBOLT_CUDA_INCLUDE=/usr/local/cuda/include
  gpu="${GPU_CHECK_DEVICE:-cuda:0}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  fi
  .gpu/ringbolt kernels compile --arch sm_90 --cuda-include "$RINGBOLT_CUDA_INCLUDE" 2>&1 | tee "$OUT/kernels-compile.txt"
  .gpu/kernel-tests --test-threads 1 --nocapture 2>&1 | tee "$OUT/kernel-tests.txt"
  # Out-of-bounds accesses and shared-memory races, where the runtime lets compute-sanitizer
  # work (Firecracker machines; not gVisor): bounded, the kernel tests are small.
  if command -v compute-sanitizer >/dev/null && [ "$gpu" != cpu ]; then
    for tool in memcheck racecheck; do
      timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        .gpu/kernel-tests --test-threads 1 > "$OUT/sanitizer-$tool.txt" 2>&1 \
        && echo "compute-sanitizer $tool: clean" \
        || echo "compute-sanitizer $tool: exit $? (see sanitizer-$tool.txt)"
    done | tee -a "$OUT/kernel-tests.txt"
  fi
  # The whole model: prefill 200 tokens, then decode 20, on cuda and on cpu.
  work=$(mktemp -d)
  .gpu/ringbolt init-checkpoint --preset small --seed 1 --dtype bf16 --out "$work/small" >/dev/null
  python3 -c 'print(",".join(str((i * 7919) % 32000) for i in range(220)))' > "$work/prompt.txt"
  for d in cpu gpu; do
    dev=$([ "$d" = cpu ] && echo cpu || echo "$gpu")
    /usr/bin/time -f "$dev: %e s" .gpu/ringbolt logits --checkpoint "$work/small" \
      --tokens-file "$work/prompt.txt" --prefill-len 200 --device "$dev" \
      --out "$work/$d.safetensors" 2>&1 | tee -a "$OUT/logits.txt"
  done
  python3 - "$work" <<'PY' 2>&1 | tee -a "$OUT/logits.txt"
import sys
from safetensors.numpy import load_file
w = sys.argv[1]
a = load_file(f"{w}/cpu.safetensors")["logits"]
b = load_file(f"{w}/gpu.safetensors")["logits"]
rel = float(abs(a - b).max() / abs(a).max())
same = float((a.argmax(-1) == b.argmax(-1)).mean())
print(f"logits cuda vs cpu: max error {rel:.3e} of max|logit|, argmax agreement {same:.3f}")
print("ok" if rel <= 2e-2 else "FAILED: above 2e-2")
PY
  # A job through the public API of `standalone` on each device: greedy tokens, cuda vs cpu.
  python3 -c 'print(",".join(str((i * 104729) % 32000) for i in range(300)))' > "$work/job.txt"
  for d in cpu gpu; do
    dev=$([ "$d" = cpu ] && echo cpu || echo "$gpu")
    .gpu/ringbolt standalone --device "$dev" --checkpoint "$work/small" --data-dir "$work/data-$d" \
      --listen 127.0.0.1:0 2> "$work/standalone-$d.log" &
    pid=$!
    for _ in $(seq 100); do
      ep=$(sed -n 's/^ringbolt standalone listening on //p' "$work/standalone-$d.log")
      [ -n "$ep" ] && break
      sleep 0.2
    done
    timeout 120 .gpu/ringbolt submit --endpoint "http://$ep" --tokens-file "$work/job.txt" \
      --max-new-tokens 24 --json > "$work/job-$d.json" 2>> "$OUT/standalone.txt" || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    tail -3 "$work/standalone-$d.log" >> "$OUT/standalone.txt"
  done
  python3 - "$work" <<'PY' 2>&1 | tee -a "$OUT/standalone.txt"
import json, sys
w = sys.argv[1]
def toks(d):
    try:
        return json.loads(open(f"{w}/job-{d}.json").read().strip().splitlines()[-1])["tokens"]
    except Exception as e:
        return f"no result ({e})"
a, b = toks("cpu"), toks("gpu")
print("standalone cpu:", a)
print("standalone cuda:0:", b)
if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) > 0:
    lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"standalone job on cuda:0 finished; greedy tokens agree with cpu for the first {lead} of {len(a)}")
else:
    print("FAILED: the standalone job did not finish on both devices")
PY
  if [ "$gpu" = cpu ]; then
    echo "dry run on the cpu: benchmarks skipped" | tee -a "$OUT/bench.txt"
    exit 0
  fi
  # Benchmarks: ours, then PyTorch's on the same GPU, then the ratios.
  ours=$(.gpu/ringbolt bench kernels --device cuda:0 2>>"$OUT/bench.txt" | tail -1)
  echo "$ours" | tee -a "$OUT/bench.txt"
  theirs=$(python3 scripts/gpu/bench_torch.py 2>>"$OUT/bench.txt" | tail -1)
  echo "$theirs" | tee -a "$OUT/bench.txt"
  python3 - "$ours" "$theirs" <<'PY' 2>&1 | tee -a "$OUT/bench.txt"
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = {"bench": "kernels vs torch", "lightning_prefill_fraction_of_bf16_matmul": {
    str(p["tokens"]): p["tflops"] / t["bf16_matmul_tflops"] for p in o["lightning_prefill"]},
    "lightning_decode_fraction_of_copy_bandwidth": o["lightning_decode"]["gb_per_s"] / t["copy_gb_per_s"],
    "attention_vs_sdpa_bf16": o["attention"]["tflops"] / t["sdpa_causal_tflops"]["bf16"],
    "attention_vs_sdpa_f32": o["attention"]["tflops"] / t["sdpa_causal_tflops"]["f32"]}
print(json.dumps(r))
PY
  ;;
*)
  echo "usage: scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
