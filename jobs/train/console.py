"""The training driver's console without a terminal: a line every few seconds from the logs.

The driver waits in ``TorchTrainer.fit`` while rank 0 writes ``metrics/rank-0.jsonl`` (a line
per step) and ``metrics.jsonl`` (starts, epochs, refreshes) into the run directory, which every
node shares. :class:`TrainConsole` follows both files in a thread and prints through
:class:`~salient.jobs.runtime.progress.ProgressLines`: epoch and step, img/s over all workers, loss,
generation, at most every few seconds; each finished epoch, refresh and restart at once. The
workers print nothing themselves, so ``ray job submit`` logs read as the driver's own lines.

What the run lost or could not keep is said whatever the progress display (a terminal's bars,
lines, or none): a restart after a lost worker, the images an epoch could not use (when that
count changes), each damaged map chunk an epoch met (once),
a refresh resumed or abandoned after a restore, and each generation of another teacher's maps
an epoch read (``--maps any``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from salient.jobs.runtime.progress import ProgressLines

__all__ = ["TrainConsole"]

_POLL_S = 1.0


class _Follow:
    """New complete JSON lines of a file that grows (it may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset = path, 0

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


class TrainConsole:
    """``with TrainConsole(config, steps_per_epoch, enabled):`` around ``fit``."""

    def __init__(self, config, steps_per_epoch: int, enabled: bool) -> None:
        self.config, self.steps = config, steps_per_epoch
        run_dir = Path(config.run_dir)
        self._steps = _Follow(run_dir / "metrics" / "rank-0.jsonl")
        self._events = _Follow(run_dir / "metrics.jsonl")
        self._lines = ProgressLines("train") if enabled else None
        self._notices = ProgressLines("train", every_s=0)  # always: what the run lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="salient-console", daemon=True)
        self._window: list[dict] = []
        self._epochs_done = 0
        self._damaged: set[str] = set()  # chunks already named
        self._corrupt = 0  # the corrupt count last said

    def __enter__(self) -> TrainConsole:
        self._events.records(), self._steps.records()  # a resumed run: skip the old lines
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll(final=True)

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            self._poll()

    def _poll(self, final: bool = False) -> None:
        steps = self._steps.records()
        if self._lines is not None:
            self._window.extend(steps)
            if self._window and not final:
                self._step_line()
        for event in self._events.records():
            self._notice(event)
            if self._lines is not None:
                self._event_line(event)

    def _step_line(self) -> None:
        self._window = [r for r in self._window if r["epoch"] >= self._epochs_done]
        if not self._window:  # its epoch's own line said it all
            return
        last = self._window[-1]
        rate = sum(r["img_per_s"] for r in self._window) / len(self._window)  # rank 0's steps
        printed = self._lines.update(
            epoch=f"{last['epoch'] + 1}/{self.config.epochs}",
            step=f"{(last['step'] - 1) % self.steps + 1}/{self.steps}",
            img_per_s=round(rate * self.config.workers, 1),
            loss=last["loss"],
            generation=last.get("generation") or "none",
        )
        if printed:  # the next line's img/s counts from here
            self._window = []

    def _event_line(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "epoch":
            self._epochs_done = event["epochs_done"]
            self._lines.line(
                epoch=f"{event['epochs_done']}/{self.config.epochs} done",
                img_per_s=round(event["img_per_s"], 1),
                loss=event["loss"],
                generation=event.get("generation") or "none",
            )
        elif kind == "refresh":
            self._lines.line(
                refresh=f"from epoch {event['epochs_done']} published {event['generation']}",
                img_per_s=event.get("img_per_s"),
            )

    def _notice(self, event: dict) -> None:
        """One line for each thing the run lost or could not keep (any progress display)."""
        kind, say = event.get("kind"), self._notices.line
        if kind == "start" and event.get("restart"):
            start = Path(event["from"]).name if event.get("from") else "the start"
            say(restarted=f"from {start} after a lost worker")
        elif kind == "epoch":
            corrupt = event.get("corrupt") or 0
            if corrupt != self._corrupt:  # said when it changes, not every epoch
                self._corrupt = corrupt
                say(
                    corrupt=f"{corrupt} images in epoch {event['epochs_done']} (undecodable, "
                    "over the pixel budget, or missing from their tar: left out, counted)"
                )
            for chunk in event.get("damaged_chunks") or []:
                if chunk not in self._damaged:
                    self._damaged.add(chunk)
                    say(damaged=f"{chunk}: its rows read as no map (masked at random, counted)")
        elif kind in ("refresh_resumed", "refresh_abandoned"):
            verb = "resuming" if kind == "refresh_resumed" else "abandoned"
            teacher = Path(event.get("teacher") or "?").name
            why = f": {event['reason']}" if event.get("reason") else ""
            say(
                refresh=f"{verb} {event['generation']} from {teacher} ({event['shards_done']} "
                f"of {event['shards']} shards done){why}"
            )
        elif kind == "foreign_maps":
            say(
                maps=f"{event['generation']} comes from another teacher, {event['about']} "
                "(--maps any; --maps own reads only this run's)"
            )
