"""Train a policy with PPO, GRPO or DAPO.

    python -m scripts.train                                  # GRPO on addition with SmolLM2-135M-Instruct
    python -m scripts.train algorithm=dapo group_size=g16 seed=3
    python -m scripts.train -m algorithm=grpo,dapo seed=0,1,2
    python -m scripts.train debug=smoke                      # seconds, tiny model, no W&B
    torchrun --nproc_per_node 2 -m scripts.train model=tiny  # data parallel (also: accelerate launch)

The only module that reads the Hydra config: it validates it, builds the objects into one
common.trainer.RunContext and calls common.trainer.train with it.
"""

# ruff: noqa: E402 (the repository root goes on sys.path before the imports of its packages)
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

if not __package__:  # `python scripts/train.py` (a file, not -m): its folder, not the root, is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.algorithm import Algorithm
from common.checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    load_newest,
    resume_candidates,
    set_aside_newer,
)
from common.config import as_config_error
from common.distributed import (
    SINGLE,
    DistContext,
    DistributedError,
    init_distributed,
    launched_world_size,
    shard_model,
    shutdown,
    wrap_model,
)
from common.logging import LogWriteError, RunLogger, WandbInit
from common.models import ModelLoadError, make_reference
from common.numerics import pin_portable_numerics
from common.precision import PrecisionChoice, Workload, record_precision, resolve_precision
from common.provenance import record_start
from common.rollout.base import PromptTooLongError
from common.rollout.engine import RolloutEngine
from common.run_folder import check_identity, run_folder_lock, run_identity
from common.sampling import DynamicSamplingError
from common.state import RunAbortedError, RunInterruptedError
from common.tasks import Task, TaskError
from common.trainer import RunContext, train
from scripts.build import (
    ConfigError,
    apply_launcher_settings,
    build_algorithm,
    build_critic_for,
    build_flat_groups,
    build_group_filter,
    build_optimizer,
    build_policy,
    build_rollout,
    build_settings,
    build_task_from,
    check_bool_overrides,
    resolve_device,
    store_schemas,
    validate,
    warn_unread_overrides,
)
from scripts.sweeps import record_failure

log = logging.getLogger("rl_lab")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_resume_state(
    resume: str | None, run_dir: Path, model: torch.nn.Module, dist: DistContext = SINGLE
) -> dict | None:
    """resume=PATH: that checkpoint. resume=auto: the newest complete checkpoint in run_dir that can
    be read (common.checkpoint.load_newest; none at all: start fresh). Rank 0 clears what an
    interrupted save left and lists the candidates; every rank then tries the same list."""
    if not resume:
        return None
    if resume == "auto":
        candidates = dist.broadcast_object(resume_candidates(run_dir) if dist.is_main else None)
        if not candidates:
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
            return None
        path, state = load_newest(candidates, model)
    else:
        path = Path(resume)
        state = load_checkpoint(path, model)
        if dist.is_main:  # the run goes on from this step: what came after it is out of resume=auto's way
            set_aside_newer(run_dir, path, state["step"])
    log.info("resuming from %s (step %d)", path, state["step"])
    return state


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run, each word quoted for a POSIX shell where it needs it
    (a folder with a space: `'hydra.run.dir=/runs/my run'`)."""
    overrides = [
        o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.run.dir=", "resume="))
    ]
    world = launched_world_size()
    launcher = (
        f"torchrun --nproc_per_node {world} -m scripts.train" if world > 1 else "python -m scripts.train"
    )
    words = [*overrides, f"hydra.run.dir={run_dir}", "resume=auto"]
    return " ".join([launcher, *(shlex.quote(w) for w in words)])


def hand_on_signal(signum: int | None) -> None:
    """After the checkpoint a signal asked for: call the handler that held the signal before the run
    (under hydra/launcher=slurm, submitit's own: on its USR2 warning it requeues the job, which then
    resumes with resume=auto: hydra_plugins/rl_lab_launchers); nothing for Ctrl-C or a default handler."""
    handler = signal.getsignal(signum) if signum is not None else None
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


def shared_run_dir(run_dir: Path, dist: DistContext) -> Path:
    """Rank 0's run directory on every rank (Hydra's timestamped folder may differ by a second
    between processes); a rank's own folder, if different and holding only Hydra's files, goes."""
    main_dir = Path(dist.broadcast_object(str(run_dir)))
    if main_dir != run_dir and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
    return main_dir


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Validate cfg, build every object, train; returns the last step's metrics.

    Under torchrun / accelerate launch every process runs this: same seed (identical weights,
    reference and critic), then its own sampling stream; the policy and the critic train under DDP
    or, with trainer.zero_stage 2-3, FSDP (the reference is then sharded too). An accelerate
    config's FSDP / DeepSpeed / mixed-precision settings are mapped onto trainer keys first.
    """
    launched = apply_launcher_settings(cfg, os.environ)
    validate(cfg)
    dist = init_distributed(cfg.trainer.ddp_backend, cfg.trainer.zero_stage)
    if not dist.is_main:  # one voice on the console: other ranks report only problems
        log.setLevel(logging.WARNING)
    if launched:
        log.info("from the accelerate config: %s", " ".join(f"{k}={v}" for k, v in launched.items()))
    try:
        return _run(cfg, shared_run_dir(run_dir, dist) if dist.enabled else run_dir, dist)
    finally:
        shutdown(dist)


