// Runs Ringbolt's CUDA kernels (the kernels/cuda sources themselves) on the CPU emulation of
// include/rb_emu.h against plain double-precision references, with launch shapes as
// kernels/src/cuda_backend.rs makes them. Tolerances: kernels that compute in f32 within 1e-4
// of the largest reference value; tensor-core kernels, whose operands are rounded to bf16
// (8 significant bits), within 1e-2 (the bound kernels/tests/cuda.rs uses on a GPU).
//
// Build and run: scripts/emulate-kernels.sh (g++ ≥ 12, C++20). Exit status 1 if any check fails.
#include "../cuda/attention.cu"
#include "../cuda/elementwise.cu"
#include "../cuda/lightning.cu"
#include "../cuda/rope.cu"
#include "../cuda/route.cu"
#include "../cuda/w8a16.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

namespace {

int failures = 0;
std::mt19937 rng(20261129);

std::vector<float> random(size_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    return v;
}

void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
           double tol) {
    double max = 1e-30, err = 0.0;
    for (double w : want) max = std::max(max, std::abs(w));
    bool finite = got.size() == want.size();
    for (size_t i = 0; finite && i < got.size(); ++i) {
        if (!std::isfinite(got[i])) finite = false;
        err = std::max(err, std::abs((double)got[i] - want[i]));
    }
    const double rel = err / max;
    const bool ok = finite && rel <= tol;
    if (!ok) ++failures;
    std::printf("%-58s %s  error %.2e of max %.2e (tolerance %.0e)%s\n", what.c_str(),
                ok ? "ok  " : "FAIL", rel, max, tol, finite ? "" : "  [size or non-finite]");
}

constexpr size_t PASS_TOKENS = 2048;  // LIGHTNING_PASS_TOKENS
constexpr size_t TC_BLOCK = 64;        // LIGHTNING_TC_BLOCK

unsigned tc_smem(int d) { return 2 * 64 * (d + 8) * 2 + d * (64 + 8) * 2; }

// ---- lightning ----

struct Lightning {
    int t, heads, d;
    std::vector<float> qkv, lam, state;
};

Lightning lightning_case(int t, int heads, int d) {
    Lightning c{t, heads, d, random((size_t)t * heads * 3 * d, 0.5f), {},
                random((size_t)heads * d * d, 0.3f)};
    std::uniform_real_distribution<float> u(0.01f, 0.6f);
    for (int h = 0; h < heads; ++h) c.lam.push_back(u(rng));
    return c;
}

// S ← e^{−λ} S + kᵀv, o = q S, token by token. Returns (outputs, final states).
std::pair<std::vector<double>, std::vector<double>> lightning_ref(const Lightning& c) {
    const int d = c.d;
    std::vector<double> out((size_t)c.t * c.heads * d), st(c.state.begin(), c.state.end());
    for (int h = 0; h < c.heads; ++h) {
        double* S = st.data() + (size_t)h * d * d;
        const double g = std::exp(-(double)c.lam[h]);
        for (int i = 0; i < c.t; ++i) {
            const float* base = c.qkv.data() + (size_t)i * c.heads * 3 * d + (size_t)h * 3 * d;
            for (int r = 0; r < d; ++r)
                for (int col = 0; col < d; ++col)
                    S[r * d + col] = g * S[r * d + col] + (double)base[d + r] * base[2 * d + col];
            for (int col = 0; col < d; ++col) {
                double acc = 0.0;
                for (int r = 0; r < d; ++r) acc += (double)base[r] * S[r * d + col];
                out[(size_t)i * c.heads * d + (size_t)h * d + col] = acc;
            }
        }
    }
    return {out, st};
}

// As CudaBackend::lightning_prefill_tc, in passes of `pass` tokens.
void lightning_tc(const Lightning& c, size_t pass) {
    const int t = c.t, heads = c.heads, d = c.d;
    std::vector<float> out((size_t)t * heads * d, NAN), state = c.state;
    const size_t max_blocks = (std::min((size_t)t, pass) + TC_BLOCK - 1) / TC_BLOCK;
    const size_t scratch = (size_t)heads * max_blocks * d * d;
    std::vector<float> kv(scratch, NAN);
    std::vector<__nv_bfloat16> p_hi(scratch, {0xffff}), p_lo(scratch, {0xffff});
    const size_t row_in = (size_t)heads * 3 * d, row_out = (size_t)heads * d;
    for (size_t p0 = 0; p0 < (size_t)t;) {
        const size_t tp = std::min((size_t)t - p0, pass);
        const int nb = (int)((tp + TC_BLOCK - 1) / TC_BLOCK), ti = (int)tp;
        const float* qv = c.qkv.data() + p0 * row_in;
        float* ov = out.data() + p0 * row_out;
        rb_launch({(unsigned)heads, (unsigned)nb, 1}, {256, 1, 1}, 0, [&] {
            lightning_block_kv(qv, kv.data(), c.lam.data(), ti, heads, d);
        });
        rb_launch({(unsigned)((d * d + 255) / 256), (unsigned)heads, 1}, {256, 1, 1}, 0, [&] {
            lightning_scan(kv.data(), p_hi.data(), p_lo.data(), state.data(), c.lam.data(), ti,
                           nb, d);
        });
        rb_launch({(unsigned)heads, (unsigned)nb, 1}, {128, 1, 1}, tc_smem(d), [&] {
            lightning_block_out(qv, ov, p_hi.data(), p_lo.data(), c.lam.data(), ti, heads, d);
        });
        p0 += tp;
    }
    auto [want_out, want_state] = lightning_ref(c);
    const std::string name = "lightning tensor cores t=" + std::to_string(t) +
                             " heads=" + std::to_string(heads) + " d=" + std::to_string(d) +
                             " pass=" + std::to_string(pass);
    check(name + ": out", out, want_out, 1e-2);
    check(name + ": state", state, want_state, 1e-2);
}

