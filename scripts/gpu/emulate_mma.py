# Warp-level numpy emulation of the tensor-core kernels in kernels/cuda (lightning_block_kv,
# lightning_scan, lightning_block_out, attention_tc), hand-translated line by line, with the
# mma.m16n8k16 bf16 fragment layouts of the PTX ISA. It checks the kernels' index algebra
# (fragment offsets, transposes, masks, row decays, the online softmax) against plain references
# on a machine without a GPU; it cannot check the hardware itself: kernels/tests/cuda.rs on a GPU
# (scripts/gpu-check.sh) does. Run: python3 scripts/gpu/emulate_mma.py (needs numpy).
import numpy as np
L = np.arange(32); G = L >> 2; Q = L & 3

def bf16(x):
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)

def frag_a(arr, off, ld):
    pair = lambda o: np.stack([arr[o], arr[o + 1]], -1)
    return np.stack([pair(off + G*ld + 2*Q), pair(off + (G+8)*ld + 2*Q),
                     pair(off + G*ld + 2*Q + 8), pair(off + (G+8)*ld + 2*Q + 8)], 1)

def frag_b(arr, off, ld):
    pair = lambda o: np.stack([arr[o], arr[o + 1]], -1)
    return np.stack([pair(off + G*ld + 2*Q), pair(off + G*ld + 2*Q + 8)], 1)

def mma(c, a, b):
    A = np.zeros((16, 16), np.float64); B = np.zeros((16, 8), np.float64)
    for e in range(2):
        A[G, 2*Q+e] = a[:, 0, e]; A[G+8, 2*Q+e] = a[:, 1, e]
        A[G, 2*Q+8+e] = a[:, 2, e]; A[G+8, 2*Q+8+e] = a[:, 3, e]
        B[2*Q+e, G] = b[:, 0, e]; B[2*Q+8+e, G] = b[:, 1, e]
    D = A @ B
    c[:, 0] += D[G, 2*Q]; c[:, 1] += D[G, 2*Q+1]; c[:, 2] += D[G+8, 2*Q]; c[:, 3] += D[G+8, 2*Q+1]

def pack(lo, hi):
    return np.stack([bf16(lo), bf16(hi)], -1)

LB, LT = 64, 72

def load_block(ld, transposed, qkv, start, m, h, heads, d, part, decayed, lam):
    dst = np.zeros(LB * (d if transposed else ld) if not transposed else d * LT, np.float32)
    row = heads * 3 * d
    for j in range(LB):
        for c in range(d):
            v = 0.0
            if j < m:
                v = qkv[(start + j) * row + h * 3 * d + part * d + c]
                if decayed: v *= np.exp(-lam * (m - 1 - j))
            dst[c * LT + j if transposed else j * ld + c] = bf16(v)
    return dst

