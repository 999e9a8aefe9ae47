"""Config -> objects. The one place that reads `cfg`; everything below it takes keyword arguments.

The schemas of the config groups (common.config, the algorithm dataclasses, common.tasks.task_schema)
are registered in Hydra's ConfigStore here (`store_schemas`); `validate` runs their checks. Every
check fails at start-up with a ConfigError that names the key, before any model loads.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.algorithm import Algorithm
from common.config import (
    ConfigError,
    DynamicSampling,
    FilterSampling,
    ResampleSampling,
    RunSettings,
    TrainConfig,
    as_config_error,
    require,
    require_option,
    schema_node,
)
from common.config_checks import require_finite
from common.distributed import DistContext, launched_world_size
from common.models import apply_lora, disable_dropout, load_policy, save_hf
from common.rollout.decode import DecodeTricks
from common.rollout.engine import RolloutEngine, make_engine
from common.run_folder import identity_error, run_identity
from common.sampling import FlatGroups, GroupFilter
from common.tasks import TASKS, Task, build_task, task_schema
from common.update import Critic
from dapo import DAPO, filter_groups, groups_to_resample
from grpo import GRPO
from ppo import PPO, build_critic

ALGORITHMS = {"ppo": PPO, "grpo": GRPO, "dapo": DAPO}
DYNAMIC_SAMPLING = {"disabled": DynamicSampling, "filter": FilterSampling, "resample": ResampleSampling}
# accelerate's FSDP sharding strategies (names, or the numbers of FSDP1's enum) -> trainer.zero_stage
FSDP_STRATEGIES = {"FULL_SHARD": 3, "1": 3, "SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0}

log = logging.getLogger("rl_lab")


def launcher_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings an `accelerate launch` config asks for (read from the variables accelerate sets),
    as this repo's keys. accelerate only starts the processes; the training loop shards and casts
    itself (common.distributed), so its config must be translated, not ignored:

        distributed_type FSDP, fsdp_version 2, fsdp_reshard_after_forward true/false -> zero_stage 3/2
        distributed_type FSDP, fsdp_sharding_strategy FULL_SHARD / SHARD_GRAD_OP / NO_SHARD -> 3 / 2 / 0
        fsdp_activation_checkpointing true                 -> model.gradient_checkpointing=true
        distributed_type DEEPSPEED, zero_stage k           -> trainer.zero_stage=k (run by torch's
                                                              ZeRO-1 / FSDP2, not by DeepSpeed)
        mixed_precision bf16                               -> trainer.bf16=true

    Raises ConfigError for what the loop cannot do (fp16, parameter / optimizer offload, HYBRID_SHARD).
    """
    out: dict[str, Any] = {}
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") == "2":
            out["trainer.zero_stage"] = 3 if env.get("FSDP_RESHARD_AFTER_FORWARD", "true") == "true" else 2
        else:
            strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
            if strategy not in FSDP_STRATEGIES:
                raise ConfigError(
                    f"accelerate config: fsdp_sharding_strategy {strategy} is not supported; options: "
                    "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD"
                )
            out["trainer.zero_stage"] = FSDP_STRATEGIES[strategy]
        if env.get("FSDP_OFFLOAD_PARAMS", "false") == "true":
            raise ConfigError("accelerate config: fsdp_offload_params is not supported; set it to false")
        if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true":
            out["model.gradient_checkpointing"] = True
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        for key in (
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        ):
            if env.get(key, "none") not in ("none", ""):
                raise ConfigError(
                    f"accelerate config: DeepSpeed offload ({key}) is not supported; set it to none"
                )
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
            out["trainer.zero_stage"] = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision == "bf16":
        out["trainer.bf16"] = True
    elif precision != "no":
        raise ConfigError(
            f"accelerate config: mixed_precision {precision} is not supported; options: no, bf16"
        )
    return out


