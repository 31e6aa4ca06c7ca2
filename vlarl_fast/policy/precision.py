"""Weights' dtype and the attention kernel of a policy's language model.

On a GPU a pretrained VLA runs in bfloat16 with flash-attn's kernels when flash-attn is installed
(the `flash` extra), and PyTorch's SDPA otherwise; on a CPU it runs in float32 with SDPA. The tiny
VLA trains from scratch and stays in float32 everywhere: bf16 weights without a float32 master copy
lose the small updates a randomly initialised model needs. Its behaviour-cloning steps may still run
their matrix products in bfloat16 through autocast (``mixed_precision``), the float32 weights being
the master copy.

PPO trains a pretrained VLA in bfloat16 with float32 master weights (``MasterWeights``): Adam's steps are
often a relative 1e-4 of a weight, below bfloat16's resolution (2**-8), so on 16-bit weights most of
them would round away. LoRA adapters and value heads hold float32 weights themselves (they cast their
inputs to their own weights' dtype, so they run over a bfloat16 base as is); every other trained
weight keeps its 16-bit copy for the forward, and the optimiser steps a float32 master copy that is
rounded back into it after each step. ``rollout_matches_update`` says when the rollout's log-probs
must be recomputed by the update's own forward before the PPO ratio may be taken against them.
Behaviour cloning (SFT, iRe-VLA's supervised stage) trains a bfloat16 model the same way
(``rl/sft.py: bc_optimizer``).
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterable

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


# ---------------------------------------------------------------------------------------------
# Float32 master weights of the trained parameters
# ---------------------------------------------------------------------------------------------
def upcast_(params: Iterable[torch.nn.Parameter]) -> None:
    """Store parameters in float32, in place (the Parameter objects stay the same). Only for modules that
    cast their inputs to their own weights' dtype: peft's LoRA layers (their output is cast back to the
    base layer's dtype) and the value heads."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


class MasterWeights:
    """Float32 master copies of the trained parameters that are stored in 16 bits.

    The model keeps its 16-bit weights, so the rollout and the update compute with the very weights they
    always did; the optimiser gets ``of(params)``, where each 16-bit parameter is replaced by its float32
    master. Per step: ``backward``, ``grads_to_masters`` (16-bit gradients -> float32 master gradients),
    clip and ``optimizer.step()`` on the masters, ``masters_to_model`` (round them back into the model).
    The model's weight then moves once the master has drifted half a bfloat16 step away, where a 16-bit
    Adam step of the same size would have been rounded away every time. float32 parameters are their own
    masters: a float32 model trains exactly as without this class.

    A weight written by anything else (a supervised stage between PPO iterations, a checkpoint loaded in
    place) is taken back into its master by ``refresh``, rather than overwritten by the stale master at
    the next step."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._master: dict[int, torch.nn.Parameter] = {}
        self._written: dict[int, tuple[int, int]] = {}   # each weight's storage and version as last synced
        for p in params:
            if id(p) in self._master or p.dtype == torch.float32:
                continue
            if not p.is_floating_point():
                raise PrecisionError(f"cannot train a {p.dtype} parameter")
            m = torch.nn.Parameter(p.detach().float().clone())
            self._master[id(p)] = m
            self._written[id(p)] = _stamp(p)
            self.pairs.append((p, m))

    def of(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """What the optimiser steps in place of ``params``: the float32 master of each 16-bit one."""
        return [self._master.get(id(p), p) for p in params]

    def grads_to_masters(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None   # the 16-bit gradient has served; the next backward starts from nothing

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)
            self._written[id(p)] = _stamp(p)

    @torch.no_grad()
    def refresh(self) -> int:
        """Take every weight changed since the last sync into its master; returns how many were."""
        changed = 0
        for p, m in self.pairs:
            if self._written[id(p)] != _stamp(p):
                m.copy_(p)
                self._written[id(p)] = _stamp(p)
                changed += 1
        return changed


    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach().clone() for _, m in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, masters: list[torch.Tensor]) -> None:
        """Masters saved by ``state_dict``, after the model's own weights were loaded: they are the truth, and the
        model's current weights count as synced with them."""
        if len(masters) != len(self.pairs):
            raise ValueError(f"{len(masters)} saved master weights for {len(self.pairs)} 16-bit parameters")
        for (p, m), saved in zip(self.pairs, masters):
            m.copy_(saved)
            self._written[id(p)] = _stamp(p)


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    # in-place writes bump the version counter; replacing ``.data`` changes the storage
    return p.data_ptr(), p._version


def float32_training(policy, trained: list[torch.nn.Parameter]) -> MasterWeights:
    """Float32 weights for whatever is trained: LoRA adapters and value heads become float32 in place (they
    cast their inputs to their own dtype, so they run over a bfloat16 base as they are); every other trained
    16-bit weight gets a float32 master copy (``MasterWeights``). Nothing changes in a float32
    model."""
    heads = list(policy.model.value_head.parameters())
    if policy.critic is not None:
        heads += list(policy.critic.value_head.parameters())
    adapters = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    upcast_([p for p in heads + adapters if p.requires_grad])
    return MasterWeights(trained)


def check_float32_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Every parameter an optimiser steps must be float32 (``MasterWeights``, ``upcast_``): a 16-bit one
    loses its small updates to rounding."""
    bad = sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"] if p.dtype != torch.float32})
    if bad:
        raise PrecisionError(f"the optimiser would step {', '.join(bad)} parameters, whose small updates round "
                             "away: give it float32 master copies (vlarl_fast.policy.precision.MasterWeights) or "
                             "float32 weights (precision.upcast_) instead")


def rollout_matches_update(model) -> bool:
    """Whether the rollout's decoder (``llama_step``, its own attention) and the update's teacher-forced
    forward (transformers') give the same log-probs to float32 rounding: the language model in float32,
    and float32 matrix products at full precision (no TF32 or bfloat16 passes; PyTorch's default
    ``torch.get_float32_matmul_precision() == "highest"``). Measured on the CPU, the first PPO ratio is
    then within 4e-6 of 1 (tiny VLA and tiny OpenVLA); in bfloat16 the two paths are 2-5% apart on the
    CPU and gave a first approx_kl of 0.036 on a 7B model on a GPU, so the update must recompute them."""
    dtypes = {p.dtype for p in model.decoder.parameters()} | {model.lm_head_weight.dtype}
    if dtypes != {torch.float32}:
        return False
    return torch.get_float32_matmul_precision() == "highest"
