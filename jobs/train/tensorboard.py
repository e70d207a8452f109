"""TensorBoard event files of a training run: every scalar of its records in ``RUN/tb/``.

MAE, AttMask and AutoMAE all write TensorBoard events, so ``tensorboard --logdir RUN`` is
what their users open. Rank 0 adds each record it logs (its steps, and the epoch, refresh and
probe records of ``metrics.jsonl``) with the tags of ``salient.jobs.runtime.records.scalars``
(``step/loss``, ``epoch/img_per_s``, ``eval/knn/cls/top1``, ``refresh/box/lift_mean``, …),
every one on the axis of the global optimiser step. A restarted or resumed run purges what
the first attempt logged past its checkpoint, so each curve is drawn once.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from salient.jobs.runtime.records import scalars

__all__ = ["TB_DIR", "TensorBoardSink"]

TB_DIR = "tb"  # under the run directory
_FLUSH_S = 10  # a live `tensorboard --logdir RUN` sees new points within this


class TensorBoardSink:
    """``add(record)`` writes the record's scalars at its step (a step record's ``step``, else
    ``epochs_done`` × ``steps_per_epoch``); ``close()`` at the end. ``resumed_step``: the
    global step of the checkpoint the run continues from (0 for a new run)."""

    def __init__(self, run_dir: str | Path, steps_per_epoch: int, resumed_step: int = 0) -> None:
        self._steps_per_epoch = steps_per_epoch
        self._writer = SummaryWriter(
            str(Path(run_dir) / TB_DIR),
            purge_step=resumed_step or None,
            flush_secs=_FLUSH_S,
        )

    def add(self, record: dict) -> None:
        step = record.get("step")
        if step is None:
            step = record.get("epochs_done", 0) * self._steps_per_epoch
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, step, walltime=record.get("time"))

    def close(self) -> None:
        self._writer.close()
