//! Every CUDA kernel against the CPU backend on random inputs (feature `cuda`). On a machine
//! without a GPU (or without NVRTC) each test prints why it is skipped and passes; on a GPU
//! (`scripts/gpu-check.sh`) they run for real.
//!
//! Tolerances: the scalar kernels compute in f32 like the CPU backend; what differs is the order
//! of summation (warp/block reductions vs sequential or GEMM-blocked sums) and the GPU's `expf`,
//! `rsqrtf` (≤ 2 ulp). Over sums of at most a few thousand terms of O(1) values that is well
//! under 1e-4 relative to the largest value, which is the bound used (tighter than the 1e-4
//! of max|logit| the model is held to against transformers).
//!
//! The tensor-core kernels (`lightning_block_*`, `attention_tc`) round Q, K, V and the softmax
//! probabilities to bf16 (8 significant bits: relative error ≤ 2⁻⁸ each) and accumulate in f32.
//! A product of two rounded operands is off by ≤ 2⁻⁷ relative; a sum of such products is off by
//! at most 2⁻⁷ ≈ 7.8e-3 of the sum of their magnitudes, and with random signs the error grows
//! like the square root of the term count while the largest output grows faster. The bound used
//! for them is 1e-2 of the largest value: a layout or masking mistake moves outputs by O(1) of
//! it, so it still catches any wrong index.
#![cfg(feature = "cuda")]

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_kernels::cpu::{Cpu, rope_inv_freq};
use ringbolt_kernels::cuda;
use ringbolt_kernels::cuda_backend::{CudaBackend, LIGHTNING_PASS_TOKENS, LightningKernel};
use ringbolt_kernels::{AttentionShape, Backend, ExpertGroup, LightningShape, RopeParams};
use std::collections::HashMap;
use std::sync::Arc;

struct Gpu {
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
}

/// Skips a test on a machine without a GPU (or NVRTC), saying why; with `RINGBOLT_REQUIRE_GPU`
/// set (scripts/gpu-check.sh on the GPU machine) that is a failure instead, so a test run there
/// cannot pass by skipping.
fn skip(why: &str) {
    assert!(
        std::env::var_os("RINGBOLT_REQUIRE_GPU").is_none(),
        "RINGBOLT_REQUIRE_GPU is set but this test cannot run: {why}"
    );
    eprintln!("skipped: {why}");
}

