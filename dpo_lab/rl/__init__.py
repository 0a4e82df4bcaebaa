"""Reinforcement learning with verifiable rewards: GRPO from scratch (loss, rollouts, training)."""
