//! The CUDA implementation of [`Backend`] (feature `cuda`): activations in f32 device buffers,
//! weights in bf16, GEMMs through cuBLAS (bf16 inputs, f32 accumulation and output), everything
//! else through the NVRTC-compiled kernels of `kernels/cuda/`. Lightning prefill and softmax
//! attention run on tensor cores (`mma.sync` with bf16 operands and f32 accumulation) when the
//! head dimension is a multiple of 16 up to 128, else on scalar f32 kernels. One stream per backend; the
//! compute interface returns values, so a device failure panics with its message (the engine
//! turns a panic into a failed job).
//!
//! Status: compiled and linted without a GPU; its results against the CPU backend are checked
//! by `kernels/tests/cuda.rs` (kernels) and `scripts/gpu-check.sh` only on a GPU machine.

use crate::cpu::rope_inv_freq;
use crate::cuda::{self, CudaError, Unpermute};
use crate::{AttentionShape, Backend, ExpertGroup, LightningShape, RopeParams, Routing};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest head dimension the lightning kernels take (`RB_MAX_HEAD_DIM`).
pub const MAX_LIGHTNING_HEAD_DIM: usize = 128;

/// Tokens per block of the tensor-core lightning prefill (`RB_LB`).
pub const LIGHTNING_TC_BLOCK: usize = 64;

/// Tokens per pass of the tensor-core lightning prefill: its scratch (per head and block, a
/// d×d f32 KV sum and the bf16 hi/lo starting state) is 8·d² bytes per head per 64 tokens of a
/// pass: 256 MiB at 64 heads of 128.
pub const LIGHTNING_PASS_TOKENS: usize = 2048;

/// MoE steps whose experts each take at most this many rows run as batched GEMMs
/// ([`CudaBackend::moe_batched`]); wider ones (prefill) as two GEMMs per expert.
const MOE_BATCHED_MAX_ROWS: usize = 128;
/// `route_topk` keeps its choices in registers (`RB_MAX_TOPK` in route.cu).
const ROUTE_MAX_TOP_K: usize = 16;

/// Queries per thread block of `attention_tc` (`RB_AQ`).
const ATTENTION_TC_QUERIES: usize = 64;

/// Attention of at most this many queries (decode steps) splits its keys across thread
/// blocks: one split per this many keys, at most [`ATTENTION_MAX_SPLITS`].
const ATTENTION_SPLIT_MAX_QUERIES: usize = 16;
const ATTENTION_SPLIT_KEYS: usize = 1024;
const ATTENTION_MAX_SPLITS: usize = 32;

/// Dynamic shared memory of `lightning_block_out` and `attention_tc`: a block of 64 query and
/// 64 key rows in bf16 (rows padded by 8 to spread shared-memory banks) and the values
/// transposed (`[d, 64 + 8]`).
fn tc_smem(d: usize) -> u32 {
    (2 * 64 * (d + 8) * 2 + d * (64 + 8) * 2) as u32
}

/// Whether the tensor-core kernels take this head dimension (`RB_AMAX`, `RB_MAX_HEAD_DIM`).
fn tensor_core_dim(d: usize) -> bool {
    d.is_multiple_of(16) && d <= 128
}

/// An f32 device buffer of `len` values.
pub struct GpuBuf {
    data: Option<CudaSlice<f32>>,
    len: usize,
}

impl GpuBuf {
    fn view(&self) -> Option<CudaView<'_, f32>> {
        self.data.as_ref().map(|d| d.slice(0..self.len))
    }
}

/// A softmax layer's key or value cache on the device, in bf16: `len` values in use, up to 25%
/// more allocated so that appends do not copy each time.
pub struct GpuCache {
    data: Option<CudaSlice<bf16>>,
    len: usize,
}

/// A weight matrix `[rows, cols]` on the device: bf16, or int8 with one f32 scale per row.
pub struct GpuWeight {
    data: WeightData,
    rows: usize,
    cols: usize,
}

enum WeightData {
    Bf16(CudaSlice<bf16>),
    Int8 {
        q: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

impl GpuWeight {
    /// The bf16 values; int8 weights take [`CudaBackend::w8a16`] instead.
    fn bf16(&self) -> &CudaSlice<bf16> {
        match &self.data {
            WeightData::Bf16(d) => d,
            WeightData::Int8 { .. } => unreachable!("int8 weights go through linear_w8a16"),
        }
    }

    fn is_int8(&self) -> bool {
        matches!(self.data, WeightData::Int8 { .. })
    }
}

/// One GPU: its stream, cuBLAS handle and kernels. Every operation is queued on the one stream,
/// so work from several threads (an attention worker's job threads, an expert worker's steps)
/// is ordered there; the cuBLAS handle, which must not be used by two threads at once, is
/// behind a lock.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: std::sync::Mutex<CudaBlas>,
    funcs: HashMap<String, CudaFunction>,
    /// A [`LightningKernel`] (0 blocks, 1 fused).
    lightning: std::sync::atomic::AtomicU8,
}

/// Which tensor-core kernels compute lightning prefill (head dims that are multiples of 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum LightningKernel {
    /// Three launches: every block's KV sum, a scan of the states, every block's outputs.
    /// Parallel over blocks; moves each block's state through device memory.
    #[default]
    Blocks = 0,
    /// One launch (`lightning_fused`): a head's blocks in order, the state kept on chip.
    Fused = 1,
}

impl std::str::FromStr for LightningKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blocks" => Ok(LightningKernel::Blocks),
            "fused" => Ok(LightningKernel::Fused),
            _ => Err(format!("lightning kernel `{s}`: blocks or fused")),
        }
    }
}

/// Bytes of dynamic shared memory of `lightning_fused` (lightning.cu: Q and K row-major,
/// decayed Kᵀ, a slice of Vᵀ, the state slice as hi and lo).
fn fused_smem(d: usize) -> u32 {
    let (lb, lt, fv) = (LIGHTNING_TC_BLOCK, LIGHTNING_TC_BLOCK + 8, 64);
    ((2 * lb * (d + 8) + d * lt + fv * lt + 2 * fv * (d + 8)) * 2) as u32
}

fn fail(what: &str, e: impl std::fmt::Debug) -> ! {
    panic!("CUDA {what}: {e:?}")
}

/// What the device's memory pool keeps of freed memory (see [`keep_pool_memory`]).
const POOL_KEEP_BYTES: u64 = 4 << 30;

/// Up to POOL_KEEP_BYTES of device memory freed back to the device's default pool stays there
/// for the next allocation instead of going back to the driver at every synchronisation (the
/// pool's default release threshold is 0): each decode step, which ends in one, would otherwise
/// map its buffers anew. Bounded, so a long prefill's peak is returned for allocations outside
/// the pool (cuBLAS workspaces, NCCL buffers). Best effort: a failure costs speed only.
fn keep_pool_memory(ordinal: usize) {
    use cudarc::driver::sys;
    // SAFETY: plain driver calls on out-pointers to locals that live through them.
    let r = unsafe {
        let mut dev: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut keep: u64 = POOL_KEEP_BYTES;
        let a = sys::cuDeviceGet(&mut dev, ordinal as i32);
        if a != sys::CUresult::CUDA_SUCCESS {
            a
        } else {
            let b = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
            if b != sys::CUresult::CUDA_SUCCESS {
                b
            } else {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                )
            }
        }
    };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        tracing::warn!(ordinal, result = ?r, "could not keep freed memory in the device's pool");
    }
}