// As CudaBackend launches lightning_fused: one pass, grid (heads, ceil(d / 64)).
unsigned fused_smem(int d) {
    return (2 * 64 * (d + 8) + d * (64 + 8) + 64 * (64 + 8) + 2 * 64 * (d + 8)) * 2;
}

void lightning_fused_check(const Lightning& c) {
    std::vector<float> out((size_t)c.t * c.heads * c.d, NAN), state = c.state;
    rb_launch({(unsigned)c.heads, (unsigned)((c.d + 63) / 64), 1}, {128, 1, 1}, fused_smem(c.d),
              [&] {
                  lightning_fused(c.qkv.data(), out.data(), state.data(), c.lam.data(), c.t,
                                  c.heads, c.d);
              });
    auto [want_out, want_state] = lightning_ref(c);
    const std::string name = "lightning_fused t=" + std::to_string(c.t) +
                             " heads=" + std::to_string(c.heads) + " d=" + std::to_string(c.d);
    check(name + ": out", out, want_out, 1e-2);
    check(name + ": state", state, want_state, 1e-2);
}

void lightning_scalar(const Lightning& c) {
    std::vector<float> out((size_t)c.t * c.heads * c.d, NAN), state = c.state;
    rb_launch({(unsigned)c.heads, 1, 1}, {256, 1, 1}, 0, [&] {
        lightning_prefill(c.qkv.data(), out.data(), state.data(), c.lam.data(), c.t, c.heads, c.d);
    });
    auto [want_out, want_state] = lightning_ref(c);
    const std::string name = "lightning_prefill (scalar) t=" + std::to_string(c.t) +
                             " d=" + std::to_string(c.d);
    check(name + ": out", out, want_out, 1e-4);
    check(name + ": state", state, want_state, 1e-4);
}

// Batched decode: sequence s continues from its own state.
void lightning_decode_batch(int batch, int heads, int d) {
    std::vector<Lightning> seqs;
    for (int s = 0; s < batch; ++s) seqs.push_back(lightning_case(1, heads, d));
    for (int s = 1; s < batch; ++s) seqs[s].lam = seqs[0].lam;
    std::vector<float> qkv, out((size_t)batch * heads * d, NAN);
    std::vector<std::vector<float>> states;
    std::vector<unsigned long long> ptrs;
    for (auto& s : seqs) {
        qkv.insert(qkv.end(), s.qkv.begin(), s.qkv.end());
        states.push_back(s.state);
    }
    for (auto& st : states) ptrs.push_back((unsigned long long)(uintptr_t)st.data());
    rb_launch({(unsigned)heads, (unsigned)batch, 1}, {(unsigned)d, 1, 1}, 0, [&] {
        lightning_decode(qkv.data(), out.data(), ptrs.data(), seqs[0].lam.data(), heads, d);
    });
    std::vector<float> got_state;
    std::vector<double> want_out, want_state;
    for (int s = 0; s < batch; ++s) {
        auto [o, st] = lightning_ref(seqs[s]);
        want_out.insert(want_out.end(), o.begin(), o.end());
        want_state.insert(want_state.end(), st.begin(), st.end());
        got_state.insert(got_state.end(), states[s].begin(), states[s].end());
    }
    const std::string name = "lightning_decode batch=" + std::to_string(batch) +
                             " d=" + std::to_string(d);
    check(name + ": out", out, want_out, 1e-4);
    check(name + ": states", got_state, want_state, 1e-4);
}

// ---- softmax attention ----

struct Attn {
    int t, heads, kv_heads, d;
    long long pos0;
    // k, v: [pos0 + t, kv_heads·d], values that bf16 holds exactly (the KV cache is bf16), and
    // the same as bf16 for the kernels.
    std::vector<float> q, k, v;
    std::vector<__nv_bfloat16> kb, vb;
};

// Rounds `x` to bf16 in place and returns the bf16 copy.
std::vector<__nv_bfloat16> to_bf16(std::vector<float>& x) {
    std::vector<__nv_bfloat16> b;
    for (auto& v : x) {
        b.push_back(__float2bfloat16(v));
        v = __bfloat162float(b.back());
    }
    return b;
}

