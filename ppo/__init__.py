"""PPO (Schulman et al. 2017, arXiv:1707.06347) for language models, as in InstructGPT (arXiv:2203.02155)."""

from ppo.algorithm import PPO, token_level_rewards
from ppo.critic import ValueModel, build_critic
from ppo.kl_control import AdaptiveKLController, FixedKLController

__all__ = [
    "PPO",
    "AdaptiveKLController",
    "FixedKLController",
    "ValueModel",
    "build_critic",
    "token_level_rewards",
]
