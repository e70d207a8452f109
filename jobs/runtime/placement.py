"""Where train workers and refresh actors go: resources planned per node, waits that end.

Ray places every resource request on one node: "2 CPUs free in the cluster" is not "0.5 CPU
free on some node". A plan computed from cluster totals can leave an actor pending forever
(README, Decisions, "Placement per node"). So:

- :func:`pack` is a pure bin-packing of bundles (``{"CPU": c, "GPU": g}``) onto nodes, with
  Ray's GPU rules: a fraction of a GPU must fit on one device, a whole number takes whole
  devices. :func:`plan_train` sizes the train workers beside the refresh actors with it;
  :func:`check_refresh` checks a job's actors (refresh, eval). Both raise one
  :class:`PlacementError` line saying what is missing and which flag changes it. No Ray:
  tested with made-up nodes.
- :func:`cluster_nodes` reads the live nodes from Ray; :func:`reserve` reserves bundles in a
  Ray placement group and waits for them a bounded time; :func:`probe` checks that bundles
  can be placed now and gives them back (Ray Train makes its own group for the workers, and
  waits for it ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` per try).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from salient.errors import SalientError

__all__ = [
    "Ask",
    "NodeFree",
    "PlacementError",
    "TrainPlan",
    "check_refresh",
    "cluster_nodes",
    "describe",
    "pack",
    "plan_train",
    "probe",
    "reserve",
    "wait_ready",
]

_EPS = 1e-6


class PlacementError(SalientError):
    """Workers or actors that no node can hold, or that Ray did not place in time."""


@dataclass(frozen=True)
class NodeFree:
    """What one node can still hold: CPUs and the free share of each of its GPUs."""

    name: str
    cpus: float
    gpus: tuple[float, ...] = ()


@dataclass(frozen=True)
class Ask:
    """``count`` bundles of ``bundle`` for ``what``; ``flags`` name the settings that size it."""

    what: str
    count: int
    bundle: dict
    flags: str

    @classmethod
    def of(cls, what: str, count: int, cpus: float, gpus: float, flags: str) -> Ask:
        """``count`` bundles of ``cpus`` CPUs and, when > 0, ``gpus`` GPUs."""
        bundle = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
        return cls(what, count, bundle, flags)


@dataclass(frozen=True)
class TrainPlan:
    """Resources of one train worker and of one refresh actor (None: no refresh)."""

    worker: dict
    refresh: dict | None


def describe(bundle: dict) -> str:
    """``{CPU: 0.5, GPU: 0.25}`` as people write it."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items() if v) + "}"


# ---------------------------------------------------------------- packing (pure)


def _gpu_slots(gpus: tuple[float, ...], need: float) -> list[int] | None:
    """Devices that take a GPU request: one device with ``need`` free (a fraction), or
    ``need`` wholly free devices (a whole number); None when the node cannot."""
    if need <= 0:
        return []
    if need < 1:
        fitting = [i for i, free in enumerate(gpus) if free + _EPS >= need]
        # the fullest device that still fits: whole GPUs stay whole for whole requests
        return [min(fitting, key=lambda i: gpus[i])] if fitting else None
    whole = [i for i, free in enumerate(gpus) if free + _EPS >= 1]
    return whole[: int(need)] if len(whole) >= need else None


def _take(node: NodeFree, bundle: dict) -> NodeFree | None:
    """``node`` after holding ``bundle``, or None when it cannot."""
    cpus, need = bundle.get("CPU", 0.0), bundle.get("GPU", 0.0)
    if cpus > node.cpus + _EPS:
        return None
    slots = _gpu_slots(node.gpus, need)
    if slots is None:
        return None
    share = need if need < 1 else 1.0
    gpus = tuple(free - share if i in slots else free for i, free in enumerate(node.gpus))
    return replace(node, cpus=node.cpus - cpus, gpus=gpus)


def pack(
    nodes: Sequence[NodeFree], bundles: Sequence[dict], spread: bool = False
) -> tuple[list[int], list[NodeFree]] | None:
    """Place ``bundles`` on ``nodes``: each bundle's node index and the nodes after, or None.

    First fit, largest bundles first (GPU, then CPU); ``spread`` puts each bundle on the
    node with the most CPU left instead (Ray's SPREAD), so actors do not share a node when
    they need not.
    """
    free = list(nodes)
    where = [0] * len(bundles)
    order = sorted(
        range(len(bundles)),
        key=lambda i: (-bundles[i].get("GPU", 0.0), -bundles[i].get("CPU", 0.0)),
    )
    for i in order:
        candidates = range(len(free))
        if spread:
            candidates = sorted(candidates, key=lambda n: -free[n].cpus)
        for n in candidates:
            after = _take(free[n], bundles[i])
            if after is not None:
                free[n], where[i] = after, n
                break
        else:
            return None
    return where, free


def _nodes_text(nodes: Sequence[NodeFree]) -> str:
    def one(node: NodeFree) -> str:  # what is free, or in all for cluster_nodes()
        gpus = f", GPU {'/'.join(f'{g:g}' for g in node.gpus)}" if node.gpus else ""
        return f"{node.name}: CPU {max(node.cpus, 0):g}{gpus}"

    return "; ".join(one(n) for n in nodes) or "no live node"