def apply_launcher_settings(cfg: DictConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """Set the keys `launcher_settings(env)` asks for in cfg; returns them. A key the command line
    set to another non-default value (e.g. trainer.zero_stage=1 under an FSDP config) is a
    ConfigError rather than a silent choice."""
    settings = launcher_settings(env)
    for key, value in settings.items():
        current = OmegaConf.select(cfg, key)
        if current not in (0, False, value):
            raise ConfigError(
                f"{key}={current} contradicts the accelerate config, which asks for {key}={value}: "
                "drop one of the two"
            )
        OmegaConf.update(cfg, key, value)
    return settings


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail (or silently mislead) later, naming the key, before any model
    loads: the algorithm's name here, a NaN or infinity anywhere (common.config_checks), then
    every schema's own checks (common.config, and each algorithm's in grpo/, dapo/, ppo/), which run
    as the composed config becomes its dataclasses."""
    require_option("algorithm.name", cfg.algorithm.name, list(ALGORITHMS))
    try:
        require_known_keys(cfg)
        require_finite(cfg)
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise as_config_error(err) or ConfigError(str(err).splitlines()[0]) from err


def require_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Raise ConfigError for a key that no schema reads: `+trainer.max_step=3`, `++rollout.temprature=0.1`
    or `+foo=1` add a key to a typed section (Hydra's `+` opens the struct flag that refuses a plain
    `trainer.max_step=3`), where nothing would read it. Sections typed as a free mapping (model.tiny,
    the tiny model's config) stay open; Hydra's own node (`hydra`, with its `+hydra...` keys) is not a
    schema's and is skipped."""
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if not prefix and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if fields is not None and key not in fields:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"{name}: not a key of {where} (got {node[key]})")
        if not OmegaConf.is_missing(node, key) and isinstance(child := node[key], DictConfig):
            require_known_keys(child, f"{name}.")


def check_bool_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A boolean key takes true or false on the command line. OmegaConf would also read yes / no /
    on / off / 1 / 0 as booleans, so `trainer.bf16=yes` stops the run instead of being a guess."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        parent_key, _, leaf = override.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if not dataclasses.is_dataclass(schema) or typing.get_type_hints(schema).get(leaf) is not bool:
            continue
        value = override.value()
        if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ConfigError(f"{override.key_or_group}: must be true or false (got {value})")


def warn_unread_overrides(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """The critic.* keys set on the command line (`overrides`) for an algorithm without a critic,
    which nothing reads; one warning names them. A warning, not an error: a sweep over arms may set
    PPO's critic for every run (`-m arm=ppo,grpo critic.lr=1e-3`)."""
    algorithm = ALGORITHMS.get(cfg.algorithm.name)  # an unknown name: validate's error, later
    if algorithm is None or algorithm.needs_critic:
        return []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.key_or_group for o in parsed if o.key_or_group.startswith("critic.")]
    if keys:
        log.warning(
            "%s: read only by algorithms with a critic (ppo); %s ignores it",
            ", ".join(keys),
            cfg.algorithm.name,
        )
    return keys


