"""Reinforcement learning with verifiable rewards, GRPO from scratch:
`grpo` (advantages, loss), `rollout` (sampling with a KV cache, checkers, log-probs), `train` (the
loop on 1 or more ranks), `trl_check` (TRL's own GRPOTrainer code on our batches, the twin)."""