/// The GPU with every kernel loaded, or None (and why) when this machine cannot run them.
fn gpu() -> Option<Gpu> {
    match cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            skip("no CUDA device");
            return None;
        }
        Err(e) => {
            skip(&e.to_string());
            return None;
        }
    }
    let ctx = CudaContext::new(0).expect("CUDA context");
    let arch = {
        let (maj, min) = ctx.compute_capability().expect("compute capability");
        format!("sm_{maj}{min}")
    };
    let include = cuda::include_dirs(
        std::env::var_os("RINGBOLT_CUDA_INCLUDE")
            .map(std::path::PathBuf::from)
            .as_deref(),
    );
    let mut funcs = HashMap::new();
    for (m, s) in cuda::SOURCES {
        let c = match cuda::compile_module(m, s, &arch, &include, true) {
            Ok(c) => c,
            Err(cuda::CudaError::NoNvrtc) => {
                skip("no NVRTC");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        let module = ctx.load_module(Ptx::from_src(c.ptx)).expect("load PTX");
        for k in c.kernels {
            let f = module.load_function(&k).expect("kernel in module");
            funcs.insert(k, f);
        }
    }
    Some(Gpu {
        stream: ctx.default_stream(),
        funcs,
    })
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random values that bf16 holds exactly (keys and values: the CUDA KV cache is bf16, so the
/// CPU reference gets the same values), and the same as bf16.
fn rand_bf16(rng: &mut StdRng, n: usize, scale: f32) -> (Vec<f32>, Vec<half::bf16>) {
    let b: Vec<half::bf16> = rand_vec(rng, n, scale)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_within(got, want, 1e-4, what);
}

/// The bound for tensor-core kernels with bf16 operands (see the module comment).
const BF16_TOL: f32 = 1e-2;

fn assert_within(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= tol * max,
        "{what}: max error {err} vs max |value| {max} (bound {tol} of it)"
    );
}

fn blocks(n: usize, per: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(per) as u32, 1, 1),
        block_dim: (per as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[test]
fn rms_norm_swiglu_and_gates_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut rng = StdRng::seed_from_u64(1);
    let (rows, width) = (7, 3072);
    let x = rand_vec(&mut rng, rows * width, 2.0);
    let w = rand_vec(&mut rng, width, 1.0);
    let xd = s.clone_htod(&x).unwrap();
    let wd = s.clone_htod(&w).unwrap();
    let mut yd = s.alloc_zeros::<f32>(rows * width).unwrap();
    let (wi, eps) = (width as i32, 1e-6f32);
    let mut b = s.launch_builder(&g.funcs["rms_norm"]);
    b.arg(&xd).arg(&wd).arg(&mut yd).arg(&wi).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.unwrap();
    assert_close(
        &s.clone_dtoh(&yd).unwrap(),
        &Cpu::default().rms_norm(&x, &w, width, eps),
        "rms_norm",
    );

    let inter = width / 2;
    let mut hd = s.alloc_zeros::<f32>(rows * inter).unwrap();
    let (r, ii) = (rows as i32, inter as i32);
    let mut b = s.launch_builder(&g.funcs["swiglu"]);
    b.arg(&xd).arg(&mut hd).arg(&r).arg(&ii);
    unsafe { b.launch(blocks(rows * inter, 256)) }.unwrap();
    assert_close(
        &s.clone_dtoh(&hd).unwrap(),
        &Cpu::default().swiglu(&x, rows, inter),
        "swiglu",
    );

    let gate = rand_vec(&mut rng, rows * width, 3.0);
    let gd = s.clone_htod(&gate).unwrap();
    let mut xg = s.clone_htod(&x).unwrap();
    let n = x.len();
    let mut b = s.launch_builder(&g.funcs["sigmoid_gate"]);
    b.arg(&mut xg).arg(&gd).arg(&n);
    unsafe { b.launch(blocks(n, 256)) }.unwrap();
    let mut want = x.clone();
    Cpu::default().sigmoid_gate_inplace(&mut want, &gate);
    assert_close(&s.clone_dtoh(&xg).unwrap(), &want, "sigmoid_gate");
}

#[test]
fn rope_and_routing_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut rng = StdRng::seed_from_u64(2);
    let (t, heads, hd) = (9, 6, 128);
    let rope = RopeParams {
        head_dim: hd,
        rotary_dim: 64,
        theta: 10_000_000.0,
    };
    let x = rand_vec(&mut rng, t * heads * hd, 1.0);
    let inv = s.clone_htod(&rope_inv_freq(rope)).unwrap();
    let mut xd = s.clone_htod(&x).unwrap();
    let pos0: i64 = 1_000_003;
    let (ti, hi, hdi, half) = (t as i32, heads as i32, hd as i32, 32i32);
    let mut b = s.launch_builder(&g.funcs["rope_inplace"]);
    b.arg(&mut xd)
        .arg(&inv)
        .arg(&ti)
        .arg(&hi)
        .arg(&hdi)
        .arg(&half)
        .arg(&pos0);
    unsafe { b.launch(blocks(t * heads * 32, 256)) }.unwrap();
    let mut want = x.clone();
    Cpu::default().rope_inplace(&mut want, t, heads, pos0 as usize, rope);
    assert_close(&s.clone_dtoh(&xd).unwrap(), &want, "rope");

    let (rows, experts, k) = (100, 32, 2);
    let logits = rand_vec(&mut rng, rows * experts, 4.0);
    let ld = s.clone_htod(&logits).unwrap();
    let mut ed = s.alloc_zeros::<u32>(rows * k).unwrap();
    let mut wd = s.alloc_zeros::<f32>(rows * k).unwrap();
    let (ri, ei, ki) = (rows as i32, experts as i32, k as i32);
    let mut b = s.launch_builder(&g.funcs["route_topk"]);
    b.arg(&ld)
        .arg(&mut ed)
        .arg(&mut wd)
        .arg(&ri)
        .arg(&ei)
        .arg(&ki);
    unsafe { b.launch(blocks(rows, 128)) }.unwrap();
    let want = Cpu::default().route(&logits, rows, experts, k);
    assert_eq!(s.clone_dtoh(&ed).unwrap(), want.experts, "route: experts");
    assert_close(&s.clone_dtoh(&wd).unwrap(), &want.weights, "route: weights");
}

#[test]
fn lightning_prefill_and_decode_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut rng = StdRng::seed_from_u64(3);
    let (heads, d) = (4, 128);
    // 83 tokens: several blocks and a partial last one, then a decode step.
    let t = 83;
    let shape = LightningShape {
        heads,
        head_dim: d,
        block: 64,
    };
    let lambda: Vec<f32> = (0..heads).map(|h| 0.05 * (h + 1) as f32).collect();
    let qkv = rand_vec(&mut rng, t * heads * 3 * d, 0.3);
    let state0 = rand_vec(&mut rng, heads * d * d, 0.1);
    let mut want_state = state0.clone();
    let want = Cpu::default().lightning(&qkv, t, shape, &lambda, &mut want_state);

    let qd = s.clone_htod(&qkv).unwrap();
    let ld = s.clone_htod(&lambda).unwrap();
    let mut sd = s.clone_htod(&state0).unwrap();
    let mut od = s.alloc_zeros::<f32>(t * heads * d).unwrap();
    let (ti, hi, di) = (t as i32, heads as i32, d as i32);
    let mut b = s.launch_builder(&g.funcs["lightning_prefill"]);
    b.arg(&qd)
        .arg(&mut od)
        .arg(&mut sd)
        .arg(&ld)
        .arg(&ti)
        .arg(&hi)
        .arg(&di);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.unwrap();
    assert_close(
        &s.clone_dtoh(&od).unwrap(),
        &want,
        "lightning prefill output",
    );
    assert_close(
        &s.clone_dtoh(&sd).unwrap(),
        &want_state,
        "lightning prefill state",
    );

    // Decode, batched over two sequences (the second starts from state0).
    let tok = rand_vec(&mut rng, 2 * heads * 3 * d, 0.3);
    let mut s1 = want_state.clone();
    let mut s2 = state0.clone();
    let w1 = Cpu::default().lightning(&tok[..heads * 3 * d].to_vec(), 1, shape, &lambda, &mut s1);
    let w2 = Cpu::default().lightning(&tok[heads * 3 * d..].to_vec(), 1, shape, &lambda, &mut s2);
    let st2 = s.clone_htod(&state0).unwrap();
    let td = s.clone_htod(&tok).unwrap();
    let mut od = s.alloc_zeros::<f32>(2 * heads * d).unwrap();
    let ptrs: Vec<u64> = {
        use cudarc::driver::DevicePtr;
        let (p1, _r1) = sd.device_ptr(s);
        let (p2, _r2) = st2.device_ptr(s);
        vec![p1, p2]
    };
    let pd = s.clone_htod(&ptrs).unwrap();
    let mut b = s.launch_builder(&g.funcs["lightning_decode"]);
    b.arg(&td).arg(&mut od).arg(&pd).arg(&ld).arg(&hi).arg(&di);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, 2, 1),
        block_dim: (d as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.unwrap();
    let got = s.clone_dtoh(&od).unwrap();
    assert_close(&got[..heads * d], &w1, "lightning decode, sequence 1");
    assert_close(&got[heads * d..], &w2, "lightning decode, sequence 2");
    assert_close(&s.clone_dtoh(&sd).unwrap(), &s1, "lightning decode state 1");
    assert_close(
        &s.clone_dtoh(&st2).unwrap(),
        &s2,
        "lightning decode state 2",
    );
}

