"""``salient eval``: features of a frozen encoder on Ray (actor, view, cache), the k-NN and
linear probes, and the probe a training run makes as it goes. The names below load their module
on first use (``salient.lazy``), so importing ``salient.jobs.eval.config`` loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__, {".config": ["EvalConfig", "EvalError"], ".driver": ["render_eval", "run_eval"]}
)
