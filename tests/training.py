"""A plain supervised loop for tests that need a trained classifier (attacks need one)."""

import torch
import torch.nn.functional as F


def fit(model, x, y, opt, *, epochs: int, batch_size: int):
    """Train ``model`` on (x, y) with cross-entropy, shuffling with the global torch RNG."""
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model
