"""``salient train``: the driver, the Ray Train worker, the config and recipes, failure
handling across restarts and the driver's console."""

from salient.jobs.train.config import TrainConfig
from salient.jobs.train.driver import RefreshLauncher, run_train
from salient.jobs.train.recipes import RECIPES
from salient.trainer.loop import TrainError

__all__ = ["RECIPES", "RefreshLauncher", "TrainConfig", "TrainError", "run_train"]
