"""Log-probabilities (and entropy) of sampled action tokens, without the full [N, V] logits.

    action_logprobs(hidden [N,H], weight [V,H], targets [N]) ==
        log_softmax((hidden @ weight[vocab_start:vocab_end].T).float() / temperature)[targets - vocab_start]

Three implementations of one public contract:

- ``action_logprobs_reference``: the readable definition above (slice-only log_softmax + gather).
  Every fast path is tested against it, outputs and gradients.
- the torch path (CPU tensors, or ``backend="torch"``): the vocabulary slice is walked in chunks;
  each chunk's logits are formed, folded into an online (streaming) logsumexp, and dropped. The
  backward walks the chunks again, recomputing each chunk's logits from the saved per-row
  logsumexp, so neither pass ever holds more than one chunk.
- the Triton path (CUDA tensors, or ``backend="triton"``, e.g. under ``TRITON_INTERPRET=1``):
  see ``_triton_logprobs.py``; the projection is fused into the kernel (``tl.dot`` over H tiles),
  logits exist only as register tiles.

Gradient algebra (z = logits / temperature, p = softmax(z), lse = logsumexp(z), Ent = -sum p log p):

    d logp / d z_k = [k == y] - p_k
    d Ent  / d z_k = -p_k (log p_k + Ent) = -p_k (z_k - lse + Ent)
    => dz_k = g_logp [k == y] - p_k (g_logp + g_ent (z_k - lse + Ent)),   d logits = dz / temperature
    d hidden = d logits @ W_slice,   d W_slice = d logits^T @ hidden      (rows outside the slice: 0)

Memory arithmetic behind the torch path's chunk size (fp32 logits, 4 bytes):
  the naive path holds N x V x 4 bytes several times over (logits, log_softmax output, its
  gradient): N = 4096 action tokens x V = 32064 x 4 B = 525 MB per copy, ~1.5-2 GB at its peak.
  A chunk of C vocabulary columns costs N x C x 4 B per live temporary and the chunk body keeps
  about three alive (logits, exp, gradient); ``_CHUNK_BYTES = 16 MiB`` per temporary gives
  C = 16 MiB / (4096 x 4 B) = 1024 columns at N = 4096 (~50 MB of temporaries in all, ~3% of
  the naive peak), and is large enough that each chunk's matmul ([N, H] x [H, C]) still runs
  at full BLAS speed. Small N gets wider chunks, but never more than 1/8 of the slice
  (``_MIN_CHUNKS``): at N = 512 a 16 MiB chunk would be 8192 columns, a quarter of the naive
  logits, so it is cut to 32064 / 8 = 4008 columns (8 MB per temporary). Chunks never drop below
  128 columns (``_MIN_CHUNK``), where per-chunk overhead would dominate; the 256 action bins are
  two chunks of 128 (N x 128 x 4 B: 4 MiB at N = 8192).

Numerics: every path accumulates in fp32 whatever the input dtype (bf16/fp16 inputs are upcast
per chunk on the torch path; ``tl.dot`` accumulates in fp32 on the Triton path), so results can
differ from the reference on bf16 inputs, whose logits are rounded to bf16 before the
``.float()`` -- by the bf16 rounding of the logits, and towards the exact value. Gradients come
back in the inputs' dtypes.

Entropy is accumulated shifted, ``Ent = log s - (sum_k e^(z_k - m) (z_k - m)) / s`` with running
max m and s = sum e^(z_k - m), so that large logits do not cancel (lse - E[z] would).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._device import check_one_device
from ._errors import NonFiniteError

__all__ = ["action_logprobs", "action_logprobs_reference", "action_logprobs_naive"]

# 16 MiB per fp32 temporary of a chunk body; see the module docstring for the arithmetic.
_CHUNK_BYTES = 16 * 2**20
_MIN_CHUNKS = 8     # and at most 1/8 of the slice per chunk, so small N is chunked too
_MIN_CHUNK = 128


def action_logprobs_reference(hidden, weight, targets, *, temperature: float = 1.0, vocab_start: int = 0,
                              vocab_end: int | None = None, return_entropy: bool = False):
    """The readable definition: the slice's logits in full, log_softmax, gather."""
    vocab_end = weight.shape[0] if vocab_end is None else vocab_end
    logits = (hidden @ weight[vocab_start:vocab_end].T).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, (targets.long() - vocab_start)[:, None]).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def action_logprobs_naive(hidden, weight, targets, *, temperature: float = 1.0):
    """The baseline a user would otherwise write (what VLA-RL does): full-vocabulary logits in fp32,
    log_softmax, gather. Used by the benchmarks; equals the reference with the whole vocabulary."""
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.long()[:, None]).squeeze(-1)


