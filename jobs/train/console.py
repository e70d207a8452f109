"""The training driver's console: one progress display for the whole run, on the driver.

The driver waits in ``TorchTrainer.fit`` while rank 0 writes ``metrics/rank-0.jsonl`` (a line
per optimiser step) and ``metrics.jsonl`` (starts, epochs, refreshes, probes) into the run
directory, which every node shares. :class:`TrainConsole` follows both files in a thread
(``salient.jobs.runtime.records.Follow``) and shows them one way on a terminal and another
off one; the workers draw nothing, so no line carries Ray's ``(pid=…)`` prefix and nothing is
drawn after the run's summary (the display closes before ``fit`` returns its result):

- ``bar`` (a terminal): one tqdm bar over every optimiser step of the run, its postfix the
  epoch (1-based) and step in it, img/s over all workers, loss, generation and the run's ETA;
  each finished epoch, refresh and restart is a line above the bar, so they stay visible.
- ``lines`` (a log, ``ray job submit``, CI): the same figures as one line every few seconds
  (``SALIENT_PROGRESS_EVERY``), and each event as its own line at once.

A change of the ``teacher`` whose maps an epoch used is shown with its line. What the run
lost or could not keep is said whatever the display (also with progress off, as plain lines):
a restart after a lost worker, the images an epoch could not use (when that count changes),
each damaged map chunk an epoch met (once), a refresh resumed or abandoned after a restore,
and each generation of another teacher's maps an epoch read (``--maps any``).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from salient.jobs.runtime.progress import ProgressLines
from salient.jobs.runtime.records import METRICS, STEPS, Follow

__all__ = ["TrainConsole", "eta_text"]

_POLL_S = 1.0
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}]{postfix}"


def eta_text(seconds: float | None) -> str | None:
    """``1h02m``, ``3m20s``, ``45s``; None when unknown."""
    if seconds is None:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _Lines:
    """Off a terminal: ``salient train: …`` lines on stderr (progress every few seconds)."""

    def __init__(self, stream=None) -> None:
        self._lines = ProgressLines("train", stream=stream)

    def progress(self, at: int, fields: dict) -> bool:
        return self._lines.update(**fields)

    def moved(self, at: int) -> None:
        pass

    def event(self, fields: dict) -> None:
        self._lines.line(**fields)

    def close(self) -> None:
        pass


class _Bar:
    """On a terminal: one tqdm bar over the run's steps; events are lines above it."""

    def __init__(self, total: int, stream=None) -> None:
        from tqdm import tqdm

        self._stream = stream or sys.stderr
        self._bar = tqdm(
            total=total, desc="salient train", bar_format=_BAR, file=self._stream, leave=True
        )
        self._tqdm = tqdm

    def progress(self, at: int, fields: dict) -> bool:
        self.moved(at)
        self._bar.set_postfix_str(ProgressLines.text(**fields), refresh=True)
        return True

    def moved(self, at: int) -> None:
        self._bar.n = at  # a restart goes back to its checkpoint's step
        self._bar.refresh()

    def event(self, fields: dict) -> None:
        self._tqdm.write(f"salient train: {ProgressLines.text(**fields)}", file=self._stream)

    def close(self) -> None:
        self._bar.close()


