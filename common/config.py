"""The typed configuration: one dataclass schema per config group, each with the range and cross-key
checks that belong to it, and the one-line error that every bad value ends in.

Hydra composes configs/train.yaml on these schemas (scripts/build.py registers them in Hydra's
ConfigStore, and the YAML files name theirs in their defaults lists), so OmegaConf rejects a value
of the wrong type while composing, naming the key. The checks of ranges and of keys that must agree
run in each schema's `__post_init__`, when the composed config becomes these objects
(`OmegaConf.to_object`, in scripts/build.py `validate`), before any model loads. An algorithm's
schema is its own dataclass (grpo/, dapo/, ppo/, on common.algorithm.BaseAlgorithm) with its own
checks; a task's is made from its constructor (common.tasks.task_schema, which keeps the
constructor's defaults). Values and their comments live in the YAML files: the schemas here carry
types, no defaults.

Before any schema's own checks, common.config_checks.require_finite walks the whole composed config
once: a NaN or an infinity is refused wherever it stands, so the range checks below only ever see
finite numbers. Every numeric key states its range in its schema; a key with no bound beyond
finiteness says so in a comment.

Every check ends in a ConfigError `<key>: <why> (got <value>)`, which the entry point prints as
`error: ...` with exit status 2. `RunSettings` is what the loop reads of the checked config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

# the one-line error and its helpers, defined with the whole-config checks and imported from here
from common.config_checks import ConfigError, as_config_error, require, require_option  # noqa: F401
from common.distributed import launched_world_size
from common.precision import ROLLOUT_DTYPE_SETTINGS
from common.rollout.engine import ENGINES
from common.rollout.prepack import PREPACK_MODES

DDP_BACKENDS = ("auto", "gloo", "nccl")
# trainer.checkpoint_signals: the signals a cluster sends before it stops a job (Ctrl-C's SIGINT always)
CHECKPOINT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
ZERO_STAGES = (0, 1, 2, 3)
DYNAMIC_SAMPLING_MODES = ("disabled", "filter", "resample")
# dynamic_sampling=filter after max_num_gen_batches rounds: train on the kept groups, skip the update, stop
ON_EXHAUSTED = ("partial", "skip", "error")


def schema_node(cls: type) -> DictConfig:
    """`cls` as a writable structured config: a frozen dataclass (the algorithms) gives a read-only
    one, into which Hydra could not merge the YAML values."""
    node = OmegaConf.structured(cls)
    OmegaConf.set_readonly(node, False)
    return node


@dataclass
class LoraConfig:
    """model.lora: LoRA adapters (Hu et al. 2021), checked only when enabled."""

    enabled: bool
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        require(self.r >= 1, "model.lora.r", "must be >= 1", self.r)
        require(self.alpha > 0, "model.lora.alpha", "must be > 0", self.alpha)
        require(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)", self.dropout)
        require(
            len(self.target_modules) > 0,
            "model.lora.target_modules",
            "must be a non-empty list of module names, e.g. [q_proj, v_proj]",
            self.target_modules,
        )


@dataclass
class ModelConfig:
    """model: the policy's source (configs/model/*.yaml) and the keys every model shares."""

    source: str
    name: str
    name_or_path: str | None
    dtype: str
    tiny: dict[str, Any] | None
    disable_dropout: bool
    gradient_checkpointing: bool
    lora: LoraConfig

    # keys that one source alone reads (the other options leave them null or {}):
    # key -> (source, the model= option that selects it)
    SOURCE_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "name_or_path": ("hub", "model=hub"),
        "tiny": ("tiny", "model=tiny"),
    }

    def __post_init__(self) -> None:
        for key, (source, option) in self.SOURCE_KEYS.items():
            value = getattr(self, key)
            require(
                not value or self.source == source,
                f"model.{key}",
                f"read only by {option}; the selected model ({self.name}, source {self.source}) ignores it",
                value,
            )


