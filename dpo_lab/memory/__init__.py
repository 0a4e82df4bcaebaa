"""The memory wall: asynchronous checkpoints (async_ckpt) and the DPO memory planner (planner)."""
