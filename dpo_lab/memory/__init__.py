"""The memory wall: roofline, activation recomputation, optimizer-state offload (notebook 14)."""
