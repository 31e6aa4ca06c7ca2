"""Weights' dtype and the attention kernel of a policy's language model.

On a GPU a pretrained VLA runs in bfloat16 with flash-attn's kernels when flash-attn is installed
(the `flash` extra), and PyTorch's SDPA otherwise; on a CPU it runs in float32 with SDPA. The tiny
VLA trains from scratch and stays in float32 everywhere: bf16 weights without a float32 master copy
lose the small updates a randomly initialised model needs. Its behaviour-cloning steps may still run
their matrix products in bfloat16 through autocast (``mixed_precision``), the float32 weights being
the master copy.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")


class PrecisionError(ValueError):
    """A dtype or attention kernel this machine or model cannot use."""


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_dtype(name: str, device: str | torch.device, *, pretrained: bool) -> torch.dtype:
    """'auto': bfloat16 for a pretrained checkpoint on a CUDA device, else float32."""
    if name == "auto":
        return torch.bfloat16 if pretrained and torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise PrecisionError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}")
    if not pretrained and DTYPES[name] != torch.float32:
        raise PrecisionError(f"the tiny VLA trains from scratch in float32; --policy.dtype {name} is for OpenVLA and "
                         "transformers checkpoints")
    return DTYPES[name]


def resolve_attention(name: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """'auto': flash_attention_2 on CUDA in 16-bit when flash-attn is installed, else sdpa. An explicit
    flash_attention_2 that cannot run is an error that names the fix."""
    if name not in ATTENTIONS:
        raise PrecisionError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTENTIONS)}")
    on_cuda = torch.device(device).type == "cuda"
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        return "flash_attention_2" if on_cuda and half and flash_attn_installed() else "sdpa"
    if name == "flash_attention_2":
        if not flash_attn_installed():
            raise PrecisionError("flash_attention_2 needs flash-attn: `pip install \".[flash]\"` on a CUDA machine, or "
                             "use --policy.attn-implementation sdpa")
        if not (on_cuda and half):
            raise PrecisionError("flash_attention_2 runs only on a CUDA device in bfloat16/float16: use "
                             "--policy.attn-implementation sdpa here")
    return name


def set_attention(model, name: str) -> None:
    """Switch the language model's attention kernel (transformers reads it at every forward)."""
    model.decoder.set_attn_implementation(name)


# ---------------------------------------------------------------------------------------------
# Mixed precision of the behaviour-cloning steps
# ---------------------------------------------------------------------------------------------
BC_AUTOCAST = ("auto", "bfloat16", "off")


def cpu_native_bf16() -> str | None:
    """The CPU's native bfloat16 matrix instructions ('amx' or 'avx512_bf16'), or None where bfloat16 would
    be emulated (and slower than float32)."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return name
    return None


def resolve_bc_autocast(name: str, device: str | torch.device) -> torch.dtype | None:
    """'auto': bfloat16 on a CUDA device that supports it and on a CPU with native bfloat16, else None
    (float32 throughout). An explicit 'bfloat16' is honoured anywhere (emulated, so slow, on older CPUs)."""
    if name not in BC_AUTOCAST:
        raise PrecisionError(f"unknown --sft.bc-autocast {name!r}; use one of {', '.join(BC_AUTOCAST)}")
    if name == "off":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if dev.type == "cpu" and cpu_native_bf16() else None


@contextlib.contextmanager
def mixed_precision(device: str | torch.device, dtype: torch.dtype | None):
    """The forward pass of a training step with matrix products in ``dtype`` (weights, gradients and the
    optimiser stay float32; None: a no-op). On a CPU, SDPA's fused kernel is pinned to its math backend:
    the fused CPU kernel's bfloat16 backward runs about 4x slower than its float32 one."""
    if dtype is None:
        yield
        return
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(dev.type, dtype=dtype))
        if dev.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield
