"""What the guarded recipe is measured against: the naive fine-tune that causes the forgetting,
and the oracle that ignores the source (the target accuracy to aim for).

Naive: all layers train at one learning rate on production rows only, BatchNorm statistics updating,
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


def oracle_fine_tune(model: nn.Module, train: Split, val: Split, *, epochs: int, lr: float, batch_size: int = 32,
                     seed: int = 0) -> nn.Module:
    """The target-accuracy upper bound: every layer with AdamW and a cosine schedule, BatchNorm
    statistics adapted on the target (train mode), early stopping on target validation accuracy;
    no replay, no anchor, no regard for the source. Returns ``model`` in eval mode at its best epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            batch = train.take(order[start : start + batch_size])
            if len(batch) < 2:  # BatchNorm in train mode needs two rows
                continue
            loss = nn.functional.cross_entropy(model(batch.x), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            acc = sum(int((model(val.x[i : i + 256]).argmax(1) == val.y[i : i + 256]).sum())
                      for i in range(0, len(val), 256)) / max(1, len(val))
        if acc > best:
            best, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()
