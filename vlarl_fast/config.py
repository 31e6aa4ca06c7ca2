"""Run configuration: dataclasses whose field docstrings become the command-line help (tyro).

Every field can be overridden on the command line (``--ppo.learning-rate 1e-5``), from a
JSON or YAML file (``--config run.yaml``), or by a named preset (``--preset smoke``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class EnvConfig:
    benchmark: Literal["tabletop", "libero"] = "tabletop"
    """Benchmark: the built-in tabletop suite, or LIBERO (`--env libero`: the libero extra, and its assets in
    VLARL_LIBERO_ASSETS)."""
    suite: str | None = None
    """Task suite: 'tabletop', or a LIBERO suite (libero_spatial (the default with --env libero), libero_object,
    libero_goal, libero_10, libero_90)."""
    tasks: tuple[str, ...] = ()
    """Task ids to train and evaluate on; empty means every task of the suite."""
    image_size: int | None = None
    """Agent-view image side in pixels, as the policy takes it (default: tabletop 64, LIBERO 224)."""
    reward: Literal["dense", "sparse"] | None = None
    """'sparse': 1 on success. 'dense': sparse plus potential-based progress shaping (keeps the optimal policy).
    Default: tabletop dense; LIBERO has only sparse."""
    num_envs: int = 0
    """Environments stepped together per rollout batch (0: tabletop 96, LIBERO 8)."""
    max_episode_steps: int | None = None
    """Episode limit instead of each task's own (quick checks; not for benchmark numbers)."""
    backend: Literal["auto", "inprocess", "process"] = "auto"
    """Where envs step: 'process' = the C++-backed worker-process manager (one worker process per core, each
    serving several envs; render devices balanced over the GPUs); 'inprocess' = the calling process, one env
    after another. 'auto': 'process' where the compiled extension is usable, else 'inprocess'."""
    render_device: str = "auto"
    """Where the env workers of --env.backend process render: 'auto' = each worker on a visible GPU through that
    GPU's own EGL device (Mesa on the CPU where no GPU has one); 'cpu' = Mesa on the CPU; 'cuda' = every visible
    GPU; 'cuda:0,cuda:2' (or '0,2') = those CUDA devices. MUJOCO_GL=osmesa and CUDA_VISIBLE_DEVICES are respected."""


ENV_DEFAULTS = {"tabletop": {"suite": "tabletop", "image_size": 64, "reward": "dense", "num_envs": 96,
                             "backend": "process"},
                "libero": {"suite": "libero_spatial", "image_size": 224, "reward": "sparse", "num_envs": 8,
                           "backend": "process"}}


def env_options(env: EnvConfig) -> dict:
    """The keyword options every env of a run is made with (beyond task, image size, reward and seed)."""
    return {} if env.max_episode_steps is None else {"max_episode_steps": env.max_episode_steps}


def vector_options(env: EnvConfig) -> dict:
    """VectorEnv's keyword options for a run's envs: the backend, and where worker processes render."""
    return vector_kwargs(env.backend, env.render_device)


def vector_kwargs(backend: str, render_device: str) -> dict:
    """VectorEnv's keywords for a backend and a render device: only worker processes take the device."""
    return {"backend": backend, **({"render_devices": render_device} if backend == "process" else {})}


def resolve_env(env: EnvConfig) -> EnvConfig:
    """Fill the benchmark's defaults into the unset fields, and check the suite belongs to the benchmark."""
    from .envs.registry import LIBERO_SUITES, SUITES
    d = ENV_DEFAULTS[env.benchmark]
    suite = env.suite or d["suite"]
    known = LIBERO_SUITES if env.benchmark == "libero" else tuple(SUITES)
    if suite not in known:
        hint = " (add --env libero)" if suite in LIBERO_SUITES else ""
        raise ValueError(f"suite {suite!r} is not a {env.benchmark} suite{hint}; choose from {', '.join(known)}")
    reward = env.reward or d["reward"]
    if env.benchmark == "libero" and reward != "sparse":
        raise ValueError("LIBERO has only the sparse success reward: drop --env.reward or set it to sparse")
    backend = env.backend
    num_envs = env.num_envs or d["num_envs"]
    if backend == "auto":
        from .envs.vector import choose_backend  # VectorEnv's own rule: one env, or no extension, in-process
        backend = choose_backend(num_envs, "auto")[0]
    from .envs.render_devices import parse_render_device
    if parse_render_device(env.render_device) != "auto" and backend != "process":
        raise ValueError(f"--env.render-device {env.render_device} chooses where worker processes render, but envs "
                         f"step in this process (--env.backend {backend}): add --env.backend process, or set "
                         "MUJOCO_GL=osmesa (CPU) or MUJOCO_GL=egl MUJOCO_EGL_DEVICE_ID=N for this process yourself")
    return dataclasses.replace(env, suite=suite, image_size=env.image_size or d["image_size"], reward=reward,
                               num_envs=num_envs, backend=backend)