#[test]
fn attention_and_its_merge_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let s = &g.stream;
    let mut rng = StdRng::seed_from_u64(4);
    let (heads, kv_heads, d) = (8, 2, 128);
    let (pos0, t) = (300usize, 37usize);
    let len = pos0 + t;
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    };
    let q = rand_vec(&mut rng, t * heads * d, 1.0);
    let (k, kb16) = rand_bf16(&mut rng, len * kv_heads * d, 1.0);
    let (v, vb16) = rand_bf16(&mut rng, len * kv_heads * d, 1.0);
    let want = Cpu::default().attention(&q, t, &k, &v, pos0, shape);

    let qd = s.clone_htod(&q).unwrap();
    let run = |name: &str,
               kd: &cudarc::driver::CudaSlice<half::bf16>,
               vd: &cudarc::driver::CudaSlice<half::bf16>,
               kpos0: i64,
               nkeys: i32| {
        let mut od = s.alloc_zeros::<f32>(t * heads * d).unwrap();
        let mut lse = s.alloc_zeros::<f32>(t * heads).unwrap();
        let (ti, hi, kvi, di) = (t as i32, heads as i32, kv_heads as i32, d as i32);
        let p0 = pos0 as i64;
        let f = &g.funcs[name];
        let cfg = if name == "attention_tc" {
            // 64 query and key rows of bf16 padded by 8, values transposed ([d, 72]).
            let smem = (2 * 64 * (d + 8) * 2 + d * 72 * 2) as u32;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .unwrap();
            LaunchConfig {
                grid_dim: (t.div_ceil(64) as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem,
            }
        } else {
            blocks(t * heads * 32, 128)
        };
        let mut b = s.launch_builder(f);
        b.arg(&qd)
            .arg(kd)
            .arg(vd)
            .arg(&mut od)
            .arg(&mut lse)
            .arg(&ti)
            .arg(&hi)
            .arg(&kvi)
            .arg(&di)
            .arg(&p0)
            .arg(&kpos0)
            .arg(&nkeys);
        unsafe { b.launch(cfg) }.unwrap();
        (od, lse)
    };
    let kd = s.clone_htod(&kb16).unwrap();
    let vd = s.clone_htod(&vb16).unwrap();
    let split = 200;
    let w = kv_heads * d;
    let (ka, kb) = (
        s.clone_htod(&kb16[..split * w]).unwrap(),
        s.clone_htod(&kb16[split * w..]).unwrap(),
    );
    let (va, vb) = (
        s.clone_htod(&vb16[..split * w]).unwrap(),
        s.clone_htod(&vb16[split * w..]).unwrap(),
    );
    for (name, tol) in [("attention", 1e-4), ("attention_tc", BF16_TOL)] {
        let (od, _) = run(name, &kd, &vd, 0, len as i32);
        assert_within(&s.clone_dtoh(&od).unwrap(), &want, tol, name);

        // Ring form: keys split in two blocks, partial results merged.
        let (mut o1, mut l1) = run(name, &ka, &va, 0, split as i32);
        let (o2, l2) = run(name, &kb, &vb, split as i64, (len - split) as i32);
        let (ti, hi, di) = (t as i32, heads as i32, d as i32);
        let mut b = s.launch_builder(&g.funcs["attention_merge"]);
        b.arg(&mut o1)
            .arg(&mut l1)
            .arg(&o2)
            .arg(&l2)
            .arg(&ti)
            .arg(&hi)
            .arg(&di);
        unsafe { b.launch(blocks(t * heads, 128)) }.unwrap();
        assert_within(
            &s.clone_dtoh(&o1).unwrap(),
            &want,
            tol,
            &format!("{name} merged from two key blocks"),
        );
    }
}