@dataclass
class TrainerConfig:
    """trainer: steps, batch sizes, evaluation, checkpoints, devices and data parallel."""

    max_steps: int
    max_generated_tokens: int | None
    batch_size: int
    mini_batch_size: int | None
    micro_batch_size: int
    max_tokens_per_micro_batch: int | None
    eval_every: int
    eval_every_tokens: int | None
    eval_num_prompts: int
    eval_num_samples: int
    eval_temperature: float
    log_samples_every: int
    num_samples_logged: int
    save_every: int
    checkpoint_signals: list[str]
    keep_last_checkpoints: int
    keep_step_checkpoints: bool
    save_only_model: bool
    max_bad_steps: int
    device: str
    num_threads: int | None
    portable_numerics: bool
    ddp_backend: str
    zero_stage: int
    bf16: Any  # true / false / auto (common.precision: measured once per run); checked below
    packed_forward: bool
    chunked_logprobs: bool
    log_rollout_mismatch: bool
    fail_on_reward_error: bool

    def __post_init__(self) -> None:
        require(self.max_steps >= 0, "trainer.max_steps", "must be >= 0", self.max_steps)
        require(
            self.max_generated_tokens is None or self.max_generated_tokens >= 1,
            "trainer.max_generated_tokens",
            "must be >= 1 or null",
            self.max_generated_tokens,
        )
        require(self.batch_size >= 1, "trainer.batch_size", "must be >= 1", self.batch_size)
        mini = self.mini_batch_prompts
        require(
            1 <= mini <= self.batch_size and self.batch_size % mini == 0,
            "trainer.mini_batch_size",
            f"must divide trainer.batch_size={self.batch_size}",
            mini,
        )
        tokens = self.max_tokens_per_micro_batch
        require(
            tokens is None or tokens >= 1,
            "trainer.max_tokens_per_micro_batch",
            "must be >= 1 or null",
            tokens,
        )
        world = launched_world_size()
        require(
            self.batch_size % world == 0 and mini % world == 0,
            "trainer.batch_size",
            f"trainer.batch_size and trainer.mini_batch_size={mini} must be multiples of the {world} "
            "data-parallel processes (each rank rolls out whole groups of its share of the prompts)",
            self.batch_size,
        )
        self._check_parallel_and_precision()
        for name in self.checkpoint_signals:
            require_option("trainer.checkpoint_signals", name, CHECKPOINT_SIGNALS)
        require(self.max_bad_steps >= 1, "trainer.max_bad_steps", "must be >= 1", self.max_bad_steps)
        for key in (
            "eval_every",
            "eval_num_prompts",
            "log_samples_every",
            "num_samples_logged",
            "save_every",
            "keep_last_checkpoints",
        ):
            value = getattr(self, key)
            require(value >= 0, f"trainer.{key}", "must be >= 0", value)
        self._check_eval()
        require(
            self.num_threads is None or self.num_threads >= 1,
            "trainer.num_threads",
            "must be >= 1 or null",
            self.num_threads,
        )

    def _check_parallel_and_precision(self) -> None:
        """Data parallel (zero_stage, ddp_backend) and bf16 (true, false or auto, auto not under FSDP)."""
        require_option(
            "trainer.zero_stage",
            self.zero_stage,
            ZERO_STAGES,
            "0 (off), 1 (AdamW state sharded over data-parallel ranks), 2 (+ gradients, FSDP "
            "SHARD_GRAD_OP), 3 (+ weights, FSDP FULL_SHARD)",
        )
        require_option("trainer.ddp_backend", self.ddp_backend, DDP_BACKENDS)
        require(  # not `in (True, False, "auto")`, which would take 1 and 0 for true and false
            isinstance(self.bf16, bool) or self.bf16 == "auto",
            "trainer.bf16",
            "not one of the options: true, false, auto",
            self.bf16,
        )
        require(
            self.zero_stage < 2 or self.bf16 != "auto",
            "trainer.bf16",
            "auto is not measured on FSDP-sharded weights (trainer.zero_stage 2 or 3): use true or false",
            self.bf16,
        )

    def _check_eval(self) -> None:
        """The held-out evaluation's schedule and its sampled mean@k."""
        every_tokens = self.eval_every_tokens
        require(
            every_tokens is None or every_tokens >= 1,
            "trainer.eval_every_tokens",
            "must be >= 1 or null",
            every_tokens,
        )
        require(self.eval_num_samples >= 0, "trainer.eval_num_samples", "must be >= 0", self.eval_num_samples)
        require(self.eval_temperature > 0, "trainer.eval_temperature", "must be > 0", self.eval_temperature)

    @property
    def evaluates(self) -> bool:
        """Held-out evaluation is on: every trainer.eval_every steps or trainer.eval_every_tokens tokens."""
        return self.eval_every > 0 or self.eval_every_tokens is not None

    @property
    def mini_batch_prompts(self) -> int:
        """Prompts per policy optimizer step: mini_batch_size, or the whole batch when null."""
        return self.mini_batch_size or self.batch_size