@dataclass
class PolicyConfig:
    policy: str = "tiny"
    """A checkpoint directory or a preset name ('tiny': a randomly initialised tiny VLA)."""
    hidden_size: int = 64
    """LM width of the 'tiny' preset."""
    num_layers: int = 2
    """LM depth of the 'tiny' preset (64 wide and 2 deep: chosen on held-out success after SFT,
    benchmarks/RESULTS.md)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype of an OpenVLA or transformers checkpoint ('auto': bfloat16 on a CUDA device, float32 on the
    CPU); the tiny VLA is always float32."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Attention kernel of the language model ('auto': flash_attention_2 on a CUDA device in 16-bit when
    flash-attn is installed, the `flash` extra; PyTorch's SDPA otherwise)."""
    decode: Literal["fast", "compiled"] = "fast"
    """Action decoding: 'fast' (the prefill and 6 cached steps, eager) or 'compiled' (the same through
    torch.compile: faster per call, but each new batch size or prompt length first compiles for seconds to a
    minute, so it pays off for long runs and large models)."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass instead of keeping them (less memory,
    about a third more compute): for large backbones on a GPU."""
    action_convention: Literal["auto", "identity", "libero-openvla"] = "auto"
    """How decoded actions become env actions (and demonstrations become tokens). 'libero-openvla': OpenVLA's
    LIBERO fine-tunes emit the gripper as 0 = close, 1 = open; LIBERO takes -1 = open, +1 = close, so it is
    binarised and flipped as OpenVLA's LIBERO evaluation does. 'identity': no change. 'auto': what the checkpoint
    recorded when saved here, else 'libero-openvla' for an OpenVLA checkpoint whose statistics key starts with
    'libero', else 'identity'."""