fn grid(n: usize, per: u32) -> LaunchConfig {
    let blocks = u32::try_from(n.div_ceil(per as usize))
        .unwrap_or_else(|_| panic!("{n} elements need more than 2^32 thread blocks"));
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (per, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) every kernel for its
    /// architecture with headers from `include` (else `$CUDA_HOME/include`).
    pub fn new(ordinal: usize, include: Option<PathBuf>) -> Result<Self, CudaError> {
        let n = cuda::device_count()?;
        if ordinal >= n {
            return Err(CudaError::Driver(format!(
                "cuda:{ordinal} asked for, this machine has {n} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let (maj, min) = ctx
            .compute_capability()
            .map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let arch = format!("sm_{maj}{min}");
        let dirs = cuda::include_dirs(include.as_deref());
        let mut funcs = HashMap::new();
        for c in cuda::compile_all(&arch, &dirs)? {
            let module = ctx
                .load_module(Ptx::from_src(c.ptx))
                .map_err(|e| CudaError::Driver(format!("loading {}: {e:?}", c.module)))?;
            for k in c.kernels {
                let f = module
                    .load_function(&k)
                    .map_err(|e| CudaError::Driver(format!("kernel {k}: {e:?}")))?;
                funcs.insert(k, f);
            }
        }
        keep_pool_memory(ordinal);
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let name = format!(
            "cuda:{ordinal} ({}, {arch})",
            ctx.name().unwrap_or_else(|_| "unknown GPU".into())
        );
        // RINGBOLT_LIGHTNING=fused|blocks picks the prefill kernels (default blocks).
        let lightning = match std::env::var("RINGBOLT_LIGHTNING") {
            Ok(v) if !v.is_empty() => v.parse().map_err(CudaError::Driver)?,
            _ => LightningKernel::default(),
        };
        Ok(CudaBackend {
            ordinal,
            name,
            stream,
            blas: std::sync::Mutex::new(blas),
            funcs,
            lightning: std::sync::atomic::AtomicU8::new(lightning as u8),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The same backend computing lightning prefill with `k`.
    pub fn with_lightning(self, k: LightningKernel) -> Self {
        self.set_lightning(k);
        self
    }

    /// Computes lightning prefill with `k` from now on.
    pub fn set_lightning(&self, k: LightningKernel) {
        self.lightning
            .store(k as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn lightning_kernel(&self) -> LightningKernel {
        match self.lightning.load(std::sync::atomic::Ordering::Relaxed) {
            1 => LightningKernel::Fused,
            _ => LightningKernel::Blocks,
        }
    }

    /// Waits for every operation queued on this backend's stream (for timing).
    pub fn synchronize(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| fail("synchronize", e));
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not loaded"))
    }

    fn alloc(&self, n: usize) -> GpuBuf {
        if n == 0 {
            return GpuBuf { data: None, len: 0 };
        }
        let d = self
            .stream
            .alloc_zeros::<f32>(n)
            .unwrap_or_else(|e| fail("alloc", e));
        GpuBuf {
            data: Some(d),
            len: n,
        }
    }

    fn ids(&self, ids: &[u32]) -> CudaSlice<u32> {
        self.stream
            .clone_htod(if ids.is_empty() { &[0u32][..] } else { ids })
            .unwrap_or_else(|e| fail("upload", e))
    }

    fn floats(&self, v: &[f32]) -> CudaSlice<f32> {
        self.stream
            .clone_htod(if v.is_empty() { &[0f32][..] } else { v })
            .unwrap_or_else(|e| fail("upload", e))
    }

    /// Makes room in `cache` for `need` values, keeping its contents. A prompt's first chunk
    /// is sized exactly; later growth is by a quarter, which keeps copies amortised O(1) per
    /// value and the slack at most 25%.
    fn reserve(&self, cache: &mut GpuCache, need: usize) {
        let cap = cache.data.as_ref().map(|d| d.len()).unwrap_or(0);
        if need <= cap {
            return;
        }
        let new_cap = if cap == 0 {
            need
        } else {
            need.max(cap + cap / 4).max(1024)
        };
        let mut grown = self
            .stream
            .alloc_zeros::<bf16>(new_cap)
            .unwrap_or_else(|e| fail("alloc", e));
        if let Some(old) = cache.data.take().filter(|_| cache.len > 0) {
            let mut dst = grown.slice_mut(0..cache.len);
            self.stream
                .memcpy_dtod(&old.slice(0..cache.len), &mut dst)
                .unwrap_or_else(|e| fail("copy", e));
        }
        cache.data = Some(grown);
    }

    /// Copies `src` into `dst` at element `at`.
    fn copy_into(&self, dst: &mut CudaSlice<f32>, at: usize, src: &GpuBuf) {
        if let Some(v) = src.view() {
            let mut d = dst.slice_mut(at..at + src.len);
            self.stream
                .memcpy_dtod(&v, &mut d)
                .unwrap_or_else(|e| fail("copy", e));
        }
    }

    /// `x` rounded to bf16 (a GEMM input).
    fn to_bf16(&self, x: &GpuBuf) -> CudaSlice<bf16> {
        let n = x.len.max(1);
        let mut y = self
            .stream
            .alloc_zeros::<bf16>(n)
            .unwrap_or_else(|e| fail("alloc", e));
        if let Some(v) = x.view() {
            let nn = x.len;
            let mut b = self.stream.launch_builder(self.f("f32_to_bf16"));
            b.arg(&v).arg(&mut y).arg(&nn);
            // SAFETY: v holds nn values and y has room for nn (one thread each).
            unsafe { b.launch(grid(nn, 256)) }.unwrap_or_else(|e| fail("f32_to_bf16", e));
        }
        y
    }

    /// Experts with few rows each (decode): every expert's rows padded to the widest group's
    /// `m` (padding repeats row 0 at weight 0, so it adds nothing), then both projections as
    /// one batched GEMM each over all experts instead of two small GEMMs per expert.
    fn moe_batched(
        &self,
        x: &GpuBuf,
        rows: usize,
        hidden: usize,
        inter: usize,
        groups: &[&ExpertGroup<'_, Self>],
        m: usize,
    ) -> GpuBuf {
        let e = groups.len();
        let mut ids = Vec::with_capacity(e * m);
        for g in groups {
            ids.extend_from_slice(g.ids);
            ids.resize(ids.len() + m - g.ids.len(), 0);
        }
        let xs = self.gather_rows(x, &ids, hidden);
        let h = self.batched_linear(&xs, groups.iter().map(|g| g.w13), e, m, hidden, 2 * inter);
        let a = self.swiglu(&h, e * m, inter);
        let y = self.batched_linear(&a, groups.iter().map(|g| g.w2), e, m, inter, hidden);
        let mut out = self.alloc(rows * hidden);
        // Padding rows are not added back; a token's experts add in expert order.
        let plan = Unpermute::new(groups.iter().enumerate().flat_map(|(b, g)| {
            g.ids
                .iter()
                .zip(g.weights)
                .enumerate()
                .map(move |(i, (&d, &w))| (d, (b * m + i) as u32, w))
        }));
        self.unpermute(&mut out, &y, &plan, hidden);
        out
    }

    /// `out[dst[k]] += Σ weights[j] · y[src[j]]`, one thread per destination value.
    fn unpermute(&self, out: &mut GpuBuf, y: &GpuBuf, u: &Unpermute, width: usize) {
        if u.dst.is_empty() {
            return;
        }
        if let (Some(od), Some(yd)) = (out.data.as_mut(), y.data.as_ref()) {
            let (dd, sd, srd) = (self.ids(&u.dst), self.ids(&u.starts), self.ids(&u.src));
            let wd = self.floats(&u.weights);
            let (c, wi) = (u.dst.len() as i32, width as i32);
            let mut b = self.stream.launch_builder(self.f("scatter_add_rows"));
            b.arg(od)
                .arg(yd)
                .arg(&dd)
                .arg(&sd)
                .arg(&srd)
                .arg(&wd)
                .arg(&c)
                .arg(&wi);
            // SAFETY: out has a row for every dst entry, y one for every src entry, starts holds dst.len()+1 offsets into src and weights; one thread per element of the dst rows.
            unsafe { b.launch(grid(u.dst.len() * width, 256)) }
                .unwrap_or_else(|e| fail("scatter_add_rows", e));
        }
    }

    /// `Y_b = X_b · W_bᵀ` for each of `batch` weights `W_b` (`[n, k]`), where `X_b` and `Y_b`
    /// are the b-th blocks of `m` rows of `x` (`[batch·m, k]`) and of the result
    /// (`[batch·m, n]`): one `cublasGemmBatchedEx`, bf16 inputs, f32 accumulation and output.
    fn batched_linear<'w>(
        &self,
        x: &GpuBuf,
        weights: impl Iterator<Item = &'w GpuWeight>,
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
    ) -> GpuBuf {
        use cudarc::cublas::sys;
        assert_eq!(
            x.len,
            batch * m * k,
            "batched linear: x is not [batch·m, k]"
        );
        let weights: Vec<&GpuWeight> = weights.collect();
        if weights.first().is_some_and(|w| w.is_int8()) {
            return self.w8a16(x, &weights, m, k, n);
        }
        let mut y = self.alloc(batch * m * n);
        let xb = self.to_bf16(x);
        if let Some(yd) = y.data.as_mut() {
            let mut guards = Vec::with_capacity(batch);
            let mut a = Vec::with_capacity(batch);
            for w in weights {
                assert_eq!(
                    (w.rows, w.cols),
                    (n, k),
                    "batched linear: a weight is not [n, k]"
                );
                let (p, g) = w.bf16().device_ptr(&self.stream);
                a.push(p);
                guards.push(g);
            }
            assert_eq!(a.len(), batch, "batched linear: one weight per block");
            let (xp, _rx) = xb.device_ptr(&self.stream);
            let (yp, _ry) = yd.device_ptr_mut(&self.stream);
            let b: Vec<u64> = (0..batch).map(|i| xp + (i * m * k * 2) as u64).collect();
            let c: Vec<u64> = (0..batch).map(|i| yp + (i * m * n * 4) as u64).collect();
            let up = |v: &[u64]| {
                self.stream
                    .clone_htod(v)
                    .unwrap_or_else(|e| fail("upload", e))
            };
            let (ad, bd, cd) = (up(&a), up(&b), up(&c));
            let (ap, _ra) = ad.device_ptr(&self.stream);
            let (bp, _rb) = bd.device_ptr(&self.stream);
            let (cp, _rc) = cd.device_ptr(&self.stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: as in `linear`, per block (the same column-major reading); the pointer
            // arrays are device arrays of `batch` live pointers, kept alive with their buffers
            // (the guards) until the call is queued.
            let status = unsafe {
                sys::cublasGemmBatchedEx(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    ap as *const *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    bp as *const *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    cp as *const *mut _,
                    sys::cudaDataType::CUDA_R_32F,
                    n as i32,
                    batch as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                fail("batched gemm", status);
            }
        }
        y
    }

    /// `Y_b = X_b · W_bᵀ` for int8 weights `W_b` (`[n, k]` with per-row scales), `X_b` the
    /// b-th block of `m` rows of `x`: one launch of `linear_w8a16` (w8a16.cu: the int8 values
    /// widened to bf16 in its tile loader, bf16 tensor cores, f32 accumulation, the scales in
    /// its epilogue), blocks of 64 rows × 64 features, one grid layer per weight.
    fn w8a16(&self, x: &GpuBuf, weights: &[&GpuWeight], m: usize, k: usize, n: usize) -> GpuBuf {
        let batch = weights.len();
        assert_eq!(x.len, batch * m * k, "w8a16: x is not [batch·m, k]");
        let mut y = self.alloc(batch * m * n);
        let Some(yd) = y.data.as_mut() else {
            return y;
        };
        let xb = self.to_bf16(x);
        let mut guards = Vec::with_capacity(2 * batch);
        let (mut qs, mut ss) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
        for w in weights {
            assert_eq!((w.rows, w.cols), (n, k), "w8a16: a weight is not [n, k]");
            let WeightData::Int8 { q, scales } = &w.data else {
                panic!("w8a16: a bf16 weight among int8 ones");
            };
            let (qp, gq) = q.device_ptr(&self.stream);
            let (sp, gs) = scales.device_ptr(&self.stream);
            qs.push(qp);
            ss.push(sp);
            guards.push((gq, gs));
        }
        let up = |v: &[u64]| {
            self.stream
                .clone_htod(v)
                .unwrap_or_else(|e| fail("upload", e))
        };
        let (qd, sd) = (up(&qs), up(&ss));
        let (mi, ki, ni) = (m as i32, k as i32, n as i32);
        let mut b = self.stream.launch_builder(self.f("linear_w8a16"));
        b.arg(&xb)
            .arg(&qd)
            .arg(&sd)
            .arg(yd)
            .arg(&mi)
            .arg(&ki)
            .arg(&ni);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: xb holds batch·m·k bf16, y batch·m·n f32; qd and sd are device arrays of
        // `batch` pointers to live int8 weights ([n, k]) and their n scales, kept alive by
        // `weights` and the guards until the launch is queued; the block shape is the one the
        // kernel is written for.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("linear_w8a16", e));
        drop(guards);
        y
    }

    /// Combines `splits` partial attention results over disjoint key sets (`out`: parts of
    /// `[rows, d]`, `lse`: parts of `[rows]`) by their log-sum-exps into `[rows, d]`.
    /// One launch of the attention kernel (`attention_tc` where the head dimension allows
    /// tensor cores, else the scalar one): `t` queries at positions `pos0..` over `nkeys` keys
    /// and values (bf16) at positions `kpos0..`, causal by absolute position. With `split`, a
    /// few queries over many keys spread the keys across thread blocks and merge them (the
    /// returned log-sum-exps are then per part, not the whole's); without, the output and the
    /// log-sum-exp `[t, heads]` are of all the keys.
    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &GpuBuf,
        t: usize,
        pos0: usize,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        kpos0: usize,
        nkeys: usize,
        shape: AttentionShape,
        split: bool,
    ) -> (GpuBuf, GpuBuf) {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        assert!(
            d <= 256,
            "attention kernel takes head_dim up to 256, got {d}"
        );
        assert_eq!(q.len, t * heads * d);
        assert!(k.len() >= nkeys * kv_heads * d && v.len() >= nkeys * kv_heads * d);
        let tc = tensor_core_dim(d);
        // A few queries over a long cache (decode): the keys are split across thread blocks so
        // that the GPU has heads × splits blocks to run, and the partial results merged.
        let splits = if split && tc && t <= ATTENTION_SPLIT_MAX_QUERIES {
            (nkeys / ATTENTION_SPLIT_KEYS).clamp(1, ATTENTION_MAX_SPLITS)
        } else {
            1
        };
        let mut out = self.alloc(splits * t * heads * d);
        let mut lse = self.alloc(splits * t * heads);
        if let (Some(od), Some(ld), Some(qd)) =
            (out.data.as_mut(), lse.data.as_mut(), q.data.as_ref())
        {
            let (ti, hi, kvi, di) = (t as i32, heads as i32, kv_heads as i32, d as i32);
            let (p0, kp0, nk) = (pos0 as i64, kpos0 as i64, nkeys as i32);
            let name = if tc { "attention_tc" } else { "attention" };
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(qd)
                .arg(k)
                .arg(v)
                .arg(&mut *od)
                .arg(&mut *ld)
                .arg(&ti)
                .arg(&hi)
                .arg(&kvi)
                .arg(&di)
                .arg(&p0)
                .arg(&kp0)
                .arg(&nk);
            let cfg = if tc {
                let smem = tc_smem(d);
                self.allow_smem(name, smem);
                LaunchConfig {
                    grid_dim: (
                        t.div_ceil(ATTENTION_TC_QUERIES) as u32,
                        heads as u32,
                        splits as u32,
                    ),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem,
                }
            } else {
                grid(t * heads * 32, 128)
            };
            // SAFETY: q is [t, heads·d], k and v hold at least nkeys rows of kv_heads·d, out
            // and lse are `splits` parts of [t, heads·d] and [t, heads]; the shared memory
            // asked for is allowed.
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail(name, e));
        }
        if splits == 1 {
            return (out, lse);
        }
        let merged = self.merge_splits(&out, &lse, splits, t * heads, d);
        (merged, lse)
    }

    fn merge_splits(
        &self,
        out: &GpuBuf,
        lse: &GpuBuf,
        splits: usize,
        rows: usize,
        d: usize,
    ) -> GpuBuf {
        let mut merged = self.alloc(rows * d);
        if let (Some(md), Some(od), Some(ld)) =
            (merged.data.as_mut(), out.data.as_ref(), lse.data.as_ref())
        {
            let (si, ri, di) = (splits as i32, rows as i32, d as i32);
            let mut b = self.stream.launch_builder(self.f("attention_merge_splits"));
            b.arg(od).arg(ld).arg(md).arg(&si).arg(&ri).arg(&di);
            // SAFETY: out and lse hold `splits` parts of [rows, d] and [rows]; merged is
            // [rows, d].
            unsafe { b.launch(grid(rows * d, 256)) }
                .unwrap_or_else(|e| fail("attention_merge_splits", e));
        }
        merged
    }

    /// Lets kernel `name` use `bytes` of dynamic shared memory (above the 48 KiB default).
    fn allow_smem(&self, name: &str, bytes: u32) {
        self.f(name)
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .unwrap_or_else(|e| fail(&format!("{name}: {bytes} bytes of shared memory"), e));
    }

    /// Tensor-core lightning prefill (`lightning.cu`: block KV sums, scan over blocks, block
    /// outputs) of `t` tokens, in passes of at most [`LIGHTNING_PASS_TOKENS`] so that the
    /// per-block scratch stays bounded whatever the prompt length.
    #[allow(clippy::too_many_arguments)]
    fn lightning_prefill_tc(
        &self,
        qkv: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        lam: &CudaSlice<f32>,
        t: usize,
        heads: usize,
        d: usize,
    ) {
        let max_blocks = t.min(LIGHTNING_PASS_TOKENS).div_ceil(LIGHTNING_TC_BLOCK);
        let scratch = heads * max_blocks * d * d;
        // SAFETY: uninitialised scratch: every pass writes each (head, block) KV sum before the
        // scan reads it, and the scan writes each starting state before the outputs read it.
        let (kv, p_hi, p_lo) = unsafe {
            (
                self.stream.alloc::<f32>(scratch),
                self.stream.alloc::<bf16>(scratch),
                self.stream.alloc::<bf16>(scratch),
            )
        };
        let (mut kv, mut p_hi, mut p_lo) = (
            kv.unwrap_or_else(|e| fail("alloc", e)),
            p_hi.unwrap_or_else(|e| fail("alloc", e)),
            p_lo.unwrap_or_else(|e| fail("alloc", e)),
        );
        let smem = tc_smem(d);
        self.allow_smem("lightning_block_out", smem);
        let (hi, di) = (heads as i32, d as i32);
        let (row_in, row_out) = (heads * 3 * d, heads * d);
        let mut p0 = 0;
        while p0 < t {
            let tp = (t - p0).min(LIGHTNING_PASS_TOKENS);
            let nb = tp.div_ceil(LIGHTNING_TC_BLOCK);
            let (ti, nbi) = (tp as i32, nb as i32);
            let qv = qkv.slice(p0 * row_in..(p0 + tp) * row_in);
            let mut ov = out.slice_mut(p0 * row_out..(p0 + tp) * row_out);
            let blocks = LaunchConfig {
                grid_dim: (heads as u32, nb as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.f("lightning_block_kv"));
            b.arg(&qv).arg(&mut kv).arg(lam).arg(&ti).arg(&hi).arg(&di);
            // SAFETY: qv holds tp rows of heads·3d; kv has room for heads × nb blocks of d².
            unsafe { b.launch(blocks) }.unwrap_or_else(|e| fail("lightning_block_kv", e));
            let mut b = self.stream.launch_builder(self.f("lightning_scan"));
            b.arg(&kv)
                .arg(&mut p_hi)
                .arg(&mut p_lo)
                .arg(&mut *state)
                .arg(lam)
                .arg(&ti)
                .arg(&nbi)
                .arg(&di);
            let cfg = LaunchConfig {
                grid_dim: ((d * d).div_ceil(256) as u32, heads as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: kv, p_hi, p_lo hold heads × nb blocks of d²; state is [heads, d, d].
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("lightning_scan", e));
            let mut b = self.stream.launch_builder(self.f("lightning_block_out"));
            b.arg(&qv)
                .arg(&mut ov)
                .arg(&p_hi)
                .arg(&p_lo)
                .arg(lam)
                .arg(&ti)
                .arg(&hi)
                .arg(&di);
            let cfg = LaunchConfig {
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem,
                ..blocks
            };
            // SAFETY: as above; ov holds tp rows of heads·d; the shared memory is allowed.
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("lightning_block_out", e));
            p0 += tp;
        }
    }

    fn elementwise(&self, x: &mut GpuBuf, name: &str) {
        let n = x.len;
        if let Some(d) = x.data.as_mut() {
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(d).arg(&n);
            // SAFETY: x holds n values; one thread per element.
            unsafe { b.launch(grid(n, 256)) }.unwrap_or_else(|e| fail(name, e));
        }
    }
}

impl Backend for CudaBackend {
    type Buf = GpuBuf;
    type Weight = GpuWeight;
    type Cache = GpuCache;

    /// Every weight is bf16 on the device (int8 ones aside).
    fn bytes_per_weight(&self, _bf16: bool) -> u64 {
        2
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload(&self, data: &[f32]) -> GpuBuf {
        if data.is_empty() {
            return GpuBuf { data: None, len: 0 };
        }
        GpuBuf {
            data: Some(self.floats(data)),
            len: data.len(),
        }
    }

    fn upload_weight(&self, data: &[f32], rows: usize, cols: usize) -> GpuWeight {
        assert_eq!(data.len(), rows * cols, "weight is not [rows, cols]");
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let d = self
            .stream
            .clone_htod(if host.is_empty() {
                &[bf16::ZERO][..]
            } else {
                &host
            })
            .unwrap_or_else(|e| fail("upload", e));
        GpuWeight {
            data: WeightData::Bf16(d),
            rows,
            cols,
        }
    }

    fn upload_weight_int8(&self, data: &[f32], rows: usize, cols: usize) -> GpuWeight {
        let (q, scales) = crate::format::quantize_int8(data, rows, cols);
        // Empty matrices still get one element: the device has no empty allocations.
        let q = self
            .stream
            .clone_htod(if q.is_empty() { &[0i8][..] } else { &q })
            .unwrap_or_else(|e| fail("upload", e));
        let scales = self
            .stream
            .clone_htod(if scales.is_empty() {
                &[0f32][..]
            } else {
                &scales
            })
            .unwrap_or_else(|e| fail("upload", e));
        GpuWeight {
            data: WeightData::Int8 { q, scales },
            rows,
            cols,
        }
    }

    fn weight_rows(&self, w: &GpuWeight, ids: &[u32], width: usize) -> GpuBuf {
        assert_eq!(width, w.cols);
        let mut out = self.alloc(ids.len() * width);
        if let Some(o) = out.data.as_mut() {
            let idd = self.ids(ids);
            let (c, wi) = (ids.len() as i32, width as i32);
            let mut b = self.stream.launch_builder(self.f("gather_rows_bf16"));
            b.arg(w.bf16()).arg(&idd).arg(o).arg(&c).arg(&wi);
            // SAFETY: every id indexes a row of the table (checked by the caller); o has room for ids.len()·width values, one thread each.
            unsafe { b.launch(grid(ids.len() * width, 256)) }
                .unwrap_or_else(|e| fail("gather_rows_bf16", e));
        }
        out
    }

    fn download(&self, buf: &GpuBuf) -> Vec<f32> {
        match buf.view() {
            Some(v) => self
                .stream
                .clone_dtoh(&v)
                .unwrap_or_else(|e| fail("download", e)),
            None => Vec::new(),
        }
    }

    fn zeros(&self, len: usize) -> GpuBuf {
        self.alloc(len)
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn rows(&self, x: &GpuBuf, start: usize, count: usize, width: usize) -> GpuBuf {
        assert!((start + count) * width <= x.len, "rows out of range");
        let mut out = self.alloc(count * width);
        if let (Some(o), Some(src)) = (out.data.as_mut(), x.data.as_ref()) {
            let v = src.slice(start * width..(start + count) * width);
            self.stream
                .memcpy_dtod(&v, o)
                .unwrap_or_else(|e| fail("copy", e));
        }
        out
    }

    fn gather_rows(&self, x: &GpuBuf, ids: &[u32], width: usize) -> GpuBuf {
        let mut out = self.alloc(ids.len() * width);
        if let (Some(o), Some(src)) = (out.data.as_mut(), x.data.as_ref()) {
            let idd = self.ids(ids);
            let (c, wi) = (ids.len() as i32, width as i32);
            let mut b = self.stream.launch_builder(self.f("gather_rows"));
            b.arg(src).arg(&idd).arg(o).arg(&c).arg(&wi);
            // SAFETY: every id indexes a row of src (checked by the caller); o has room for ids.len()·width values, one thread each.
            unsafe { b.launch(grid(ids.len() * width, 256)) }
                .unwrap_or_else(|e| fail("gather_rows", e));
        }
        out
    }

    fn concat_rows(&self, parts: &[GpuBuf]) -> GpuBuf {
        let total: usize = parts.iter().map(|p| p.len).sum();
        let mut out = self.alloc(total);
        if let Some(o) = out.data.as_mut() {
            let mut at = 0;
            for p in parts {
                self.copy_into(o, at, p);
                at += p.len;
            }
        }
        out
    }

    fn new_cache(&self) -> GpuCache {
        GpuCache { data: None, len: 0 }
    }

    fn cache_append(&self, cache: &mut GpuCache, src: &GpuBuf) {
        let need = cache.len + src.len;
        self.reserve(cache, need);
        if let (Some(d), Some(v)) = (cache.data.as_mut(), src.view()) {
            let n = src.len;
            let mut dst = d.slice_mut(cache.len..need);
            let mut b = self.stream.launch_builder(self.f("f32_to_bf16"));
            b.arg(&v).arg(&mut dst).arg(&n);
            // SAFETY: v holds n values and dst has room for n.
            unsafe { b.launch(grid(n, 256)) }.unwrap_or_else(|e| fail("f32_to_bf16", e));
        }
        cache.len = need;
    }

    fn cache_append_rows(&self, caches: &mut [&mut GpuCache], src: &GpuBuf, width: usize) {
        let count = caches.len();
        assert_eq!(src.len, count * width);
        let Some(sd) = src.data.as_ref().filter(|_| count > 0 && width > 0) else {
            return;
        };
        // The guards record each cache's use on the stream when dropped: after the launch.
        let mut ptrs = Vec::with_capacity(count);
        let mut _cache_guards = Vec::with_capacity(count);
        for c in caches.iter_mut() {
            let at = c.len;
            self.reserve(c, at + width);
            c.len = at + width;
            let d = c.data.as_mut().expect("reserved above");
            let (p, g) = d.device_ptr_mut(&self.stream);
            ptrs.push(p + (at * std::mem::size_of::<bf16>()) as u64);
            _cache_guards.push(g);
        }
        let ptrs = self
            .stream
            .clone_htod(&ptrs)
            .unwrap_or_else(|e| fail("upload", e));
        let (ci, wi) = (count as i32, width as i32);
        let mut b = self.stream.launch_builder(self.f("cache_append_rows"));
        b.arg(sd).arg(&ptrs).arg(&ci).arg(&wi);
        // SAFETY: src holds count rows of width; each pointer is a cache's first free row with
        // room for width values (reserved above), borrowed mutably for this call.
        unsafe { b.launch(grid(count * width, 256)) }
            .unwrap_or_else(|e| fail("cache_append_rows", e));
    }

    fn cache_len(&self, cache: &GpuCache) -> usize {
        cache.len
    }

    fn cache_bytes(&self, cache: &GpuCache) -> usize {
        cache.data.as_ref().map(|d| d.len()).unwrap_or(0) * 2
    }

    fn cache_read(&self, cache: &GpuCache, start: usize, len: usize) -> Vec<f32> {
        assert!(start + len <= cache.len, "cache_read past the cache's end");
        let Some(d) = cache.data.as_ref().filter(|_| len > 0) else {
            return Vec::new();
        };
        let raw = self
            .stream
            .clone_dtoh(&d.slice(start..start + len))
            .unwrap_or_else(|e| fail("cache_read", e));
        // bf16 widens to f32 exactly; appending narrows back to the same bits.
        raw.into_iter().map(f32::from).collect()
    }

    fn linear(&self, x: &GpuBuf, w: &GpuWeight, m: usize, k: usize, n: usize) -> GpuBuf {
        assert_eq!(x.len, m * k, "linear: x is not [m, k]");
        assert_eq!((w.rows, w.cols), (n, k), "linear: w is not [n, k]");
        if w.is_int8() {
            return self.w8a16(x, &[w], m, k, n);
        }
        let mut y = self.alloc(m * n);
        let xb = self.to_bf16(x);
        if let Some(yd) = y.data.as_mut() {
            use cudarc::cublas::sys;
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Row-major Y[m,n] = X[m,k]·Wᵀ is column-major Yᵀ[n,m] = W·Xᵀ: W (column-major
            // [k,n]) transposed, X (column-major [k,m]) as is.
            let (wp, _rw) = w.bf16().device_ptr(&self.stream);
            let (xp, _rx) = xb.device_ptr(&self.stream);
            let (yp, _ry) = yd.device_ptr_mut(&self.stream);
            let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: the three pointers are live device buffers of the sizes the call reads
            // and writes ([n,k] and [m,k] bf16, [m,n] f32), on this handle's stream.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    xp as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    yp as *mut _,
                    sys::cudaDataType::CUDA_R_32F,
                    n as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .unwrap_or_else(|e| fail("gemm", e));
        }
        y
    }

    fn rms_norm(&self, x: &GpuBuf, g: &GpuBuf, width: usize, eps: f32) -> GpuBuf {
        assert_eq!(g.len, width);
        let rows = x.len / width.max(1);
        let mut y = self.alloc(x.len);
        if let (Some(yd), Some(xd), Some(gd)) = (y.data.as_mut(), x.data.as_ref(), g.data.as_ref())
        {
            let wi = width as i32;
            let mut b = self.stream.launch_builder(self.f("rms_norm"));
            b.arg(xd).arg(gd).arg(yd).arg(&wi).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x and y hold rows·width floats, g width (asserted above); one block a row.
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("rms_norm", e));
        }
        y
    }

    fn layer_norm(&self, x: &GpuBuf, g: &GpuBuf, b: &GpuBuf, width: usize, eps: f32) -> GpuBuf {
        assert!(
            g.len == width && b.len == width,
            "layer_norm: parameters are not [width]"
        );
        let rows = x.len / width.max(1);
        let mut y = self.alloc(x.len);
        if let (Some(yd), Some(xd), Some(gd), Some(bd)) = (
            y.data.as_mut(),
            x.data.as_ref(),
            g.data.as_ref(),
            b.data.as_ref(),
        ) {
            let wi = width as i32;
            let mut l = self.stream.launch_builder(self.f("layer_norm"));
            l.arg(xd).arg(gd).arg(bd).arg(yd).arg(&wi).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x and y hold rows·width floats, g and b width (checked above); one block
            // a row reads and writes only its row.
            unsafe { l.launch(cfg) }.unwrap_or_else(|e| fail("layer_norm", e));
        }
        y
    }

    fn add_bias(&self, x: &mut GpuBuf, bias: &GpuBuf) {
        let (n, width) = (x.len, bias.len);
        assert!(
            width > 0 && n % width == 0,
            "add_bias: {n} values are not rows of {width}"
        );
        if let (Some(xd), Some(bd)) = (x.data.as_mut(), bias.data.as_ref()) {
            let wi = width as i32;
            let mut b = self.stream.launch_builder(self.f("add_bias"));
            b.arg(xd).arg(bd).arg(&n).arg(&wi);
            // SAFETY: one thread per element of x (n of them); bias holds width floats and is
            // read at i mod width.
            unsafe { b.launch(grid(n, 256)) }.unwrap_or_else(|e| fail("add_bias", e));
        }
    }

    fn gelu_inplace(&self, x: &mut GpuBuf) {
        self.elementwise(x, "gelu_inplace");
    }

    fn silu_inplace(&self, x: &mut GpuBuf) {
        self.elementwise(x, "silu_inplace");
    }

    fn sigmoid_gate_inplace(&self, x: &mut GpuBuf, gate: &GpuBuf) {
        assert_eq!(x.len, gate.len);
        let n = x.len;
        if let (Some(xd), Some(gd)) = (x.data.as_mut(), gate.data.as_ref()) {
            let mut b = self.stream.launch_builder(self.f("sigmoid_gate"));
            b.arg(xd).arg(gd).arg(&n);
            // SAFETY: x and gate both hold n values (asserted above); one thread per element.
            unsafe { b.launch(grid(n, 256)) }.unwrap_or_else(|e| fail("sigmoid_gate", e));
        }
    }

    fn axpby(&self, alpha: f32, a: &GpuBuf, beta: f32, b_: &GpuBuf) -> GpuBuf {
        assert_eq!(a.len, b_.len);
        let n = a.len;
        let mut y = self.alloc(n);
        if let (Some(yd), Some(ad), Some(bd)) = (y.data.as_mut(), a.data.as_ref(), b_.data.as_ref())
        {
            let mut b = self.stream.launch_builder(self.f("axpby"));
            b.arg(&alpha).arg(ad).arg(&beta).arg(bd).arg(yd).arg(&n);
            // SAFETY: a, b and y all hold n values; one thread per element.
            unsafe { b.launch(grid(n, 256)) }.unwrap_or_else(|e| fail("axpby", e));
        }
        y
    }

    fn swiglu(&self, h: &GpuBuf, rows: usize, inter: usize) -> GpuBuf {
        assert_eq!(h.len, rows * 2 * inter);
        let mut y = self.alloc(rows * inter);
        if let (Some(yd), Some(hd)) = (y.data.as_mut(), h.data.as_ref()) {
            let (r, i) = (rows as i32, inter as i32);
            let mut b = self.stream.launch_builder(self.f("swiglu"));
            b.arg(hd).arg(yd).arg(&r).arg(&i);
            // SAFETY: h holds rows·2·inter values and y rows·inter; one thread per element of y.
            unsafe { b.launch(grid(rows * inter, 256)) }.unwrap_or_else(|e| fail("swiglu", e));
        }
        y
    }

    fn scatter_add_rows(
        &self,
        out: &mut GpuBuf,
        y: &GpuBuf,
        ids: &[u32],
        weights: &[f32],
        width: usize,
    ) {
        assert_eq!(y.len, ids.len() * width);
        assert_eq!(weights.len(), ids.len());
        // Repeated ids add in the order given, as on the CPU.
        let plan = Unpermute::new(
            ids.iter()
                .zip(weights)
                .enumerate()
                .map(|(j, (&d, &w))| (d, j as u32, w)),
        );
        self.unpermute(out, y, &plan, width);
    }

    fn moe_experts(
        &self,
        x: &GpuBuf,
        rows: usize,
        hidden: usize,
        inter: usize,
        groups: &[ExpertGroup<'_, Self>],
    ) -> GpuBuf {
        assert_eq!(x.len, rows * hidden);
        let active: Vec<&ExpertGroup<'_, Self>> =
            groups.iter().filter(|g| !g.ids.is_empty()).collect();
        let widest = active.iter().map(|g| g.ids.len()).max().unwrap_or(0);
        if active.len() > 1 && widest <= MOE_BATCHED_MAX_ROWS {
            return self.moe_batched(x, rows, hidden, inter, &active, widest);
        }
        let mut out = self.alloc(rows * hidden);
        for g in active {
            let n = g.ids.len();
            let xs = self.gather_rows(x, g.ids, hidden);
            let h = self.linear(&xs, g.w13, n, hidden, 2 * inter);
            let a = self.swiglu(&h, n, inter);
            let y = self.linear(&a, g.w2, n, inter, hidden);
            self.scatter_add_rows(&mut out, &y, g.ids, g.weights, hidden);
        }
        out
    }

    fn lightning(
        &self,
        qkv: &GpuBuf,
        t: usize,
        shape: LightningShape,
        decay: &[f32],
        state: &mut GpuBuf,
    ) -> GpuBuf {
        let LightningShape {
            heads, head_dim: d, ..
        } = shape;
        assert!(
            d <= MAX_LIGHTNING_HEAD_DIM,
            "lightning kernels take head_dim up to {MAX_LIGHTNING_HEAD_DIM}, got {d}"
        );
        assert_eq!(qkv.len, t * heads * 3 * d);
        assert_eq!(state.len, heads * d * d);
        assert_eq!(decay.len(), heads, "one decay rate per head");
        let lam = self.floats(decay);
        let mut out = self.alloc(t * heads * d);
        let (Some(od), Some(qd), Some(sd)) =
            (out.data.as_mut(), qkv.data.as_ref(), state.data.as_mut())
        else {
            return out;
        };
        let (hi, di) = (heads as i32, d as i32);
        if t == 1 {
            // The guard records the state's use on the stream when dropped: after the launch.
            let (ptr, _state_guard) = sd.device_ptr_mut(&self.stream);
            let ptrs = self
                .stream
                .clone_htod(&[ptr])
                .unwrap_or_else(|e| fail("upload", e));
            let mut b = self.stream.launch_builder(self.f("lightning_decode"));
            b.arg(qd).arg(od).arg(&ptrs).arg(&lam).arg(&hi).arg(&di);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, 1, 1),
                block_dim: (d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as in `lightning_decode`: one live state, stream-ordered frees.
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("lightning_decode", e));
        } else if tensor_core_dim(d) && self.lightning_kernel() == LightningKernel::Blocks {
            self.lightning_prefill_tc(qd, od, sd, &lam, t, heads, d);
        } else {
            // One launch over the whole prompt: the fused tensor-core kernel, or the scalar one
            // for head dims the tensor-core kernels do not take.
            let (name, cfg) = if tensor_core_dim(d) {
                let smem = fused_smem(d);
                self.allow_smem("lightning_fused", smem);
                let cfg = LaunchConfig {
                    grid_dim: (heads as u32, d.div_ceil(64) as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem,
                };
                ("lightning_fused", cfg)
            } else {
                let cfg = LaunchConfig {
                    grid_dim: (heads as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                ("lightning_prefill", cfg)
            };
            let ti = t as i32;
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(qd)
                .arg(od)
                .arg(sd)
                .arg(&lam)
                .arg(&ti)
                .arg(&hi)
                .arg(&di);
            // SAFETY: qkv holds t rows of heads·3d, out t rows of heads·d, state heads·d·d;
            // both kernels take (qkv, out, state, λ, t, heads, d).
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail(name, e));
        }
        out
    }

    /// The whole batch in one launch (pointers to every sequence's state).
    fn lightning_decode(
        &self,
        qkv: &GpuBuf,
        shape: LightningShape,
        decay: &[f32],
        states: &mut [&mut GpuBuf],
    ) -> GpuBuf {
        let (heads, d, batch) = (shape.heads, shape.head_dim, states.len());
        assert!(d <= MAX_LIGHTNING_HEAD_DIM && d > 0 && heads > 0);
        assert_eq!(decay.len(), heads, "one decay rate per head");
        assert_eq!(qkv.len, batch * heads * 3 * d);
        let mut out = self.alloc(batch * heads * d);
        // The guards record each state's use on the stream when dropped: after the launch.
        let (ptrs, _state_guards): (Vec<u64>, Vec<_>) = states
            .iter_mut()
            .map(|st| {
                assert_eq!(st.len, heads * d * d);
                let sd = st.data.as_mut().expect("a non-empty state");
                sd.device_ptr_mut(&self.stream)
            })
            .unzip();
        let (Some(od), Some(qd)) = (out.data.as_mut(), qkv.data.as_ref()) else {
            return out;
        };
        let ptrs = self
            .stream
            .clone_htod(&ptrs)
            .unwrap_or_else(|e| fail("upload", e));
        let lam = self.floats(decay);
        let (hi, di) = (heads as i32, d as i32);
        let mut b = self.stream.launch_builder(self.f("lightning_decode"));
        b.arg(qd).arg(od).arg(&ptrs).arg(&lam).arg(&hi).arg(&di);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, batch as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: qkv holds batch rows of heads·3d, out batch rows of heads·d, and each pointer
        // is a live [heads, d, d] state borrowed mutably for this call. No host wait is needed:
        // all work is on this one stream and cudarc frees device memory in stream order, so
        // neither a state nor the pointer array can be freed before the kernel has run.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("lightning_decode", e));
        out
    }

    fn rope_inplace(&self, x: &mut GpuBuf, t: usize, heads: usize, pos0: usize, rope: RopeParams) {
        let half = rope.rotary_dim / 2;
        if half == 0 || t == 0 {
            return;
        }
        assert_eq!(x.len, t * heads * rope.head_dim);
        let inv = self.floats(&rope_inv_freq(rope));
        if let Some(xd) = x.data.as_mut() {
            let (ti, hi, hd, hf, p0) = (
                t as i32,
                heads as i32,
                rope.head_dim as i32,
                half as i32,
                pos0 as i64,
            );
            let mut b = self.stream.launch_builder(self.f("rope_inplace"));
            b.arg(xd)
                .arg(&inv)
                .arg(&ti)
                .arg(&hi)
                .arg(&hd)
                .arg(&hf)
                .arg(&p0);
            // SAFETY: q/k hold t rows of heads·dim values and the tables cover their positions; one thread per rotated pair.
            unsafe { b.launch(grid(t * heads * half, 256)) }
                .unwrap_or_else(|e| fail("rope_inplace", e));
        }
    }

    fn rope_at(&self, x: &mut GpuBuf, heads: usize, positions: &[usize], rope: RopeParams) {
        let (t, half) = (positions.len(), rope.rotary_dim / 2);
        assert_eq!(x.len, t * heads * rope.head_dim);
        if half == 0 || t == 0 {
            return;
        }
        let inv = self.floats(&rope_inv_freq(rope));
        let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let pd = self
            .stream
            .clone_htod(&pos)
            .unwrap_or_else(|e| fail("upload", e));
        if let Some(xd) = x.data.as_mut() {
            let (ti, hi, hd, hf) = (t as i32, heads as i32, rope.head_dim as i32, half as i32);
            let mut b = self.stream.launch_builder(self.f("rope_rows"));
            b.arg(xd)
                .arg(&inv)
                .arg(&pd)
                .arg(&ti)
                .arg(&hi)
                .arg(&hd)
                .arg(&hf);
            // SAFETY: q/k hold t rows of heads·dim values and the tables cover their positions; one thread per rotated pair.
            unsafe { b.launch(grid(t * heads * half, 256)) }
                .unwrap_or_else(|e| fail("rope_rows", e));
        }
    }

    fn attention(
        &self,
        q: &GpuBuf,
        t: usize,
        k_cache: &GpuCache,
        v_cache: &GpuCache,
        pos0: usize,
        shape: AttentionShape,
    ) -> GpuBuf {
        let nkeys = pos0 + t;
        let w = shape.kv_heads * shape.head_dim;
        assert!(k_cache.len >= nkeys * w && v_cache.len >= nkeys * w);
        match (k_cache.data.as_ref(), v_cache.data.as_ref()) {
            (Some(k), Some(v)) => {
                let (k, v) = (k.slice(0..nkeys * w), v.slice(0..nkeys * w));
                self.attention_launch(q, t, pos0, &k, &v, 0, nkeys, shape, true)
                    .0
            }
            _ => self.alloc(t * shape.heads * shape.head_dim),
        }
    }

    /// Ring attention's partial over a block of keys and values (f32, rounded to bf16 as the
    /// caches are): one launch without key splits, so the log-sum-exp is the block's.
    fn attention_partial(
        &self,
        q: &GpuBuf,
        t: usize,
        q_pos0: usize,
        k: &GpuBuf,
        v: &GpuBuf,
        k_len: usize,
        k_pos0: usize,
        shape: AttentionShape,
    ) -> (GpuBuf, Vec<f32>) {
        let w = shape.kv_heads * shape.head_dim;
        assert!(k.len >= k_len * w && v.len >= k_len * w);
        let rows = t * shape.heads;
        if k_len == 0 {
            return (
                self.alloc(rows * shape.head_dim),
                vec![f32::NEG_INFINITY; rows],
            );
        }
        let (kb, vb) = (self.to_bf16(k), self.to_bf16(v));
        let (kb, vb) = (kb.slice(0..k_len * w), vb.slice(0..k_len * w));
        let (out, lse) = self.attention_launch(q, t, q_pos0, &kb, &vb, k_pos0, k_len, shape, false);
        (out, self.download(&lse))
    }

    /// The log-sum-exp merge of partials on the device (`attention_merge_splits` over the
    /// stacked parts); the merged log-sum-exp, a value per (query, head), on the host.
    fn attention_merge(
        &self,
        parts: &[(GpuBuf, Vec<f32>)],
        t: usize,
        shape: AttentionShape,
    ) -> (GpuBuf, Vec<f32>) {
        let rows = t * shape.heads;
        let d = shape.head_dim;
        let mut stacked = self.alloc(parts.len() * rows * d);
        if let Some(o) = stacked.data.as_mut() {
            for (z, (part, _)) in parts.iter().enumerate() {
                assert_eq!(part.len, rows * d, "a partial of another shape");
                self.copy_into(o, z * rows * d, part);
            }
        }
        let lses: Vec<f32> = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
        assert_eq!(
            lses.len(),
            parts.len() * rows,
            "log-sum-exps of another shape"
        );
        let lse = GpuBuf {
            data: Some(self.floats(&lses)),
            len: lses.len(),
        };
        let merged = self.merge_splits(&stacked, &lse, parts.len(), rows, d);
        (merged, crate::partial::merge_lse(&lses, parts.len(), rows))
    }

    /// One launch of `attention_decode_tc` for the whole batch (pointers to every sequence's
    /// caches), keys split across thread blocks by the longest context and merged.
    fn attention_decode(
        &self,
        q: &GpuBuf,
        caches: &[(&GpuCache, &GpuCache)],
        positions: &[usize],
        shape: AttentionShape,
    ) -> GpuBuf {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let batch = caches.len();
        assert_eq!(positions.len(), batch);
        assert_eq!(q.len, batch * heads * d);
        if batch == 0 || !tensor_core_dim(d) {
            return crate::attention_decode_each(self, q, caches, positions, shape);
        }
        let w = kv_heads * d;
        assert!(
            batch <= 65535,
            "attention_decode: at most 65,535 sequences per call"
        );
        let mut kptrs = Vec::with_capacity(batch);
        let mut vptrs = Vec::with_capacity(batch);
        // The guards record each cache's use on the stream when dropped: after the launch.
        let mut _cache_guards = Vec::with_capacity(2 * batch);
        for ((k, v), &pos) in caches.iter().zip(positions) {
            assert!(k.len >= (pos + 1) * w && v.len >= (pos + 1) * w);
            let (Some(kd), Some(vd)) = (k.data.as_ref(), v.data.as_ref()) else {
                unreachable!("a cache of at least one row has device memory")
            };
            for (ptrs, (p, g)) in [
                (&mut kptrs, kd.device_ptr(&self.stream)),
                (&mut vptrs, vd.device_ptr(&self.stream)),
            ] {
                ptrs.push(p);
                _cache_guards.push(g);
            }
        }
        let lens: Vec<i32> = positions.iter().map(|&p| (p + 1) as i32).collect();
        let longest = positions.iter().max().map_or(1, |&p| p + 1);
        // gridDim.z = batch × splits stays within CUDA's 65,535.
        let splits = (longest / ATTENTION_SPLIT_KEYS)
            .clamp(1, ATTENTION_MAX_SPLITS)
            .min(65535 / batch);
        let mut out = self.alloc(splits * batch * heads * d);
        let mut lse = self.alloc(splits * batch * heads);
        let (kp, vp, ln) = (
            self.stream
                .clone_htod(&kptrs)
                .unwrap_or_else(|e| fail("upload", e)),
            self.stream
                .clone_htod(&vptrs)
                .unwrap_or_else(|e| fail("upload", e)),
            self.stream
                .clone_htod(&lens)
                .unwrap_or_else(|e| fail("upload", e)),
        );
        if let (Some(od), Some(ld), Some(qd)) =
            (out.data.as_mut(), lse.data.as_mut(), q.data.as_ref())
        {
            let (bi, hi, kvi, di, si) = (
                batch as i32,
                heads as i32,
                kv_heads as i32,
                d as i32,
                splits as i32,
            );
            let smem = tc_smem(d);
            self.allow_smem("attention_decode_tc", smem);
            let mut b = self.stream.launch_builder(self.f("attention_decode_tc"));
            b.arg(qd)
                .arg(&kp)
                .arg(&vp)
                .arg(&ln)
                .arg(&mut *od)
                .arg(&mut *ld)
                .arg(&bi)
                .arg(&hi)
                .arg(&kvi)
                .arg(&di)
                .arg(&si);
            let cfg = LaunchConfig {
                grid_dim: (1, heads as u32, (batch * splits) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem,
            };
            // SAFETY: q is [batch, heads·d]; each pointer is a live bf16 cache of at least lens[s]
            // rows of kv_heads·d, borrowed for this call (frees are stream-ordered); out and lse
            // hold `splits` parts of [batch·heads, d] and [batch·heads]; the shared memory asked
            // for is allowed.
            unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("attention_decode_tc", e));
        }
        if splits == 1 {
            return out;
        }
        self.merge_splits(&out, &lse, splits, batch * heads, d)
    }

    fn route(&self, logits: &GpuBuf, rows: usize, experts: usize, top_k: usize) -> Routing {
        assert_eq!(logits.len, rows * experts);
        assert!(
            top_k <= ROUTE_MAX_TOP_K,
            "route_topk takes top_k up to {ROUTE_MAX_TOP_K}, got {top_k}"
        );
        if rows == 0 {
            return Routing {
                top_k,
                experts: Vec::new(),
                weights: Vec::new(),
            };
        }
        let mut ed = self
            .stream
            .alloc_zeros::<u32>(rows * top_k)
            .unwrap_or_else(|e| fail("alloc", e));
        let mut wd = self
            .stream
            .alloc_zeros::<f32>(rows * top_k)
            .unwrap_or_else(|e| fail("alloc", e));
        if let Some(ld) = logits.data.as_ref() {
            let (r, e, k) = (rows as i32, experts as i32, top_k as i32);
            let mut b = self.stream.launch_builder(self.f("route_topk"));
            b.arg(ld).arg(&mut ed).arg(&mut wd).arg(&r).arg(&e).arg(&k);
            // SAFETY: logits hold rows·experts values, ids and weights rows·top_k; one thread per row.
            unsafe { b.launch(grid(rows, 128)) }.unwrap_or_else(|e| fail("route_topk", e));
        }
        Routing {
            top_k,
            experts: self
                .stream
                .clone_dtoh(&ed)
                .unwrap_or_else(|e| fail("download", e)),
            weights: self
                .stream
                .clone_dtoh(&wd)
                .unwrap_or_else(|e| fail("download", e)),
        }
    }
}
