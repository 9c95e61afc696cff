"""Workload generators for `tandem bench`: each yields an endless, seeded stream of jobs."""

from .base import DEFAULT_VOCAB_SIZE, Job, Reply, RequestSpec, SingleRequest, Workload
from .jsonl_file import FileWorkload
from .multi_turn import Conversation, MultiTurnWorkload
from .random_prompts import RandomWorkload
from .shared_prefix import SharedPrefixWorkload

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "Conversation",
    "FileWorkload",
    "Job",
    "MultiTurnWorkload",
    "RandomWorkload",
    "Reply",
    "RequestSpec",
    "SharedPrefixWorkload",
    "SingleRequest",
    "Workload",
]
