"""The probes on synthetic features: k-NN against a brute-force reference, the linear probe on
separable and on shuffled labels, accuracy ties. Pure torch, no Ray, a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salient.trainer.probes import accuracy, knn_probe, knn_scores, linear_probe


def brute_force_knn(train, train_labels, test, num_classes, k, temperature) -> np.ndarray:
    """DINO's weighted vote written out one test row at a time, in float64 NumPy."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    votes = np.zeros((len(test), num_classes))
    for j, row in enumerate(test):
        sims = [float(row @ t) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        for i in nearest:
            votes[j, int(train_labels[i])] += math.exp(sims[i] / temperature)
    return votes


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_knn_votes_match_a_brute_force_reference(k):
    gen = torch.Generator().manual_seed(k)
    train, test = torch.randn(150, 12, generator=gen), torch.randn(40, 12, generator=gen)
    labels = torch.randint(0, 6, (150,), generator=gen)
    got = knn_scores(train, labels, test, 6, k=k, temperature=0.07, chunk=16).double()
    want = brute_force_knn(train, labels, test, 6, min(k, 150), 0.07)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    test_labels = torch.randint(0, 6, (40,), generator=gen)
    top1 = (want.argmax(1) == test_labels.numpy()).mean()
    assert knn_probe(train, labels, test, test_labels, 6, k=k)["top1"] == pytest.approx(top1)


def test_knn_is_perfect_on_well_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=gen) * 10
    labels = torch.arange(5).repeat(20)
    train = centres[labels] + torch.randn(100, 32, generator=gen)
    test = centres[labels[:50]] + torch.randn(50, 32, generator=gen)
    assert knn_probe(train, labels, test, labels[:50], 5) == {"top1": 1.0, "top5": 1.0}


def test_accuracy_counts_ties_for_the_lower_class_and_caps_k():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 1])
    # ranked: row 0 [0, 1, 2] (tie: 0 first), row 1 [1, 2, 0] (tie: 1 first), row 2 [2, 0, 1]
    assert accuracy(scores, labels, ks=(1, 2, 5)) == pytest.approx(
        {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0}
    )


def separable(classes: int, dim: int, sizes: tuple[int, ...], seed: int = 0) -> list:
    """Splits of features whose class is linearly decodable: shared class directions, noise
    within, an offset (the BatchNorm removes it); ``[(features [n, dim], labels [n]), ...]``."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, dim, generator=gen)
    splits = []
    for n in sizes:
        labels = torch.randint(0, classes, (n,), generator=gen)
        splits.append((directions[labels] * 3 + torch.randn(n, dim, generator=gen) + 5.0, labels))
    return splits


def test_linear_probe_learns_separable_features_and_not_shuffled_labels():
    (train, labels), (test, y_test) = separable(8, 24, (600, 400))
    learned = linear_probe(train, labels, test, y_test, 8, epochs=30, batch_size=64)
    assert learned["top1"] >= 0.95
    shuffled = labels[torch.randperm(600, generator=torch.Generator().manual_seed(1))]
    chance = linear_probe(train, shuffled, test, y_test, 8, epochs=30, batch_size=64)
    assert abs(chance["top1"] - 1 / 8) < 0.08  # 400 test rows: one sd of chance is ~0.017


def test_linear_probe_is_deterministic_for_a_seed():
    [(features, labels)] = separable(4, 8, (200,), seed=3)
    a = linear_probe(features, labels, features, labels, 4, epochs=5, batch_size=32, seed=1)
    b = linear_probe(features, labels, features, labels, 4, epochs=5, batch_size=32, seed=1)
    assert a == b
