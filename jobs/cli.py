"""The ``salient`` command line: one entry point, one sub-command per job.

Each job is a frozen config dataclass and a run function (:data:`COMMANDS`); its flags are
generated from the config (:mod:`salient.jobs.flags`), so a setting is spelled once, in the
config, with its help as the field's docstring. Every sub-command also takes ``--config FILE``
(JSON / YAML; a run's ``config.json`` works) and ``--print-config`` (the resolved config as
JSON, nothing run) and ``--storage-option KEY=VALUE`` (fsspec options for the job's URLs,
kept out of the config); ``train`` takes ``--recipe NAME``.

A job module is imported only when its sub-command runs (or shows its help), so ``salient
--help`` stays fast. A :class:`~salient.errors.SalientError` is printed as one line (what is
wrong, what to do) with exit code 2, also when Ray wrapped it (raised in a task, an actor or a
train worker: ``salient.jobs.runtime.ray_env.user_error``); anything else is a bug and keeps its
traceback. Ctrl-C ends a job with exit code 130 and one line: what it kept and the command
that continues it (``salient.jobs.runtime.interrupt``). A run function's result is printed as
one JSON line (a dict) or as text (a str).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

from salient import __version__, urls
from salient.errors import SalientError
from salient.jobs.flags import add_config_flags, build_config, config_dict, flag_name
from salient.jobs.runtime.progress import plain_warnings, storage_heartbeat
from salient.jobs.runtime.ray_env import user_error
from salient.pipeline.manifest import DatasetError, open_dataset

__all__ = ["COMMANDS", "build_parser", "entry", "main"]


@dataclass(frozen=True)
class Command:
    """A sub-command: its config class and run function in ``salient.jobs.<module>``."""

    module: str
    config: str
    run: str
    help: str
    description: str
    presets: str | None = None  # "module:NAME" of a {name: settings} dict, offered as --recipe
    # "module:NAME" of (preset, values set above it) -> the preset's values (it follows them)
    fit_preset: str | None = None
    render: str | None = None  # "module:NAME" of summary -> text for people; --json skips it
    # what an interrupted run leaves usable, unless the job says (runtime.interrupt)
    kept: str = "nothing (nothing half-done is used)"


COMMANDS: dict[str, Command] = {
    "ingest": Command(
        "ingest", "IngestConfig", "run_ingest",
        "image folder or --demo → webdataset shards + manifest",
        "Turn an ImageFolder tree (class sub-folders) or a flat folder of images into webdataset "
        "tar shards with dense sample ids and a manifest.json; or write the bundled demo dataset "
        "with --demo OUT."),
    "index": Command(
        "index", "IndexConfig", "run_index",
        "existing webdataset shards → a manifest, no tar rewritten",
        "Adopt webdataset tar shards you already have (ImageNet- or LAION-style: any keys, any "
        "image field, cls or json labels, shards of unequal size; local, s3://, gs:// or "
        "http(s)://) as a dataset in place: writes only manifest.json and ids.tsv, beside the "
        "shards or into --out.",
        render="index.driver:render_index"),
    "refresh": Command(
        "refresh", "RefreshConfig", "run_refresh",
        "teacher saliency over every shard → a new store generation",
        "Run a teacher ViT over every shard on Ray (one actor per worker, one shard per task) and "
        "write a new generation of saliency maps into the Zarr store; publish it when every "
        "shard is done. Rerunning the same command after a crash resumes, redoing only "
        "unfinished shards."),
    "train": Command(
        "train", "TrainConfig", "run_train",
        "MAE / SimMIM / iBOT / AutoMAE on Ray Train with periodic saliency refresh",
        "Train MAE, SimMIM or iBOT (--model ibot-*) with DDP on Ray Train. Random masking at "
        "--warmup-mask-ratio for the warmup epochs and until a generation exists; then the "
        "strategy. Every --refresh-every epochs a refresh from the latest checkpoint writes a "
        "new generation, used from the next epoch boundary. iBOT masks on its own schedule from "
        "the first step, by default from its EMA teacher's attention in the step "
        "(--saliency-source online). --recipe NAME starts from a paper's settings.",
        presets="train.recipes:RECIPES", fit_preset="train.recipes:fitted"),
    "inspect": Command(
        "inspect", "InspectConfig", "run_inspect",
        "stats, overlays, mask plans and an HTML report of the maps",
        "Inspect a saliency store: per-generation stats, per-image panels (image, heat overlay, "
        "one mask plan), a generation diff with --compare, and a static HTML report with --out; "
        "or one sample's map in the terminal with --id.",
        render="inspect:render_inspect"),
    "demo": Command(
        "demo", "DemoConfig", "run_demo",
        "the whole flow on the bundled demo data, local Ray",
        "Run the end-to-end loop on the bundled demo dataset on an embedded local Ray: ingest "
        "the demo set, train an MAE with warmup epochs of random masking, refresh saliency from "
        "its own checkpoint, train on AMT masks, and write an inspection report. Resumes where "
        "it stopped.",
        kept="what every stage finished (the run resumes from its latest checkpoint)"),
    "eval": Command(
        "eval", "EvalConfig", "run_eval",
        "k-NN and linear probes of a frozen encoder",
        "Probe a checkpoint's frozen encoder (or timm:NAME --weights FILE): features of every "
        "image of --data and --val on Ray (MAE's evaluation view, cached under --out by "
        "checkpoint, dataset and view), then DINO's weighted k-NN and MAE's linear probe; "
        "--baseline adds the same model at its random initialisation.",
        render="eval.driver:render_eval",
        kept="the features of every finished shard, cached under --out"),
    "gc": Command(
        "gc", "GcConfig", "run_gc",
        "list a store's generations and remove old ones",
        "List the generations of a saliency store with what garbage collection does to each and "
        "why, and remove the old ones: the current and the --keep newest published stay, older "
        "ones go once replaced --grace-s ago, unpublished ones once their driver has been gone "
        "that long. --dry-run removes nothing."),
    "compare": Command(
        "compare", "CompareConfig", "run_compare",
        "masking strategies compared on one dataset, seeds and error bars",
        "Train every arm (a recipe or strategy name; -self: maps from its own checkpoints, "
        "-label: the fixed maps of a teacher trained on the dataset's labels) on the same "
        "data with the same seeds, epochs and lr schedule; probe each (k-NN curve, k-NN and "
        "linear), measure its maps and masks, and write mean ± sd tables, whether each "
        "difference exceeds its noise, compare.json and an HTML report. --demo composes the "
        "demo set. The same command again continues.",
        render="compare:render_compare"),
    "bench": Command(
        "bench", "BenchConfig", "run_bench_job",
        "throughput benchmarks, as JSON",
        "Measure throughput and print one JSON object stamped with the device, versions and "
        "date. Targets and recorded figures are in BENCHMARKS.md."),
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other salient error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _top_parser() -> _Parser:
    commands = "\n".join(f"  {name:<9} {c.help}" for name, c in COMMANDS.items())
    parser = _Parser(
        prog="salient",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attention-guided masked image modeling: ingest images, refresh teacher "
        "saliency into a Zarr store, train MAE / SimMIM / iBOT / AutoMAE on attention-driven "
        "masks, inspect the maps, compare strategies.",
        epilog=f"commands:\n{commands}\n\n`salient COMMAND --help` lists a command's settings.",
    )
    parser.add_argument("--version", action="version", version=f"salient {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _config_class(command: Command) -> type:
    return getattr(importlib.import_module(f"salient.jobs.{command.module}"), command.config)


def _named(spec: str):
    """The object ``NAME`` of ``salient.jobs.MODULE`` for ``"MODULE:NAME"``."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"salient.jobs.{module}"), name)