def ensure_writable_folder(folder: str | Path) -> str | None:
    """Create `folder` (and its parents) and write a file into it; None when that works, else why
    not (e.g. "[Errno 20] Not a directory: '/tmp/file/run'")."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return str(err)
    return None


class OutputFolderCheck(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): a hydra.run.dir or hydra.sweep.dir
    that cannot be created or written stops the run in one line naming the key and the folder
    (`error: <key>: ...`, exit status 2), before Hydra uses it (where the failure is a traceback).
    It creates the folder as Hydra would a moment later (the same resolved path: Hydra's ${now:}
    is cached on the config), and exits itself: Hydra turns an exception raised in a callback into
    a warning and goes on."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        folder = OmegaConf.select(config, key)
        if (reason := ensure_writable_folder(folder)) is not None:
            print(
                f"error: {key}: cannot create or write the run folder ({reason}) (got {folder})",
                file=sys.stderr,
            )
            sys.exit(2)


class RunFolderCheck(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): a single run that common.run_folder would
    refuse (a resume under other defining settings, a fresh start into a folder that holds a run)
    stops in one line before Hydra writes the run's .hydra/ files over those of the run it would
    have mixed with. scripts/train.py checks again, and records and locks, inside the job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            task = OmegaConf.to_container(task, resolve=True)
            folder = Path(OmegaConf.select(config, "hydra.run.dir"))
            error = identity_error(task.get("resume"), folder, run_identity(task))
        except (OmegaConfBaseException, ConfigError, OSError):  # left to the check inside the job
            return
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)


def store_schemas() -> None:
    """Register every config group's schema in Hydra's ConfigStore, under the names the YAML files
    give in their defaults lists (`- /schema/<group>/<option>@_here_`): schema/train for
    configs/train.yaml, schema/algorithm/<name>, schema/task/<name>, schema/dynamic_sampling/<mode>.
    A group of their own keeps them out of the options of algorithm=, task=, dynamic_sampling=.
    Call before composing train.yaml."""
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainConfig)
    for name, cls in ALGORITHMS.items():
        store.store(group="schema/algorithm", name=name, node=schema_node(cls))
    for name in TASKS:
        store.store(group="schema/task", name=name, node=task_schema(name))
    for mode, cls in DYNAMIC_SAMPLING.items():
        store.store(group="schema/dynamic_sampling", name=mode, node=cls)


def build_algorithm(cfg: DictConfig) -> Algorithm:
    """The algorithm dataclass from cfg.algorithm; a missing or unknown key fails here, named."""
    fields = OmegaConf.to_container(cfg, resolve=True)
    cls = ALGORITHMS[fields["name"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    missing = sorted(names - set(fields))
    require(not unknown, "algorithm", f"unknown key(s) for {fields['name']}", ", ".join(unknown))
    require(not missing, "algorithm", f"missing key(s) for {fields['name']}", ", ".join(missing))
    return cls(**fields)


def build_group_filter(cfg: DictConfig) -> GroupFilter | None:
    """DAPO's group filter (Eq. 11) when dynamic_sampling.mode is filter, else None."""
    return filter_groups if cfg.dynamic_sampling.mode == "filter" else None


def build_flat_groups(cfg: DictConfig) -> FlatGroups | None:
    """The all-equal-group finder of the resample mode, else None."""
    return groups_to_resample if cfg.dynamic_sampling.mode == "resample" else None


def build_settings(cfg: DictConfig) -> RunSettings:
    """The typed trainer / optim / reward / dynamic_sampling sections of the checked config, as the
    loop reads them (common.config.RunSettings)."""
    return RunSettings(
        trainer=OmegaConf.to_object(cfg.trainer),
        optim=OmegaConf.to_object(cfg.optim),
        reward=OmegaConf.to_object(cfg.reward),
        dynamic_sampling=OmegaConf.to_object(cfg.dynamic_sampling),
        seed=cfg.seed,
    )