/// The CUDA backend on GPU 0, or None (and why) when this machine cannot run it.
fn backend() -> Option<CudaBackend> {
    gpu()?;
    let include = std::env::var_os("RINGBOLT_CUDA_INCLUDE").map(std::path::PathBuf::from);
    Some(CudaBackend::new(0, include).expect("CUDA backend on GPU 0"))
}

#[test]
fn tensor_core_lightning_prefill_matches_the_cpu() {
    let Some(b) = backend() else { return };
    tensor_core_lightning_against_the_cpu(b.with_lightning(LightningKernel::Blocks));
}

#[test]
fn tensor_core_lightning_fused_prefill_matches_the_cpu() {
    let Some(b) = backend() else { return };
    tensor_core_lightning_against_the_cpu(b.with_lightning(LightningKernel::Fused));
}

fn tensor_core_lightning_against_the_cpu(b: CudaBackend) {
    let kernel = b.lightning_kernel();
    let mut rng = StdRng::seed_from_u64(5);
    let (heads, d) = (4, 128);
    let shape = LightningShape {
        heads,
        head_dim: d,
        block: 64,
    };
    // From a decay that carries the state across thousands of tokens to one that forgets it
    // within a block.
    let lambda = [0.001f32, 0.02, 0.1, 0.4];
    // One full block; a full and a partial block; two passes of the prefill, the second with
    // a partial last block.
    for t in [64, 83, LIGHTNING_PASS_TOKENS + 300] {
        let qkv = rand_vec(&mut rng, t * heads * 3 * d, 0.3);
        let state0 = rand_vec(&mut rng, heads * d * d, 0.1);
        let mut want_state = state0.clone();
        let want = Cpu::default().lightning(&qkv, t, shape, &lambda, &mut want_state);
        let mut st = b.upload(&state0);
        let got = b.lightning(&b.upload(&qkv), t, shape, &lambda, &mut st);
        assert_within(
            &b.download(&got),
            &want,
            BF16_TOL,
            &format!("tensor-core lightning prefill ({kernel:?}) output, {t} tokens"),
        );
        assert_within(
            &b.download(&st),
            &want_state,
            BF16_TOL,
            &format!("tensor-core lightning prefill ({kernel:?}) state, {t} tokens"),
        );
    }
}

