"""Shared fixtures: one local Ray for the whole session, and a small demo dataset."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray (num_cpus=2) for the whole test session (its cold start is 5–20 s)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A 96-image demo dataset in 3 shards of 32, made by our own ingest (image size 96)."""
    from salient.pipeline.ingest import ingest_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    ingest_demo(out, n=96, seed=0, shard_size=32, image_size=96)
    return out


@pytest.fixture(scope="session")
def demo_val(tmp_path_factory):
    """The held-out demo split beside ``demo_data``: 48 scenes in 2 shards (image size 96)."""
    from salient.pipeline.ingest import ingest_demo

    out = tmp_path_factory.mktemp("demo-val") / "data"
    ingest_demo(out, n=48, seed=0, shard_size=32, image_size=96, split="val")
    return out
