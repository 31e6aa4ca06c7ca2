"""Triton kernels behind ``action_logprobs(..., backend="triton")`` (CUDA tensors by default).

Forward (``_fwd_kernel``): grid = (row blocks, vocab splits). A program owns BLOCK_N rows and one
contiguous split of the vocabulary slice; it walks its split in BLOCK_V tiles, forms each
[BLOCK_N, BLOCK_V] logit tile with ``tl.dot`` over H in BLOCK_H steps (fp32 accumulator, whatever
the input dtype), and folds the tile into an online logsumexp (running max m, running sum s,
running shifted entropy term t) plus the target's logit. Per-split partials (4 x splits x N
floats) are merged in torch. Splitting the vocabulary matters for parallelism: at the OpenVLA
update shape N = 16*7*8 = 896 there are only 14 row blocks of 64, far fewer than an H100's 132
SMs; 16 splits of 32064 give 224 programs.

Backward: per vocabulary chunk, ``_dlogits_kernel`` (grid = row blocks x vocab tiles) recomputes
the logit tile the same way, turns it into d logits with the saved lse and entropy, and writes it
to a [N, C] buffer; two cuBLAS matmuls then take d hidden += dz @ W_chunk and
d W_chunk = dz^T @ hidden.

Memory arithmetic behind the backward chunk C (the forward holds no [N, V] tensor at all):
  naive full-vocabulary logits at the OpenVLA shape are N x V x 4 B = 896 x 32064 x 4 B = 115 MB
  in fp32, plus their bf16 original (57 MB), the log_softmax output (115 MB) and its gradient
  (115 MB + 57 MB): ~0.45 GB of activations for one update micro-batch. The dz buffer costs
  N x C x bytes(dtype); ``_CHUNK_BYTES = 32 MiB`` gives C = 32 MiB / (896 x 2 B) ~ 18.7k columns
  (rounded down to BLOCK_V) in bf16, i.e. two chunks for the full vocabulary and one for the
  256 action bins, ~7% of the naive activations; at N = 8192 it is 2048 columns (16 chunks),
  still wide enough to keep the matmuls efficient.

Under ``TRITON_INTERPRET=1`` (tests on a CPU) the kernels run in numpy on CPU tensors; tile sizes
shrink to 16 so the interpreter stays fast, and bf16/fp16 tiles are upcast before ``tl.dot``
(triton 3.9's interpreter returns garbage for a bf16 ``tl.dot``; on a GPU the bf16 x bf16
products are exact in the fp32 accumulator anyway, so the upcast changes nothing but speed).
"""
from __future__ import annotations

import os

import torch

from . import _device

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - triton is a dependency on linux x86_64
    raise ImportError("action_logprobs(backend='triton') needs the `triton` package; use backend='torch'") from e

_CHUNK_BYTES = 32 * 2**20


