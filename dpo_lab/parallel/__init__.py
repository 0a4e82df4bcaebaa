"""Parallelism, run for real: ranks are processes talking through torch.distributed.

`launch(fn, world_size, ...)` is the one way ranks are started, from scripts, tests and
notebooks alike. Each technique lives in its own module here, named after the concept.
"""
from dpo_lab.parallel.data_parallel import DataParallel
from dpo_lab.parallel.fsdp import FullyShardedDataParallel
from dpo_lab.parallel.launch import RankFailed, RankTimeout, launch, pick_backend, rank_device
from dpo_lab.parallel.zero import ShardedOptimizer

__all__ = ["launch", "pick_backend", "rank_device", "RankFailed", "RankTimeout",
           "DataParallel", "ShardedOptimizer", "FullyShardedDataParallel"]