def _refuse(ask: Ask, nodes: Sequence[NodeFree], beside: str = "") -> PlacementError:
    return PlacementError(
        f"{ask.count} {ask.what}(s) of {describe(ask.bundle)} each do not fit{beside} on "
        f"the Ray nodes (free: {_nodes_text(nodes)}); a request must fit on one node — "
        f"lower {ask.flags}, or add nodes"
    )


def check_refresh(nodes: Sequence[NodeFree], ask: Ask) -> list[int]:
    """The node of each of a job's actors (spread; refresh and eval actors alike), or
    PlacementError naming ``ask.flags``."""
    placed = pack(nodes, [ask.bundle] * ask.count, spread=True)
    if placed is None:
        raise _refuse(ask, nodes)
    return placed[0]


def plan_train(
    nodes: Sequence[NodeFree],
    workers: int,
    cpus_per_worker: float | None,
    gpus_per_worker: float,
    refresh: Ask | None,
) -> TrainPlan:
    """Resources of each train worker so that ``workers`` of them and ``refresh`` fit.

    Placed in the order they run: the workers first, packed (Ray Train's default), then the
    refresh's actors into what the workers leave, spread. That order is also what puts a
    refresh's share of a GPU beside a train worker: Ray fills the fullest GPU that still
    fits, so reserved first, the refresh shares would pile onto one GPU. ``cpus_per_worker``
    None: the largest share up to 1 CPU (in hundredths) that fits, so a small machine still
    trains and a refresh never starves.

    Raises:
        PlacementError: the refresh, the workers, or the two together fit on no node.
    """
    if refresh is not None and pack(nodes, [refresh.bundle] * refresh.count) is None:
        raise _refuse(refresh, nodes)
    flags = "--workers or --cpus-per-worker"
    if refresh is not None:
        flags += f" (or the refresh's {refresh.flags})"

    def ask(cpus: float) -> Ask:
        bundle = {"CPU": cpus, "GPU": gpus_per_worker} if gpus_per_worker else {"CPU": cpus}
        return Ask("train worker", workers, bundle, flags)

    def left(cpus: float) -> list[NodeFree] | None:
        placed = pack(nodes, [ask(cpus).bundle] * workers)
        return None if placed is None else placed[1]

    def fits(cpus: float) -> bool:
        free = left(cpus)
        if free is None or refresh is None:
            return free is not None
        return pack(free, [refresh.bundle] * refresh.count, spread=True) is not None

    def refuse(cpus: float) -> PlacementError:
        free = left(cpus)
        if free is None:
            return _refuse(ask(cpus), nodes)
        both = replace(refresh, flags=f"{refresh.flags}, or --workers / --cpus-per-worker")
        return _refuse(both, free, " beside the train workers")

    if cpus_per_worker is not None:
        if not fits(cpus_per_worker):
            raise refuse(cpus_per_worker)
        return TrainPlan(ask(cpus_per_worker).bundle, refresh and refresh.bundle)
    if not fits(0.01):
        raise refuse(0.01)
    low, high = 1, 100  # hundredths of a CPU: fits(low / 100) holds
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid / 100) else (low, mid - 1)
    return TrainPlan(ask(low / 100).bundle, refresh and refresh.bundle)


# ---------------------------------------------------------------- Ray


def cluster_nodes() -> list[NodeFree]:
    """The live Ray nodes with their total CPUs and GPUs (named by IP and the end of the id)."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        name = f"{node.get('NodeManagerAddress', '?')}/{node['NodeID'][:6]}"
        gpus = (1.0,) * math.floor(resources.get("GPU", 0.0) + _EPS)
        nodes.append(NodeFree(name, float(resources.get("CPU", 0.0)), gpus))
    return nodes


def wait_ready(group, ask: Ask, timeout_s: float, beside: str = "") -> None:
    """Wait for the placement group ``group`` (holding ``ask``) to be placed; PlacementError
    after ``timeout_s``, the group removed."""
    import ray

    if not group.wait(timeout_seconds=timeout_s):
        ray.util.remove_placement_group(group)
        raise PlacementError(
            f"Ray could not place {ask.count} {ask.what}(s) of {describe(ask.bundle)}{beside} "
            f"within {timeout_s:g} s (nodes in all: {_nodes_text(cluster_nodes())}, less what "
            f"other work holds); lower {ask.flags}, free the cluster, or raise "
            "--placement-timeout-s"
        )


def reserve(ask: Ask, timeout_s: float, name: str = "", beside: str = ""):
    """A Ray placement group holding ``ask``'s bundles (spread over the nodes), ready;
    PlacementError after ``timeout_s`` (the group is removed then). ``name`` makes it findable
    (``ray.util.get_placement_group``); the caller removes it when done."""
    from ray.util.placement_group import placement_group

    group = placement_group([dict(ask.bundle)] * ask.count, strategy="SPREAD", name=name)
    wait_ready(group, ask, timeout_s, beside)
    return group


def probe(ask: Ask, timeout_s: float) -> None:
    """Check that Ray can place ``ask`` now (packed, as Ray Train does), then give it back."""
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group([dict(ask.bundle)] * ask.count, strategy="PACK")
    wait_ready(group, ask, timeout_s)
    ray.util.remove_placement_group(group)
