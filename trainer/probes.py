"""Probes of a frozen encoder's features: weighted k-NN and a linear classifier.

Both take features already computed (``salient eval`` caches them) and return top-1 / top-5
accuracy on a held-out split. Pure PyTorch on the given device; no disk, Ray or GPU unless
asked.

- :func:`knn_scores` — DINO's ``eval_knn.knn_classifier`` (Caron et al. 2021): features
  L2-normalised, so a dot product is the cosine similarity; the ``k`` most similar training
  samples vote for their class with weight ``exp(sim / T)``; classes are ranked by their summed
  votes. Defaults k = 20, T = 0.07 (DINO's). Ties in the ranking go to the lower class index.
- :func:`linear_probe` — MAE's linear probing head (He et al. 2022, ``main_linprobe.py``):
  ``BatchNorm1d(D, affine=False, eps=1e-6)`` before one ``Linear(D, C)`` whose weight is
  drawn from a truncated normal of std 0.01, trained with cross-entropy for ``epochs`` with a
  linear warmup (10 epochs, MAE) and a half-cycle cosine, weight decay 0, base lr 0.1 × batch /
  256 (MAE's blr rule), on fixed features (no augmentation). MAE trains it with LARS at a
  batch of 16,384; LARS scales each step by ``trust × ‖w‖ / ‖∇w‖`` (trust 0.001), a rule made
  for such batches that, at the few hundred samples per batch a cached-feature probe uses,
  moves the weights ~1e-4 of their norm per step and does not converge in 90 epochs. With one
  layer behind a normalising BatchNorm there is nothing for per-layer trust ratios to balance,
  so the probe uses plain SGD with momentum 0.9 at the same schedule (README, Decisions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from salient.trainer.schedules import WarmupCosine

__all__ = [
    "KNN_K",
    "KNN_TEMPERATURE",
    "LINEAR_BLR",
    "LINEAR_EPOCHS",
    "accuracy",
    "knn_probe",
    "knn_scores",
    "linear_probe",
]

KNN_K = 20  # DINO eval_knn: --nb_knn 20 (of 10, 20, 100, 200; 20 is its best on ImageNet)
KNN_TEMPERATURE = 0.07  # DINO eval_knn: --temperature 0.07
LINEAR_EPOCHS = 90  # MAE main_linprobe.py: --epochs 90, --warmup_epochs 10
LINEAR_WARMUP_EPOCHS = 10
LINEAR_BLR = 0.1  # MAE main_linprobe.py: --blr 0.1, lr = blr × batch / 256


def accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Share of rows whose label is among the ``k`` highest scores: ``scores [M, C]``,
    ``labels [M]`` -> ``{"top1": …, "top5": …}``; ``k`` is capped at C. Ties go to the lower
    class index (a stable sort)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [M, C]
    hits = order == labels.view(-1, 1)  # [M, C], one True per row
    total = max(len(labels), 1)
    return {f"top{k}": hits[:, : min(k, scores.shape[1])].sum().item() / total for k in ks}


@torch.no_grad()
def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> Tensor:
    """Weighted k-NN class votes (DINO eval_knn): ``train [N, D]``, ``train_labels [N]``,
    ``test [M, D]`` -> ``votes [M, C]``, where ``votes[j, c] = Σ exp(sim / T)`` over the
    ``min(k, N)`` training samples most cosine-similar to test row ``j`` that have class c."""
    train = nn.functional.normalize(train.float(), dim=1)  # [N, D], unit rows: dot = cosine
    test = nn.functional.normalize(test.float(), dim=1)  # [M, D]
    k = min(k, len(train))
    votes = []
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k], most similar first
        weights = (top_sim / temperature).exp()  # [m, k]
        one_hot = nn.functional.one_hot(train_labels[top_idx], num_classes).float()  # [m, k, C]
        votes.append((one_hot * weights.unsqueeze(-1)).sum(1))  # [m, C]
    return torch.cat(votes) if votes else test.new_zeros(0, num_classes)


def knn_probe(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of :func:`knn_scores` on the test split."""
    scores = knn_scores(train, train_labels, test, num_classes, k, temperature)
    return accuracy(scores, test_labels)


def _head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's linear probing head: BatchNorm without affine parameters, then one Linear."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE main_linprobe.py
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def linear_probe(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = LINEAR_EPOCHS,
    lr: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Train MAE's linear head on fixed features; top-1 / top-5 on the test split.

    ``lr`` None: MAE's rule, ``0.1 × batch_size / 256``. Deterministic for a seed on one
    device (the head's init and the batch order come from one generator).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _head(train.shape[1], num_classes).to(device)
    x, y = train.float().to(device), train_labels.to(device)
    batch_size = min(batch_size, len(x))
    _fit(head, x, y, epochs, lr, batch_size, torch.Generator().manual_seed(seed))
    head.eval()
    with torch.no_grad():
        scores = head(test.float().to(device)).cpu()
    return accuracy(scores, test_labels.cpu())


def _fit(head, x, y, epochs: int, lr: float | None, batch_size: int, generator) -> None:
    """MAE's linear-probe schedule over fixed features, SGD with momentum (module docstring)."""

    steps = math.ceil(len(x) / batch_size)
    base_lr = LINEAR_BLR * batch_size / 256 if lr is None else lr
    schedule = WarmupCosine(base_lr, epochs * steps, min(LINEAR_WARMUP_EPOCHS, epochs) * steps)
    optimizer = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for step, start in enumerate(range(0, len(x), batch_size)):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples to have a variance
                continue
            schedule.apply(optimizer, epoch * steps + step)
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