def sweep_num_threads(hydra_cfg: DictConfig, cores: int) -> int | None:
    """Torch threads per run of a parallel local sweep (hydra/launcher=local with n_jobs > 1, or
    n_jobs < 0 as joblib counts: -1 = one job per core): cores // jobs, at least 1, so the runs
    share the cores instead of each taking all of them (two 2-thread PPO runs on 2 cores took 3x
    as long per step as two 1-thread runs). None outside such a sweep: torch's own default."""
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs")
    if hydra_cfg.mode != RunMode.MULTIRUN or not isinstance(n_jobs, int) or n_jobs in (0, 1):
        return None
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // jobs)


def claim_run_folder(cfg: DictConfig, run_dir: Path, dist: DistContext) -> contextlib.ExitStack:
    """Rank 0 locks the run folder for the run and checks the run's identity against the one it
    recorded (common.run_folder); its one-line ConfigError is raised on every rank. Returns the lock,
    to hold with `with`."""
    lock, error = contextlib.ExitStack(), None
    if dist.is_main:
        try:
            lock.enter_context(run_folder_lock(run_dir))
            check_identity(cfg.resume, run_dir, run_identity(OmegaConf.to_container(cfg, resolve=True)))
        except ConfigError as err:
            lock.close()
            error = str(err)
    if (error := dist.broadcast_object(error)) is not None:
        raise ConfigError(error)
    return lock


def _run(cfg: DictConfig, run_dir: Path, dist: DistContext) -> dict[str, float]:
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    with claim_run_folder(cfg, run_dir, dist):
        ctx, resume_state = build_context(cfg, run_dir, dist)
        exit_code = 1
        try:
            metrics = train(ctx, resume_state)
            exit_code = 0
        finally:
            if ctx.logger is not None:
                ctx.logger.finish(exit_code)
    return metrics


def build_models(
    cfg: DictConfig, algo: Algorithm, device: torch.device
) -> tuple[torch.nn.Module, Any, torch.nn.Module | None]:
    """The policy on `device`, its tokenizer, and the frozen reference when the algorithm needs one."""
    model, tokenizer = build_policy(cfg)
    model.to(device)
    reference = make_reference(model) if algo.needs_reference else None
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "policy %s: %.1fM parameters on %s; reference model: %s",
        cfg.model.name,
        n_params / 1e6,
        device,
        "yes" if reference is not None else "no (kl_coef = 0)",
    )
    return model, tokenizer, reference


def check_prompt_lengths(engine: RolloutEngine, task: Task, task_name: str) -> None:
    """ConfigError naming the first prompt of the task that does not fit the rollout's limits, by
    file and line when the task read it from one (else by split and position)."""
    examples = task.train + task.test
    try:
        engine.check_prompts([e.prompt for e in examples])
    except PromptTooLongError as err:
        example, n_train = examples[err.index], len(task.train)
        where = example.source or (
            f"train prompt {err.index}" if err.index < n_train else f"held-out prompt {err.index - n_train}"
        )
        limits = "rollout.max_prompt_len, rollout.max_new_tokens"
        raise ConfigError(f"task {task_name}: {where}: the prompt {err.detail} ({limits})") from err