def _presets(command: Command) -> dict | None:
    return None if command.presets is None else _named(command.presets)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``: one flag per config field, plus the config flags."""

    command = COMMANDS[name]
    parser = _Parser(prog=f"salient {name}", description=command.description)
    add_config_flags(parser, _config_class(command))
    control = parser.add_argument_group("configuration")
    control.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="read settings from a JSON or YAML file (a run's config.json works); flags given "
        "beside it win",
    )
    control.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for every s3:// / gs:// URL of the job, e.g. anon=true or "
        "endpoint_url=http://host:9000 (repeatable; never written anywhere)",
    )
    control.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as JSON and exit without running",
    )
    if command.render is not None:
        control.add_argument(
            "--json", action="store_true", help="print the summary as one JSON line"
        )
    presets = _presets(command)
    if presets is not None:
        control.add_argument(
            "--recipe",
            choices=sorted(presets),
            default=None,
            metavar="NAME",
            help=f"start from a paper's settings (README, Recipes): {', '.join(sorted(presets))}; "
            "the config file and the flags given override them",
        )
    return parser


_CONTROL = ("config", "print_config", "recipe", "storage_option", "json")


def _run(name: str, argv: list[str]) -> int:
    command = COMMANDS[name]
    args = vars(build_parser(name).parse_args(argv))
    recipe = args.get("recipe")
    preset = _presets(command)[recipe] if recipe else None
    if preset is not None and command.fit_preset is not None:  # follows the layers above it
        preset = functools.partial(_named(command.fit_preset), preset)
    given = {k: v for k, v in args.items() if k not in _CONTROL}
    config = build_config(_config_class(command), given, args["config"], preset, name)
    if args["print_config"]:
        print(json.dumps(config_dict(config), indent=2))
        return 0
    if args["storage_option"]:  # process-wide, carried to the job's workers (salient.urls)
        urls.set_storage_options(urls.parse_storage_options(args["storage_option"]))
    _check_local_datasets(config)
    run = getattr(importlib.import_module(f"salient.jobs.{command.module}"), command.run)
    with storage_heartbeat(name):  # a line a minute while the job waits on storage
        result = run(config)
    if command.render is not None and not args.get("json"):
        result = _named(command.render)(result)
    if isinstance(result, str):
        print(result, end="" if result.endswith("\n") else "\n")
    else:
        print(json.dumps(result, sort_keys=True, default=str))
    return 0


def _check_local_datasets(config) -> None:
    """Read the manifest of each local dataset the job names (fields marked
    ``settings.DATASET``) before its module loads torch, so a mistyped path answers in a
    fraction of a second with the job's own message; URLs and the shards are left to the job."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if spec.metadata.get("dataset") and value is not None and not urls.is_remote(value):
            try:
                open_dataset(value, check_files=False)
            except DatasetError as error:  # which of the job's datasets it is
                raise DatasetError(f"{flag_name(spec)}: {error}") from None


