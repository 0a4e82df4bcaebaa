"""GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", 2024).

For a 2-D gradient G (m×n) project onto the top-r singular subspace of its shorter side:
    m < n:  P = U[:, :r]   (m×r),   R = PᵀG   (r×n),   back: α·P·N
    m ≥ n:  Q = Vᵀ[:r]     (r×n),   R = GQᵀ   (m×r),   back: α·N·Q
where G = USVᵀ is the SVD of the gradient at the refresh step (every T steps). Adam's moments live
on R, so their size is 2·r·max(m, n) instead of 2·m·n. As in the paper's code (galore-torch), the
inner Adam is the transformers-style AdamW: ε is added to √v before bias correction, the step is
η·√(1−β2ᵗ)/(1−β1ᵗ), decoupled decay is applied after the update, and the moments are kept across
a subspace refresh. Groups without "rank" are plain (same-style) AdamW.
"""
import math

import torch

from dpo_lab.optim.adamw import PerParameter, adam_moments_


class GaLoreProjector:
    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 0.25):
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"rank and update_proj_gap must be >= 1, got {rank}, {update_proj_gap}")
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
        self.matrix = None  # P (m×r) or Q (r×n)

    def left(self, G):
        return G.shape[0] < G.shape[1]

    def project(self, G: torch.Tensor, step: int) -> torch.Tensor:
        if self.matrix is None or step % self.update_proj_gap == 0:
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            self.matrix = (U[:, :self.rank] if self.left(G) else Vh[:self.rank]).to(G.dtype)
        return self.matrix.T @ G if self.left(G) else G @ self.matrix.T

    def project_back(self, N: torch.Tensor, shape) -> torch.Tensor:
        full = self.matrix @ N if shape[0] < shape[1] else N @ self.matrix
        return self.scale * full


class GaLoreAdamW(PerParameter):
    """Param groups with a "rank" key are GaLore-projected (plus "update_proj_gap", "scale")."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            if "rank" in group and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("GaLore groups take 2-D weights only, got shapes "
                                 f"{[tuple(p.shape) for p in group['params']]}")

    def update(self, p, g, group, state):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = 0
            if "rank" in group:
                state["projector"] = GaLoreProjector(group["rank"], group["update_proj_gap"], group["scale"])
        if "rank" in group:
            g = state["projector"].project(g, state["step"])  # refresh at 0, T, 2T, …
            state["P"] = state["projector"].matrix  # a tensor in the state: its bytes count
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        adam_moments_(m, v, g, b1, b2)
        N = m / (v.sqrt() + eps)
        if "rank" in group:
            N = state["projector"].project_back(N, p.shape)
        p.add_(N, alpha=-lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        if wd > 0:
            p.mul_(1 - lr * wd)