def _validate(hidden, weight, targets, temperature, vocab_start, vocab_end, backend):
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"action_logprobs: unknown backend {backend!r}; use None (pick by device), "
                         "'torch' or 'triton'")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"action_logprobs: hidden must be [N, H] and weight [V, H] with the same H; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)} (flatten batch/time dims of "
                         "hidden into N; pass the lm_head weight, not its transpose)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"action_logprobs: targets must be [N]={hidden.shape[0]} (one token id per hidden "
                         f"row); got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"action_logprobs: targets must be integer token ids; got dtype {targets.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"action_logprobs: hidden and weight must be floating point; got "
                         f"{hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"action_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a "
                         "dtype; cast one with .to(other.dtype)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"action_logprobs: temperature must be a finite number > 0; got {temperature!r}")
    V = weight.shape[0]
    vocab_end = V if vocab_end is None else int(vocab_end)
    vocab_start = int(vocab_start)
    if not 0 <= vocab_start < vocab_end <= V:
        raise ValueError(f"action_logprobs: need 0 <= vocab_start < vocab_end <= V={V}; "
                         f"got [{vocab_start}, {vocab_end})")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < vocab_start or hi >= vocab_end:
            raise ValueError(f"action_logprobs: targets outside the vocab slice [{vocab_start}, {vocab_end}) "
                             f"(they span [{lo}, {hi}]); pass vocabulary ids (not bin indices) that lie in "
                             "the slice, or widen vocab_start/vocab_end")
    return vocab_start, vocab_end


def _check_finite(logp, entropy, hidden, weight, vocab_start, vocab_end):
    """Non-finite inputs surface as non-finite outputs; checking the N outputs costs O(N), checking
    the weight would cost O(V x H) on every call. Only on failure are the inputs inspected."""
    bad = ~torch.isfinite(logp)
    if entropy is not None:
        bad |= ~torch.isfinite(entropy)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten()[:5].tolist()
    if not bool(torch.isfinite(hidden).all()):
        what = "hidden contains NaN/inf"
    elif not bool(torch.isfinite(weight[vocab_start:vocab_end]).all()):
        what = f"weight rows [{vocab_start}, {vocab_end}) contain NaN/inf"
    else:
        what = "logits overflowed (inputs are finite but too large for the chosen temperature)"
    raise NonFiniteError(f"action_logprobs: non-finite result at rows {rows}: {what}; find where the NaN/inf "
                     "enters upstream (skip that update, lower the learning rate) before computing log-probs")


# ---------------------------------------------------------------------------------------------
# torch chunked path
# ---------------------------------------------------------------------------------------------
def _chunk_cols(n_rows: int, width: int) -> int:
    cols = min(_CHUNK_BYTES // (4 * max(n_rows, 1)), -(-width // _MIN_CHUNKS))
    return int(min(width, max(_MIN_CHUNK, cols)))


def _torch_forward(hidden, weight, targets, inv_temp, vs, ve, want_entropy):
    N = hidden.shape[0]
    h = hidden.float()
    m = torch.full((N,), -math.inf, dtype=torch.float32, device=hidden.device)
    s = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    t = torch.zeros(N, dtype=torch.float32, device=hidden.device) if want_entropy else None
    z_target = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    step = _chunk_cols(N, ve - vs)
    for c0 in range(vs, ve, step):
        c1 = min(c0 + step, ve)
        z = h @ weight[c0:c1].float().T
        z.mul_(inv_temp)
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        z.sub_(m_new[:, None])        # z - m_new, in place: one temporary fewer
        p = torch.exp(z)
        if want_entropy:
            shift = torch.where(s > 0, m - m_new, torch.zeros_like(m))  # avoids 0 * -inf
            t = alpha * (t + s * shift) + (p * z).sum(1)
        s = s * alpha + p.sum(1)
        inside = (targets >= c0) & (targets < c1)
        local = (targets - c0).clamp(0, c1 - c0 - 1)
        z_target += torch.where(inside, z.gather(1, local[:, None]).squeeze(1) + m_new, torch.zeros_like(m))
        m = m_new
    log_s = torch.log(s)
    lse = m + log_s
    logp = z_target - lse
    entropy = log_s - t / s if want_entropy else None
    return logp, entropy, lse


def _torch_backward(hidden, weight, targets, inv_temp, vs, ve, lse, entropy, g_logp, g_ent,
                    need_dh, need_dw):
    N = hidden.shape[0]
    h = hidden.float()
    dh = torch.zeros(N, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    if g_ent is not None:
        # dz = g_logp [k==y] - p (g_logp + g_ent (z - lse + Ent)) = ... - p (a + g_ent z)
        a = g_logp + g_ent * (entropy - lse)
    step = _chunk_cols(N, ve - vs)
    for c0 in range(vs, ve, step):
        c1 = min(c0 + step, ve)
        wc = weight[c0:c1].float()
        z = h @ wc.T
        z.mul_(inv_temp)
        p = torch.exp(z - lse[:, None])
        if g_ent is None:
            dz = p.mul_(-g_logp[:, None])
        else:
            dz = z.mul_(g_ent[:, None]).add_(a[:, None]).mul_(p).neg_()
        inside = (targets >= c0) & (targets < c1)
        rows = inside.nonzero().squeeze(1)
        if rows.numel():
            dz.index_put_((rows, targets[rows] - c0), g_logp[rows], accumulate=True)
        dz.mul_(inv_temp)
        if need_dh:
            dh.addmm_(dz, wc)
        if need_dw:
            dw[c0:c1] = (dz.T @ h).to(weight.dtype)
    return (dh.to(hidden.dtype) if need_dh else None), dw


class _ActionLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, vs, ve, want_entropy, backend):
        targets = targets.long().contiguous()  # the Triton kernels index it as a flat [N] array
        if backend == "triton":
            from . import _triton_logprobs as tk
            logp, entropy, lse = tk.forward(hidden, weight, targets, inv_temp, vs, ve, want_entropy)
        else:
            logp, entropy, lse = _torch_forward(hidden, weight, targets, inv_temp, vs, ve, want_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if want_entropy else lse)
        ctx.cfg = (inv_temp, vs, ve, want_entropy, backend)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return (None,) * 8
        inv_temp, vs, ve, want_entropy, backend = ctx.cfg
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (want_entropy and g_ent is not None) else None
        with torch.autocast(hidden.device.type, enabled=False):   # loss.backward() may run inside autocast
            if backend == "triton":
                from . import _triton_logprobs as tk
                dh, dw = tk.backward(hidden, weight, targets, inv_temp, vs, ve, lse, entropy, g_logp, g_ent,
                                     need_dh, need_dw)
            else:
                dh, dw = _torch_backward(hidden, weight, targets, inv_temp, vs, ve, lse, entropy, g_logp, g_ent,
                                         need_dh, need_dw)
        return dh, dw, None, None, None, None, None, None


def action_logprobs(hidden, weight, targets, *, temperature: float = 1.0, vocab_start: int = 0,
                    vocab_end: int | None = None, return_entropy: bool = False, backend: str | None = None):
    """Log-prob [N] fp32 of ``targets`` (and entropy [N] fp32 if ``return_entropy``) under
    ``softmax(hidden @ weight[vocab_start:vocab_end].T / temperature)``, differentiable in
    ``hidden`` and ``weight``.

    ``backend``: None picks Triton for CUDA tensors and the chunked torch path otherwise;
    "torch" / "triton" force one (Triton on CPU tensors needs ``TRITON_INTERPRET=1``).
    Triton kernels run on the inputs' device, whichever CUDA device is current.
    Raises ValueError on mismatched shapes/dtypes/devices, targets outside the slice, a
    non-positive temperature, and non-finite inputs (detected through the outputs).
    """
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, targets)):
        raise ValueError("action_logprobs: hidden, weight and targets must be torch tensors")
    # before anything reads hidden's device (autocast state exists only for real device types)
    check_one_device("action_logprobs", hidden=hidden, weight=weight, targets=targets)
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
        # under autocast the LM hands back hidden in the autocast dtype while the head's weight stays the
        # float32 master copy; the log-softmax wants one dtype and float32 accumulation anyway
        hidden = hidden.to(weight.dtype)
    vs, ve = _validate(hidden, weight, targets, temperature, vocab_start, vocab_end, backend)
    if backend is None:
        backend = "triton" if hidden.is_cuda else "torch"
    if backend == "triton" and not hidden.is_cuda:
        from . import _triton_logprobs as tk
        if not tk.interpreting():
            raise ValueError("action_logprobs: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                             "before triton is imported; use backend='torch' (or None) for CPU tensors")
    hidden = hidden.contiguous()
    weight = weight.contiguous() if not weight.is_contiguous() else weight
    with torch.autocast(hidden.device.type, enabled=False):   # autocast would round the chunks' products
        logp, entropy = _ActionLogprobs.apply(hidden, weight, targets, 1.0 / float(temperature), vs, ve,
                                              bool(return_entropy), backend)
    _check_finite(logp, entropy, hidden, weight, vs, ve)
    return (logp, entropy) if return_entropy else logp
