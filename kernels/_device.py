"""Device rules shared by the kernels: one device per call, and Triton launches on that device.

Triton launches on the *current* CUDA device (its stream, its compiled binary), not on the device of
the pointers it is given. A kernel handed cuda:1 tensors while cuda:0 is current would run on cuda:0
and read another GPU's memory, so every launch is wrapped in ``launch_on(tensor)``.
"""
from __future__ import annotations

import contextlib

import torch


def check_one_device(fn: str, **tensors: torch.Tensor) -> torch.device:
    """The device all ``tensors`` share; a ValueError naming each tensor's device otherwise."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{fn}: all inputs must be on one device; got {listing}. Move them to one device "
                         f"first, e.g. with .to({first_name}.device)")
    return first


def launch_on(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for a Triton launch (nothing to do for the CPU
    tensors of ``TRITON_INTERPRET=1``)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