#[test]
fn batched_lightning_decode_matches_the_cpu() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(9);
    let (heads, d, batch) = (4, 128, 5);
    let shape = LightningShape {
        heads,
        head_dim: d,
        block: 64,
    };
    let lambda = [0.001f32, 0.02, 0.1, 0.4];
    let qkv = rand_vec(&mut rng, batch * heads * 3 * d, 0.3);
    let states0: Vec<Vec<f32>> = (0..batch)
        .map(|_| rand_vec(&mut rng, heads * d * d, 0.1))
        .collect();
    // The CPU backend's default: one sequence at a time.
    let mut want_states = states0.clone();
    let mut refs: Vec<&mut Vec<f32>> = want_states.iter_mut().collect();
    let want = Cpu::default().lightning_decode(&qkv, shape, &lambda, &mut refs);
    let mut states: Vec<_> = states0.iter().map(|s| b.upload(s)).collect();
    let mut refs: Vec<&mut _> = states.iter_mut().collect();
    let got = b.lightning_decode(&b.upload(&qkv), shape, &lambda, &mut refs);
    assert_close(&b.download(&got), &want, "batched lightning decode output");
    for (s, (g, w)) in states.iter().zip(&want_states).enumerate() {
        assert_close(
            &b.download(g),
            w,
            &format!("batched lightning decode state {s}"),
        );
    }
}

