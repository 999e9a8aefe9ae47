"""Evaluate a policy on a task: greedy accuracy, sampled pass@k, format rate, response length.

    python -m scripts.eval outputs/default/grpo/2026-01-01_12-00-00          # a run directory
    python -m scripts.eval outputs/.../checkpoints/step_20 --k 8 --out results.json
    python -m scripts.eval smollm2-135m --task countdown --task-arg num_numbers=4
    python -m scripts.eval HuggingFaceTB/SmolLM2-360M-Instruct --task gsm8k --task-arg path=data/gsm8k

SOURCE is one of:
    smollm2-135m           the packaged SmolLM2-135M-Instruct (configs/model/smollm2-135m.yaml)
    tiny                   the random tiny model of configs/model/tiny.yaml (seeded by --seed)
    a run directory        has .hydra/config.yaml or checkpoints/: its checkpoints/final, else its latest
                           complete checkpoint (common.checkpoint.find_latest)
    a model folder         has config.json: a checkpoint folder or any Hugging Face folder
    a Hugging Face id      anything else that does not exist locally ("org/name")

When SOURCE belongs to a run (a run directory, or a checkpoint inside <run>/checkpoints/), the task
settings, rollout.system_prompt, rollout.max_new_tokens and rollout.temperature come from the run's
.hydra/config.yaml, so the evaluation matches what the run trained on; --task, --task-arg and the
other flags override them. Otherwise the task is configs/task/<--task>.yaml with --task-arg applied.

Metrics (the JSON's "metrics"), on the first --num-prompts prompts of --split:
    greedy/accuracy          mean correctness of the greedy response: pass@1 as the trainer's eval/accuracy
    sampled/accuracy         mean correctness over the n sampled responses per prompt
    sampled/pass@k           unbiased pass@k (Chen et al. 2021, Eq. 1), see `pass_at_k`; with the default
                             n = k it is the share of prompts with at least one correct response among k
    */format                 share of responses with exactly one well-formed <answer> pair
    */response_length        mean response length in tokens, EOS included
    */truncated_frac         share of responses that hit --max-new-tokens without EOS
    errors                   responses whose grading raised (scored 0)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from common.checkpoint import CheckpointError, find_latest
from common.models import ModelLoadError, load_policy
from common.rewards import score_responses
from common.rollout.base import PromptTooLongError
from common.rollout.engine import RolloutEngine, make_engine
from common.tasks import TASKS, Example, Task, TaskError, build_task
from scripts.build import ConfigError, resolve_device

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# SOURCE words for the models of configs/model/: word -> load_policy source
MODEL_WORDS = {"smollm2-135m": "smollm2-gguf", "tiny": "tiny"}
DEFAULT_TASK = "addition"
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_TEMPERATURE = 1.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Eq. 1).

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that k samples drawn without replacement from the n include a correct one.
    With n = k it is 1 if c > 0 else 0; n > k lowers the variance of the estimate.

    >>> pass_at_k(4, 1, 2)   # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    0.5
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got {n=}, {c=}, {k=}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.eval",
        description="Greedy accuracy, sampled pass@k, format rate and response length of a policy on a task.",
    )
    parser.add_argument(
        "source", help="run directory, checkpoint or model folder, HF id, smollm2-135m or tiny"
    )
    parser.add_argument(
        "--task", default=None, help=f"task name (default: the run's task, else {DEFAULT_TASK})"
    )
    parser.add_argument(
        "--task-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option override, repeatable (values parse as YAML: 5, true, null)",
    )
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--num-prompts", type=int, default=100, help="first N prompts of the split")
    parser.add_argument("--k", type=int, default=4, help="pass@k")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt, at least k (default: k)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the run's, else 1.0)"
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="response budget (default: the run's, else 48)"
    )
    parser.add_argument(
        "--system-prompt", default=None, help="system message (default: the run's, else none)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batched decode")
    parser.add_argument(
        "--engine",
        default="hf",
        choices=("hf", "decode", "generate"),
        help="rollout engine: hf / decode (the fast decode loop) or generate (transformers' generate)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="model cache (default: $RL_LAB_CACHE or ~/.cache/rl-lab)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    args.n = args.k if args.n is None else args.n
    for name in ("num_prompts", "k", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n < args.k:
        parser.error(f"--n ({args.n}) must be at least --k ({args.k})")
    return args


def resolve_source(source: str) -> tuple[str, Path | None, Path | None]:
    """(kind, model path, run directory) for SOURCE; kind is a MODEL_WORDS key, "folder" or "hub".

    Raises SystemExit with a one-line message for a missing path, a folder that is neither a model
    folder nor a run directory, or a run directory without a checkpoint.
    """
    if source in MODEL_WORDS:
        return source, None, None
    path = Path(source).expanduser()
    if not path.exists():
        # "org/name" is a hub id unless its first part is a local folder ("outputs/missing_run")
        if _looks_local(source):
            raise SystemExit(
                f"error: {source!r} does not exist (expected a run directory, a checkpoint or model "
                f"folder, a Hugging Face id, or one of: {', '.join(MODEL_WORDS)})"
            )
        return "hub", None, None
    if not path.is_dir():
        raise SystemExit(f"error: {source!r} is a file, not a model folder or a run directory")
    if (path / "config.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        has_run_config = run_dir is not None and (run_dir / ".hydra" / "config.yaml").is_file()
        return "folder", path, run_dir if has_run_config else None
    if (path / ".hydra" / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        final = path / "checkpoints" / "final"
        checkpoint = final if (final / "config.json").is_file() else find_latest(path)
        if checkpoint is None:
            raise SystemExit(f"error: run directory {source!r} has no checkpoint in checkpoints/")
        return "folder", checkpoint, path
    raise SystemExit(
        f"error: {source!r} is neither a model folder (no config.json) nor a run directory "
        "(no .hydra/config.yaml or checkpoints/)"
    )


def _looks_local(source: str) -> bool:
    """True for a SOURCE that can only be a path: a hub id is "name" or "org/name" with no local "org"."""
    parts = Path(source).parts
    if Path(source).is_absolute() or source.startswith((".", "~")) or len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).exists()


def load_run_config(run_dir: Path | None) -> DictConfig | None:
    """The run's .hydra/config.yaml, or None for a source outside a run."""
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():
        return None
    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")


