"""Optimizers written from scratch (AdamW, Muon, GaLore, LISA) and the loss-spike lab of notebook 12.

Each optimizer is tested against its library twin in tests/test_optim.py.
"""
from dpo_lab.optim.adamw import AdamW, adam_l2
from dpo_lab.optim.muon import Muon, newton_schulz
from dpo_lab.optim.galore import GaLoreAdamW, GaLoreProjector
from dpo_lab.optim.lisa import LISA
from dpo_lab.optim.state_bytes import (adamw_state_bytes, galore_state_bytes, lisa_state_bytes,
                                       lora_state_bytes, muon_state_bytes, state_bytes)

__all__ = ["AdamW", "adam_l2", "Muon", "newton_schulz", "GaLoreAdamW", "GaLoreProjector", "LISA",
           "state_bytes", "adamw_state_bytes", "muon_state_bytes", "galore_state_bytes",
           "lisa_state_bytes", "lora_state_bytes"]