def build_context(cfg: DictConfig, run_dir: Path, dist: DistContext) -> tuple[RunContext, dict | None]:
    """Every object of the run, built once into the loop's RunContext, and the checkpoint state a
    resumed run continues from (None for a fresh run)."""
    device = resolve_device(cfg.trainer.device, dist)
    algo = build_algorithm(cfg.algorithm)
    task = build_task_from(cfg)
    log.info("task %s: %d train / %d held-out prompts", cfg.task.name, len(task.train), len(task.test))
    model, tokenizer, reference = build_models(cfg, algo, device)
    # the critic copies the initial policy's body before a resumed run loads the checkpoint's
    # weights (they replace its own), as the reference keeps the initial policy as the KL anchor;
    # bf16 matters only to FSDP (zero_stage 2-3), where trainer.bf16=auto is refused
    critic = build_critic_for(algo, model, cfg, wrap=lambda m: wrap_model(m, dist, cfg.trainer.bf16 is True))
    resume_state = load_resume_state(cfg.resume, run_dir, model, dist)
    precision = choose_precision(cfg, model, run_dir, resume_state, dist)
    settings = build_settings(cfg)
    engine = build_rollout(cfg, model, tokenizer)
    check_prompt_lengths(engine, task, cfg.task.name)
    if resume_state is not None and engine.syncs_weights:  # vLLM copies the weights it is built with
        engine.sync_weights(model)
    if dist.rank > 0:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # this rank's own sampling stream
    policy = wrap_model(model, dist, settings.trainer.bf16)  # FSDP: the same module, its weights sharded
    if reference is not None and dist.shards_params:
        shard_model(reference, dist, settings.trainer.bf16)
    # after wrapping: under FSDP the optimizer holds the sharded parameters
    optimizer, scheduler = build_optimizer(policy, cfg)
    if dist.enabled:
        wrapper = "FSDP" if dist.shards_params else "DDP"
        log.info(
            "data parallel: rank %d of %d (%s), %s, zero_stage %d",
            dist.rank,
            dist.world_size,
            device,
            wrapper,
            dist.zero_stage,
        )
    ctx = RunContext(
        model=policy,
        tokenizer=tokenizer,
        reference=reference,
        engine=engine,
        algo=algo,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        logger=make_logger(cfg, run_dir, resume_state) if dist.is_main else None,  # rank 0 logs
        settings=settings,
        run_dir=run_dir,
        device=device,
        group_filter=build_group_filter(cfg),
        flat_groups=build_flat_groups(cfg),
        critic=critic,
        dist=dist,
        precision=precision.to_state(),
    )
    return ctx, resume_state


def choose_precision(
    cfg: DictConfig, model: torch.nn.Module, run_dir: Path, resume_state: dict | None, dist: DistContext
) -> PrecisionChoice:
    """trainer.bf16 and rollout.dtype with auto resolved (common.precision), written into cfg for
    everything built after: the checkpoint's recorded choice on a resume, else rank 0's measurement
    on a small micro-batch (at most 4 rows x 32 tokens) and one decode step's rows (batch_size x
    group_size), shared with every rank."""
    t, r = cfg.trainer, cfg.rollout
    recorded = (resume_state or {}).get("precision")
    choice = None
    if dist.is_main:
        workload = Workload(
            min(t.micro_batch_size, 4), min(r.max_new_tokens, 32), t.batch_size * r.group_size
        )
        choice = resolve_precision(t.bf16, r.dtype, model, workload, t.portable_numerics, recorded)
        record_precision(choice, run_dir, resumed=recorded is not None)
    choice = dist.broadcast_object(choice)
    OmegaConf.update(cfg, "trainer.bf16", choice.bf16)
    OmegaConf.update(cfg, "rollout.dtype", choice.rollout_dtype)
    return choice


def make_logger(cfg: DictConfig, run_dir: Path, resume_state: dict | None) -> RunLogger:
    """The run's W&B / JSONL logger, continuing the W&B run of a resumed checkpoint."""
    config = OmegaConf.to_container(cfg, resolve=True)
    name = f"{cfg.arm}-{cfg.task.name}-s{cfg.seed}"
    wandb_init = WandbInit(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.experiment_name,
        name=name,
        job_type=cfg.arm,
        tags=(
            *dict.fromkeys((cfg.arm, cfg.algorithm.name)),  # the arm, and its algorithm when it differs
            cfg.task.name,
            cfg.model.name,
            f"G{cfg.rollout.group_size}",
            f"seed{cfg.seed}",
        ),
        config=config,
    )
    logger = RunLogger(
        run_dir,
        backend=cfg.logger.backend,
        mode=cfg.logger.mode,
        wandb_init=wandb_init,
        run_id=resume_state["wandb_run_id"] if resume_state else None,
        # resume=auto without a checkpoint yet starts afresh: the rows of a killed first attempt go
        resume_step=resume_state["step"] if resume_state else (-1 if cfg.resume == "auto" else None),
    )
    start = record_start(run_dir, Path(__file__).resolve().parents[1])
    log.info(
        "run %s in %s (commit %s)\n%s", name, run_dir, start["commit"], OmegaConf.to_yaml(cfg, resolve=True)
    )
    return logger


