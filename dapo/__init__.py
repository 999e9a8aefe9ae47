"""DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization, arXiv:2503.14476) on the shared core."""

from dapo.algorithm import DAPO
from dapo.sampling import filter_groups, groups_to_resample

__all__ = ["DAPO", "filter_groups", "groups_to_resample"]
