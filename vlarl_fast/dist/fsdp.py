"""Fully sharded data parallelism for full fine-tuning (FSDP2, ``--dist.shard full``).

Each rank keeps 1/N of every weight, of its float32 master and of Adam's moments, so a 7B policy trained
without LoRA fits where DDP's full replica per rank would not. The layout follows the FSDP2 recipe: every
decoder layer (the policy's, and a separate critic's) is its own unit (gathered for its forward and backward,
then freed), the value heads are units of their own (kept in float32, as an unsharded model keeps them), and one
root unit holds the rest (vision tower, projector, embeddings, LM head).

Every sharded computation enters through the root's forward (``ShardRoot``): that is where FSDP2 gathers the
root's weights and registers the reduce-scatter that averages the gradients over the ranks. The update's
scoring and the supervised stage's loss run as ``root(fn)``. The rollout and the evaluations decode with
their own fused code, which reads weights directly: they run inside ``gathered(root)``, which holds the whole
model unsharded until they end (no gradient flows there).

Precision is FSDP2's own mixed precision: the shards are float32 (the masters Adam steps, so no
``precision.MasterWeights`` copies are made), gathered in the model's 16-bit dtype for every forward and for
the rollout, so the rollout and the update compute with the same 16-bit weights as an unsharded run; the
gradients are reduced in float32. A float32 model is sharded as it is.

Sharding is for full fine-tuning (``--ppo.train-layers 0``, no LoRA): FSDP2 fixes which weights of a unit
are trained when it first runs, and LoRA's small adapters are better served by DDP.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..policy import llama_step
from .comm import Comm


class ShardRoot(torch.nn.Module):
    """The root FSDP unit: the policy's model (and its separate critic); ``root(fn)`` runs ``fn()`` as the
    root's forward."""

    def __init__(self, model: torch.nn.Module, critic: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        if critic is not None:
            self.critic = critic

    def forward(self, fn):
        # a closure, not tensors: FSDP2's root moves tensor arguments to the device before the forward.
        # Views are returned as copies: FSDP2 hooks the backward on the outputs, and an in-place op on a view
        # would bypass the hook
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.clone() if t._is_view() else t, fn())


def shard_policy(policy, comm: Comm) -> ShardRoot:
    """Shard ``policy.model`` (and its critic) over the ranks of ``comm`` in place; returns the root unit.
    Every rank must hold the same weights before (rank 0's SFT weights are broadcast first)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = torch.device(policy.device)
    mesh = init_device_mesh(device.type, (comm.world,))
    heads = [m.value_head for m in (policy.model, policy.critic) if m is not None]
    in_heads = {id(p) for h in heads for p in h.parameters()}
    dtypes = {p.dtype for p in policy.model.parameters() if p.is_floating_point() and id(p) not in in_heads}
    if len(dtypes) != 1:
        raise ValueError(f"--dist.shard full needs one dtype for the model's weights (value heads aside); found "
                         f"{sorted(map(str, dtypes))}")
    compute = None if dtypes == {torch.float32} else dtypes.pop()
    # inputs keep their dtype: the update's arguments hold the whole rollout buffer
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # the shards are the float32 masters: each unit is cast just before it is sharded, so a 16-bit model never
    # stands whole in float32 on the device
    decoders = [policy.model.decoder] + ([policy.critic.decoder] if policy.critic is not None else [])
    for layer in (layer for d in decoders for layer in d.layers):
        fully_shard(_float32_weights(layer), mesh=mesh, mp_policy=mp)
    for head in heads:   # units of their own, gathered in float32 as an unsharded model keeps them
        fully_shard(_float32_weights(head), mesh=mesh,
                    mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False))
    root = ShardRoot(policy.model, policy.critic)
    fully_shard(_float32_weights(root), mesh=mesh, mp_policy=mp)
    root.compute_dtype = compute or torch.float32   # what the weights are gathered in, and saved in
    with torch.no_grad():
        root(lambda: None)   # FSDP2 sets its units up in the root's first forward, before any unit is gathered
    root.reshard()
    return root


def _float32_weights(module: torch.nn.Module) -> torch.nn.Module:
    """The parameters of ``module`` not yet sharded, in float32 (buffers keep their dtype)."""
    from torch.distributed.tensor import DTensor
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != torch.float32 and not isinstance(p, DTensor):
            p.data = p.data.float()
    return module


def sync_buffers(root: torch.nn.Module | None, comm: Comm) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank. FSDP2 shards parameters only; a buffer that the
    training forward updates drifts apart on ranks that see different rows, and the rollout (in eval mode) would
    then act with different statistics on each. DDP broadcasts rank 0's before every forward; after a phase of
    training forwards is the same for the rollouts, whose eval-mode forwards alone read them."""
    if root is not None:
        comm.broadcast_tensors(list(root.buffers()))


