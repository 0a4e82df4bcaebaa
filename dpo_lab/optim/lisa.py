"""LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning", 2024).

The embeddings and the LM head (with the final norm) are always trained; of the transformer blocks,
only γ sampled uniformly without replacement are trainable, resampled every K steps. The other
blocks are frozen and hold no gradient and no optimizer state, so Adam's state covers
embed + head + γ blocks instead of the whole model.
"""
import torch


class LISA:
    def __init__(self, model, gamma: int, interval: int, seed: int = 0):
        self.blocks = list(model.blocks)
        if not 1 <= gamma <= len(self.blocks):
            raise ValueError(f"gamma must be in [1, {len(self.blocks)}] (the number of blocks), got {gamma}")
        if interval < 1:
            raise ValueError(f"interval K must be >= 1, got {interval}")
        self.gamma, self.interval = gamma, interval
        self.generator = torch.Generator().manual_seed(seed)  # own stream: the sampling is seeded
        block_params = {id(p) for b in self.blocks for p in b.parameters()}
        self.always = [p for p in model.parameters() if id(p) not in block_params]
        self.active: list[int] = []

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call before each forward; resamples at steps 0, K, 2K, … and returns whether it did."""
        if step % self.interval:
            return False
        self.active = sorted(torch.randperm(len(self.blocks), generator=self.generator)[:self.gamma].tolist())
        for i, block in enumerate(self.blocks):
            on = i in self.active
            for p in block.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if optimizer is not None:
                        optimizer.state.pop(p, None)  # frozen: its Adam moments are freed
        return True

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.always + [p for i in self.active for p in self.blocks[i].parameters()]