def block_kv(qkv, lam, t, heads, d, nb):
    kv = np.zeros(heads * nb * d * d, np.float32)
    for h in range(heads):
        for b in range(nb):
            start = b * LB; m = min(LB, t - start)
            kt = load_block(0, True, qkv, start, m, h, heads, d, 1, True, lam[h])
            vt = load_block(0, True, qkv, start, m, h, heads, d, 2, False, 0.0)
            base = (h * nb + b) * d * d
            for mt in range(d // 16):
                a = {kc: frag_a(vt, mt*16*LT + kc*16, LT) for kc in range(LB // 16) if kc*16 < m}
                for nt in range(d // 8):
                    acc = np.zeros((32, 4))
                    for kc in range(LB // 16):
                        if kc * 16 >= m: break
                        mma(acc, a[kc], frag_b(kt, nt*8*LT + kc*16, LT))
                    c = mt*16 + G; r = nt*8 + 2*Q
                    kv[base + c*d + r] = acc[:, 0]; kv[base + c*d + r + 1] = acc[:, 1]
                    kv[base + (c+8)*d + r] = acc[:, 2]; kv[base + (c+8)*d + r + 1] = acc[:, 3]
    return kv

def scan(kv, state, lam, t, nb, heads, d):
    ph = np.zeros_like(kv); pl = np.zeros_like(kv)
    for h in range(heads):
        for e in range(d * d):
            c, r = e // d, e % d
            s = state[h*d*d + r*d + c]
            for b in range(nb):
                at = (h*nb + b)*d*d + e
                hi = bf16(s); ph[at] = hi; pl[at] = bf16(s - hi)
                m = min(LB, t - b*LB)
                s = np.float32(np.exp(-lam[h]*m)) * s + kv[at]
            state[h*d*d + r*d + c] = s
    return ph, pl

def block_out(qkv, out, ph, pl, lam, t, heads, d, nb):
    ld = d + 8
    for h in range(heads):
        for b in range(nb):
            start = b*LB; m = min(LB, t - start)
            qs = load_block(ld, False, qkv, start, m, h, heads, d, 0, False, 0.0)
            ks = load_block(ld, False, qkv, start, m, h, heads, d, 1, False, 0.0)
            vt = load_block(0, True, qkv, start, m, h, heads, d, 2, False, 0.0)
            base = (h*nb + b)*d*d
            for warp in range(4):
                i0 = warp*16; ia = i0 + G; ib = ia + 8
                s = np.zeros((LB//8, 32, 4))
                for c0 in range(0, d, 16):
                    a = frag_a(qs, i0*ld + c0, ld)
                    for nt in range(LB//8):
                        if nt*8 > i0 + 15: break
                        mma(s[nt], a, frag_b(ks, nt*8*ld + c0, ld))
                for nt in range(LB//8):
                    for e in range(4):
                        i = ia if e < 2 else ib; j = nt*8 + 2*Q + (e & 1)
                        s[nt][:, e] = np.where((j <= i) & (i < m), s[nt][:, e]*np.exp(-lam[h]*(i-j)), 0)
                pa = [np.stack([pack(s[2*kc][:,0], s[2*kc][:,1]), pack(s[2*kc][:,2], s[2*kc][:,3]),
                                pack(s[2*kc+1][:,0], s[2*kc+1][:,1]), pack(s[2*kc+1][:,2], s[2*kc+1][:,3])], 1)
                      for kc in range(LB//16)]
                o = np.zeros((d//8, 32, 4))
                for r0 in range(0, d, 16):
                    a = frag_a(qs, i0*ld + r0, ld)
                    for nt in range(d//8):
                        mma(o[nt], a, frag_b(ph, base + nt*8*d + r0, d))
                        mma(o[nt], a, frag_b(pl, base + nt*8*d + r0, d))
                da = np.exp(-lam[h]*(ia+1)); db = np.exp(-lam[h]*(ib+1))
                o[:, :, 0] *= da; o[:, :, 1] *= da; o[:, :, 2] *= db; o[:, :, 3] *= db
                for kc in range(LB//16):
                    if kc*16 > i0 + 15: break
                    for nt in range(d//8):
                        mma(o[nt], pa[kc], frag_b(vt, nt*8*LT + kc*16, LT))
                for nt in range(d//8):
                    c = nt*8 + 2*Q
                    for lane in range(32):
                        if ia[lane] < m:
                            out[(start+ia[lane])*heads*d + h*d + c[lane] + np.arange(2)] = o[nt][lane, 0:2]
                        if ib[lane] < m:
                            out[(start+ib[lane])*heads*d + h*d + c[lane] + np.arange(2)] = o[nt][lane, 2:4]

def ref_lightning(qkv, state, lam, t, heads, d):
    out = np.zeros(t*heads*d); S = state.reshape(heads, d, d).astype(np.float64).copy()
    X = qkv.reshape(t, heads, 3, d)
    for i in range(t):
        for h in range(heads):
            qv, kvv, vv = X[i, h]
            S[h] = np.exp(-lam[h]) * S[h] + np.outer(kvv, vv)
            out[(i*heads + h)*d:(i*heads+h+1)*d] = qv @ S[h]
    return out, S.reshape(-1)

AQ, AK, AT = 64, 64, 72
def attention_tc(q, k, v, t, heads, kvh_n, d, pos0, kpos0, nkeys):
    out = np.zeros(t*heads*d); lse = np.zeros(t*heads)
    ld = d + 8; scale = 1/np.sqrt(d)
    for bx in range((t + AQ - 1)//AQ):
        for h in range(heads):
            q0 = bx*AQ; kvh = h // (heads // kvh_n)
            qs = np.zeros(AQ*ld, np.float32)
            for i in range(AQ):
                for c in range(d):
                    qs[i*ld + c] = bf16(q[(q0+i)*heads*d + h*d + c] if q0+i < t else 0)
            last_q = pos0 + min(q0 + AQ, t) - 1
            kend = max(0, min(nkeys, last_q - kpos0 + 1))
            st = [dict(o=np.zeros((d//8, 32, 4)), m=np.full((2, 32), -np.inf), l=np.zeros((2, 32))) for _ in range(4)]
            for kb in range(0, kend, AK):
                ks = np.zeros(AK*ld, np.float32); vt = np.zeros(d*AT, np.float32)
                for j in range(AK):
                    for c in range(d):
                        kx = vx = 0.0
                        if kb + j < nkeys:
                            at = (kb+j)*kvh_n*d + kvh*d + c; kx = k[at]; vx = v[at]
                        ks[j*ld + c] = bf16(kx); vt[c*AT + j] = bf16(vx)
                for warp in range(4):
                    W = st[warp]; i0 = warp*16; qa = q0 + i0 + G; qb = qa + 8
                    s = np.zeros((AK//8, 32, 4))
                    for c0 in range(0, d, 16):
                        a = frag_a(qs, i0*ld + c0, ld)
                        for nt in range(AK//8):
                            mma(s[nt], a, frag_b(ks, nt*8*ld + c0, ld))
                    mx = np.full((2, 32), -np.inf)
                    for nt in range(AK//8):
                        for e in range(4):
                            i = qa if e < 2 else qb; j = kb + nt*8 + 2*Q + (e & 1)
                            vis = (i < t) & (j < nkeys) & (kpos0 + j <= pos0 + i)
                            s[nt][:, e] = np.where(vis, s[nt][:, e]*scale, -np.inf)
                            mx[e >> 1] = np.maximum(mx[e >> 1], s[nt][:, e])
                    corr = np.ones((2, 32)); sm = np.zeros((2, 32))
                    for r in range(2):
                        # shuffles over the 4 lanes of a group (xor 1, 2)
                        mx[r] = np.maximum(mx[r], mx[r][L ^ 1]); mx[r] = np.maximum(mx[r], mx[r][L ^ 2])
                        mn = np.maximum(W['m'][r], mx[r])
                        with np.errstate(invalid='ignore'):
                            corr[r] = np.where(mn == -np.inf, 1.0, np.exp(W['m'][r] - mn))
                        W['m'][r] = mn
                    for nt in range(AK//8):
                        for e in range(4):
                            mn = W['m'][e >> 1]
                            with np.errstate(invalid='ignore'):
                                p = np.where(mn == -np.inf, 0.0, np.exp(s[nt][:, e] - mn))
                            s[nt][:, e] = p; sm[e >> 1] += p
                    for r in range(2):
                        sm[r] += sm[r][L ^ 1]; sm[r] += sm[r][L ^ 2]
                        W['l'][r] = W['l'][r]*corr[r] + sm[r]
                    o = W['o']
                    o[:, :, 0] *= corr[0]; o[:, :, 1] *= corr[0]; o[:, :, 2] *= corr[1]; o[:, :, 3] *= corr[1]
                    for kc in range(AK//16):
                        pa = np.stack([pack(s[2*kc][:,0], s[2*kc][:,1]), pack(s[2*kc][:,2], s[2*kc][:,3]),
                                       pack(s[2*kc+1][:,0], s[2*kc+1][:,1]), pack(s[2*kc+1][:,2], s[2*kc+1][:,3])], 1)
                        for nt in range(d//8):
                            mma(o[nt], pa, frag_b(vt, nt*8*AT + kc*16, AT))
            for warp in range(4):
                W = st[warp]; i0 = warp*16
                for r in range(2):
                    rows = q0 + i0 + G + 8*r
                    for lane in range(32):
                        i = rows[lane]
                        if i >= t: continue
                        inv = 1/W['l'][r][lane] if W['l'][r][lane] > 0 else 0
                        for nt in range(d//8):
                            c = nt*8 + 2*Q[lane]
                            out[i*heads*d + h*d + c] = W['o'][nt][lane, 2*r]*inv
                            out[i*heads*d + h*d + c + 1] = W['o'][nt][lane, 2*r+1]*inv
                        if Q[lane] == 0:
                            lse[i*heads + h] = W['m'][r][lane] + np.log(W['l'][r][lane]) if W['l'][r][lane] > 0 else -np.inf
    return out, lse

def ref(q, k, v, t, heads, kvh_n, d, pos0, kpos0, nkeys):
    out = np.zeros(t*heads*d); lse = np.zeros(t*heads)
    Qm = q.reshape(t, heads, d); K = k.reshape(nkeys, kvh_n, d); V = v.reshape(nkeys, kvh_n, d)
    for i in range(t):
        for h in range(heads):
            kvh = h // (heads // kvh_n)
            vis = [j for j in range(nkeys) if kpos0 + j <= pos0 + i]
            if not vis: lse[i*heads+h] = -np.inf; continue
            s = K[vis, kvh] @ Qm[i, h] / np.sqrt(d)
            mx = s.max(); p = np.exp(s - mx)
            out[(i*heads+h)*d:(i*heads+h+1)*d] = p @ V[vis, kvh] / p.sum()
            lse[i*heads+h] = mx + np.log(p.sum())
    return out, lse

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    heads, d = 2, 32
    lam = np.array([0.01, 0.3])
    for t in [83, 64, 20]:
        qkv = rng.uniform(-0.3, 0.3, t*heads*3*d).astype(np.float32)
        state0 = rng.uniform(-0.1, 0.1, heads*d*d).astype(np.float32)
        want, wst = ref_lightning(qkv, state0, lam, t, heads, d)
        nb = (t + LB - 1)//LB
        kv = block_kv(qkv, lam, t, heads, d, nb)
        st = state0.copy()
        ph, pl = scan(kv, st, lam, t, nb, heads, d)
        out = np.zeros(t*heads*d, np.float32)
        block_out(qkv, out, ph, pl, lam, t, heads, d, nb)
        print("lightning t=%d out err %.2e (max %.2e) state err %.2e (max %.2e)" % (t, abs(out-want).max(), abs(want).max(), abs(st-wst).max(), abs(wst).max()))
        assert abs(out-want).max() <= 1e-2*abs(want).max() and abs(st-wst).max() <= 1e-2*abs(wst).max()
    rng = np.random.default_rng(1)
    heads, kvh_n, d = 4, 2, 32
    for (pos0, t, kpos0, nkeys) in [(0, 70, 0, 70), (100, 5, 0, 105), (100, 20, 60, 60), (10, 3, 50, 20)]:
        q = rng.uniform(-1, 1, t*heads*d); k = rng.uniform(-1, 1, nkeys*kvh_n*d); v = rng.uniform(-1, 1, nkeys*kvh_n*d)
        got, gl = attention_tc(q, k, v, t, heads, kvh_n, d, pos0, kpos0, nkeys)
        want, wl = ref(q, k, v, t, heads, kvh_n, d, pos0, kpos0, nkeys)
        fin = np.isfinite(wl)
        print(pos0, t, kpos0, nkeys, "out err %.2e (max %.2e)" % (abs(got-want).max(), abs(want).max()),
              "lse err %.2e" % (abs(gl[fin]-wl[fin]).max() if fin.any() else 0), "inf match", np.array_equal(np.isinf(gl), np.isinf(wl)))
        assert abs(got-want).max() <= 1e-2*max(abs(want).max(), 1e-6) and np.array_equal(np.isinf(gl), np.isinf(wl))
        assert not fin.any() or abs(gl[fin]-wl[fin]).max() <= 1e-2

    # Split keys (flash-decoding): block z takes keys [z·per, (z+1)·per) as attention_tc does
    # with gridDim.z > 1, then attention_merge_splits combines the parts by their lse.
    pos0, t, nkeys, S = 150, 2, 152, 3
    q = rng.uniform(-1, 1, t*heads*d); k = rng.uniform(-1, 1, nkeys*kvh_n*d); v = rng.uniform(-1, 1, nkeys*kvh_n*d)
    per = (nkeys + S - 1) // S
    parts, lses = [], []
    for z in range(S):
        beg = min(nkeys, z*per); cnt = min(nkeys, beg + per) - beg
        o, l = attention_tc(q, k[beg*kvh_n*d:], v[beg*kvh_n*d:], t, heads, kvh_n, d, pos0, beg, cnt)
        parts.append(o); lses.append(l)
    lses = np.array(lses); m = lses.max(0); w = np.exp(lses - m)
    merged = (np.array(parts).reshape(S, t*heads, d) * w[:, :, None]).sum(0) / w.sum(0)[:, None]
    want, _ = ref(q, k, v, t, heads, kvh_n, d, pos0, 0, nkeys)
    err = abs(merged.reshape(-1) - want).max()
    print("split keys (%d parts) out err %.2e (max %.2e)" % (S, err, abs(want).max()))
    assert err <= 1e-2*abs(want).max()
