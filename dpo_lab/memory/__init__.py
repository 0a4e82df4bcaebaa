"""The memory wall (notebook 14): the roofline (roofline), activation recomputation (recompute),
optimizer-state offload to host memory and disk (offload), asynchronous checkpoints (async_ckpt)
and the DPO memory planner (planner)."""