def task_config(name: str | None, task_args: list[str], run_cfg: DictConfig | None) -> dict[str, Any]:
    """The task's keyword arguments, name included: the run's task (same name) or
    configs/task/<name>.yaml, then the KEY=VALUE overrides."""
    run_task = run_cfg.get("task") if run_cfg is not None else None
    name = name or (run_task.name if run_task is not None else DEFAULT_TASK)
    if name not in TASKS:
        raise SystemExit(f"error: unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    for arg in task_args:
        key = arg.split("=", 1)[0].strip()
        if "=" not in arg or not key:
            raise SystemExit(f"error: --task-arg {arg!r} is not KEY=VALUE")
        if key == "name":
            raise SystemExit("error: choose the task with --task, not --task-arg name=...")
    try:
        if run_task is not None and run_task.name == name:
            base = OmegaConf.create(OmegaConf.to_container(run_task, resolve=True))
        elif (CONFIGS / "task" / f"{name}.yaml").is_file():
            base = OmegaConf.load(CONFIGS / "task" / f"{name}.yaml")
            base.pop("defaults", None)  # the typed schema it names (Hydra's defaults list), not an option
        else:
            base = OmegaConf.create({"name": name})
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(task_args))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        first_line = str(err).strip().splitlines()[0]
        raise SystemExit(
            f"error: task {name!r} config: {first_line} (set it with --task-arg KEY=VALUE)"
        ) from err


def load_model(kind: str, path: Path | None, args: argparse.Namespace):
    """(model, tokenizer) for a resolved SOURCE."""
    if kind == "tiny":
        tiny = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "tiny.yaml").tiny)
        return load_policy("tiny", cache_dir=args.cache_dir, tiny=tiny, dtype=args.dtype, seed=args.seed)
    if kind in MODEL_WORDS:
        return load_policy(MODEL_WORDS[kind], cache_dir=args.cache_dir, dtype=args.dtype)
    name_or_path = str(path) if path is not None else args.source
    return load_policy("hub", name_or_path=name_or_path, dtype=args.dtype)