#[test]
fn batched_decode_attention_matches_the_cpu() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(10);
    let (heads, kv_heads, d) = (8, 2, 128);
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    };
    // Sequences of very different lengths: one key, a few tiles, enough to split the keys.
    let positions = [0usize, 70, 2500, 333];
    let w = kv_heads * d;
    let q = rand_vec(&mut rng, positions.len() * heads * d, 1.0);
    let kv: Vec<(Vec<f32>, Vec<f32>)> = positions
        .iter()
        .map(|&p| {
            (
                rand_bf16(&mut rng, (p + 1) * w, 1.0).0,
                rand_bf16(&mut rng, (p + 1) * w, 1.0).0,
            )
        })
        .collect();
    let cpu: Vec<(&Vec<f32>, &Vec<f32>)> = kv.iter().map(|(k, v)| (k, v)).collect();
    let want = Cpu::default().attention_decode(&q, &cpu, &positions, shape);
    // Every key and value but the last by cache_append (none for the one-key sequence), the
    // last of all sequences at once by cache_append_rows, as a decode step appends them.
    let mut caches: Vec<_> = kv
        .iter()
        .map(|(k, v)| {
            let (mut kc, mut vc) = (b.new_cache(), b.new_cache());
            if k.len() > w {
                b.cache_append(&mut kc, &b.upload(&k[..k.len() - w]));
                b.cache_append(&mut vc, &b.upload(&v[..v.len() - w]));
            }
            (kc, vc)
        })
        .collect();
    let last = |which: usize| -> Vec<f32> {
        kv.iter()
            .flat_map(|kv| {
                let x = if which == 0 { &kv.0 } else { &kv.1 };
                x[x.len() - w..].to_vec()
            })
            .collect()
    };
    {
        let (mut ks, mut vs): (Vec<_>, Vec<_>) = caches.iter_mut().map(|(k, v)| (k, v)).unzip();
        b.cache_append_rows(&mut ks, &b.upload(&last(0)), w);
        b.cache_append_rows(&mut vs, &b.upload(&last(1)), w);
    }
    for ((k, v), &p) in caches.iter().zip(&positions) {
        assert_eq!((b.cache_len(k), b.cache_len(v)), ((p + 1) * w, (p + 1) * w));
    }
    let refs: Vec<_> = caches.iter().map(|(k, v)| (k, v)).collect();
    let got = b.attention_decode(&b.upload(&q), &refs, &positions, shape);
    assert_within(
        &b.download(&got),
        &want,
        BF16_TOL,
        "batched decode attention",
    );
}

#[test]
fn tensor_core_attention_matches_the_cpu_in_prefill_and_decode() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    let (heads, kv_heads, d) = (8, 2, 128);
    let shape = AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    };
    // Prefill over several query blocks and key tiles; a chunk continuing a cache; one token;
    // decode steps over caches long enough that their keys split across thread blocks.
    for (pos0, t) in [
        (0usize, 150usize),
        (130, 70),
        (333, 1),
        (5000, 1),
        (3100, 5),
    ] {
        let len = pos0 + t;
        let q = rand_vec(&mut rng, t * heads * d, 1.0);
        let (k, _) = rand_bf16(&mut rng, len * kv_heads * d, 1.0);
        let (v, _) = rand_bf16(&mut rng, len * kv_heads * d, 1.0);
        let want = Cpu::default().attention(&q, t, &k, &v, pos0, shape);
        // The caches grow as in the engine: the earlier positions, then this step's rows.
        let (mut kc, mut vc) = (b.new_cache(), b.new_cache());
        let w = kv_heads * d;
        for (c, x) in [(&mut kc, &k), (&mut vc, &v)] {
            b.cache_append(c, &b.upload(&x[..pos0 * w]));
            b.cache_append(c, &b.upload(&x[pos0 * w..]));
            assert_eq!(b.cache_len(c), len * w);
            // bf16, with at most a quarter (or 1,024 values) of room to grow.
            let held = b.cache_bytes(c);
            assert!(
                held >= len * w * 2 && held <= len * w * 2 * 5 / 4 + 2048,
                "a bf16 cache of {} values holds {held} bytes",
                len * w
            );
        }
        let got = b.attention(&b.upload(&q), t, &kc, &vc, pos0, shape);
        assert_within(
            &b.download(&got),
            &want,
            BF16_TOL,
            &format!("tensor-core attention, {t} queries after {pos0}"),
        );
    }
}

#[test]
fn moe_experts_match_the_cpu_batched_and_per_expert() {
    let Some(b) = backend() else { return };
    moe_case(&b, false);
    // int8 experts (W8A16: linear_w8a16) against the CPU's int8 experts with bf16 activations,
    // the same quantized weights and the same rounding of the inputs.
    moe_case(&b, true);
}

