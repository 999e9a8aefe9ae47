"""KL coefficient controllers for the KL-in-reward penalty of PPO (beta in r_t = -beta * KL_t + ...).

The adaptive rule is Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(arXiv:1909.08593, Sec. 2.2), as implemented by TRL's AdaptiveKLController and verl's
core_algos.AdaptiveKLController. Both controllers expose `.value` (the beta to use now) and
`.update(current_kl, n_steps)`, and save their state for checkpoints.
"""

from __future__ import annotations


class FixedKLController:
    """A constant beta (InstructGPT, arXiv:2203.02155: beta fixed per run). `update` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; kept so the caller need not know which controller it holds."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Beta steered towards a target KL (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2).

        e_t     = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta   <- beta * (1 + e_t * n_steps / horizon)

    A proportional controller on log(beta): too much KL raises beta, too little lowers it, by at
    most 20% of n_steps / horizon per update. n_steps is the number of samples behind KL_t (TRL and
    verl pass the batch size), so the adaptation speed per sample does not depend on the batch size.
    KL_t must be in the same unit as the target: Ziegler's target (6 nats) is a KL per sequence.

    Example (target 6, horizon 10000, n_steps 100, beta 0.1):
        KL 12 -> e = clip(1.0) = 0.2   -> beta = 0.1 * 1.002 = 0.1002
        KL 3  -> e = -0.5 -> -0.2      -> beta = 0.1 * 0.998 = 0.0998

    Args:
        init_kl_coef: beta at the start.
        target: KL_target.
        horizon: samples over which a +-20% error changes beta by about e (exp(e) for many steps).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0 ({target=}, {horizon=})")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
