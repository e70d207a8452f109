"""``salient eval``: features of a frozen encoder on Ray (actor, view, cache), the k-NN and
linear probes, and the probe a training run makes as it goes."""

from salient.jobs.eval.driver import EvalConfig, EvalError, run_eval

__all__ = ["EvalConfig", "EvalError", "run_eval"]