Attn attn_case(int t, int heads, int kv_heads, int d, long long pos0) {
    const size_t n = (size_t)(pos0 + t);
    Attn c{t, heads, kv_heads, d, pos0, random((size_t)t * heads * d, 1.0f),
           random(n * kv_heads * d, 1.0f), random(n * kv_heads * d, 1.0f), {}, {}};
    c.kb = to_bf16(c.k);
    c.vb = to_bf16(c.v);
    return c;
}

// Output and log-sum-exp over keys [k0, k1) (absolute positions), causal.
std::pair<std::vector<double>, std::vector<double>> attn_ref(const Attn& c, long long k0,
                                                             long long k1) {
    const int d = c.d;
    std::vector<double> out((size_t)c.t * c.heads * d), lse((size_t)c.t * c.heads);
    const double scale = 1.0 / std::sqrt((double)d);
    for (int i = 0; i < c.t; ++i)
        for (int h = 0; h < c.heads; ++h) {
            const int kvh = h / (c.heads / c.kv_heads);
            const float* q = c.q.data() + (size_t)i * c.heads * d + (size_t)h * d;
            const long long end = std::min(k1, c.pos0 + i + 1);
            std::vector<double> s;
            double m = -INFINITY;
            for (long long j = k0; j < end; ++j) {
                const float* k = c.k.data() + (size_t)j * c.kv_heads * d + (size_t)kvh * d;
                double x = 0.0;
                for (int e = 0; e < d; ++e) x += (double)q[e] * k[e];
                s.push_back(x * scale);
                m = std::max(m, x * scale);
            }
            double z = 0.0;
            for (double x : s) z += std::exp(x - m);
            double* o = out.data() + (size_t)i * c.heads * d + (size_t)h * d;
            for (size_t n = 0; n < s.size(); ++n) {
                const float* v = c.v.data() + (size_t)(k0 + n) * c.kv_heads * d + (size_t)kvh * d;
                const double w = std::exp(s[n] - m) / z;
                for (int e = 0; e < d; ++e) o[e] += w * v[e];
            }
            lse[(size_t)i * c.heads + h] = s.empty() ? -INFINITY : m + std::log(z);
        }
    return {out, lse};
}

void check_lse(const std::string& what, const std::vector<float>& got,
               const std::vector<double>& want, double tol) {
    std::vector<double> w;
    std::vector<float> g;
    for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
        if (std::isinf(want[i])) {
            if (!(std::isinf(got[i]) && got[i] < 0)) {
                ++failures;
                std::printf("%-58s FAIL  row %zu: %g where no key is visible\n", what.c_str(), i,
                            got[i]);
                return;
            }
            continue;
        }
        w.push_back(want[i]);
        g.push_back(got[i]);
    }
    check(what, g, w, tol);
}

// As CudaBackend::attention with the tensor-core kernel; `splits` > 1 splits the keys over
// thread blocks and merges them with attention_merge_splits.
void attention_tensor_cores(const Attn& c, int splits) {
    const int t = c.t, heads = c.heads, d = c.d;
    const int nkeys = (int)(c.pos0 + t);
    std::vector<float> out((size_t)splits * t * heads * d, NAN), lse((size_t)splits * t * heads, NAN);
    rb_launch({(unsigned)((t + 63) / 64), (unsigned)heads, (unsigned)splits}, {128, 1, 1},
              tc_smem(d), [&] {
                  attention_tc(c.q.data(), c.kb.data(), c.vb.data(), out.data(), lse.data(), t,
                               heads, c.kv_heads, d, c.pos0, 0, nkeys);
              });
    const std::string name = "attention_tc t=" + std::to_string(t) + " pos0=" +
                             std::to_string(c.pos0) + " heads=" + std::to_string(heads) + "/" +
                             std::to_string(c.kv_heads) + " d=" + std::to_string(d) +
                             " splits=" + std::to_string(splits);
    auto [want, want_lse] = attn_ref(c, 0, nkeys);
    if (splits == 1) {
        check(name + ": out", out, want, 1e-2);
        check_lse(name + ": lse", lse, want_lse, 1e-2);
        return;
    }
    // Each split's partial result against the reference over its keys.
    const int per = (nkeys + splits - 1) / splits;
    for (int z = 0; z < splits; ++z) {
        const long long beg = std::min(nkeys, z * per), end = std::min(nkeys, (z + 1) * per);
        auto [pw, pl] = attn_ref(c, beg, end);
        const size_t n = (size_t)t * heads * d, m = (size_t)t * heads;
        std::vector<float> po(out.begin() + z * n, out.begin() + (z + 1) * n);
        std::vector<float> plse(lse.begin() + z * m, lse.begin() + (z + 1) * m);
        check(name + ": part " + std::to_string(z), po, pw, 1e-2);
        check_lse(name + ": part " + std::to_string(z) + " lse", plse, pl, 1e-2);
    }
    std::vector<float> merged((size_t)t * heads * d, NAN);
    const int rows = t * heads, n = rows * d;
    rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
        attention_merge_splits(out.data(), lse.data(), merged.data(), splits, rows, d);
    });
    check(name + ": merged", merged, want, 1e-2);
}