@dataclass
class RolloutConfig:
    """rollout: the generation engine and its sampling settings."""

    engine: str
    gpu_memory_utilization: float
    group_size: int
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    system_prompt: str | None
    max_prompt_len: int
    dtype: str
    prepack_linears: str
    preallocated_cache: bool
    inplace_row_removal: bool
    shared_prefix: bool

    def __post_init__(self) -> None:
        require(self.group_size >= 1, "rollout.group_size", "must be >= 1", self.group_size)
        require_option("rollout.prepack_linears", self.prepack_linears, PREPACK_MODES)
        require_option("rollout.dtype", self.dtype, ROLLOUT_DTYPE_SETTINGS)
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", self.max_new_tokens)
        require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "rollout.min_new_tokens",
            f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}]",
            self.min_new_tokens,
        )
        require(self.temperature > 0, "rollout.temperature", "must be > 0", self.temperature)
        require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]", self.top_p)
        require(self.top_k >= 0, "rollout.top_k", "must be >= 0, 0 = off", self.top_k)
        require(self.max_prompt_len >= 1, "rollout.max_prompt_len", "must be >= 1", self.max_prompt_len)
        require(
            0 < self.gpu_memory_utilization < 1,
            "rollout.gpu_memory_utilization",
            "must be in (0, 1)",
            self.gpu_memory_utilization,
        )
        require_option("rollout.engine", self.engine, ENGINES)
        if self.engine == "vllm":
            from common.rollout.vllm_engine import vllm_available  # the optional engine's module, on demand

            usable, reason = vllm_available()
            if not usable:
                raise ConfigError(
                    f"rollout.engine: vllm: {reason}; rollout.engine=hf (or generate) works everywhere"
                )


@dataclass
class OptimConfig:
    """optim: the policy's AdamW, warm-up and gradient clipping."""

    lr: float
    warmup_steps: int
    weight_decay: float
    betas: list[float]
    max_grad_norm: float

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        # AdamW multiplies the weights by 1 - lr x weight_decay every step: at 1 or more they vanish or flip
        require(
            self.lr * self.weight_decay < 1,
            "optim.weight_decay",
            f"optim.lr x weight_decay must be < 1 (lr {self.lr})",
            self.weight_decay,
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
            list(self.betas),
        )
        require(self.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0", self.max_grad_norm)


HEAD_INITS = ("normal", "zeros")  # critic.head_init: the value head's initialisation (ppo.critic.ValueModel)


@dataclass
class CriticConfig:
    """critic: PPO's value model, read only by algorithms with a critic."""

    lr: float
    warmup_steps: int
    name_or_path: str | None
    head_init: str

    def __post_init__(self) -> None:
        require(self.lr > 0, "critic.lr", "must be > 0", self.lr)
        require(self.warmup_steps >= 0, "critic.warmup_steps", "must be >= 0", self.warmup_steps)
        require_option("critic.head_init", self.head_init, HEAD_INITS)


@dataclass
class RewardConfig:
    """reward: weights of the terms added to the task's correctness."""

    format_weight: float

    def __post_init__(self) -> None:
        # a bonus for the answer format; a negative weight would train the format away
        require(self.format_weight >= 0, "reward.format_weight", "must be >= 0", self.format_weight)


@dataclass
class LoggerConfig:
    """logger: W&B or local files only (configs/logger/*.yaml)."""

    backend: str
    mode: str
    project: str
    entity: str | None


@dataclass
class PathsConfig:
    cache_dir: str


@dataclass
class DynamicSampling:
    """dynamic_sampling=disabled; the other modes are options with keys of their own."""

    mode: str

    MODES: ClassVar[tuple[str, ...]] = ("disabled",)

    def __post_init__(self) -> None:
        require_option("dynamic_sampling.mode", self.mode, DYNAMIC_SAMPLING_MODES)
        require(
            self.mode in self.MODES,
            "dynamic_sampling.mode",
            f"select a mode with its group option (dynamic_sampling={self.mode}), which brings its keys",
            self.mode,
        )


@dataclass
class FilterSampling(DynamicSampling):
    """dynamic_sampling=filter (DAPO Eq. 11): drop flat groups, refill from new prompts; each round
    draws gen_batch_size_factor x trainer.batch_size prompts, and on_exhausted says what happens
    after max_num_gen_batches rounds that did not fill the batch."""

    max_num_gen_batches: int
    gen_batch_size_factor: float
    on_exhausted: str

    MODES: ClassVar[tuple[str, ...]] = ("filter",)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.max_num_gen_batches >= 1,
            "dynamic_sampling.max_num_gen_batches",
            "must be >= 1",
            self.max_num_gen_batches,
        )
        require(
            self.gen_batch_size_factor >= 1,
            "dynamic_sampling.gen_batch_size_factor",
            "must be >= 1",
            self.gen_batch_size_factor,
        )
        require_option("dynamic_sampling.on_exhausted", self.on_exhausted, ON_EXHAUSTED)

    def prompts_per_round(self, batch_size: int) -> int:
        """Prompts per generation round (verl's gen_batch_size): ceil(factor x batch_size)."""
        return math.ceil(self.gen_batch_size_factor * batch_size)


