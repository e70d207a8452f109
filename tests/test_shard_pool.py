"""The actor pool's cleanup in a failure path (Ray or a node gone) never replaces the job's own
error: it becomes a note on it, on a real local Ray."""

from __future__ import annotations

import pytest

from salient.jobs.runtime.placement import Ask
from salient.jobs.runtime.shard_pool import started_pool


class _Worker:
    def ping(self) -> int:
        return 1


def _gone() -> None:
    raise RuntimeError("the Ray cluster is gone")


def test_a_failing_shutdown_is_a_note_on_the_jobs_error(ray_session):
    ask = Ask.of("test actor", 1, 0.1, 0.0, "--workers")
    with (
        pytest.raises(ValueError, match="the job's own error") as raised,
        started_pool(_Worker, (), ask, 60.0) as pool,
    ):
        real = pool.shutdown
        pool.shutdown = lambda: (real(), _gone())  # stops the actor, then fails as if Ray left
        raise ValueError("the job's own error")
    (note,) = raised.value.__notes__
    assert note == "shutting the actors down failed too: RuntimeError: the Ray cluster is gone"


def test_without_an_error_a_failing_shutdown_raises(ray_session):
    ask = Ask.of("test actor", 1, 0.1, 0.0, "--workers")
    with pytest.raises(RuntimeError, match="gone"), started_pool(_Worker, (), ask, 60.0) as pool:
        real = pool.shutdown
        pool.shutdown = lambda: (real(), _gone())
