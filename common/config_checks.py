"""The one-line ConfigError every bad setting ends in (`<key>: <why> (got <value>)`), its helpers
(`require`, `require_option`), and the checks of the whole composed config beside each schema's
own (common.config): an OmegaConf or Hydra composition error turned into that one line
(`as_config_error`), and NaN or infinity refused wherever it stands (`require_finite`, run by
scripts/build.py `validate` before the composed config becomes the schemas' dataclasses).
ConfigError, require, require_option and as_config_error are also importable from common.config,
where they were defined before."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

# keys that moved, for the error that names the new one
RENAMED = {
    "algorithm.scale_by_std": "algorithm.scale_rewards (true = group, false = none)",
    "algorithm.critic_lr": "critic.lr",
    "algorithm.critic_warmup_steps": "critic.warmup_steps",
    "algorithm.critic_name_or_path": "critic.name_or_path",
    # the single switch became verl's section (a value there is refused with this pointer too)
    "algorithm.rollout_correction": "algorithm.rollout_correction.rollout_is (tis is now token, none null)",
    "algorithm.tis_imp_ratio_cap": "algorithm.rollout_correction.rollout_is_threshold",
}


class ConfigError(ValueError):
    """A bad or contradictory setting; the message names the key: `<key>: <why> (got <value>)`."""


def require(condition: bool, key: str, why: str, got: Any) -> None:
    """Raise ConfigError(`<key>: <why> (got <got>)`) unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {why} (got {got!r})")


def require_option(key: str, value: Any, options: Sequence[Any], described: str | None = None) -> None:
    """`value` must be one of `options`; `described` replaces their plain listing in the message."""
    listing = described or ", ".join(str(o) for o in options)
    require(value in options, key, f"not one of the options: {listing}", value)


# what a value of the wrong type should have been, by the OmegaConf node that refused it
_EXPECTED = {
    IntegerNode: "must be an integer",
    FloatNode: "must be a number",
    BooleanNode: "must be true or false",
    StringNode: "must be a string",
    ListConfig: "must be a list, e.g. [a, b]",
    DictConfig: "must be a mapping, e.g. {a: 1}",
}


def as_config_error(err: BaseException) -> ConfigError | None:
    """The one-line ConfigError for an OmegaConf error about a key, or for a Hydra composition error
    caused by one: a value of the wrong type, a key that no schema has, a missing value. None for
    any other error (e.g. an unknown config group option, which Hydra reports with its options).

    The offending value comes from OmegaConf's message ("Value 'abc' of type 'str' ...") or from
    Hydra's, which quotes the override ("Error merging override optim.lr=abc").
    """
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if not isinstance(cause, OmegaConfBaseException) or not cause.full_key:
        return None
    key, message = cause.full_key, str(cause.msg).splitlines()[0]
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{key}: needs a value, e.g. {key}=... on the command line (got ???)")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        where = key.rpartition(".")[0] or "the top level"
        why = f"renamed to {RENAMED[key]}" if key in RENAMED else f"not a key of {where}"
    elif isinstance(cause, ValidationError):
        why = (
            f"renamed to {RENAMED[key]}" if key in RENAMED else _EXPECTED.get(type(cause.child_node), message)
        )
    else:  # e.g. an interpolation that does not resolve
        return ConfigError(f"{key}: {message}")
    value = re.search(r"Value '(.*?)'", message) or re.search(
        rf"(?:override|use) \+*{re.escape(key)}=(.*)$", str(err), re.MULTILINE
    )
    return ConfigError(f"{key}: {why} (got {value.group(1) if value else '?'})")


def non_finite(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every NaN or infinity in a plain config container (nested dicts and
    lists, as OmegaConf.to_container gives); a list holding one is reported whole, under its key."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        if any(isinstance(v, float) and not math.isfinite(v) for v in node):
            yield key, node
        else:
            for value in node:
                yield from non_finite(value, key)
    elif isinstance(node, float) and not math.isfinite(node):
        yield key, node


def require_finite(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key of `cfg` (resolved) that holds NaN or an infinity.

    One pass over the whole composed config (a float key, a list of floats, a free-form mapping such
    as model.tiny), run before the schemas' own checks: `optim.lr=inf` would pass `lr > 0`, and an
    infinite learning rate turns every weight into NaN at the first step.
    """
    for key, value in non_finite(OmegaConf.to_container(cfg, resolve=True)):
        raise ConfigError(f"{key}: must be a finite number (got {value})")
