"""Every option of every config group composes, and the presets mean what they say."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import MISSING

import pytest
from omegaconf import OmegaConf

from scripts.build import (
    ConfigError,
    build_algorithm,
    build_settings,
    build_task_from,
    check_bool_overrides,
    validate,
    warn_unread_overrides,
)
from tests.conftest import CONFIGS, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_default_is_grpo_on_addition_with_smollm2():
    cfg = compose_train()
    assert (cfg.algorithm.name, cfg.task.name, cfg.model.source) == ("grpo", "addition", "smollm2-gguf")
    assert cfg.rollout.group_size == 8 and cfg.algorithm.group_size == 8
    assert cfg.dynamic_sampling.mode == "disabled"
    assert cfg.algorithm.kl_coef == 0.04 and cfg.algorithm.kl_kind == "k3"
    assert cfg.algorithm.loss_agg == "seq-mean-token-mean"
    validate(cfg)


@pytest.mark.parametrize(
    "group",
    ["algorithm", "model", "task", "group_size", "dynamic_sampling", "logger", "experiment", "debug"],
)
def test_every_option_composes(group):
    names = options(group)
    if group != "experiment":
        assert names, f"configs/{group}/ is empty"
    for name in names:
        overrides = [f"{group}={name}"]
        if name == "hub":
            overrides.append("model.name_or_path=some/model")
        if name == "jsonl":
            overrides.append("task.path=data.jsonl")
        cfg = compose_train(*overrides)
        # every value resolves (no missing interpolation)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("g", [1, 2, 4, 8, 16, 32])
def test_group_size_group_sets_rollout_and_algorithm(g):
    cfg = compose_train(f"group_size=g{g}")
    assert cfg.rollout.group_size == g and cfg.algorithm.group_size == g


def test_plain_key_override_of_group_size():
    cfg = compose_train("rollout.group_size=12")
    assert cfg.algorithm.group_size == 12


def test_dapo_preset():
    cfg = compose_train("algorithm=dapo")
    a = cfg.algorithm
    assert (a.name, a.clip_low, a.clip_high, a.loss_agg, a.kl_coef) == ("dapo", 0.2, 0.28, "token-mean", 0.0)
    assert a.overlong_shaping and a.max_len == cfg.rollout.max_new_tokens
    assert cfg.dynamic_sampling.mode == "filter"
    algo = build_algorithm(a)
    assert not algo.needs_reference


def test_dapo_switches_are_independent():
    cfg = compose_train("algorithm=dapo", "dynamic_sampling=disabled", "algorithm.clip_high=0.2")
    assert cfg.dynamic_sampling.mode == "disabled" and cfg.algorithm.clip_high == 0.2
    cfg = compose_train("algorithm=grpo", "dynamic_sampling=filter")
    assert cfg.algorithm.name == "grpo" and cfg.dynamic_sampling.mode == "filter"
    validate(cfg)


def test_smoke_preset_is_tiny_and_short_and_group_size_still_overridable():
    cfg = compose_train("debug=smoke")
    assert cfg.model.source == "tiny" and cfg.logger.backend == "none" and cfg.trainer.max_steps == 2
    assert compose_train("debug=smoke", "group_size=g16").rollout.group_size == 16


def test_typo_in_key_is_rejected_by_hydra():
    with pytest.raises(Exception, match="clip_hihg"):
        compose_train("algorithm.clip_hihg=0.3")


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.group_size=1", "rollout.group_size"),
        ("algorithm.clip_low=1.5", "algorithm.clip_low"),
        ("algorithm.clip_high=0", "algorithm.clip_high"),
        ("optim.lr=-1e-5", "optim.lr"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("rollout.top_k=-1", "rollout.top_k"),
        ("trainer.mini_batch_size=3", "trainer.mini_batch_size"),
        ("algorithm.loss_agg=mean", "algorithm.loss_agg"),
        ("algorithm.loss_scale_factor=0", "algorithm.loss_scale_factor"),
        ("algorithm.kl_kind=k4", "algorithm.kl_kind"),
        ("algorithm.dual_clip=0.5", "algorithm.dual_clip"),
        ("algorithm.policy_loss=ppo", "algorithm.policy_loss"),
        ("algorithm.adv_estimator=gae", "algorithm.adv_estimator"),
        ("algorithm.scale_rewards=std", "algorithm.scale_rewards"),
        ("algorithm.loss_agg=token_sum", "algorithm.loss_agg"),
        ("algorithm.name=reinforce", "algorithm"),
        ("dynamic_sampling.mode=sometimes", "dynamic_sampling.mode"),
    ],
)
def test_bad_settings_fail_naming_the_key(override, key):
    cfg = compose_train(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a NaN or infinity is refused wherever it stands, before any range check could let it pass
        (("optim.lr=inf",), "optim.lr: must be a finite number (got inf)"),
        (("optim.weight_decay=inf",), "optim.weight_decay: must be a finite number (got inf)"),
        (("rollout.temperature=inf",), "rollout.temperature: must be a finite number (got inf)"),
        (("reward.format_weight=nan",), "reward.format_weight: must be a finite number (got nan)"),
        (("optim.betas=[0.9,-inf]",), "optim.betas: must be a finite number (got [0.9, -inf])"),
        (
            ("model=tiny", "model.tiny.initializer_range=inf"),
            "model.tiny.initializer_range: must be a finite",
        ),
        (("algorithm=ppo", "algorithm.kl_target=nan"), "algorithm.kl_target: must be a finite number"),
        # ranges
        (("optim.betas=[2,0.5]",), "optim.betas: must be two numbers in [0, 1), e.g. [0.9, 0.999] (got [2.0"),
        (("optim.betas=[0.9]",), "optim.betas: must be two numbers in [0, 1)"),
        (("optim.weight_decay=-0.1",), "optim.weight_decay: must be >= 0 (got -0.1)"),
        (("optim.lr=0.5", "optim.weight_decay=2"), "optim.weight_decay: optim.lr x weight_decay must be < 1"),
        (("reward.format_weight=-1",), "reward.format_weight: must be >= 0 (got -1.0)"),
        (("trainer.save_every=-1",), "trainer.save_every: must be >= 0 (got -1)"),
        (("trainer.keep_last_checkpoints=-2",), "trainer.keep_last_checkpoints: must be >= 0"),
        (("trainer.num_threads=0",), "trainer.num_threads: must be >= 1 or null (got 0)"),
        (("rollout.max_prompt_len=0",), "rollout.max_prompt_len: must be >= 1 (got 0)"),
        (("rollout.min_new_tokens=49",), "rollout.min_new_tokens: must be in [0, rollout.max_new_tokens=48]"),
        (("trainer.portable_numerics=true", "trainer.bf16=true"), "trainer.bf16: trainer.portable_numerics"),
        (
            ("trainer.portable_numerics=true", "rollout.prepack_linears=always"),
            "rollout.prepack_linears: trainer.portable_numerics=true pins float32 MKL kernels",
        ),
        (("rollout.gpu_memory_utilization=1.5",), "rollout.gpu_memory_utilization: must be in (0, 1)"),
        (("seed=-1",), "seed: must be in [0, 2**32) (got -1)"),
        (("algorithm=dapo", "algorithm.overlong_factor=-1"), "algorithm.overlong_factor: must be >= 0"),
        (("algorithm=ppo", "algorithm.entropy_coef=-0.1"), "algorithm.entropy_coef: must be >= 0"),
        (
            ("algorithm=ppo", "algorithm.adv_estimator=rloo"),
            "algorithm.adv_estimator: not one of the options: gae",
        ),
        (
            ("algorithm.policy_loss=gspo", "algorithm.dual_clip=3"),
            "algorithm.dual_clip: bounds the vanilla surrogate only; set it to null for policy_loss=gspo",
        ),
        (
            ("algorithm.adv_estimator=reinforce_plus_plus", "dynamic_sampling=filter"),
            "dynamic_sampling: filter drops or grows groups of responses and needs a group algorithm, "
            "not grpo with adv_estimator=reinforce_plus_plus",
        ),
        (
            ("algorithm=ppo", "critic.head_init=xavier"),
            "critic.head_init: not one of the options: normal, zeros (got 'xavier')",
        ),
        # a key that the selected option of its group never reads
        (("model.name_or_path=/x",), "model.name_or_path: read only by model=hub; the selected model"),
        (("model=tiny", "model.name_or_path=/x"), "model.name_or_path: read only by model=hub"),
        (("model=hub", "model.name_or_path=x", "+model.tiny.hidden_size=8"), "model.tiny: read only by"),
    ],
)
def test_non_finite_out_of_range_and_ignored_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_train(*overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optim.lr=abc",), "optim.lr: must be a number (got abc)"),
        (("model.lora.r=2.5",), "model.lora.r: must be an integer (got 2.5)"),
        (
            ("algorithm.overlong_filter=maybe", "algorithm=dapo"),
            "algorithm.overlong_filter: must be true or false (got maybe)",
        ),
        (
            ("algorithm.scale_by_std=false",),
            "algorithm.scale_by_std: renamed to algorithm.scale_rewards (true = group, false = none) "
            "(got false)",
        ),
        (("task=countdown", "task.num_train=x"), "task.num_train: must be an integer (got x)"),
        (
            ("model.lora.target_modules=q_proj",),
            "model.lora.target_modules: must be a list, e.g. [a, b] (got q_proj)",
        ),
        (("algorithm.clip_hihg=0.3",), "algorithm.clip_hihg: not a key of algorithm (got 0.3)"),
        (("algorithm.loss_scale_factor=null",), "algorithm.loss_scale_factor: must be an integer (got null)"),
        (
            ("algorithm=ppo", "algorithm.critic_lr=1e-3"),
            "algorithm.critic_lr: renamed to critic.lr (got 1e-3)",
        ),
    ],
)
def test_a_value_that_does_not_fit_the_schema_fails_while_composing(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_train(*overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("override", ["trainer.save_only_model=yes", "trainer.keep_step_checkpoints=1"])
def test_a_boolean_key_takes_only_true_or_false(override):
    # OmegaConf would read yes / 1 as true; the entry point checks the command line's booleans
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        check_bool_overrides(compose_train(override), [override])
    assert str(err.value) == f"{key}: must be true or false (got {value})"


def test_missing_value_and_mode_without_its_keys_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model.name_or_path: needs a value"):
        validate(compose_train("model=hub"))
    # dynamic_sampling.mode=filter on the disabled option lacks the filter's keys: pick the option
    with pytest.raises(ConfigError, match=r"^dynamic_sampling.mode: .*dynamic_sampling=filter"):
        validate(compose_train("dynamic_sampling.mode=filter"))


def test_algorithm_fields_come_from_yaml_only():
    cfg = compose_train("algorithm=dapo")
    algo = build_algorithm(cfg.algorithm)
    assert algo.clip_high == 0.28 and algo.overlong_buffer_len == cfg.algorithm.overlong_buffer_len
    settings = build_settings(cfg)
    # the DAPO preset takes several optimizer steps per rollout batch (configs/algorithm/dapo.yaml)
    assert settings.trainer.mini_batch_prompts == cfg.trainer.mini_batch_size == 2 < cfg.trainer.batch_size
    assert settings.dynamic_sampling.max_num_gen_batches == cfg.dynamic_sampling.max_num_gen_batches


def test_unknown_algorithm_key_is_named():
    cfg = compose_train()
    container = OmegaConf.to_container(cfg.algorithm, resolve=True)
    container["clip_hihg"] = 0.3
    with pytest.raises(ConfigError, match="clip_hihg"):
        build_algorithm(OmegaConf.create(container))


@pytest.mark.parametrize(
    "launcher, target",
    [("slurm", "rl_lab_launchers.ResumingSlurmLauncher"), ("local", "joblib_launcher.JoblibLauncher")],
)
def test_launcher_configs_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def comparison_presets() -> list[str]:
    """Every experiment preset that compares arms (its sweep has an arm list)."""
    presets = []
    for name in options("experiment"):
        sweep = compose_train(f"experiment={name}", hydra=True).hydra.sweeper.params
        if "arm" in sweep:
            presets.append(name)
    return presets


def policy_update_budget(cfg) -> tuple[int, int, int]:
    """(rollouts, policy optimizer steps, rollouts the policy did not learn from) of a run, from its
    composed config alone: the critic's warm-up steps roll out but do not step the policy."""
    algo = build_algorithm(cfg.algorithm)
    warmup = cfg.critic.warmup_steps if algo.needs_critic else 0
    mini = cfg.trainer.mini_batch_size or cfg.trainer.batch_size
    per_rollout = algo.epochs * (cfg.trainer.batch_size // mini)  # passes x mini-batches per pass
    return cfg.trainer.max_steps, (cfg.trainer.max_steps - warmup) * per_rollout, warmup


def test_comparison_presets_are_found():
    assert {"compare", "compare_tiny", "compare_tokens", "dapo_ablation"} <= set(comparison_presets())


@pytest.mark.parametrize("preset", ["compare", "compare_tiny", "compare_tokens", "dapo_ablation"])
def test_every_arm_and_algorithm_of_a_comparison_makes_the_same_policy_updates(preset):
    # every algorithm, and every arm (which select algorithms and variants), in the preset's sweep or not
    arms = str(compose_train(f"experiment={preset}", hydra=True).hydra.sweeper.params.arm).split(",")
    assert set(arms) <= set(options("arm"))
    variants = [f"algorithm={a}" for a in ("ppo", "grpo", "dapo")] + [f"arm={arm}" for arm in options("arm")]
    budgets = {}
    for variant in variants:
        cfg = compose_train(variant, f"experiment={preset}")
        validate(cfg)
        rollouts, updates, unused = policy_update_budget(cfg)
        assert unused == 0, f"{preset} {variant}: {unused} rollouts without a policy update (critic warm-up)"
        budgets[variant] = (
            cfg.trainer.batch_size,
            cfg.rollout.group_size,
            cfg.rollout.max_new_tokens,
            cfg.trainer.max_generated_tokens,
            rollouts,
            updates,
        )
    assert len(set(budgets.values())) == 1, f"{preset}: unmatched budgets {budgets}"
    assert updates > rollouts, "one optimizer step per rollout batch never moves the ratio"


def test_the_update_budget_counts_the_critic_warm_up():
    # 20 steps x 4 mini-batches, of which the first 2 steps only train the critic
    cfg = compose_train("experiment=compare", "arm=ppo", "critic.warmup_steps=2")
    assert policy_update_budget(cfg) == (20, 72, 2)


def test_arms_set_their_name_and_what_makes_them():
    cfg = compose_train("arm=drgrpo")
    a = cfg.algorithm
    assert (cfg.arm, a.name, a.scale_rewards, a.loss_agg) == (
        "drgrpo",
        "grpo",
        "none",
        "seq-mean-token-sum-norm",
    )
    assert compose_train().arm == "grpo" and compose_train("algorithm=ppo").arm == "ppo"


@pytest.mark.parametrize(
    "arm, settings",
    [
        # GSPO's clip range (arXiv:2507.18071, Sec. 5.1) and its sequence-level aggregation
        (
            "gspo",
            {"policy_loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
        ),
        # CISPO: no lower bound (the paper), the cap 1.2 of verl's example, token-mean (Eq. 4)
        ("cispo", {"policy_loss": "cispo", "clip_low": 1.0, "clip_high": 0.2, "loss_agg": "token-mean"}),
        ("rloo", {"adv_estimator": "rloo", "policy_loss": "vanilla", "scale_rewards": "group"}),
        ("reinforce_pp", {"adv_estimator": "reinforce_plus_plus", "policy_loss": "vanilla"}),
        ("grpo_batch_std", {"adv_estimator": "grpo", "scale_rewards": "batch", "policy_loss": "vanilla"}),
    ],
)
def test_new_arms_are_grpo_with_their_settings(arm, settings):
    cfg = compose_train(f"arm={arm}")
    validate(cfg)
    algo = build_algorithm(cfg.algorithm)
    assert cfg.arm == arm and algo.name == "grpo"
    assert {key: getattr(algo, key) for key in settings} == settings
    # everything else is the GRPO preset's
    grpo = build_algorithm(compose_train().algorithm)
    assert {k: v for k, v in vars(algo).items() if k not in settings} == {
        k: v for k, v in vars(grpo).items() if k not in settings
    }


def test_dapo_ladder_adds_one_technique_per_rung():
    rungs = [
        "dapo0_naive_grpo",
        "dapo1_overlong_filter",
        "dapo2_clip_higher",
        "dapo3_soft_overlong",
        "dapo4_token_loss",
        "dapo5_dynamic_sampling",
    ]

    def switches(arm: str) -> dict:
        cfg = compose_train(f"arm={arm}", "experiment=dapo_ablation")
        a = cfg.algorithm
        return {
            "overlong_filter": a.overlong_filter,
            "clip_high": a.clip_high,
            "overlong_shaping": a.overlong_shaping,
            "loss_agg": a.loss_agg,
            "dynamic_sampling": cfg.dynamic_sampling.mode,
            "kl_coef": a.kl_coef,
            "scale_rewards": a.scale_rewards,
        }

    ladder = [switches(rung) for rung in rungs]
    assert ladder[0] == {
        "overlong_filter": False,
        "clip_high": 0.2,
        "overlong_shaping": False,
        "loss_agg": "seq-mean-token-mean",
        "dynamic_sampling": "disabled",
        "kl_coef": 0.0,
        "scale_rewards": "group",
    }
    added = ["overlong_filter", "clip_high", "overlong_shaping", "loss_agg", "dynamic_sampling"]
    for i, key in enumerate(added, start=1):
        changed = {k for k in ladder[i] if ladder[i][k] != ladder[i - 1][k]}
        assert changed == {key}, f"rung {rungs[i]} changes {changed}, not only {key}"
    # the top rung is the DAPO preset plus overlong filtering
    dapo = switches("dapo")
    assert ladder[-1] == {**dapo, "overlong_filter": True}
    drgrpo = switches("dapo0_drgrpo")
    assert drgrpo == {**ladder[0], "scale_rewards": "none", "loss_agg": "seq-mean-token-sum-norm"}


def test_overlong_penalty_has_the_papers_weight_relative_to_the_reward():
    # DAPO Eq. 13 reaches -1 against a +-1 correctness reward: half its range; correctness here is 0/1
    cfg = compose_train("algorithm=dapo")
    assert cfg.algorithm.overlong_factor == 0.5 * (1 - 0)


def test_compare_presets_keep_a_weights_only_final_checkpoint():
    for preset in comparison_presets():
        cfg = compose_train(f"experiment={preset}")
        settings = build_settings(cfg)
        assert settings.trainer.save_only_model and not settings.trainer.keep_step_checkpoints, preset
    assert not build_settings(compose_train()).trainer.save_only_model  # the default run stays resumable


def test_addition_5_40_is_the_default_task_with_wider_operands():
    base = OmegaConf.to_container(compose_train().task)
    task = OmegaConf.to_container(compose_train("experiment=compare", "task=addition_5_40").task)
    assert {**base, "min_operand": 5, "max_operand": 40, "num_test": 400} == task
    built = build_task_from(compose_train("task=addition_5_40"))
    # "What is 12 + 37? Put ..." -> 12, 37
    operands = [int(n) for e in built.train + built.test for n in re.findall(r"\d+", e.prompt.split("?")[0])]
    assert min(operands) == 5 and max(operands) == 40 and len(operands) == 2 * (300 + 400)


def test_algorithm_presets_keep_their_own_optimizer_steps_outside_the_comparison():
    # experiment_algorithm/compare_ppo.yaml applies only under experiment=compare
    assert compose_train("algorithm=ppo").algorithm.ppo_epochs == 2
    assert compose_train("algorithm=ppo", "experiment=compare").algorithm.ppo_epochs == 1
    assert compose_train("algorithm=grpo").trainer.mini_batch_size is None
    assert compose_train("algorithm=dapo", "trainer.mini_batch_size=4").trainer.mini_batch_size == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("dynamic_sampling.gen_batch_size_factor=0.5", "dynamic_sampling.gen_batch_size_factor"),
        ("dynamic_sampling.max_num_gen_batches=0", "dynamic_sampling.max_num_gen_batches"),
        ("dynamic_sampling.on_exhausted=retry", "dynamic_sampling.on_exhausted"),
    ],
)
def test_bad_dynamic_sampling_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_train("algorithm=dapo", override))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_oversampled_rounds_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_train(
        "algorithm=dapo", "dynamic_sampling.gen_batch_size_factor=1.5", "trainer.batch_size=2"
    )
    assert build_settings(cfg).dynamic_sampling.prompts_per_round(2) == 3
    with pytest.raises(
        ConfigError, match="^dynamic_sampling.gen_batch_size_factor: 1.5 x trainer.batch_size=2"
    ):
        validate(cfg)


