"""``salient train``: the driver, the Ray Train worker, the config and recipes, failure
handling across restarts and the driver's console. The names below load their module on
first use (``salient.lazy``), so importing ``salient.jobs.train.config`` loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".config": ["TrainConfig"],
        ".driver": ["RefreshLauncher", "run_train"],
        ".recipes": ["RECIPES"],
        "salient.trainer.specs": ["TrainError"],
    },
)
