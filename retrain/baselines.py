"""What the guarded recipe is measured against: the naive fine-tune that causes the forgetting.

All layers train at one learning rate on production rows only, BatchNorm statistics updating,
no replay, no anchor, no early stopping. Used by the benchmark and the tests, never by a job.
"""

from __future__ import annotations

import torch
from torch import nn

from retrain.batches import Split


def naive_fine_tune(model: nn.Module, train: Split, *, epochs: int, lr: float, batch_size: int = 32,
                    seed: int = 0) -> nn.Module:
    """Fine-tune every parameter of ``model`` in place with Adam at ``lr``; returns it in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            batch = train.take(order[start : start + batch_size])
            loss = nn.functional.cross_entropy(model(batch.x), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()
