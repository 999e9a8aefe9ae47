"""Config -> objects. The one place that reads `cfg`; everything below it takes keyword arguments.

Every check here fails at start-up with a ConfigError that names the key, before any model loads.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common.algorithm import Algorithm
from common.distributed import DistContext, launched_world_size
from common.models import apply_lora, load_policy, save_hf
from common.rollout import HFRollout
from common.rollout_vllm import vllm_available
from common.tasks import Task, build_task
from common.trainer import Critic, FlatGroups, GroupFilter, TrainSettings
from dapo import DAPO, filter_groups, groups_to_resample
from grpo import GRPO
from ppo import PPO, build_critic

ALGORITHMS = {"ppo": PPO, "grpo": GRPO, "dapo": DAPO}
GROUP_ALGORITHMS = {"grpo", "dapo"}
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")
DYNAMIC_SAMPLING_MODES = ("disabled", "filter", "resample")
DDP_BACKENDS = ("auto", "gloo", "nccl")
ZERO_STAGES = (0, 1, 2, 3)
# accelerate's FSDP sharding strategies (names, or the numbers of FSDP1's enum) -> trainer.zero_stage
FSDP_STRATEGIES = {"FULL_SHARD": 3, "1": 3, "SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0}
ROLLOUT_ENGINES = ("hf", "vllm")


class ConfigError(ValueError):
    """A bad or contradictory setting; the message names the key and the allowed values."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


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
    """Reject settings that would fail (or silently mislead) later, naming the key."""
    algo = cfg.algorithm
    _require(
        algo.name in ALGORITHMS,
        "algorithm",
        f"unknown algorithm {algo.name!r}; options: {', '.join(ALGORITHMS)}",
    )
    G = cfg.rollout.group_size
    if algo.name in GROUP_ALGORITHMS:
        _require(
            G >= 2,
            "rollout.group_size",
            f"{algo.name} compares responses within a group and needs group_size >= 2 (got {G})",
        )
    _require(
        cfg.rollout.max_new_tokens >= 1,
        "rollout.max_new_tokens",
        f"must be >= 1 (got {cfg.rollout.max_new_tokens})",
    )
    _require(
        cfg.rollout.temperature > 0, "rollout.temperature", f"must be > 0 (got {cfg.rollout.temperature})"
    )
    _require(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1] (got {cfg.rollout.top_p})")
    _require(
        cfg.rollout.engine in ROLLOUT_ENGINES,
        "rollout.engine",
        f"{cfg.rollout.engine!r}; options: {', '.join(ROLLOUT_ENGINES)}",
    )
    if cfg.rollout.engine == "vllm":
        usable, reason = vllm_available()
        _require(usable, "rollout.engine", f"vllm: {reason}; rollout.engine=hf works everywhere")
        _require(
            0 < cfg.rollout.gpu_memory_utilization < 1,
            "rollout.gpu_memory_utilization",
            f"must be in (0, 1) (got {cfg.rollout.gpu_memory_utilization})",
        )
    t = cfg.trainer
    _require(t.max_steps >= 0, "trainer.max_steps", f"must be >= 0 (got {t.max_steps})")
    _require(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1 (got {t.batch_size})")
    mini = t.mini_batch_size or t.batch_size
    _require(
        1 <= mini <= t.batch_size and t.batch_size % mini == 0,
        "trainer.mini_batch_size",
        f"must divide trainer.batch_size={t.batch_size} (got {mini})",
    )
    rows = mini * G
    _require(
        t.micro_batch_size >= 1 and (rows % t.micro_batch_size == 0 or t.micro_batch_size >= rows),
        "trainer.micro_batch_size",
        f"must divide the {rows} sequences of a mini-batch (trainer.mini_batch_size x rollout.group_size)"
        f" (got {t.micro_batch_size})",
    )
    world = launched_world_size()
    _require(
        t.batch_size % world == 0 and mini % world == 0,
        "trainer.batch_size",
        f"trainer.batch_size={t.batch_size} and trainer.mini_batch_size={mini} must be multiples of the "
        f"{world} data-parallel processes (each rank rolls out whole groups of its share of the prompts)",
    )
    _require(
        t.zero_stage in ZERO_STAGES,
        "trainer.zero_stage",
        f"{t.zero_stage}; options: 0 (off), 1 (AdamW state sharded over data-parallel ranks), "
        "2 (+ gradients, FSDP SHARD_GRAD_OP), 3 (+ weights, FSDP FULL_SHARD)",
    )
    _require(
        t.zero_stage < 2 or not cfg.model.lora.enabled,
        "trainer.zero_stage",
        f"{t.zero_stage} shards the weights (FSDP), which is not supported with LoRA (model.lora.enabled): "
        "use zero_stage 0 or 1 (the frozen base is not trained, so its memory is weights only)",
    )
    _require(
        t.ddp_backend in DDP_BACKENDS,
        "trainer.ddp_backend",
        f"{t.ddp_backend!r}; options: {', '.join(DDP_BACKENDS)}",
    )
    _require(t.max_bad_steps >= 1, "trainer.max_bad_steps", f"must be >= 1 (got {t.max_bad_steps})")
    _require(cfg.optim.lr > 0, "optim.lr", f"must be > 0 (got {cfg.optim.lr})")
    _require(
        cfg.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0 (got {cfg.optim.warmup_steps})"
    )
    _require(
        cfg.optim.max_grad_norm > 0, "optim.max_grad_norm", f"must be > 0 (got {cfg.optim.max_grad_norm})"
    )
    for key in ("clip_low", "clip_high"):
        value = algo[key]
        _require(0 < value < 1, f"algorithm.{key}", f"must be in (0, 1) (got {value})")
    _require(
        algo.dual_clip is None or algo.dual_clip > 1,
        "algorithm.dual_clip",
        f"must be > 1 or null (got {algo.dual_clip})",
    )
    _require(
        algo.loss_agg in LOSS_AGG_MODES,
        "algorithm.loss_agg",
        f"{algo.loss_agg!r}; options: {', '.join(LOSS_AGG_MODES)}",
    )
    _require(
        algo.kl_kind in KL_KINDS, "algorithm.kl_kind", f"{algo.kl_kind!r}; options: {', '.join(KL_KINDS)}"
    )
    _require(algo.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0 (got {algo.kl_coef})")
    if algo.name in GROUP_ALGORITHMS:
        _require(
            algo.num_iterations >= 1, "algorithm.num_iterations", f"must be >= 1 (got {algo.num_iterations})"
        )
    else:
        validate_ppo(algo)
    ds = cfg.dynamic_sampling
    _require(
        ds.mode in DYNAMIC_SAMPLING_MODES,
        "dynamic_sampling.mode",
        f"{ds.mode!r}; options: {', '.join(DYNAMIC_SAMPLING_MODES)}",
    )
    if ds.mode != "disabled":
        _require(
            algo.name in GROUP_ALGORITHMS,
            "dynamic_sampling",
            f"{ds.mode} needs a group algorithm, not {algo.name}",
        )
    if ds.mode == "filter":
        _require(ds.max_num_gen_batches >= 1, "dynamic_sampling.max_num_gen_batches", "must be >= 1")
    if ds.mode == "resample":
        _require(
            ds.max_samples > G,
            "dynamic_sampling.max_samples",
            f"must exceed rollout.group_size={G} (got {ds.max_samples})",
        )
    if algo.name == "dapo" and algo.overlong_shaping and algo.overlong_buffer_len is not None:
        _require(
            0 < algo.overlong_buffer_len <= algo.max_len,
            "algorithm.overlong_buffer_len",
            f"must be in (0, algorithm.max_len={algo.max_len}] or null (got {algo.overlong_buffer_len})",
        )
    if cfg.model.lora.enabled:
        validate_lora(cfg.model.lora)
    _require(cfg.critic.lr > 0, "critic.lr", f"must be > 0 (got {cfg.critic.lr})")


def validate_ppo(algo: DictConfig) -> None:
    _require(algo.ppo_epochs >= 1, "algorithm.ppo_epochs", f"must be >= 1 (got {algo.ppo_epochs})")
    _require(algo.kl_ctl in KL_CONTROLLERS, "algorithm.kl_ctl", f"{algo.kl_ctl!r}; options: fixed, adaptive")
    for key in ("gamma", "lam"):
        _require(0 <= algo[key] <= 1, f"algorithm.{key}", f"must be in [0, 1] (got {algo[key]})")
    _require(
        algo.cliprange_value is None or algo.cliprange_value > 0,
        "algorithm.cliprange_value",
        f"must be > 0 or null (got {algo.cliprange_value})",
    )
    _require(algo.vf_coef >= 0, "algorithm.vf_coef", f"must be >= 0 (got {algo.vf_coef})")
    if algo.kl_ctl == "adaptive":
        _require(algo.kl_target > 0, "algorithm.kl_target", f"must be > 0 (got {algo.kl_target})")
        _require(algo.kl_horizon > 0, "algorithm.kl_horizon", f"must be > 0 (got {algo.kl_horizon})")


def validate_lora(lora: DictConfig) -> None:
    """model.lora, checked only when enabled: the adapter's rank, scale, dropout and layers."""
    _require(
        isinstance(lora.r, int) and lora.r >= 1,
        "model.lora.r",
        f"must be an integer >= 1 (got {lora.r})",
    )
    _require(lora.alpha > 0, "model.lora.alpha", f"must be > 0 (got {lora.alpha})")
    _require(0 <= lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1) (got {lora.dropout})")
    modules = lora.target_modules
    _require(
        OmegaConf.is_list(modules) and len(modules) > 0 and all(isinstance(m, str) for m in modules),
        "model.lora.target_modules",
        f"must be a non-empty list of module names, e.g. [q_proj, v_proj] (got {modules})",
    )


def build_algorithm(cfg: DictConfig) -> Algorithm:
    """The algorithm dataclass from cfg.algorithm; a missing or unknown key fails here, named."""
    fields = OmegaConf.to_container(cfg, resolve=True)
    cls = ALGORITHMS[fields["name"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    missing = sorted(names - set(fields))
    _require(not unknown, "algorithm", f"unknown key(s) for {fields['name']}: {', '.join(unknown)}")
    _require(not missing, "algorithm", f"missing key(s) for {fields['name']}: {', '.join(missing)}")
    return cls(**fields)


def build_group_filter(cfg: DictConfig) -> GroupFilter | None:
    """DAPO's group filter (Eq. 11) when dynamic_sampling.mode is filter, else None."""
    return filter_groups if cfg.dynamic_sampling.mode == "filter" else None


def build_flat_groups(cfg: DictConfig) -> FlatGroups | None:
    """The all-equal-group finder of the resample mode, else None."""
    return groups_to_resample if cfg.dynamic_sampling.mode == "resample" else None


def build_settings(cfg: DictConfig) -> TrainSettings:
    t = cfg.trainer
    ds = cfg.dynamic_sampling
    return TrainSettings(
        max_steps=t.max_steps,
        batch_size=t.batch_size,
        mini_batch_size=t.mini_batch_size or t.batch_size,
        micro_batch_size=t.micro_batch_size,
        max_grad_norm=cfg.optim.max_grad_norm,
        format_weight=cfg.reward.format_weight,
        eval_every=t.eval_every,
        eval_num_prompts=t.eval_num_prompts,
        log_samples_every=t.log_samples_every,
        num_samples_logged=t.num_samples_logged,
        save_every=t.save_every,
        keep_last_checkpoints=t.keep_last_checkpoints,
        max_bad_steps=t.max_bad_steps,
        bf16=t.bf16,
        fail_on_reward_error=t.fail_on_reward_error,
        max_num_gen_batches=ds.max_num_gen_batches if ds.mode == "filter" else 1,
        max_samples=ds.max_samples if ds.mode == "resample" else 0,
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
        value_model = wrap(build_critic(model, c.name_or_path))
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
    with gradient checkpointing when model.gradient_checkpointing is set, wrapped in LoRA adapters
    (only they train) when model.lora.enabled is set."""
    model, tokenizer = load_policy(
        cfg.model.source,
        name_or_path=cfg.model.name_or_path,
        cache_dir=cfg.paths.cache_dir,
        tiny=OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None,
        dtype=cfg.model.dtype,
        seed=cfg.seed,
    )
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


def build_rollout(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> HFRollout:
    """The rollout engine (cfg.rollout.engine: hf or vllm) with cfg.rollout's sampling settings."""
    r = cfg.rollout
    sampling = dict(
        group_size=r.group_size,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        system_prompt=r.system_prompt,
        max_prompt_len=r.max_prompt_len,
    )
    if r.engine == "hf":
        return HFRollout(model, tokenizer, **sampling)
    from common.rollout_vllm import VLLMRollout  # optional extra, GPU only

    # vLLM builds its copy from a folder; the weights are synced from the policy right after
    with tempfile.TemporaryDirectory(prefix="rl-lab-vllm-") as folder:
        save_hf(model, tokenizer, folder)
        return VLLMRollout(
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