@contextmanager
def gathered(root: torch.nn.Module | None):
    """Every weight of the sharded ``root`` whole on every rank inside the block (a collective: all ranks
    enter together); ``None``: nothing to do."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in units if m is not root]
    for m in units:
        m.unshard()
    # the decoder's fused projections are keyed by storage address and version, which a re-gather can repeat
    # after an update changed the weights
    llama_step.forget_fused()
    # a layer's forward inside the block (a separate critic's) must not free it: gathering it again would be a
    # collective on one rank only when the ranks' evaluations make different numbers of forwards
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
        for m in units:
            m.reshard()


@contextmanager
def whole_state_dicts(root: torch.nn.Module | None):
    """Inside the block ``state_dict()`` of the sharded ``root`` and of every module in it returns, on rank 0,
    whole weights on the CPU in the dtype the model computes in (on the other ranks, nothing), so the checkpoint
    writers (policy/checkpoint.py) save a sharded policy as they save any other. A collective: all ranks enter
    together; rank 0 then writes. ``None``: nothing to do."""
    if root is None:
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # the model's dtype, but the value heads', which an unsharded model keeps in float32 too
    full = {k: v.to(root.compute_dtype) if v.is_floating_point() and ".value_head." not in f".{k}" else v
            for k, v in full.items()}
    modules = list(root.named_modules())
    for name, module in modules:
        prefix = f"{name}." if name else ""

        def state_dict(*args, _prefix=prefix, **kwargs):
            return {k[len(_prefix):]: v for k, v in full.items() if k.startswith(_prefix)}
        module.state_dict = state_dict   # the instance's, over the class's (and FSDP2's hooks)
    try:
        with gathered(root):   # and what a writer reads besides (model.dtype for a config) is the model's too
            yield
    finally:
        for _, module in modules:
            del module.state_dict


def sharded_state(root: torch.nn.Module, optimizers: dict) -> dict:
    """The sharded model's and ``optimizers``' (name -> optimizer over its parameters) state as DTensors, for
    ``torch.distributed.checkpoint`` (each rank writes and reads its own shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"model": get_model_state_dict(root)}
    for name, opt in optimizers.items():
        state[name] = get_optimizer_state_dict(root, opt)
    return state


def save_sharded(path, root: torch.nn.Module, optimizers: dict) -> None:
    import torch.distributed.checkpoint as dcp
    dcp.save(sharded_state(root, optimizers), checkpoint_id=str(path))


def load_sharded(path, root: torch.nn.Module, optimizers: dict) -> None:
    """Put what ``save_sharded`` wrote back into ``root`` and ``optimizers`` (built as they were when saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    # torch.distributed.checkpoint lays a fresh optimiser's moments out by a step of zero gradients, which skips
    # (and its loading drops) frozen parameters; the supervised stage's optimiser has moments for weights PPO
    # keeps frozen, so every parameter counts as trained until the moments are in
    params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        state = sharded_state(root, optimizers)   # the layout to read into: moments for every parameter
        # the checkpoint has moments for the parameters that had a gradient by then; the others keep the layout's
        # placeholders through the load and lose them after, as they had none in the run that saved it
        saved = {k.rsplit(".", 1)[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
        missing = {name: [f for f in state[name]["state"] if f"{name}.state.{f}" not in saved] for name in optimizers}
        dcp.load(state, checkpoint_id=str(path),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=any(missing.values())))
        set_model_state_dict(root, state["model"])
        by_name = dict(root.named_parameters())
        for name, opt in optimizers.items():
            set_optimizer_state_dict(root, opt, state[name])
            for fqn in missing[name]:
                opt.state.pop(by_name[fqn], None)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A sharded result (a DTensor, e.g. the gradient norm over sharded gradients) as a plain tensor."""
    from torch.distributed.tensor import DTensor
    return x.full_tensor() if isinstance(x, DTensor) else x