def worst_objective(hydra_cfg: DictConfig) -> float:
    """What a run that yields no objective returns to its sweeper: the worst value for the sweep's
    direction (-inf when it maximises, +inf when it minimises), which Optuna records as a finished,
    losing trial (a nan makes hydra-optuna-sweeper 1.3 with optuna 2.10 stop the whole study);
    nan for sweepers without a direction (the basic sweeper ignores the value)."""
    direction = OmegaConf.select(hydra_cfg, "sweeper.direction")
    if isinstance(direction, str):
        return -math.inf if direction == "maximize" else math.inf
    return math.nan


def objective(metrics: dict[str, float], key: str) -> float:
    """The value a Hydra sweeper (hydra/sweeper=optuna) optimises: `key` (config key `objective`,
    default eval/accuracy) of the run's last step; the worst value (worst_objective), with a
    warning, when the last step has no finite value of it (e.g. trainer.eval_every=0)."""
    value = metrics.get(key, math.nan)
    if not math.isfinite(value):
        log.warning("objective %s: the last step has no finite value (got %s)", key, value)
        return worst_objective(HydraConfig.get())
    return float(value)


def failed(message: str, exit_code: int) -> float:
    """A run that cannot go on: its one line on stderr, then the exit status `exit_code`, except
    inside a sweep (-m), where it returns the worst objective instead, so the other runs go on and
    a sweeper such as Optuna records the trial as lost. Under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        record_failure(Path(HydraConfig.get().runtime.output_dir), message)  # for the sweep's summary
        return worst_objective(HydraConfig.get())
    sys.exit(exit_code)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run; returns its objective (see `objective`) for sweepers."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_bool_overrides(cfg, HydraConfig.get().overrides.task)
        warn_unread_overrides(cfg, HydraConfig.get().overrides.task)
        if cfg.trainer.num_threads is None:  # recorded in the run's config like a setting
            cfg.trainer.num_threads = sweep_num_threads(HydraConfig.get(), len(os.sched_getaffinity(0)))
        if cfg.trainer.portable_numerics:  # before the first tensor operation, where the kernels are chosen
            pin_portable_numerics(cfg.trainer.num_threads)
        return objective(run(cfg, run_dir), cfg.objective)
    except (ConfigError, ModelLoadError, TaskError, CheckpointError, DistributedError) as err:
        return failed(f"error: {err}", 2)
    except (RunAbortedError, DynamicSamplingError) as err:
        resume = getattr(err, "path", None) and f"\nresume with: {resume_command(run_dir)}"
        return failed(f"error: {err}{resume or ''}", 1)
    except LogWriteError as err:
        last = find_latest(run_dir)
        resume = f"\nresume with: {resume_command(run_dir)}" if last else ""
        return failed(f"error: {err}; the last checkpoint is {last or 'none'}{resume}", 1)
    except RunInterruptedError as err:
        if os.environ.get("RANK", "0") == "0":  # one line for the whole job under torchrun
            print(f"{err}\nresume with: {resume_command(run_dir)}", file=sys.stderr)
        hand_on_signal(err.signum)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"stopped; the last checkpoint, if any, is in {run_dir / 'checkpoints'}", file=sys.stderr)
        sys.exit(130)


def cli() -> None:
    """`python -m scripts.train`: Hydra's runner around `main`, with a value that does not fit its
    schema (wrong type, unknown or missing key) reported like every other bad setting, in one line
    `error: <key>: <why> (got <value>)` with exit status 2, before any model loads.

    Hydra reports its own composition errors in several lines (exit status 1) unless
    HYDRA_FULL_ERROR is set, in which case it raises them to its caller: this sets it, formats the
    errors about a key, and prints the others (e.g. an unknown group option, with the list of
    options) as Hydra would. A user's own HYDRA_FULL_ERROR=1 still gets Hydra's full traces.
    """
    store_schemas()
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        error = as_config_error(err)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        cause = f"\n{err.__cause__}" if isinstance(err.__cause__, OmegaConfBaseException) else ""
        print(f"{err}{cause}", file=sys.stderr)
        sys.exit(1)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    cli()
