"""Optimizer-state bytes: measured (the tensors an optimizer holds) and the formula of each method.

All formulas count fp32 (4-byte) state; a parameter with n entries under Adam holds m and v (2n).
"""
import torch


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of nbytes over every tensor in optimizer.state (a tensor shared by two keys counts once)."""
    seen = {}
    for st in optimizer.state.values():
        for t in st.values():
            if torch.is_tensor(t):
                seen[id(t)] = t.nbytes
    return sum(seen.values())


def _numel(params):
    return sum(p.numel() for p in params)


def adamw_state_bytes(params, torch_step: bool = False) -> int:
    """2 moments × n × 4 B; torch.optim.AdamW also keeps a 0-d fp32 `step` tensor per parameter."""
    params = list(params)
    return 8 * _numel(params) + (4 * len(params) if torch_step else 0)


def muon_state_bytes(params) -> int:
    """One momentum buffer per 2-D weight."""
    return 4 * _numel(params)


def galore_state_bytes(params, rank: int) -> int:
    """A projected m×n weight: moments 2·r·max(m, n) plus the projector r·min(m, n)."""
    total = 0
    for p in params:
        m, n = p.shape
        r = min(rank, m, n)
        total += 4 * (2 * r * max(m, n) + r * min(m, n))
    return total


def lisa_state_bytes(always, blocks, active) -> int:
    """Adam over the always-trained parameters and the active blocks only."""
    return 8 * (_numel(always) + sum(_numel(blocks[i].parameters()) for i in active))


def lora_state_bytes(shapes, rank: int) -> int:
    """Adam over A (r×n) and B (m×r) of each adapted m×n weight."""
    return 8 * sum(rank * (m + n) for m, n in shapes)