// As CudaBackend::attention_decode: one query per sequence over its own cache, one launch for
// the batch, keys split `splits` ways and merged.
void attention_decode_batch(const std::vector<int>& lens, int heads, int kv_heads, int d,
                            int splits) {
    const int batch = (int)lens.size();
    std::vector<Attn> seqs;
    std::vector<float> q;
    std::vector<unsigned long long> kptrs, vptrs;
    for (int n : lens) {
        seqs.push_back(attn_case(1, heads, kv_heads, d, n - 1));
        q.insert(q.end(), seqs.back().q.begin(), seqs.back().q.end());
    }
    for (auto& c : seqs) {
        kptrs.push_back((unsigned long long)(uintptr_t)c.kb.data());
        vptrs.push_back((unsigned long long)(uintptr_t)c.vb.data());
    }
    const size_t rows = (size_t)batch * heads;
    std::vector<float> out(splits * rows * d, NAN), lse(splits * rows, NAN);
    rb_launch({1, (unsigned)heads, (unsigned)(batch * splits)}, {128, 1, 1}, tc_smem(d), [&] {
        attention_decode_tc(q.data(), kptrs.data(), vptrs.data(), lens.data(), out.data(),
                            lse.data(), batch, heads, kv_heads, d, splits);
    });
    std::vector<float> merged(rows * d, NAN);
    if (splits > 1) {
        rb_launch({(unsigned)((rows * d + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
            attention_merge_splits(out.data(), lse.data(), merged.data(), splits, (int)rows, d);
        });
    } else {
        merged.assign(out.begin(), out.end());
    }
    std::vector<double> want;
    for (auto& c : seqs) {
        auto [o, l] = attn_ref(c, 0, c.pos0 + 1);
        want.insert(want.end(), o.begin(), o.end());
    }
    std::string name = "attention_decode_tc batch=" + std::to_string(batch) + " lens=";
    for (int n : lens) name += std::to_string(n) + ",";
    name += " splits=" + std::to_string(splits);
    check(name, merged, want, 1e-2);
}

void attention_scalar(const Attn& c) {
    const int t = c.t, heads = c.heads, d = c.d;
    const int nkeys = (int)(c.pos0 + t);
    const std::string name = "attention (scalar) t=" + std::to_string(t) + " pos0=" +
                             std::to_string(c.pos0) + " d=" + std::to_string(d);
    auto run = [&](long long k0, long long k1, std::vector<float>& out, std::vector<float>& lse) {
        out.assign((size_t)t * heads * d, NAN);
        lse.assign((size_t)t * heads, NAN);
        const unsigned warps = (unsigned)(t * heads * 32);
        rb_launch({(warps + 127) / 128, 1, 1}, {128, 1, 1}, 0, [&] {
            attention(c.q.data(), c.kb.data() + (size_t)k0 * c.kv_heads * d,
                      c.vb.data() + (size_t)k0 * c.kv_heads * d, out.data(), lse.data(), t, heads,
                      c.kv_heads, d, c.pos0, k0, (int)(k1 - k0));
        });
    };
    std::vector<float> out, lse;
    run(0, nkeys, out, lse);
    auto [want, want_lse] = attn_ref(c, 0, nkeys);
    check(name + ": out", out, want, 1e-4);
    check_lse(name + ": lse", lse, want_lse, 1e-4);
    // Ring-attention form: two key blocks merged.
    const long long cut = nkeys / 3;
    std::vector<float> o2, l2;
    run(0, cut, out, lse);
    run(cut, nkeys, o2, l2);
    rb_launch({(unsigned)((t * heads + 127) / 128), 1, 1}, {128, 1, 1}, 0, [&] {
        attention_merge(out.data(), lse.data(), o2.data(), l2.data(), t, heads, d);
    });
    check(name + ": two key blocks merged", out, want, 1e-4);
    check_lse(name + ": merged lse", lse, want_lse, 1e-4);
}

// ---- int8 weight-only GEMM (quantized experts) ----

// linear_w8a16 as the backend launches it: grid (ceil(n/64), ceil(m/64), batch), 128 threads.
// Every bf16 × int8 product is exact in f32 (at most 8 + 7 significant bits), so the kernel's
// only rounding is f32 accumulation, as in the f32 kernels: tolerance 1e-4. With `misaligned`,
// every expert's weights start one byte into their buffer (the loader's element-wise path even
// where k is a multiple of 16). y is NaN before the launch (an output never written shows) and
// has a guard of 64 rows past the last expert's that must stay untouched.
void w8a16_check(int m, int k, int n, int batch, bool misaligned = false) {
    auto xf = random((size_t)batch * m * k, 2.0f);
    const std::vector<__nv_bfloat16> x = to_bf16(xf);  // xf now holds the bf16 values
    std::uniform_int_distribution<int> qd(-127, 127);
    std::uniform_real_distribution<float> sd(0.001f, 0.02f);
    const int off = misaligned ? 1 : 0;
    std::vector<std::vector<signed char>> wq(batch);
    std::vector<std::vector<float>> sc(batch);
    std::vector<const signed char*> wp;
    std::vector<const float*> sp;
    for (int z = 0; z < batch; ++z) {
        wq[z].resize((size_t)n * k + off);
        for (auto& v : wq[z]) v = (signed char)qd(rng);
        for (int j = 0; j < n; ++j) sc[z].push_back(sd(rng));
        wp.push_back(wq[z].data() + off);
        sp.push_back(sc[z].data());
    }
    const size_t valid = (size_t)batch * m * n, guard = (size_t)64 * n + 64;
    std::vector<float> y(valid + guard, NAN);
    const float sentinel = -12345.0f;
    std::fill(y.begin() + valid, y.end(), sentinel);
    rb_launch({(unsigned)((n + 63) / 64), (unsigned)((m + 63) / 64), (unsigned)batch},
              {128, 1, 1}, 0,
              [&] { linear_w8a16(x.data(), wp.data(), sp.data(), y.data(), m, k, n); });
    std::vector<double> want(valid);
    for (int z = 0; z < batch; ++z)
        for (int r = 0; r < m; ++r)
            for (int j = 0; j < n; ++j) {
                double acc = 0.0;
                for (int i = 0; i < k; ++i)
                    acc += (double)xf[((size_t)z * m + r) * k + i] * wp[z][(size_t)j * k + i];
                want[((size_t)z * m + r) * n + j] = sc[z][j] * acc;
            }
    const bool guard_ok = std::all_of(y.begin() + valid, y.end(),
                                      [&](float v) { return v == sentinel; });
    y.resize(valid);
    const std::string name = "linear_w8a16 m=" + std::to_string(m) + " k=" + std::to_string(k) +
                             " n=" + std::to_string(n) + " batch=" + std::to_string(batch) +
                             (misaligned ? " (weights misaligned)" : "");
    check(name, y, want, 1e-4);
    if (!guard_ok) {
        ++failures;
        std::printf("%-58s FAIL  wrote past the last row\n", name.c_str());
    }
}

// ---- the rest ----

void rms_norm_check(int rows, int width) {
    auto x = random((size_t)rows * width, 2.0f), g = random(width, 1.0f);
    const float eps = 1e-5f;
    std::vector<float> y(x.size(), NAN);
    rb_launch({(unsigned)rows, 1, 1}, {256, 1, 1}, 0,
              [&] { rms_norm(x.data(), g.data(), y.data(), width, eps); });
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; ++r) {
        double ms = 0.0;
        for (int i = 0; i < width; ++i) ms += (double)x[r * width + i] * x[r * width + i];
        const double inv = 1.0 / std::sqrt(ms / width + eps);
        for (int i = 0; i < width; ++i) want[r * width + i] = g[i] * x[r * width + i] * inv;
    }
    check("rms_norm rows=" + std::to_string(rows) + " width=" + std::to_string(width), y, want,
          1e-5);
}

// The vision tower's row and element kernels: LayerNorm (rows far from zero mean, where a
// one-pass variance would cancel), a bias on every row, exact GELU.
void vision_elementwise_check(int rows, int width) {
    auto x = random((size_t)rows * width, 2.0f), g = random(width, 1.0f), b = random(width, 1.0f);
    for (auto& v : x) v += 300.0f;
    const float eps = 1e-5f;
    std::vector<float> y(x.size(), NAN);
    rb_launch({(unsigned)rows, 1, 1}, {256, 1, 1}, 0,
              [&] { layer_norm(x.data(), g.data(), b.data(), y.data(), width, eps); });
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; ++r) {
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < width; ++i) mean += x[r * width + i];
        mean /= width;
        for (int i = 0; i < width; ++i) var += std::pow(x[r * width + i] - mean, 2);
        const double inv = 1.0 / std::sqrt(var / width + eps);
        for (int i = 0; i < width; ++i)
            want[r * width + i] = (x[r * width + i] - mean) * inv * g[i] + b[i];
    }
    const std::string shape = " rows=" + std::to_string(rows) + " width=" + std::to_string(width);
    check("layer_norm" + shape, y, want, 1e-4);
    const size_t n = x.size();
    auto grid1 = dim3{(unsigned)((n + 255) / 256), 1, 1};
    std::vector<float> s = x;
    rb_launch(grid1, {256, 1, 1}, 0, [&] { add_bias(s.data(), b.data(), n, width); });
    for (size_t i = 0; i < n; ++i) want[i] = (double)x[i] + b[i % width];
    check("add_bias" + shape, s, want, 1e-6);
    s = random(n, 4.0f);
    std::vector<float> in = s;
    rb_launch(grid1, {256, 1, 1}, 0, [&] { gelu_inplace(s.data(), n); });
    for (size_t i = 0; i < n; ++i) want[i] = 0.5 * in[i] * (1.0 + std::erf(in[i] / std::sqrt(2.0)));
    check("gelu_inplace" + shape, s, want, 1e-6);
}

