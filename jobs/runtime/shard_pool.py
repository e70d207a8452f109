"""Actors that hold a model, fed one shard per task: what refresh and eval share.

A job puts its model in the object store once, reserves a placement group for its actors
(``salient.jobs.runtime.placement``) and starts one actor of its worker class in each bundle (each
loads the model once); every task is one shard, handed to an actor's ``compute_shard(*args)``,
whose result the driver gets back. Each actor keeps ``IN_FLIGHT`` shards queued, so the next
one is already waiting in the actor while one computes. An actor that dies is replaced by a
fresh one in the same bundle (same arguments, so the same weights; Ray moves a bundle whose
node died to another node) and its shards are retried, up to ``max_retries`` times each; after
that the job's own error is raised. An actor Ray cannot start within the placement timeout
stops the job with what is missing, never a silent wait. A task writes whole chunks only, so a
retried shard rewrites the same bytes (README, Decisions: "Refresh uses plain Ray actors, not
Ray Data").

Importing this module touches no Ray.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

from salient.errors import SalientError, cleaned_up
from salient.jobs.runtime.placement import (
    PlacementError,
    check_refresh,
    cluster_nodes,
    describe,
    reserve,
)

__all__ = ["IN_FLIGHT", "ActorInputs", "ShardPool", "run_shards", "started_pool"]

IN_FLIGHT = 2  # shards queued per actor: the next one waits in the actor while one computes
_POLL_S = 2.0  # how often the driver checks that every actor was placed


@dataclass(frozen=True)
class ActorInputs:
    """How an actor of a job feeds its model (refresh's teacher, eval's encoder): the input
    side, images per forward, the model's normalisation, its device and torch threads."""

    image_size: int
    batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str = "cpu"
    threads: int = 1

    @classmethod
    def of(
        cls, model, image_size: int, batch_size: int, gpus_per_actor: float, cpus_per_actor: float
    ) -> ActorInputs:
        """For ``model`` (a loaded teacher: its ``mean`` and ``std``) on an actor holding
        ``gpus_per_actor`` (CUDA when more than 0) and ``cpus_per_actor`` (its whole CPUs
        are its torch threads, at least one)."""
        device = "cuda" if gpus_per_actor > 0 else "cpu"
        threads = max(1, int(cpus_per_actor))
        return cls(image_size, batch_size, tuple(model.mean), tuple(model.std), device, threads)


class ShardPool:
    """``ask.count`` actors of ``worker_cls(*args)``, actor ``i`` in bundle ``i`` of the
    placement group ``group``.

    ``replace(i)`` swaps a dead actor for a fresh one in the same bundle; ``check_placed``
    raises PlacementError for an actor that waited longer than ``timeout_s`` for its bundle.
    """

    def __init__(self, worker_cls: type, args: tuple, ask, group, timeout_s: float) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ask, self._timeout_s, self._args = ask, timeout_s, args
        self._cls = ray.remote(worker_cls)
        self._options = {
            "num_cpus": ask.bundle.get("CPU", 0),
            "num_gpus": ask.bundle.get("GPU", 0),
            "max_restarts": 0,
        }
        self._strategy = lambda i: PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i % len(group.bundle_specs)
        )
        self.actors, self.incarnation, self._waiting = [], [0] * ask.count, {}
        for index in range(ask.count):
            self.actors.append(None)
            self._start(index)

    def _start(self, index: int) -> None:
        options = {**self._options, "scheduling_strategy": self._strategy(index)}
        actor = self._cls.options(**options).remote(*self._args)
        self.actors[index] = actor
        self._waiting[index] = (actor.__ray_ready__.remote(), time.monotonic())

    @property
    def what(self) -> str:
        return self._ask.what

    def replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self._start(index)
        self.incarnation[index] += 1

    def check_placed(self) -> None:
        """PlacementError for an actor Ray has not started within the timeout."""
        import ray

        for index, (ref, since) in list(self._waiting.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self._waiting[index]
            elif time.monotonic() - since > self._timeout_s:
                raise PlacementError(
                    f"{self._ask.what} {index} ({describe(self._ask.bundle)}) was not "
                    f"started within {self._timeout_s:g} s (nodes: "
                    f"{', '.join(n.name for n in cluster_nodes())}); a node was lost with no "
                    f"room elsewhere — add capacity or change {self._ask.flags}, then rerun "
                    "to resume"
                )

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def started_pool(
    worker_cls: type, args: tuple, ask, timeout_s: float, group=None
) -> Iterator[ShardPool]:
    """A :class:`ShardPool` in ``group``, shut down on exit. Without a ``group`` the job gets
    its own: ``ask`` checked against each node first (one line, no wait), then reserved
    within ``timeout_s`` (``salient.jobs.runtime.placement``), and removed on exit."""
    import ray

    own = group is None
    if own:
        check_refresh(cluster_nodes(), ask)
        group = reserve(ask, timeout_s)
    # Cleanup in a failure path (Ray or a node gone) never replaces the job's own error: it
    # becomes a note on it (cleanup_after).
    with contextlib.ExitStack() as stack:
        if own:
            stack.enter_context(
                cleaned_up(
                    lambda: ray.util.remove_placement_group(group),
                    "giving back the placement group",
                )
            )
        pool = ShardPool(worker_cls, args, ask, group, timeout_s)
        # looked up when the block ends (a test swaps the method in the block)
        with cleaned_up(lambda: pool.shutdown(), "shutting the actors down"):
            yield pool


def run_shards(
    pool: ShardPool,
    tasks: Sequence[tuple[Hashable, tuple]],
    max_retries: int,
    on_result: Callable[[dict], None],
    give_up: Callable[[Hashable, int, Exception], Exception],
) -> int:
    """Run every task ``(key, args)`` as ``compute_shard(*args)`` on the pool; returns retries.

    ``on_result(result)`` is called on the driver as each task finishes. A task whose actor
    died is retried on a fresh actor; after ``max_retries`` retries ``give_up(key, attempts,
    exc)`` builds the error that is raised. An actor whose ``__init__`` raised is no lost
    worker: its error is raised at once.
    """
    import ray
    from ray.exceptions import RayActorError

    args_of = dict(tasks)
    pending, inflight, attempts = deque(args_of), {}, Counter()
    retries = 0

    def feed(index: int) -> None:
        while pending and sum(w == index for _, w, _ in inflight.values()) < IN_FLIGHT:
            key = pending.popleft()
            ref = pool.actors[index].compute_shard.remote(*args_of[key])
            inflight[ref] = (key, index, pool.incarnation[index])

    for index in range(len(pool.actors)):
        feed(index)
    while inflight:
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
        if not done:
            pool.check_placed()
            continue
        key, index, incarnation = inflight.pop(done[0])
        try:
            result = ray.get(done[0])
        except RayActorError as exc:
            _check_started(exc, pool.what)
            attempts[key] += 1
            if attempts[key] > max_retries:
                raise give_up(key, attempts[key], exc) from None
            retries += 1
            pending.appendleft(key)
            if pool.incarnation[index] == incarnation:
                pool.replace(index)
        else:
            on_result(result)
        feed(index)
    return retries


def _check_started(exc: Exception, what: str) -> None:
    """An actor whose ``__init__`` raised: its last line is the error (Ray keeps only the text
    of a creation failure)."""
    if getattr(exc, "actor_init_failed", False):
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise SalientError(
            f"a {what} could not start: {lines[-1].strip() if lines else exc!r}"
        ) from None