MESSAGE_LIMIT = 300  # characters of an error line (README, Decisions: "One line per error")


def _one_line(error: SalientError, name: str) -> str:
    """The error as one line in the job's own words: a library's field names (``batch_size``,
    raised below ``jobs/``; a quoted ``'batch_size'`` is a config file's key and stays, as does
    every name in an error whose ``names_fields`` is False) as the job's flags
    (``--batch-size``), and a line longer than
    :data:`MESSAGE_LIMIT` cut in the middle, keeping its start (what is wrong) and its end
    (what to do). The messages themselves summarise long library text
    (``salient.errors.brief``); the cut is the rule's last guard."""
    text = " ".join(str(error).split())
    fields = dataclasses.fields(_config_class(COMMANDS[name])) if error.names_fields else ()
    for field in fields:
        if "_" in field.name and not field.metadata.get("positional"):
            text = re.sub(rf"(?<![\w./'-]){field.name}(?![\w/'-])", flag_name(field), text)
    if len(text) > MESSAGE_LIMIT:
        text = f"{text[: MESSAGE_LIMIT - 100]} … {text[-90:]}"
    return text


def _storage_flags(argv: list[str]) -> list[str]:
    """The ``--storage-option`` flags of a command line, as given (they are never written into
    a run's config.json, so a continue command built from one carries them itself)."""
    flags = []
    for k, arg in enumerate(argv):
        if arg == "--storage-option" and k + 1 < len(argv):
            flags += [arg, argv[k + 1]]
        elif arg.startswith("--storage-option="):
            flags.append(arg)
    return flags


def main(argv: list[str] | None = None) -> int:
    """Run ``salient ARGV``; returns the exit code (tests call this)."""
    top = _top_parser().parse_args(sys.argv[1:] if argv is None else argv)
    plain_warnings(top.command)
    try:
        return _run(top.command, top.args)
    except Exception as exc:  # ours, or ours inside Ray's wrappers: one line, exit 2
        error = user_error(exc)
        if error is None:
            raise  # a bug: its traceback is the report
        print(f"salient {top.command}: error: {_one_line(error, top.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C: what is kept, and how to go on (exit 130)
        kept = getattr(stop, "kept", None) or COMMANDS[top.command].kept
        drop = getattr(stop, "drop", ())
        again = [a for a in top.args if a not in drop]
        again += [f for f in getattr(stop, "flags", ()) if f not in top.args]
        resume = getattr(stop, "resume", None)
        if resume is not None:  # the job's own command (a run's config.json): its storage too
            resume = shlex.join([*shlex.split(resume), *_storage_flags(top.args)])
        else:
            resume = shlex.join(["salient", top.command, *again])
        print(
            f"salient {top.command}: interrupted; kept {kept}; continue with: {resume}",
            file=sys.stderr,
        )
        return 130


def entry() -> None:
    try:
        code = main()
    except BrokenPipeError:
        # `salient … | head` closed the pipe: its reader has what it wanted, so no traceback;
        # the rest of stdout goes nowhere, as Python's docs advise (signal.html, "Note on
        # SIGPIPE"), so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    if code == 130:  # Ctrl-C, after its line: leave now
        # Ray's exit handler stops an embedded cluster gracefully, which took 7 s here; its
        # processes end with this one anyway (Ray starts them fate-shared, PR_SET_PDEATHSIG,
        # and its workers end with their raylet), and a cluster ends a departed driver's job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