void route_check(int rows, int experts, int top_k) {
    auto logits = random((size_t)rows * experts, 3.0f);
    std::vector<unsigned> ids((size_t)rows * top_k, 999);
    std::vector<float> w((size_t)rows * top_k, NAN);
    rb_launch({(unsigned)((rows + 127) / 128), 1, 1}, {128, 1, 1}, 0, [&] {
        route_topk(logits.data(), ids.data(), w.data(), rows, experts, top_k);
    });
    std::vector<double> want_w;
    std::vector<float> got_w;
    bool same_ids = true;
    for (int r = 0; r < rows; ++r) {
        const float* l = logits.data() + (size_t)r * experts;
        std::vector<int> order(experts);
        for (int e = 0; e < experts; ++e) order[e] = e;
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
        double m = l[order[0]], sum = 0.0;
        for (int k = 0; k < top_k; ++k) sum += std::exp(l[order[k]] - m);
        for (int k = 0; k < top_k; ++k) {
            same_ids &= ids[(size_t)r * top_k + k] == (unsigned)order[k];
            want_w.push_back(std::exp(l[order[k]] - m) / sum);
            got_w.push_back(w[(size_t)r * top_k + k]);
        }
    }
    if (!same_ids) {
        ++failures;
        std::printf("%-58s FAIL  experts chosen differ\n", "route_topk");
    }
    check("route_topk rows=" + std::to_string(rows) + " experts=" + std::to_string(experts) +
              " k=" + std::to_string(top_k),
          got_w, want_w, 1e-5);
}