fn moe_case(b: &CudaBackend, int8: bool) {
    let cpu = Cpu::new(ringbolt_kernels::Activations::Bf16);
    let mut rng = StdRng::seed_from_u64(7);
    let (hidden, inter, experts) = (256, 384, 4);
    // Weights exactly representable in bf16, so both backends hold the same ones.
    let mut weights = |n: usize| -> Vec<f32> {
        rand_vec(&mut rng, n, 0.05)
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    let w13: Vec<Vec<f32>> = (0..experts).map(|_| weights(2 * inter * hidden)).collect();
    let w2: Vec<Vec<f32>> = (0..experts).map(|_| weights(hidden * inter)).collect();
    fn up<B: Backend>(b: &B, w: &[f32], rows: usize, cols: usize, int8: bool) -> B::Weight {
        if int8 {
            b.upload_weight_int8(w, rows, cols)
        } else {
            b.upload_weight(w, rows, cols)
        }
    }
    let (g13, g2): (Vec<_>, Vec<_>) = (
        w13.iter()
            .map(|w| up(b, w, 2 * inter, hidden, int8))
            .collect(),
        w2.iter().map(|w| up(b, w, hidden, inter, int8)).collect(),
    );
    let (c13, c2): (Vec<_>, Vec<_>) = (
        w13.iter()
            .map(|w| up(&cpu, w, 2 * inter, hidden, int8))
            .collect(),
        w2.iter()
            .map(|w| up(&cpu, w, hidden, inter, int8))
            .collect(),
    );
    // 6 rows: 3 per expert, the batched GEMMs; 300 rows: 150 per expert, two GEMMs each.
    for rows in [6usize, 300] {
        let x = rand_vec(&mut rng, rows * hidden, 1.0);
        let mut buckets = vec![(Vec::new(), Vec::new()); experts];
        for r in 0..rows {
            for (e, w) in [(r % experts, 0.7f32), ((r + 1) % experts, 0.3)] {
                buckets[e].0.push(r as u32);
                buckets[e].1.push(w);
            }
        }
        let cpu_groups: Vec<ExpertGroup<'_, Cpu>> = buckets
            .iter()
            .enumerate()
            .map(|(e, (ids, ws))| ExpertGroup {
                ids,
                weights: ws,
                w13: &c13[e],
                w2: &c2[e],
            })
            .collect();
        let gpu_groups: Vec<ExpertGroup<'_, CudaBackend>> = buckets
            .iter()
            .enumerate()
            .map(|(e, (ids, ws))| ExpertGroup {
                ids,
                weights: ws,
                w13: &g13[e],
                w2: &g2[e],
            })
            .collect();
        let want = cpu.moe_experts(&x, rows, hidden, inter, &cpu_groups);
        let got = b.moe_experts(&b.upload(&x), rows, hidden, inter, &gpu_groups);
        assert_within(
            &b.download(&got),
            &want,
            BF16_TOL,
            &format!("moe experts, {rows} rows, int8 {int8}"),
        );
    }
}

#[test]
fn scatter_add_adds_repeated_rows_in_order() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    // 300 rows of y onto 40 destinations: every destination gets several (as a token routed to
    // two experts does, many times over), from thread blocks that run at the same time.
    let (rows, width, dests) = (300usize, 96usize, 40usize);
    let ids: Vec<u32> = (0..rows).map(|r| ((r * 7 + 3) % dests) as u32).collect();
    let weights = rand_vec(&mut rng, rows, 1.0);
    let y = rand_vec(&mut rng, rows * width, 1.0);
    let base = rand_vec(&mut rng, dests * width, 1.0);
    let mut want = Cpu::default().upload(&base);
    Cpu::default().scatter_add_rows(&mut want, &Cpu::default().upload(&y), &ids, &weights, width);
    let mut got = b.upload(&base);
    b.scatter_add_rows(&mut got, &b.upload(&y), &ids, &weights, width);
    assert_close(
        &b.download(&got),
        &Cpu::default().download(&want),
        "scatter_add_rows",
    );
}

#[test]
fn rope_at_per_row_positions_matches_the_cpu() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let rope = RopeParams {
        head_dim: 128,
        rotary_dim: 64,
        theta: 10_000_000.0,
    };
    let (heads, positions) = (8, [0usize, 5, 4095, 1_000_000, 17]);
    let x = rand_vec(&mut rng, positions.len() * heads * 128, 1.0);
    let mut want = x.clone();
    Cpu::default().rope_at(&mut want, heads, &positions, rope);
    let mut got = b.upload(&x);
    b.rope_at(&mut got, heads, &positions, rope);
    assert_close(&b.download(&got), &want, "rope_at");
}