def build_optimizer(
    model: torch.nn.Module, cfg: DictConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up over optim.warmup_steps optimizer steps, then a constant rate.

    trainer.zero_stage=1 under data parallel: the AdamW state is sharded over the ranks (ZeRO stage 1,
    Rajbhandari et al. 2020, via torch's ZeroRedundancyOptimizer): each rank keeps and updates 1/W
    of it, then the updated parameters are broadcast; the update itself is unchanged."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if cfg.trainer.zero_stage == 1 and launched_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
    else:
        optimizer = torch.optim.AdamW(params, **adamw)
    warmup = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler


def build_critic_for(
    algo: Algorithm,
    model: torch.nn.Module,
    cfg: DictConfig,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> Critic | None:
    """PPO's value model (a copy of the policy's backbone unless critic.name_or_path is set), passed
    through `wrap` (data parallel: common.distributed.wrap_model), and its AdamW on the wrapped
    parameters (FSDP replaces them with shards), from the config's `critic:` block."""
    if not algo.needs_critic:
        return None
    c = cfg.critic
    try:
        value_model = wrap(build_critic(model, c.name_or_path, c.head_init))
    except ValueError as err:
        raise ConfigError(f"critic.name_or_path: {err}") from err
    optimizer = torch.optim.AdamW(value_model.parameters(), lr=c.lr, betas=tuple(cfg.optim.betas))
    return Critic(value_model, optimizer, max_grad_norm=cfg.optim.max_grad_norm, warmup_steps=c.warmup_steps)


def build_task_from(cfg: DictConfig) -> Task:
    """The task of cfg.task (its name picks the class, the other keys are its arguments)."""
    kwargs = OmegaConf.to_container(cfg.task, resolve=True)
    return build_task(kwargs.pop("name"), **kwargs)


def build_policy(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """The policy and its tokenizer from cfg.model (the packaged GGUF, the tiny model or a hub id/path),
    without dropout when model.disable_dropout is set, with gradient checkpointing when
    model.gradient_checkpointing is set, wrapped in LoRA adapters (only they train) when
    model.lora.enabled is set."""
    model, tokenizer = load_policy(
        cfg.model.source,
        name_or_path=cfg.model.name_or_path,
        cache_dir=cfg.paths.cache_dir,
        tiny=OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None,
        dtype=cfg.model.dtype,
        seed=cfg.seed,
    )
    if cfg.model.disable_dropout:
        disable_dropout(model)  # before LoRA: the adapters' dropout is model.lora.dropout
    if cfg.model.gradient_checkpointing:
        # non-reentrant: works with inputs that need no grad and with torch.no_grad passes
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.model.lora
    if lora.enabled:
        try:
            model = apply_lora(
                model, lora.r, lora.alpha, lora.dropout, list(lora.target_modules), seed=cfg.seed
            )
        except ValueError as err:
            raise ConfigError(f"model.lora.target_modules: {err}") from err
    return model, tokenizer


def truncated_sampling_warning(rollout: DictConfig) -> str | None:
    """The start-up warning for rollout.top_p < 1 or rollout.top_k > 0, else None.

    Truncated sampling draws tokens from the renormalised top-p / top-k distribution q, while every
    log-prob the update uses (old, reference, the ratio, the KL) is the full softmax p at the
    temperature. The importance ratio then corrects for nothing of the truncation: the samples are
    off-policy by q / p, which the surrogate ignores, and tokens outside the kept set never appear.
    """
    settings = [f"rollout.top_p={rollout.top_p}"] if rollout.top_p < 1 else []
    settings += [f"rollout.top_k={rollout.top_k}"] if rollout.top_k > 0 else []
    if not settings:
        return None
    return (
        f"{' and '.join(settings)}: responses are sampled from the truncated distribution, but the log-probs "
        "of the update (old, reference, ratio, KL) come from the full softmax at rollout.temperature, so "
        "the samples are off-policy by the truncation; top_p=1.0 and top_k=0 keep sampling and training on "
        "the same distribution"
    )


def build_rollout(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    """The rollout engine cfg.rollout.engine (common.rollout.engine.ENGINES) with cfg.rollout's sampling
    settings; warns when top-p / top-k truncation makes sampling differ from the training log-probs."""
    r = cfg.rollout
    if (warning := truncated_sampling_warning(r)) is not None:
        log.warning(warning)
    sampling = dict(
        group_size=r.group_size,
        max_new_tokens=r.max_new_tokens,
        min_new_tokens=r.min_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        system_prompt=r.system_prompt,
        max_prompt_len=r.max_prompt_len,
        dtype=r.dtype,
    )
    if r.engine in ("hf", "decode"):
        # portable numerics: no choice by timing, which would differ between machines
        prepack = "never" if cfg.trainer.portable_numerics else r.prepack_linears
        tricks = DecodeTricks(prepack, r.preallocated_cache, r.inplace_row_removal, r.shared_prefix)
        return make_engine(r.engine, model, tokenizer, tricks=tricks, **sampling)
    if r.engine == "generate":
        return make_engine(r.engine, model, tokenizer, **sampling)
    # vLLM builds its copy from a folder; the weights are synced from the policy right after
    with tempfile.TemporaryDirectory(prefix="rl-lab-vllm-") as folder:
        save_hf(model, tokenizer, folder)
        return make_engine(
            "vllm",
            model,
            tokenizer,
            model_path=folder,
            gpu_memory_utilization=r.gpu_memory_utilization,
            seed=cfg.seed,
            **sampling,
        )


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """trainer.device -> a torch device; under data parallel on GPUs, this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {name!r} requested but CUDA is not available")
    if name == "cuda" and dist is not None and dist.enabled:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)