# triton.jit decides at decoration time whether a kernel is compiled or interpreted, so the
# module's mode is fixed by TRITON_INTERPRET as it was when this module was first imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's interpreter (CPU tensors) rather than compiled."""
    return _INTERPRETED


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
                N, H, vs, ve, split_len, inv_temp,
                stride_hn, stride_wv,
                WANT_ENT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1)
    v_lo = vs + pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, ve)
    # finite start so that alpha = exp(m - m_new) is 0, never exp(-inf - -inf) = nan
    m = tl.full([BLOCK_N], -1.0e30, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            hm = hk < H
            a = tl.load(h_ptr + rows64[:, None] * stride_hn + hk[None, :], mask=rmask[:, None] & hm[None, :],
                        other=0.0)
            b = tl.load(w_ptr + cols64[None, :] * stride_wv + hk[:, None], mask=cmask[None, :] & hm[:, None],
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            # "ieee": fp32 inputs must not drop to tf32 (torch's own fp32 matmul does not either)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        z = tl.where(cmask[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        # masked columns: zs = 0 and p = 0, so p * zs never meets exp(-inf) * -inf = nan
        zs = tl.where(cmask[None, :], z - m_new[:, None], 0.0)
        p = tl.where(cmask[None, :], tl.exp(zs), 0.0)
        if WANT_ENT:
            t = alpha * (t + s * (m - m_new)) + tl.sum(p * zs, 1)
        s = s * alpha + tl.sum(p, 1)
        zt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & cmask[None, :], z, 0.0), 1)
        m = m_new
    out = pid_s * N + rows64
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)
    if WANT_ENT:
        tl.store(t_ptr + out, t, mask=rmask)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, a_ptr, gl_ptr, ge_ptr, dz_ptr,
                    N, H, c0, c1, inv_temp,
                    stride_hn, stride_wv, stride_dz,
                    HAS_ENT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    cols = c0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < c1
    cols64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hm = hk < H
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + hk[None, :], mask=rmask[:, None] & hm[None, :], other=0.0)
        b = tl.load(w_ptr + cols64[None, :] * stride_wv + hk[:, None], mask=cmask[None, :] & hm[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    z = acc * inv_temp
    lse = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
    gl = tl.load(gl_ptr + rows64, mask=rmask, other=0.0)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1)
    p = tl.exp(z - lse[:, None])
    if HAS_ENT:
        # dz = g_logp [k==y] - p (a + g_ent z), a = g_logp + g_ent (Ent - lse)
        av = tl.load(a_ptr + rows64, mask=rmask, other=0.0)
        ge = tl.load(ge_ptr + rows64, mask=rmask, other=0.0)
        dz = -p * (av[:, None] + ge[:, None] * z)
    else:
        dz = -p * gl[:, None]
    dz = tl.where(cols[None, :] == tgt[:, None], dz + gl[:, None], dz) * inv_temp
    ptrs = dz_ptr + rows64[:, None] * stride_dz + (cols64 - c0)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _blocks(dtype):
    if interpreting():
        return 16, 16, 16, 4
    # 64 x 128 fp32 accumulator tile; 64-wide H steps keep the operands in shared memory for bf16/fp16
    return 64, 128, 64, 8


def _n_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def forward(hidden, weight, targets, inv_temp, vs, ve, want_entropy):
    N, H = hidden.shape
    BN, BV, BH, warps = _blocks(hidden.dtype)
    width = ve - vs
    row_blocks = triton.cdiv(N, BN)
    # enough programs for ~2 waves over the SMs, but every split at least 4 tiles wide
    splits = max(1, min(triton.cdiv(2 * _n_sms(hidden.device), row_blocks), triton.cdiv(width, 4 * BV)))
    split_len = triton.cdiv(triton.cdiv(width, splits), BV) * BV
    splits = triton.cdiv(width, split_len)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s, t, zt = (torch.empty(splits, N, **f32) for _ in range(4))
    if N:
        with _device.launch_on(hidden):
            _fwd_kernel[(row_blocks, splits)](hidden, weight, targets, m, s, t, zt,
                                              N, H, vs, ve, split_len, inv_temp,
                                              hidden.stride(0), weight.stride(0),
                                              WANT_ENT=want_entropy, UPCAST=interpreting(), BLOCK_N=BN, BLOCK_V=BV,
                                              BLOCK_H=BH, num_warps=warps)
    # merge the splits' online-softmax partials
    M = m.amax(0)
    alpha = torch.exp(m - M)
    S = (s * alpha).sum(0)
    log_s = torch.log(S)
    lse = M + log_s
    logp = zt.sum(0) - lse
    entropy = None
    if want_entropy:
        Tt = (alpha * (t + s * (m - M))).sum(0)
        entropy = log_s - Tt / S
    return logp, entropy, lse


def backward(hidden, weight, targets, inv_temp, vs, ve, lse, entropy, g_logp, g_ent, need_dh, need_dw):
    N, H = hidden.shape
    BN, BV, BH, warps = _blocks(hidden.dtype)
    dh = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    # bf16/fp16: dz in the input dtype so the matmuls run on tensor cores (as the naive path's
    # autograd does when it casts the logits' gradient back through .float())
    dz_dtype = hidden.dtype
    cols = max(BV, (_CHUNK_BYTES // (max(N, 1) * hidden.element_size())) // BV * BV)
    a = (g_logp + g_ent * (entropy - lse)).contiguous() if g_ent is not None else g_logp
    ge = g_ent if g_ent is not None else g_logp
    for c0 in range(vs, ve, cols):
        c1 = min(c0 + cols, ve)
        dz = torch.empty(N, c1 - c0, dtype=dz_dtype, device=hidden.device)
        if N:
            grid = (triton.cdiv(N, BN), triton.cdiv(c1 - c0, BV))
            with _device.launch_on(hidden):
                _dlogits_kernel[grid](hidden, weight, targets, lse, a, g_logp, ge, dz,
                                      N, H, c0, c1, inv_temp,
                                      hidden.stride(0), weight.stride(0), dz.stride(0),
                                      HAS_ENT=g_ent is not None, UPCAST=interpreting(), BLOCK_N=BN, BLOCK_V=BV,
                                      BLOCK_H=BH, num_warps=warps)
        if need_dh:
            dh += (dz @ weight[c0:c1]).float()
        if need_dw:
            dw[c0:c1] = dz.T @ hidden
    return (dh.to(hidden.dtype) if need_dh else None), dw


__all__ = ["forward", "backward", "interpreting"]