void rope_check(int t, int heads, int head_dim, int rotary_dim, long long pos0) {
    const int half = rotary_dim / 2;
    auto x = random((size_t)t * heads * head_dim, 1.0f);
    std::vector<float> inv(half);
    for (int j = 0; j < half; ++j) inv[j] = (float)(1.0 / std::pow(10000.0, 2.0 * j / rotary_dim));
    std::vector<double> want(x.begin(), x.end());
    for (int r = 0; r < t; ++r)
        for (int h = 0; h < heads; ++h)
            for (int j = 0; j < half; ++j) {
                const float a = (float)(pos0 + r) * inv[j];
                const size_t at = ((size_t)r * heads + h) * head_dim;
                const double u = x[at + j], v = x[at + j + half];
                want[at + j] = u * std::cos((double)a) - v * std::sin((double)a);
                want[at + j + half] = v * std::cos((double)a) + u * std::sin((double)a);
            }
    const int n = t * heads * half;
    rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0,
              [&] { rope_inplace(x.data(), inv.data(), t, heads, head_dim, half, pos0); });
    check("rope_inplace t=" + std::to_string(t) + " rotary_dim=" + std::to_string(rotary_dim) +
              " pos0=" + std::to_string(pos0),
          x, want, 1e-5);
}

// A decode step's RoPE: row r at positions[r], equal to rope_inplace on that row alone.
void rope_rows_check(int heads, int head_dim, int rotary_dim) {
    const int half = rotary_dim / 2;
    const std::vector<long long> positions = {0, 7, 3, 4096, 1000003};
    const int t = (int)positions.size(), w = heads * head_dim;
    auto x = random((size_t)t * w, 1.0f);
    std::vector<float> inv(half);
    for (int j = 0; j < half; ++j) inv[j] = (float)(1.0 / std::pow(10000.0, 2.0 * j / rotary_dim));
    std::vector<float> want = x;
    for (int r = 0; r < t; ++r) {
        const int n = heads * half;
        rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
            rope_inplace(want.data() + (size_t)r * w, inv.data(), 1, heads, head_dim, half,
                         positions[r]);
        });
    }
    const int n = t * heads * half;
    rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
        rope_rows(x.data(), inv.data(), positions.data(), t, heads, head_dim, half);
    });
    std::printf("%-58s %s\n", "rope_rows (per-row positions)",
                x == want ? "ok    exact: rope_inplace row by row" : "FAIL  differs from rope_inplace row by row");
    if (x != want) ++failures;
}

