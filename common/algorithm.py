"""What the training loop needs from an algorithm: the `Algorithm` protocol, and `BaseAlgorithm`,
the fields and defaults that GRPO, DAPO and PPO share.

The loop (common/trainer.py and the modules it calls) is typed against `Algorithm` alone, so an
algorithm folder (grpo/, dapo/, ppo/) is any frozen dataclass with these members; `BaseAlgorithm`
saves it from restating the clipped-surrogate and KL settings and the "does nothing" defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor

from common.advantage import ADV_ESTIMATORS
from common.config import require, require_option
from common.kl import KL_KINDS
from common.losses import AGG_MODES, POLICY_LOSSES, batch_policy_loss
from common.rollout_correction import IS_LEVELS, RS_OPTIONS, k1_bounds

# sums a tensor over data-parallel ranks (DistContext.sum); None: this rank's batch is the batch
Reduce = Callable[[Tensor], Tensor]


class Algorithm(Protocol):
    """An RL algorithm as the loop sees it (batch vocabulary: see common/trainer.py).

    Per step the loop calls `shape_rewards` (extra reward terms, each logged as reward/<name>),
    `loss_mask` (which response tokens train), `compute_advantages` (writes batch["advantages"],
    returns stats to log) and, per micro-batch, `loss`. The flags say what the loop must prepare:
    a critic, a reference model, behaviour-policy log-probs, `epochs` passes over each batch;
    `rollout_correction` how the loss corrects for the rollout engine's distribution
    (common.rollout_correction), which needs the behaviour-policy log-probs too.
    `state_dict` / `load_state_dict` carry the mutable part (PPO's KL controller) in checkpoints.
    """

    name: str
    group_size: int
    loss_agg: str
    loss_scale_factor: int
    rollout_correction: RolloutCorrection
    needs_critic: ClassVar[bool]

    @property
    def group_relative(self) -> bool: ...

    @property
    def needs_reference(self) -> bool: ...

    @property
    def needs_old_logprob(self) -> bool: ...

    @property
    def epochs(self) -> int: ...

    def shape_rewards(self, lengths: Tensor, truncated: Tensor) -> dict[str, Tensor]: ...

    def loss_mask(self, response_mask: Tensor, truncated: Tensor) -> Tensor: ...

    def compute_advantages(self, batch: dict[str, Any], reduce: Reduce | None = None) -> dict[str, float]: ...

    def loss(
        self,
        batch: dict[str, Any],
        logprob: Tensor,
        *,
        denominator: float,
        entropy: Tensor | None = None,
        values: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RolloutCorrection:
    """algorithm.rollout_correction: verl's rollout correction (common.rollout_correction), the
    importance weights the policy loss applies and the rejection of tokens or responses from the loss
    mask. Values in configs/algorithm/grpo.yaml and ppo.yaml; `__post_init__` checks them."""

    rollout_is: str | None
    rollout_is_threshold: float
    rollout_is_threshold_lower: float | None
    rollout_is_batch_normalize: bool
    rollout_rs: str | None
    # a number, or [low, high] for the k1 options (verl: a float or a "low_high" string)
    rollout_rs_threshold: Any

    def __post_init__(self) -> None:
        """Raise ConfigError naming the key (algorithm.rollout_correction.<field>) of a bad value."""
        key = "algorithm.rollout_correction"
        if self.rollout_is is not None:
            require_option(f"{key}.rollout_is", self.rollout_is, list(IS_LEVELS))
        require(
            self.rollout_is_threshold >= 1,
            f"{key}.rollout_is_threshold",
            "must be >= 1 (a cap below 1 would down-weight tokens the two policies agree on)",
            self.rollout_is_threshold,
        )
        lower = self.rollout_is_threshold_lower
        if lower is not None:
            require(0 < lower <= 1, f"{key}.rollout_is_threshold_lower", "must be in (0, 1] or null", lower)
            require(
                self.rollout_is in ("token_mask", "sequence_mask"),
                f"{key}.rollout_is_threshold_lower",
                "is read only by rollout_is=token_mask or sequence_mask; set it to null",
                lower,
            )
        if self.rollout_rs is not None:
            require_option(f"{key}.rollout_rs", self.rollout_rs, RS_OPTIONS)
            self._check_rs_threshold(f"{key}.rollout_rs_threshold")

    def _check_rs_threshold(self, key: str) -> None:
        """rollout_rs_threshold: an upper bound > 0 for k2 / k3; for k1 a u >= 1, meaning (1/u, u), or
        a pair with 0 < low <= 1 <= high."""
        value = self.rollout_rs_threshold
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        is_pair = isinstance(value, (list, tuple)) and len(value) == 2
        is_pair = is_pair and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not self.rollout_rs.endswith("k1"):
            require(is_number and value > 0, key, f"{self.rollout_rs} takes one upper bound > 0", value)
            return
        require(is_number or is_pair, key, "k1 takes u (meaning [1/u, u]) or a pair [low, high]", value)
        low, high = k1_bounds(value) if is_pair or value > 0 else (0.0, 0.0)
        require(0 < low <= 1 <= high, key, "k1 bounds must satisfy 0 < low <= 1 <= high (u >= 1)", value)

    @property
    def enabled(self) -> bool:
        """Weights or rejection are on: pi_old is computed every step to compare with pi_rollout."""
        return self.rollout_is is not None or self.rollout_rs is not None


@dataclass(frozen=True)
class BaseAlgorithm:
    """The clipped surrogate's and the KL term's settings, shared by every algorithm here, and the
    `Algorithm` defaults: no critic, no extra reward terms, every response token trains, no state.

    Field values come from configs/algorithm/*.yaml; there are deliberately no defaults here. The
    dataclass is also the YAML's schema (scripts/build.py registers it), and `__post_init__` holds
    the checks of the shared keys; subclasses add their own fields and checks, and
    `compute_advantages`, `loss`, `epochs`, `needs_old_logprob`.
    """

    name: str
    group_size: int
    policy_loss: str
    adv_estimator: str
    clip_low: float
    clip_high: float
    dual_clip: float | None
    loss_agg: str
    loss_scale_factor: int
    kl_coef: float
    kl_kind: str
    rollout_correction: RolloutCorrection

    needs_critic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Raise ConfigError naming the key (algorithm.<field>) of a value out of range."""
        require_option("algorithm.policy_loss", self.policy_loss, list(POLICY_LOSSES))
        # the estimators that fit this algorithm: those with a critic for PPO, the others otherwise
        estimators = [n for n, e in ADV_ESTIMATORS.items() if e.needs_critic == self.needs_critic]
        require_option("algorithm.adv_estimator", self.adv_estimator, estimators)
        # clip_low = 1 puts the lower bound at 0, which no ratio reaches: no lower clip (CISPO's paper)
        require(0 < self.clip_low <= 1, "algorithm.clip_low", "must be in (0, 1]", self.clip_low)
        # above 1 for CISPO's weight bound (TRL, after ScaleRL: a cap of 5, clip_high 4)
        require(self.clip_high > 0, "algorithm.clip_high", "must be > 0", self.clip_high)
        require(
            self.dual_clip is None or self.dual_clip > 1,
            "algorithm.dual_clip",
            "must be > 1 or null",
            self.dual_clip,
        )
        require(
            self.dual_clip is None or self.policy_loss == "vanilla",
            "algorithm.dual_clip",
            f"bounds the vanilla surrogate only; set it to null for policy_loss={self.policy_loss}",
            self.dual_clip,
        )
        require_option("algorithm.loss_agg", self.loss_agg, AGG_MODES)
        require(
            self.loss_scale_factor >= 1,
            "algorithm.loss_scale_factor",
            "must be >= 1, in tokens (the generation budget)",
            self.loss_scale_factor,
        )
        require_option("algorithm.kl_kind", self.kl_kind, KL_KINDS)
        require(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0", self.kl_coef)
        if isinstance(self.rollout_correction, dict):  # build_algorithm passes the YAML section as a dict
            object.__setattr__(self, "rollout_correction", RolloutCorrection(**self.rollout_correction))

    @property
    def group_relative(self) -> bool:
        """The advantages compare the responses of a group (adv_estimator grpo or rloo), so a group of
        equal rewards carries no signal and dynamic sampling may drop or grow groups."""
        return ADV_ESTIMATORS[self.adv_estimator].group_relative

    @property
    def needs_reference(self) -> bool:
        """A frozen reference model is loaded only when the KL term is on."""
        return self.kl_coef > 0

    def state_dict(self) -> dict[str, Any]:
        """Mutable state for checkpoints: none by default (PPO saves its KL controller)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore by default."""

    def shape_rewards(self, lengths: Tensor, truncated: Tensor) -> dict[str, Tensor]:
        """Extra reward terms added to the task reward, by name: none by default (DAPO adds one)."""
        return {}

    def loss_mask(self, response_mask: Tensor, truncated: Tensor) -> Tensor:
        """Tokens that enter the loss: (N, T). By default every response token trains."""
        return response_mask

    def clipped_surrogate(
        self, batch: dict[str, Any], logprob: Tensor, denominator: float
    ) -> tuple[Tensor, dict[str, float]]:
        """The policy loss `policy_loss` (vanilla: the clipped surrogate, PPO Eq. 1, DAPO Eq. 10; gspo;
        cispo) of a micro-batch with this algorithm's clip range, dual clip and aggregation
        (common.losses.batch_policy_loss)."""
        return batch_policy_loss(
            batch,
            logprob,
            policy_loss=self.policy_loss,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            agg=self.loss_agg,
            dual_clip=self.dual_clip,
            denominator=denominator,
        )