def evaluate_policy(
    engine: RolloutEngine, task: Task, examples: list[Example], *, n: int, k: int, batch_size: int
) -> dict[str, float]:
    """Greedy and sampled metrics over `examples` (see the module docstring), batch_size prompts
    per batched decode: one greedy response and n sampled responses per prompt.

    A sampled response counts toward pass@k when its correctness is 1.0, so partial credit
    (char_share) adds to sampled/accuracy but never makes a prompt "passed".
    """
    greedy = {"correct": [], "format": [], "lengths": [], "truncated": []}
    sampled = {"correct": [], "format": [], "lengths": [], "truncated": []}
    errors = 0
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", unit="batch"):
        part = examples[start : start + batch_size]
        prompts = [e.prompt for e in part]
        for stats, G, do_sample in ((greedy, 1, False), (sampled, n, True)):
            rollout = engine.sample(prompts, group_size=G, do_sample=do_sample)
            expanded = [e for e in part for _ in range(G)]  # [q1]*G + [q2]*G + ...
            result = score_responses(task, rollout.responses, expanded, format_weight=0.0)
            errors += result.errors
            stats["correct"].append(result.correct.view(len(part), G))  # (N,) -> (n_prompts, G)
            stats["format"].append(result.format)
            stats["lengths"].append(rollout.lengths.float().cpu())
            stats["truncated"].append(rollout.truncated.float().cpu())

    metrics: dict[str, float] = {}
    for section, stats in (("greedy", greedy), ("sampled", sampled)):
        metrics[f"{section}/accuracy"] = torch.cat(stats["correct"]).mean().item()
        metrics[f"{section}/format"] = torch.cat(stats["format"]).mean().item()
        metrics[f"{section}/response_length"] = torch.cat(stats["lengths"]).mean().item()
        metrics[f"{section}/truncated_frac"] = torch.cat(stats["truncated"]).mean().item()
    n_correct = (torch.cat(sampled["correct"]) >= 1.0).sum(dim=1)  # (n_prompts,)
    metrics[f"sampled/pass@{k}"] = sum(pass_at_k(n, int(c), k) for c in n_correct) / len(examples)
    metrics["errors"] = float(errors)
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve SOURCE, build the task and the model, evaluate; returns the JSON result."""
    kind, model_path, run_dir = resolve_source(args.source)
    run_cfg = load_run_config(run_dir)
    run_rollout = run_cfg.get("rollout", {}) if run_cfg is not None else {}
    kwargs = task_config(args.task, args.task_arg, run_cfg)
    name = kwargs.pop("name")
    task = build_task(name, **kwargs)
    examples = getattr(task, args.split)[: args.num_prompts]

    # flag, else the run's setting, else the default
    max_new_tokens = _first(args.max_new_tokens, run_rollout.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS)
    temperature = _first(args.temperature, run_rollout.get("temperature"), DEFAULT_TEMPERATURE)
    system_prompt = _first(args.system_prompt, run_rollout.get("system_prompt"))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    model, tokenizer = load_model(kind, model_path, args)  # a non-finite weight: ModelLoadError
    model.to(device)
    engine = make_engine(
        args.engine,
        model,
        tokenizer,
        group_size=args.n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=args.top_p,
        system_prompt=system_prompt,
    )
    try:
        engine.check_prompts([e.prompt for e in examples])
    except PromptTooLongError as err:
        where = examples[err.index].source or f"{args.split} prompt {err.index}"
        raise SystemExit(f"error: task {name}: {where}: the prompt {err.detail}") from err
    torch.manual_seed(args.seed)
    metrics = evaluate_policy(engine, task, examples, n=args.n, k=args.k, batch_size=args.batch_size)
    return {
        "source": args.source,
        "model": str(model_path) if model_path is not None else args.source,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "task": name,
        "task_args": kwargs,
        "split": args.split,
        "num_prompts": len(examples),
        "k": args.k,
        "n": args.n,
        "temperature": temperature,
        "top_p": args.top_p,
        "max_new_tokens": max_new_tokens,
        "system_prompt": system_prompt,
        "seed": args.seed,
        "metrics": metrics,
    }


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the JSON result (and writes it to --out) and returns it."""
    args = parse_args(argv)
    try:
        result = run(args)
    except (ModelLoadError, TaskError, CheckpointError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from err
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