def test_truncated_sampling_is_warned_at_start_up(cache_dir, caplog):
    from scripts.build import build_policy, build_rollout, truncated_sampling_warning

    assert truncated_sampling_warning(compose_train().rollout) is None
    cfg = compose_train("model=tiny", "rollout.top_p=0.9", "rollout.top_k=50", f"paths.cache_dir={cache_dir}")
    validate(cfg)
    model, tokenizer = build_policy(cfg)
    with caplog.at_level("WARNING", logger="rl_lab"):
        build_rollout(cfg, model, tokenizer)
    assert "rollout.top_p=0.9 and rollout.top_k=50" in caplog.text and "full softmax" in caplog.text


# Dataclass fields that share a name with a config key but are not that setting
NOT_A_RUN_SETTING = {
    ("DistContext", "zero_stage"),  # a single process's context: nothing is sharded
    ("WandbInit", "name"),  # the W&B run's name, not model.name / task.name
    ("Example", "source"),  # where a dataset row came from, not model.source
}


def dataclass_defaults() -> list[tuple[str, str, str]]:
    """(module, class, field) of every dataclass field with a default in rl-lab's packages."""
    found = []
    for package in ("common", "grpo", "dapo", "ppo", "scripts"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith("vllm"):
                continue  # imports vLLM, not installed here
            module = importlib.import_module(info.name)
            for cls in vars(module).values():
                if (
                    not (isinstance(cls, type) and dataclasses.is_dataclass(cls))
                    or cls.__module__ != info.name
                ):
                    continue
                for field in dataclasses.fields(cls):
                    if field.default is not MISSING or field.default_factory is not MISSING:
                        found.append((info.name, cls.__name__, field.name))
    return found


def test_no_default_of_a_run_setting_is_defined_twice():
    """configs/*.yaml hold every run setting's default: a dataclass field named like a config key
    must not carry a default of its own (the copy would drift, as one did before)."""
    keys: set[str] = set()

    def leaves(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                leaves(value)
            else:
                keys.add(key)

    for algorithm in options("algorithm"):
        leaves(OmegaConf.to_container(compose_train(f"algorithm={algorithm}"), resolve=True))
    found = dataclass_defaults()
    assert any(cls == "WandbInit" for _, cls, _ in found)  # the walk reaches the modules
    twice = [
        f"{module}.{cls}.{name}"
        for module, cls, name in found
        if name in keys and (cls, name) not in NOT_A_RUN_SETTING
    ]
    assert not twice, f"defaults defined beside configs/: {twice}"


def test_critic_keys_under_an_algorithm_without_a_critic_are_named_in_a_warning(caplog):
    overrides = ["critic.lr=1e-3", "optim.lr=2e-5", "critic.warmup_steps=1"]
    with caplog.at_level("WARNING", logger="rl_lab"):
        assert warn_unread_overrides(compose_train("algorithm=grpo"), overrides) == [
            "critic.lr",
            "critic.warmup_steps",
        ]
    assert "critic.lr, critic.warmup_steps: read only by algorithms with a critic" in caplog.text
    assert warn_unread_overrides(compose_train("algorithm=ppo"), overrides) == []
    assert warn_unread_overrides(compose_train("arm=dapo"), ["optim.lr=2e-5"]) == []