// A decode step's keys appended to each sequence's bf16 cache through a pointer array.
void cache_append_rows_check(int count, int width) {
    auto src = random((size_t)count * width, 3.0f);
    std::vector<std::vector<__nv_bfloat16>> caches;
    std::vector<size_t> lens;
    for (int r = 0; r < count; ++r) {
        lens.push_back((size_t)(r * 5 % 7) * width);  // rows already held, some none
        caches.emplace_back(lens.back() + width + 3, __float2bfloat16_rn(-7.0f));
    }
    std::vector<unsigned long long> dst;
    for (int r = 0; r < count; ++r)
        dst.push_back((unsigned long long)(uintptr_t)(caches[r].data() + lens[r]));
    const int n = count * width;
    rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0,
              [&] { cache_append_rows(src.data(), dst.data(), count, width); });
    bool ok = true;
    for (int r = 0; r < count; ++r)
        for (size_t i = 0; i < caches[r].size(); ++i) {
            const float got = __bfloat162float(caches[r][i]);
            const bool row = i >= lens[r] && i < lens[r] + width;
            const float want = row ? __bfloat162float(__float2bfloat16_rn(
                                         src[(size_t)r * width + (i - lens[r])]))
                                   : -7.0f;
            ok = ok && got == want;
        }
    std::printf("%-58s %s\n", "cache_append_rows",
                ok ? "ok    exact: each row at its cache's end, nothing else touched"
                   : "FAIL  a row landed wrong or something else was written");
    if (!ok) ++failures;
}

void swiglu_scatter_check(int rows, int inter) {
    auto h = random((size_t)rows * 2 * inter, 2.0f);
    std::vector<float> y((size_t)rows * inter, NAN);
    const int n = rows * inter;
    rb_launch({(unsigned)((n + 255) / 256), 1, 1}, {256, 1, 1}, 0,
              [&] { swiglu(h.data(), y.data(), rows, inter); });
    std::vector<double> want((size_t)rows * inter);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < inter; ++c) {
            const double g = h[(size_t)r * 2 * inter + c], u = h[(size_t)r * 2 * inter + inter + c];
            want[(size_t)r * inter + c] = g / (1.0 + std::exp(-g)) * u;
        }
    check("swiglu rows=" + std::to_string(rows) + " inter=" + std::to_string(inter), y, want, 1e-5);
    // Expert unpermute, as the backend plans it (cuda.rs `Unpermute`): destinations once each,
    // every destination's rows in entry order. Destinations repeat (a token routed to several
    // experts); the sum must equal adding the entries one after another, bit for bit.
    std::vector<unsigned> ids;
    for (int r = 0; r < rows; ++r) ids.push_back((unsigned)((r * 7 + 3) % (rows / 2 + 1)));
    auto wts = random(rows, 1.0f);
    std::vector<unsigned> order(rows);
    for (int r = 0; r < rows; ++r) order[r] = (unsigned)r;
    std::stable_sort(order.begin(), order.end(),
                     [&](unsigned a, unsigned b) { return ids[a] < ids[b]; });
    std::vector<unsigned> dst, starts, src;
    std::vector<float> w;
    for (int i = 0; i < rows; ++i) {
        if (i == 0 || ids[order[i]] != ids[order[i - 1]]) {
            dst.push_back(ids[order[i]]);
            starts.push_back((unsigned)i);
        }
        src.push_back(order[i]);
        w.push_back(wts[order[i]]);
    }
    starts.push_back((unsigned)rows);
    std::vector<float> out((size_t)(rows / 2 + 1) * inter, 0.5f), seq = out;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < inter; ++c)
            seq[(size_t)ids[r] * inter + c] += wts[r] * y[(size_t)r * inter + c];
    const int count = (int)dst.size(), m = count * inter;
    rb_launch({(unsigned)((m + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
        scatter_add_rows(out.data(), y.data(), dst.data(), starts.data(), src.data(), w.data(),
                         count, inter);
    });
    bool same = true;
    for (size_t i = 0; i < out.size(); ++i) same = same && out[i] == seq[i];
    std::printf("%-58s %s\n", ("scatter_add_rows rows=" + std::to_string(rows)).c_str(),
                same ? "ok    exact: the sums of adding one row after another"
                     : "FAIL  differs from adding one row after another");
    if (!same) ++failures;
}

// The element-wise kernels, one thread per value (grid(n, 256) as the backend launches them).
void elementwise_check() {
    const size_t n = 1000;
    auto grid1 = [](size_t n) { return dim3{(unsigned)((n + 255) / 256), 1, 1}; };
    auto x = random(n, 4.0f), g = random(n, 4.0f), y0 = random(n, 1.0f);
    std::vector<float> s = x;
    rb_launch(grid1(n), {256, 1, 1}, 0, [&] { silu_inplace(s.data(), n); });
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = x[i] / (1.0 + std::exp(-(double)x[i]));
    check("silu_inplace n=1000", s, want, 1e-6);
    s = x;
    rb_launch(grid1(n), {256, 1, 1}, 0, [&] { sigmoid_gate(s.data(), g.data(), n); });
    for (size_t i = 0; i < n; ++i) want[i] = x[i] / (1.0 + std::exp(-(double)g[i]));
    check("sigmoid_gate n=1000", s, want, 1e-6);
    std::vector<float> y(n, NAN);
    rb_launch(grid1(n), {256, 1, 1}, 0,
              [&] { axpby(0.75f, x.data(), -1.5f, y0.data(), y.data(), n); });
    for (size_t i = 0; i < n; ++i) want[i] = 0.75 * x[i] - 1.5 * y0[i];
    check("axpby n=1000", y, want, 1e-6);
    // bf16 round trip: every value within half an ulp of bf16 (8 significant bits: 2^-8
    // relative at most).
    std::vector<__nv_bfloat16> b(n);
    rb_launch(grid1(n), {256, 1, 1}, 0, [&] { f32_to_bf16(x.data(), b.data(), n); });
    std::fill(y.begin(), y.end(), NAN);
    rb_launch(grid1(n), {256, 1, 1}, 0, [&] { bf16_to_f32(b.data(), y.data(), n); });
    double worst = 0.0;
    for (size_t i = 0; i < n; ++i)
        worst = std::max(worst, std::abs((double)y[i] - x[i]) / std::abs((double)x[i]));
    const bool ok = worst <= std::ldexp(1.0, -8);
    if (!ok) ++failures;
    std::printf("%-58s %s  relative error %.2e (bound 2^-8)\n", "f32_to_bf16 + bf16_to_f32",
                ok ? "ok  " : "FAIL", worst);
    // Row gathers (expert permute, embedding rows from a bf16 table).
    const int width = 40, rows = 12, count = 9;
    auto table = random((size_t)rows * width, 1.0f);
    std::vector<__nv_bfloat16> tb = to_bf16(table);
    std::vector<unsigned> ids;
    for (int i = 0; i < count; ++i) ids.push_back((unsigned)((i * 5 + 2) % rows));
    std::vector<double> rows_want;
    for (unsigned r : ids)
        for (int c = 0; c < width; ++c) rows_want.push_back(table[(size_t)r * width + c]);
    std::vector<float> got((size_t)count * width, NAN);
    rb_launch(grid1(got.size()), {256, 1, 1}, 0,
              [&] { gather_rows(table.data(), ids.data(), got.data(), count, width); });
    check("gather_rows", got, rows_want, 0.0);
    std::fill(got.begin(), got.end(), NAN);
    rb_launch(grid1(got.size()), {256, 1, 1}, 0,
              [&] { gather_rows_bf16(tb.data(), ids.data(), got.data(), count, width); });
    check("gather_rows_bf16", got, rows_want, 0.0);
}

}  // namespace