/// Ring attention's pieces on the GPU: each partial (absolute query and key offsets, keys in
/// several blocks, one block entirely in a query's future) against the CPU's, and their
/// device merge against the whole causal attention.
#[test]
fn partial_attention_and_its_merge_match_the_cpu() {
    let Some(b) = backend() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    for d in [64usize, 40] {
        // head_dim 64: tensor cores; 40: the scalar kernel.
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: d,
        };
        let tol = if d % 16 == 0 { BF16_TOL } else { 1e-2 };
        let (t, q_pos0) = (37usize, 300usize);
        let q = rand_vec(&mut rng, t * 4 * d, 0.5);
        let w = 2 * d;
        let mut parts_gpu = Vec::new();
        let mut parts_cpu = Vec::new();
        // Blocks of keys at positions [0, 120), [120, 310), [310, 400): the last partly and
        // the first wholly visible.
        for (k_pos0, k_len) in [(0usize, 120usize), (120, 190), (310, 90)] {
            let k = rand_vec(&mut rng, k_len * w, 0.5);
            let v = rand_vec(&mut rng, k_len * w, 0.5);
            let (oc, lc) =
                Cpu::default().attention_partial(&q, t, q_pos0, &k, &v, k_len, k_pos0, shape);
            let (og, lg) = b.attention_partial(
                &b.upload(&q),
                t,
                q_pos0,
                &b.upload(&k),
                &b.upload(&v),
                k_len,
                k_pos0,
                shape,
            );
            let what = format!("d={d} partial over keys at {k_pos0}");
            assert_within(&b.download(&og), &oc, tol, &what);
            for (x, y) in lg.iter().zip(&lc) {
                assert!(
                    (x == y) || (x - y).abs() <= 0.05 * y.abs().max(1.0),
                    "{what}: lse {x} vs {y}"
                );
            }
            parts_gpu.push((og, lg));
            parts_cpu.push((oc, lc));
        }
        let (mg, lg) = b.attention_merge(&parts_gpu, t, shape);
        let (mc, lc) = Cpu::default().attention_merge(&parts_cpu, t, shape);
        assert_within(&b.download(&mg), &mc, tol, &format!("d={d} merge"));
        for (x, y) in lg.iter().zip(&lc) {
            assert!((x - y).abs() <= 0.05 * y.abs().max(1.0), "d={d} merged lse");
        }
    }
}

#[test]
fn vision_layer_norm_bias_and_gelu_match_the_cpu() {
    let Some(b) = backend() else { return };
    let cpu = Cpu::default();
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, width) = (5, 1024);
    // Rows far from zero mean, where a one-pass variance would cancel.
    let x: Vec<f32> = rand_vec(&mut rng, rows * width, 2.0)
        .iter()
        .map(|v| v + 300.0)
        .collect();
    let (g, bias) = (
        rand_vec(&mut rng, width, 1.0),
        rand_vec(&mut rng, width, 1.0),
    );
    let eps = 1e-5;
    let got = b.layer_norm(&b.upload(&x), &b.upload(&g), &b.upload(&bias), width, eps);
    let want = cpu.layer_norm(&cpu.upload(&x), &g, &bias, width, eps);
    assert_close(&b.host_view(&got), &want, "layer_norm");
    let mut gb = b.upload(&x);
    b.add_bias(&mut gb, &b.upload(&bias));
    let mut cb = x.clone();
    cpu.add_bias(&mut cb, &bias);
    assert_close(&b.host_view(&gb), &cb, "add_bias");
    let y = rand_vec(&mut rng, rows * width, 4.0);
    let mut gy = b.upload(&y);
    b.gelu_inplace(&mut gy);
    let mut cy = y.clone();
    cpu.gelu_inplace(&mut cy);
    assert_close(&b.host_view(&gy), &cy, "gelu_inplace");
}