class TrainConsole:
    """``with TrainConsole(config, batches_per_epoch, mode):`` around ``fit``; ``mode`` is
    ``"bar"``, ``"lines"`` or ``"off"`` (``salient.jobs.runtime.progress.progress_mode``)."""

    def __init__(self, config, batches_per_epoch: int, mode: str, stream=None) -> None:
        self.config = config
        self.per_epoch = max(1, batches_per_epoch // config.accum_steps)  # optimiser steps
        self.total = config.epochs * self.per_epoch
        run_dir = Path(config.run_dir)
        self._steps = Follow(run_dir / STEPS.format(rank=0))
        self._events = Follow(run_dir / METRICS)
        self._view: _Bar | _Lines | None = None
        if mode == "bar":
            self._view = _Bar(self.total, stream)
        elif mode == "lines":
            self._view = _Lines(stream)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="salient-console", daemon=True)
        self._window: list[dict] = []
        self._clock: tuple[float, int] | None = None  # (wall time, step) this attempt began at
        self._epochs_done = 0
        self._teacher = None
        self._notices = ProgressLines("train", every_s=0, stream=stream)  # with no display
        self._damaged: set[str] = set()  # chunks already named
        self._corrupt = 0  # the corrupt count last said

    def __enter__(self) -> TrainConsole:
        self._events.records(), self._steps.records()  # a resumed run: skip the old lines
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll(final=True)
        if self._view is not None:
            self._view.close()

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """Show what the logs gained since the last look (events in order, then progress)."""
        for event in self._events.records():
            self._notice(event)
            if self._view is not None:
                self._event(event)
        steps = [r for r in self._steps.records() if r.get("kind", "step") == "step"]
        if self._view is None:
            return
        # only steps of epochs not yet shown done: one read in this look after its epoch's
        # record (the events are read first) would draw a stale line below it
        done = self._epochs_done
        self._window = [r for r in (*self._window, *steps) if r["epoch"] >= done]
        if self._window and not final:
            self._progress()

    # ------------------------------------------------------------ progress

    def _progress(self) -> None:
        last = self._window[-1]
        if self._clock is None:  # no start record seen: from this first look
            self._clock = (time.time(), self._window[0]["step"] - 1)
        rate = sum(r["img_per_s"] for r in self._window) / len(self._window)  # rank 0's steps
        fields = {
            "epoch": f"{last['epoch'] + 1}/{self.config.epochs}",
            "step": f"{(last['step'] - 1) % self.per_epoch + 1}/{self.per_epoch}",
            "img_per_s": round(rate * self.config.workers, 1),
            "loss": last["loss"],
            **self._maps(last),
            "eta": eta_text(self._eta(last["step"])),
        }
        if self._view.progress(last["step"], fields):  # the next figures count from here
            self._window = []

    def _maps(self, record: dict) -> dict:
        """``maps=online`` for iBOT's own teacher (no generation is read), else the record's
        generation."""
        if self.config.maps_from == "online":
            return {"maps": "online"}
        return {"generation": record.get("generation") or "none"}

    def _eta(self, step: int) -> float | None:
        """Seconds left at the pace of this attempt so far (refreshes and probes included)."""
        began, first = self._clock
        done = step - first
        if done <= 0:
            return None
        return (self.total - step) * (time.time() - began) / done

    # ------------------------------------------------------------ events

    def _event(self, event: dict) -> None:
        kind = event.get("kind")
        show = getattr(self, f"_on_{kind}", None)
        if show is not None:
            show(event)

    def _notice(self, event: dict) -> None:
        """One line for each thing the run lost or could not keep (any display, or none)."""
        kind = event.get("kind")
        if kind == "start" and event.get("restart"):
            start = Path(event["from"]).name if event.get("from") else "the start"
            self._say(restarted=f"from {start} after a lost worker")
        elif kind == "epoch":
            corrupt = event.get("corrupt") or 0
            if corrupt != self._corrupt:  # said when it changes, not every epoch
                self._corrupt = corrupt
                self._say(
                    corrupt=f"{corrupt} images in epoch {event['epochs_done']} (undecodable, "
                    "over the pixel budget, or missing from their tar: left out, counted)"
                )
            for chunk in event.get("damaged_chunks") or []:
                if chunk not in self._damaged:
                    self._damaged.add(chunk)
                    self._say(
                        damaged=f"{chunk}: its rows read as no map (masked at random, counted)"
                    )
        elif kind in ("refresh_resumed", "refresh_abandoned"):
            verb = "resuming" if kind == "refresh_resumed" else "abandoned"
            teacher = Path(event.get("teacher") or "?").name
            why = f": {event['reason']}" if event.get("reason") else ""
            self._say(
                refresh=f"{verb} {event['generation']} from {teacher} ({event['shards_done']} "
                f"of {event['shards']} shards done){why}"
            )
        elif kind == "refresh_rerun":
            self._say(
                refresh=f"from {Path(event['teacher']).name} never began a generation before "
                "the run stopped: running it now"
            )
        elif kind == "foreign_maps":
            self._say(
                maps=f"{event['generation']} comes from another teacher, {event['about']} "
                "(--maps any; --maps own reads only this run's)"
            )

    def _say(self, **fields) -> None:
        """A notice: above the display when there is one, else as a plain line."""
        if self._view is not None:
            self._view.event(fields)
        else:
            self._notices.line(**fields)

    def _on_start(self, event: dict) -> None:
        at = event.get("epochs_done", 0) * self.per_epoch
        self._clock, self._window = (event.get("time", time.time()), at), []  # (wall, step)
        self._view.moved(at)
        if event.get("from") and not event.get("restart"):  # a restart is a notice
            self._view.event({"resumed": f"from {Path(event['from']).name}"})

    def _on_epoch(self, event: dict) -> None:
        self._epochs_done = event["epochs_done"]  # poll drops the window's steps of it
        self._view.moved(event["step"])
        fields = {
            "epoch": f"{event['epochs_done']}/{self.config.epochs} done",
            "img_per_s": round(event["img_per_s"], 1),
            "loss": event["loss"],
            **self._maps(event),
            "corrupt_maps": event.get("corrupt_maps") or None,
            "eta": eta_text(self._eta(event["step"])) if self._clock else None,
        }
        self._view.event(fields)
        teacher = event.get("teacher")
        if teacher and teacher != self._teacher:
            self._view.event({"maps": f"of {_teacher_text(teacher)}"})
        self._teacher = teacher or self._teacher

    def _on_refresh(self, event: dict) -> None:
        box = (event.get("box") or {}).get("lift_mean")
        self._view.event(
            {
                "refresh": f"from epoch {event['epochs_done']} published {event['generation']}",
                "img_per_s": event.get("img_per_s"),
                "box_lift": None if box is None else round(box, 3),
            }
        )

    def _on_eval(self, event: dict) -> None:
        knn = event["knn"]
        self._view.event(
            {
                "probe": f"k-NN top-1 after epoch {event['epochs_done']}: CLS "
                f"{knn['cls']['top1']:.3f}, mean patch {knn['mean']['top1']:.3f}"
            }
        )


def _teacher_text(teacher: dict) -> str:
    """A generation's teacher, short: its checkpoint's file name or its timm name."""
    who = teacher.get("path") or teacher.get("name") or "an unknown teacher"
    name = Path(who).name if teacher.get("path") else who
    generation = f" ({teacher['generation']})" if teacher.get("generation") else ""
    return f"{name}{generation}"
