"""Actors that hold a model, fed one shard per task: what refresh and eval share.

A job puts its model in the object store once and starts ``workers`` actors of its worker
class (each loads the model once); every task is one shard, handed to an actor's
``compute_shard(*args)``, whose result the driver gets back. Each actor keeps ``IN_FLIGHT``
shards queued, so the next one is already waiting in the actor while one computes. An actor
that dies is replaced by a fresh one (same arguments, so the same weights) and its shards are
retried, up to ``max_retries`` times each; after that the job's own error is raised. A task
writes whole chunks only, so a retried shard rewrites the same bytes (README, Decisions:
"Refresh uses plain Ray actors, not Ray Data").

Importing this module touches no Ray.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence

__all__ = ["IN_FLIGHT", "ShardPool", "check_resources", "run_shards"]

IN_FLIGHT = 2  # shards queued per actor: the next one waits in the actor while one computes


def check_resources(
    cpus_per_worker: float,
    gpus_per_worker: float,
    cpus: float,
    gpus: float,
    error: Callable[[str], Exception],
) -> None:
    """Refuse an actor that no node of this size could ever place (an error, never a wait)."""
    if gpus_per_worker > gpus:
        raise error(
            f"--gpus-per-worker {gpus_per_worker} but the Ray cluster has "
            f"{gpus:g} GPUs; use --gpus-per-worker 0 to run on CPU"
        )
    if cpus_per_worker > cpus:
        raise error(
            f"--cpus-per-worker {cpus_per_worker} but the Ray cluster has {cpus:g} CPUs; lower it"
        )


class ShardPool:
    """The worker actors; ``replace(i)`` swaps a dead one for a fresh one (same arguments)."""

    def __init__(
        self, worker_cls: type, args: tuple, workers: int, cpus: float, gpus: float
    ) -> None:
        import ray

        self._cls = ray.remote(worker_cls).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self._args = args
        self.actors = [self._cls.remote(*args) for _ in range(workers)]
        self.incarnation = [0] * workers

    def replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._cls.remote(*self._args)
        self.incarnation[index] += 1

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


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
    exc)`` builds the error that is raised.
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
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        key, index, incarnation = inflight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as exc:
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