@dataclass
class SFTConfig:
    demos_per_task: int = 300
    """Scripted-expert demonstrations per task (successful episodes only)."""
    demo_layouts: int = 300
    """Scenes the demonstrations are recorded on: the first N layouts of each task's seeded stream (its fixed
    initial states come first). More distinct scenes transfer better to held-out layouts (chosen on held-out
    success, benchmarks/RESULTS.md)."""
    demo_noise: float = 0.1
    """Std of the Gaussian noise on the executed motion commands."""
    clean_labels: bool = True
    """Label each step with the expert's intended action (DART); False: with the executed noisy action,
    as teleoperated demonstrations are."""
    epochs: int = 14
    """Passes over the demonstration steps. They set where RL starts, and how much RL then adds (chosen on
    success after RL, benchmarks/RESULTS.md)."""
    ema_decay: float = 0.0
    """>0: the SFT policy is the exponential moving average of its weights over training (decay per gradient
    step; 0.999 averages about the last 1,000 steps) instead of the last step's weights."""
    augment_pad: int = 0
    """Random-shift image augmentation: pad by this many pixels and crop back (0: off)."""
    batch_size: int = 64
    """Steps per gradient update."""
    learning_rate: float = 2e-3
    """AdamW learning rate (after the warm-up, cosine decay to 10%; chosen together with the warm-up on SFT loss
    and success, benchmarks/RESULTS.md)."""
    warmup_steps: int = 100
    """Gradient steps of linear learning-rate warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    bc_autocast: Literal["auto", "bfloat16", "off"] = "auto"
    """Matrix products of the behaviour-cloning steps (SFT and iRe's supervised stages) in bfloat16 through
    torch.autocast; weights, gradients and AdamW stay float32. 'auto': on for a CUDA device with bfloat16 and a
    CPU with native bfloat16 (AMX or AVX512-BF16, where a step runs faster), off elsewhere (`vlarl-fast
    info` says which); 'off': float32 throughout. PPO updates stay float32: their ratio is taken against
    log-probs from the float32 rollout forward."""


@dataclass
class PPOConfig:
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    """RL algorithm: 'ppo', VLA-RL's trajectory-level PPO with a critic and GAE; 'grpo' (SimpleVLA-RL's default)
    or 'rloo' (RIPT-VLA's): no critic, groups of --ppo.group-size episodes from one (task, initial state) run side
    by side, and each episode's return compared with its group's (GRPO: minus the group mean, over the group's
    std; RLOO: minus the mean of the other K - 1) is the advantage of every action in it. The same clipped ratio
    (clip-higher) for all three; --ppo.iterations stays the cap on updates and the env-step budget
    (iterations x num_steps x num_envs) is the same for all."""
    iterations: int = 90
    """Iterations (each: a rollout, then the update). PPO's rollout is num_steps x num_envs env steps; a group
    algorithm's runs whole groups until the informative ones hold that many steps, and the run stops when the
    env-step budget iterations x num_steps x num_envs is spent."""
    num_steps: int = 32
    """Environment steps per env per iteration (the rollout horizon T)."""
    rollout: Literal["auto", "sync", "pipelined"] = "auto"
    """How PPO's rollout drives the envs: 'sync', the policy decodes for every env, then every env steps;
    'pipelined', the envs in two halves (by worker) that alternate, so one half steps in the env workers while
    the policy decodes for the other, on the cores those workers leave (the same actions per env; the group
    algorithms always run their groups as they finish); 'auto', pipelined where the envs step in worker
    processes (--env.backend process), else sync."""
    learning_rate: float = 1e-4
    """Adam learning rate of the policy."""
    critic_learning_rate: float = 1e-3
    """Adam learning rate of the value head."""
    gamma: float = 0.99
    """Discount per environment step."""
    lam: float = 0.95
    """GAE lambda."""
    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip: ratio <= 1 + clip_high (asymmetric, 'clip-higher')."""
    vf_coef: float = 0.5
    """Value-loss coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (per action token)."""
    update_epochs: int = 2
    """Passes over the rollout per iteration."""
    minibatch_size: int = 256
    """Environment steps per gradient step."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    target_kl: float | None = 0.05
    """Stop the epoch loop early when approx_kl exceeds this (None: never)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty towards the policy RL started from (k3 estimator per action token; 0: off). With
    LoRA the reference is the base with its adapters off (no second copy of the weights); otherwise a frozen
    copy of the model."""
    group_size: int = 8
    """--algo grpo|rloo: episodes per group (K), run side by side from one (task, initial state); --env.num-envs
    must be a multiple of it."""
    filter_groups: bool = True
    """--algo grpo|rloo: dynamic sampling, as SimpleVLA-RL's 0.1-0.9 filter does: a group whose episodes all
    succeeded or all failed teaches nothing and is dropped; more groups run in its place (up to 4 batches' worth
    of env steps per iteration). Kept and dropped groups are logged per iteration."""
    recompute_logprobs: Literal["auto", "on", "off"] = "auto"
    """Before the first epoch, score the rollout's actions again with the update's own forward (no gradients)
    and take the PPO ratio against those log-probs; the rollout's are kept for the rollout_logp_gap metric.
    The rollout decoder and the update compute the same log-probs by different kernels, which in bfloat16
    differ enough to move the first ratio off 1 (docs/precision.md). 'auto': on unless the language model is
    float32 (where the two agree to rounding; recomputing costs about one forward pass over the rollout)."""
    critic: Literal["shared", "separate"] = "shared"
    """The critic: 'shared' = a value head on the policy's own hidden states (one forward for both; the tiny
    VLA detaches them so value gradients leave the policy alone); 'separate' = VLA-RL's critic, a copy of the
    policy's language model initialised from it with its own value head, trained only by the value loss (a
    second prompt forward per step, and a second copy of the language model in memory)."""
    value_pooling: Literal["last", "mean"] = "last"
    """What the value head reads: the hidden state of the last prompt token, or the mean over the prompt's
    tokens."""
    critic_warmup: int = 3
    """Iterations at the start that update only the critic (VLA-RL's critic warm-up)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout policy (and of the log-probs PPO optimises)."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    norm_adv_per_task: bool = True
    """Instead, normalise advantages over the whole rollout within each task (instruction), so no task's
    reward scale or episode length dominates a mixed minibatch."""
    train_layers: int = 1
    """Train only this many top LM layers (plus the final norm and the LM head) during RL, as iRe-VLA keeps
    the backbone frozen in its RL stage; 0 trains the whole policy (but the vision tower if freeze_vision).
    Fewer trained parameters keep the policy gradient's noise from eroding the SFT skill (benchmarks/RESULTS.md)."""
    cache_frozen_layers: Literal["auto", "on", "off"] | bool = "auto"
    """Keep the inputs of the first trained LM layer from the rollout, so the update runs only the trained
    layers instead of the whole model (the same numbers to float rounding). It needs everything below frozen
    (--ppo.train-layers > 0, no LoRA, the vision tower frozen) and the shared critic: 'auto' uses it where
    those hold, 'on' requires them, 'off' (or False) always runs the whole model."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank on every layer of the language model instead (0: off); with LoRA only
    the adapters and the value head learn in RL, and --ppo.train-layers does not apply."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (the update is B A * alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input, saved in the adapter's config; PPO's updates run without dropout, so
    that their first ratio is 1."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers of the language model that get adapters."""
    freeze_vision: bool = True
    """Keep the vision tower frozen during RL (its features are cached from the rollout)."""
    layouts: Literal["auto", "fixed", "open"] = "auto"
    """Layouts RL practises on: 'fixed', each task's fixed initial states (LIBERO's protocol); 'open', the open
    stream of training layouts, a fresh scene for every new draw (tabletop only; the held-out layouts are never
    drawn); 'auto': 'open' where every task has an open stream, else 'fixed' (chosen on held-out success,
    benchmarks/RESULTS.md)."""
    curriculum: bool = True
    """Draw each episode's initial state by VLA-RL's curriculum (unvisited pairs first, then favour pairs
    solved about half the time; on the open stream, a fresh layout or a replay of one already tried). Its
    statistics are saved as curriculum.json in the final checkpoint and restored when --skip-sft True starts
    from that checkpoint."""
    curriculum_fresh: float = 1.0
    """With --ppo.layouts open: share of draws that are a layout never tried; the rest replay tried layouts by
    the curriculum's weights (chosen on held-out success, benchmarks/RESULTS.md)."""
    curriculum_pool: int = 256
    """With --ppo.layouts open: tried layouts kept for replay per task (the one that teaches least leaves)."""
    curriculum_temperature: float = 0.1
    """Sharpness of the curriculum: weight exp((0.5 - |success - 0.5|) / temperature)."""
    curriculum_window: int = 8
    """Outcomes per (task, initial state) the curriculum's success estimate is taken over (a sliding window)."""
    curriculum_floor: float = 0.2
    """Share of draws spread uniformly over a task's initial states, so that no state starves."""


@dataclass
class IReConfig:
    every: int = 9
    """Run iRe-VLA's supervised stage after every N PPO iterations (and so after the last one when N divides
    the iteration count: the default's 90 iterations end with the tenth stage); 0: PPO only."""
    steps: int = 600
    """Behaviour-cloning gradient steps per supervised stage (the whole policy, vision tower included; chosen on
    success after RL, benchmarks/RESULTS.md)."""
    batch_size: int = 64
    """Steps per gradient update of the supervised stage."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the supervised stage (kept across stages)."""
    online_fraction: float = 0.75
    """Share of each batch drawn from the policy's own successful episodes; the rest are expert demonstrations."""
    capacity: int = 30_000
    """Environment steps of successful episodes kept (the oldest episodes leave first)."""
    balance_tasks: bool = True
    """Draw the online rows so that every task has the same share (rare successes of hard tasks count as
    much as the many of easy ones); False: uniformly over the online steps."""


@dataclass
class RewardConfig:
    prm: str | None = None
    """A robotic process reward model (`vlarl-fast prm --output-dir DIR` writes one; pass DIR): it scores each
    step's observation during the rollout, and its P(completed) enters the reward as a potential,
    prm_coef * (gamma * P(next) - P(now)), which keeps the optimal policy. Add it to --env.reward sparse (or
    to the dense reward)."""
    prm_coef: float = 1.0
    """Scale of the reward model's potential-based term."""
    prm_batch_size: int = 256
    """Observations the reward model scores per forward pass."""


@dataclass
class EvalConfig:
    episodes_per_state: int = 3
    """Evaluation episodes per (task, initial state) pair (3 x 20 states x 6 tasks: 360 on the default suite; the
    held-out evaluation adds 600)."""
    init_states: int = 0
    """Initial states per task used for evaluation: the first K of the suite's fixed set (0: all)."""
    greedy: bool = False
    """Greedy decoding; by default actions are sampled at the rollout temperature."""
    heldout_episodes: int | None = None
    """Also evaluate the SFT and RL policies on this many held-out layouts per task, one episode each: scenes no
    demonstration or RL episode saw (tabletop only, at most 100; default: tabletop 100, LIBERO 0, which has none;
    0: not run, summary.json's heldout_* are null)."""


@dataclass
class DistConfig:
    nproc: int = 1
    """Data-parallel ranks (docs/distributed.md): each steps --env.num-envs / N of the envs with worker processes
    of its own, on its own GPU with --device cuda; gradients are averaged over the ranks. Under torchrun the
    launcher's world size is used instead."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend ('auto': NCCL with --device cuda, gloo on the CPU)."""
    shard: Literal["none", "full"] = "none"
    """'none': every rank holds the whole policy (DDP). 'full': FSDP2 shards the weights, their float32 masters
    and Adam's moments over the ranks (full fine-tuning of a large policy: --ppo.train-layers 0, no LoRA);
    checkpoints are sharded through torch.distributed.checkpoint (docs/distributed.md)."""
    ray: str | None = None
    """Run the ranks as Ray Train workers on the Ray cluster at this address ('auto': the one `ray start` made on
    this node; 'local': start Ray inside this process)."""
    gpus_per_worker: float = 0.0
    """--dist.ray: GPUs each rank asks Ray for (0 with --device cpu; with --device cuda, 0 means 1)."""
    cpus_per_worker: float = 1.0
    """--dist.ray: CPUs each rank asks Ray for (its env worker processes run inside that share)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """--dist.ray: how Ray places the ranks over the nodes (a placement group strategy)."""
    pin_cores: bool = True
    """Give each rank of this machine its own share of the CPU cores (its torch threads and env workers run
    there): N ranks on C cores get C / N each."""
    timeout_min: float = 60.0
    """Minutes a rank waits for the others in a collective before the run fails (rank 0's SFT and checkpoint
    writes happen while the others wait)."""


@dataclass
class TrainConfig:
    """SFT on scripted demos -> PPO (VLA-RL) alternating with iRe-VLA's supervised stage -> evaluation, on the
    built-in tabletop suite by default."""

    output_dir: str = "runs/train"
    """Run directory: checkpoints, TensorBoard events, plots, summary.json."""
    seed: int = 0
    """Seed for every RNG (torch, numpy, env init states)."""
    device: str = "cpu"
    """Torch device ('cpu', 'cuda', 'cuda:1')."""
    threads: int = 0
    """Torch CPU threads (0: library default)."""
    config: str | None = None
    """JSON/YAML file of overrides applied before the command line."""
    preset: str | None = None
    """Named preset ('default', 'smoke')."""
    skip_sft: bool = False
    """Start RL from --policy.policy as is (e.g. a checkpoint that is already fine-tuned)."""
    checkpoint_every: int = 30
    """Save a resumable RL checkpoint (RUN_DIR/checkpoints/rl-NNNNN: weights, optimisers, every RNG, the
    curriculum, the iRe-VLA episode buffer, the envs' episodes in progress, history) every N iterations; 0: only
    on Ctrl-C."""
    checkpoint_keep: int = 1
    """RL checkpoints kept (the oldest go first; a new one is complete before an old one goes). A tabletop
    checkpoint holds iRe-VLA's episode buffer, up to --ire.capacity steps of 64 px images (about 370 MB)."""
    resume: str | None = None
    """Continue the run in this directory from its newest RL checkpoint, with its config.json; the command line
    may change only what does not alter the past (--ppo.iterations to extend the run, --checkpoint-every,
    --checkpoint-keep, --progress, --tensorboard). On the CPU the resumed run ends with the same weights and
    history as one that was never stopped."""
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ire: IReConfig = field(default_factory=IReConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tb."""
    progress: bool = True
    """Show progress bars."""


PRESETS: dict[str, dict] = {
    "default": {},
    # a seconds-long run of the whole pipeline, for tests and first checks
    "smoke": {"env": {"num_envs": 4, "tasks": ["tabletop/reach_red"]},
              "policy": {"hidden_size": 32, "num_layers": 1},
              "sft": {"demos_per_task": 2, "epochs": 1},
              "ppo": {"iterations": 2, "num_steps": 4, "critic_warmup": 1, "minibatch_size": 8, "curriculum": True,
                      "group_size": 2},
              "ire": {"every": 1, "steps": 2, "batch_size": 8},
              "eval": {"episodes_per_state": 1, "init_states": 2, "heldout_episodes": 2}},
}


def _merge(obj, overrides: dict, where: str = ""):
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown config key {where + key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where + key!r} needs a mapping")
            _merge(current, value, where + key + ".")
        else:
            setattr(obj, key, tuple(value) if isinstance(current, tuple) else value)
    return obj


def load_overrides(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(text) or {}
    return json.loads(text)


def apply_presets(cfg, preset: str | None, config_file: str | None, presets: dict = PRESETS):
    """Base config: defaults <- preset <- config file (the command line is applied after)."""
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
        _merge(cfg, presets[preset])
    if config_file is not None:
        _merge(cfg, load_overrides(config_file))
    return cfg
