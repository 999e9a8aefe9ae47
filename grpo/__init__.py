"""GRPO (Group Relative Policy Optimization, DeepSeekMath arXiv:2402.03300) on the shared core."""

from grpo.algorithm import GRPO

__all__ = ["GRPO"]