int main() {
    // Tensor-core lightning prefill: several blocks with a partial last one, two passes (the
    // backend's pass of 2,048 tokens shrunk to 128 so that a pass boundary is crossed), the
    // largest head_dim, and a prompt shorter than one block.
    lightning_tc(lightning_case(150, 2, 32), 128);
    lightning_tc(lightning_case(150, 2, 32), PASS_TOKENS);
    lightning_tc(lightning_case(70, 1, 128), PASS_TOKENS);
    lightning_tc(lightning_case(37, 3, 16), PASS_TOKENS);
    lightning_fused_check(lightning_case(150, 2, 32));
    lightning_fused_check(lightning_case(70, 1, 128));
    lightning_fused_check(lightning_case(37, 3, 16));
    lightning_fused_check(lightning_case(200, 1, 96));
    lightning_fused_check(lightning_case(70, 2, 80));
    lightning_fused_check(lightning_case(100, 2, 112));
    lightning_scalar(lightning_case(45, 2, 24));
    lightning_decode_batch(3, 2, 24);
    // Tensor-core attention: prefill with GQA, a later chunk (queries after cached keys),
    // head_dim 128, and decode with the keys split over blocks then merged.
    attention_tensor_cores(attn_case(100, 4, 2, 64, 0), 1);
    attention_tensor_cores(attn_case(50, 2, 1, 32, 37), 1);
    attention_tensor_cores(attn_case(20, 2, 2, 128, 70), 1);
    attention_tensor_cores(attn_case(3, 4, 1, 128, 297), 4);
    attention_tensor_cores(attn_case(1, 2, 2, 16, 130), 3);
    attention_decode_batch({40, 130, 300, 1}, 4, 2, 64, 3);
    attention_decode_batch({17, 200}, 8, 1, 128, 1);
    attention_scalar(attn_case(20, 4, 2, 40, 5));
    // Int8 weight-only GEMM: decode (m = 1), odd k and n past a tile, exact tiles, m past a
    // tile with k not a multiple of 32, a long k, and misaligned weights.
    w8a16_check(1, 64, 96, 1);
    w8a16_check(37, 70, 130, 2);
    w8a16_check(64, 128, 64, 1);
    w8a16_check(65, 33, 8, 3);
    w8a16_check(3, 512, 200, 1);
    w8a16_check(2, 47, 65, 2);
    w8a16_check(20, 96, 70, 2, true);
    rms_norm_check(3, 96);
    rms_norm_check(2, 1000);
    vision_elementwise_check(3, 96);
    vision_elementwise_check(2, 1000);
    route_check(70, 32, 2);
    rope_check(4, 2, 16, 8, 10);
    rope_rows_check(3, 16, 8);
    cache_append_rows_check(6, 40);
    swiglu_scatter_check(9, 40);
    elementwise_check();
    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all kernel checks passed\n");
    return 0;
}
