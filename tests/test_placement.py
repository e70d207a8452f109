"""Resource plans per node (pure: made-up nodes, no Ray), and the GPU layout they stand for.

The plans must follow Ray's own rules, or a job waits forever for a request Ray cannot place:
a request fits on one node; a fraction of a GPU fits on one device (Ray fills the fullest
device that fits); a whole number takes whole devices.
"""

from __future__ import annotations

import pytest

from salient.jobs.runtime.placement import (
    Ask,
    NodeFree,
    PlacementError,
    check_refresh,
    pack,
    plan_train,
)
from salient.jobs.train.config import TrainConfig

TWO_SMALL = [NodeFree("a", 1.0), NodeFree("b", 1.0)]


def refresh(count=1, cpus=0.5, gpus=0.0) -> Ask:
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return Ask("refresh actor", count, bundle, "--refresh-cpus")


def test_two_one_cpu_nodes_fit_two_workers_and_a_refresh():
    """The case that hung: 2 nodes x 1 CPU, 2 workers, a refresh of 0.5 CPU."""
    plan = plan_train(
        TWO_SMALL, workers=2, cpus_per_worker=None, gpus_per_worker=0, refresh=refresh()
    )
    assert plan.worker == {"CPU": 0.5} and plan.refresh == {"CPU": 0.5}
    # what the cluster totals said before: (2 - 0.5) / 2 = 0.75 per worker, which fits no node
    with pytest.raises(
        PlacementError,
        match=r"refresh actor.*beside the train workers.*--refresh-cpus, or --workers",
    ):
        plan_train(TWO_SMALL, 2, 0.75, 0, refresh())


def test_one_node_keeps_the_old_sizes():
    plan = plan_train([NodeFree("a", 2.0)], 2, None, 0, refresh())
    assert plan.worker == {"CPU": 0.75}
    assert plan_train([NodeFree("a", 16.0)], 4, None, 0, None).worker == {"CPU": 1.0}


@pytest.mark.parametrize(
    "nodes, workers, cpus, ask, match",
    [
        (
            TWO_SMALL,
            2,
            None,
            refresh(cpus=1.5),
            r"refresh actor\(s\) of \{CPU: 1.5\} each do not fit on",
        ),
        (
            TWO_SMALL,
            3,
            1.0,
            None,
            r"3 train worker\(s\) of \{CPU: 1\}.*lower --workers or --cpus-per-worker",
        ),
        ([NodeFree("a", 8.0)], 1, None, refresh(gpus=0.25), r"\{CPU: 0.5, GPU: 0.25\}.*a: CPU 8\)"),
    ],
)
def test_what_fits_nowhere_is_one_line_naming_the_flag(nodes, workers, cpus, ask, match):
    with pytest.raises(PlacementError, match=match) as info:
        plan_train(nodes, workers, cpus, 0, ask)
    assert "\n" not in str(info.value)


def test_fractional_gpus_fill_the_fullest_device_that_fits():
    """Ray's rule (measured on a local Ray with 4 declared GPUs): four 0.25 requests share
    GPU 0; after four 0.75 workers, one 0.25 request lands on each GPU."""
    gpus = NodeFree("g", 8.0, (1.0,) * 4)
    where, after = pack([gpus], [{"CPU": 0.5, "GPU": 0.25}] * 4)
    assert where == [0, 0, 0, 0]
    assert after[0].gpus == (0.0, 1.0, 1.0, 1.0)
    _, trained = pack([gpus], [{"CPU": 0.5, "GPU": 0.75}] * 4)
    assert trained[0].gpus == (0.25,) * 4
    _, both = pack(trained, [{"CPU": 0.5, "GPU": 0.25}] * 4)
    assert both[0].gpus == (0.0,) * 4
    assert pack([gpus], [{"GPU": 2}, {"GPU": 2}, {"GPU": 1}]) is None  # whole GPUs stay whole


def test_gpu_training_with_a_shared_refresh_on_every_gpu():
    """--gpu: each worker takes 0.75 of a GPU, one refresh actor per training GPU the rest."""
    config = TrainConfig(
        data="d", store="s", gpu=True, workers=8, epochs=4, warmup_epochs=1, refresh_every=1
    )
    assert (config.refresh_actors, config.refresh_gpu_share, config.worker_gpus) == (8, 0.25, 0.75)
    node = NodeFree("g", 32.0, (1.0,) * 8)
    ask = Ask("refresh actor", config.refresh_actors, {"CPU": 1.0, "GPU": 0.25}, "x")
    plan = plan_train([node], 8, None, config.worker_gpus, ask)
    assert plan.worker == {"CPU": 1.0, "GPU": 0.75}
    with pytest.raises(PlacementError):  # a ninth refresh actor finds no GPU share left
        plan_train([node], 8, None, 0.75, Ask("refresh actor", 9, {"CPU": 1.0, "GPU": 0.25}, "x"))
    dedicated = TrainConfig(
        data="d", store="s", gpu=True, workers=6, refresh_gpus=1, refresh_workers=2
    )
    assert (dedicated.worker_gpus, dedicated.refresh_gpu_share) == (1.0, 1.0)
    plan = plan_train(
        [node], 6, None, dedicated.worker_gpus, Ask("refresh actor", 2, {"CPU": 1, "GPU": 1}, "x")
    )
    assert plan.worker["GPU"] == 1.0


def test_cpu_training_defaults():
    config = TrainConfig(data="d", store="s")
    assert (config.refresh_actors, config.refresh_gpu_share, config.worker_gpus) == (1, 0.0, 0.0)


def test_refresh_actors_spread_over_the_nodes():
    assert check_refresh(TWO_SMALL, refresh(count=2)) == [0, 1]
    with pytest.raises(PlacementError, match="lower --refresh-cpus"):
        check_refresh(TWO_SMALL, refresh(count=3, cpus=0.6))


@pytest.mark.parametrize("value", [1.5, -0.25])
def test_refresh_gpus_is_a_share_or_whole_gpus(value):
    from salient.trainer.specs import TrainError

    with pytest.raises(TrainError, match="--refresh-gpus must be a share in"):
        TrainConfig(data="d", store="s", gpu=True, refresh_gpus=value)