@dataclass
class ResampleSampling(DynamicSampling):
    """dynamic_sampling=resample: grow flat groups one response at a time."""

    max_samples: int

    MODES: ClassVar[tuple[str, ...]] = ("resample",)


@dataclass
class TrainConfig:
    """configs/train.yaml: every group, and the checks of keys from different groups.

    `algorithm` is an algorithm's own schema (grpo/, dapo/, ppo/) and `task` a task's
    (common.tasks.task_schema): each YAML option names its schema, so they are typed as Any here.
    """

    experiment_name: str
    arm: str
    objective: str
    seed: int
    resume: str | None
    model: ModelConfig
    # rollout before algorithm: an algorithm key may interpolate a rollout one (loss_scale_factor is
    # ${rollout.max_new_tokens}), whose own check should be the one that names a bad value
    rollout: RolloutConfig
    task: Any
    algorithm: Any
    dynamic_sampling: DynamicSampling
    logger: LoggerConfig
    trainer: TrainerConfig
    optim: OptimConfig
    critic: CriticConfig
    reward: RewardConfig
    paths: PathsConfig

    def __post_init__(self) -> None:
        # numpy's generator takes seeds in [0, 2**32); python's and torch's take any integer
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)", self.seed)
        t, G = self.trainer, self.rollout.group_size
        rows = t.mini_batch_prompts * G
        require(
            t.micro_batch_size >= 1 and (rows % t.micro_batch_size == 0 or t.micro_batch_size >= rows),
            "trainer.micro_batch_size",
            f"must divide the {rows} sequences of a mini-batch "
            "(trainer.mini_batch_size x rollout.group_size)",
            t.micro_batch_size,
        )
        require(
            t.zero_stage < 2 or not self.model.lora.enabled,
            "trainer.zero_stage",
            "2 and 3 shard the weights (FSDP), which is not supported with LoRA (model.lora.enabled): "
            "use zero_stage 0 or 1 (the frozen base is not trained, so its memory is weights only)",
            t.zero_stage,
        )
        require(
            t.zero_stage < 2 or self.rollout.dtype == "float32" or self.rollout.engine == "vllm",
            "rollout.dtype",
            "a lower-precision copy of the weights per rollout is not made from FSDP-sharded weights "
            "(trainer.zero_stage 2 or 3): use float32 or zero_stage 0 / 1",
            self.rollout.dtype,
        )
        for key, value, fp32 in (
            ("trainer.bf16", t.bf16, False),
            ("rollout.dtype", self.rollout.dtype, "float32"),
            ("rollout.prepack_linears", self.rollout.prepack_linears, "auto"),
        ):
            require(  # auto: float32 under portable numerics (common.precision)
                not t.portable_numerics or value in (fp32, "never", "auto"),
                key,
                "trainer.portable_numerics=true pins float32 MKL kernels; bf16 and prepacked linears "
                "run oneDNN's",
                value,
            )
        ds = self.dynamic_sampling
        require(
            ds.mode == "disabled" or self.algorithm.group_relative,
            "dynamic_sampling",
            f"{ds.mode} drops or grows groups of responses and needs a group algorithm, "
            f"not {self.algorithm.name} with adv_estimator={self.algorithm.adv_estimator}",
            ds.mode,
        )
        if isinstance(ds, FilterSampling):
            world, prompts = launched_world_size(), ds.prompts_per_round(t.batch_size)
            require(
                prompts % world == 0,
                "dynamic_sampling.gen_batch_size_factor",
                f"{ds.gen_batch_size_factor} x trainer.batch_size={t.batch_size} = {prompts} prompts per "
                f"round must be a multiple of the {world} data-parallel processes",
                ds.gen_batch_size_factor,
            )
        if isinstance(ds, ResampleSampling):
            require(
                ds.max_samples > G,
                "dynamic_sampling.max_samples",
                f"must exceed rollout.group_size={G}",
                ds.max_samples,
            )


@dataclass(frozen=True)
class RunSettings:
    """What the loop and the update read of the checked config: the typed sections themselves
    (scripts/build.py build_settings), not a copy, so each setting has one definition and one
    default (configs/train.yaml); part of the run's common.trainer.RunContext."""

    trainer: TrainerConfig
    optim: OptimConfig
    reward: RewardConfig
    # DynamicSampling (disabled), FilterSampling or ResampleSampling, by dynamic_sampling.mode
    dynamic_sampling: DynamicSampling
    seed: int
