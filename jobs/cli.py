"""The ``salient`` command line: one entry point, one sub-command per job.

argparse lives here only: ``main(argv) -> int`` turns flags into the job's config and calls
the job; nothing below ``jobs/`` sees parsed arguments. Job modules are imported lazily so
``salient --help`` stays fast. A :class:`~salient.errors.SalientError` is printed as one line
(what is wrong, what to do) with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from salient.errors import SalientError

__all__ = ["build_parser", "entry", "main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other salient error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _print_json(result: dict) -> None:
    print(json.dumps(result, indent=None, sort_keys=True, default=str))


# ---------------------------------------------------------------- ingest


def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="image folder or --demo → webdataset shards + manifest",
        description="Turn an ImageFolder tree (class sub-folders) or a flat "
        "folder of images into webdataset tar shards with dense sample ids "
        "and a manifest.json; or write the bundled demo dataset with --demo.",
    )
    p.add_argument("src", nargs="?", help="source folder (omit with --demo)")
    p.add_argument("out", help="output dataset directory (must be empty unless --overwrite)")
    p.add_argument("--demo", action="store_true", help="write the bundled demo dataset")
    p.add_argument("--n", type=int, default=2000, help="demo: number of scenes (2000)")
    p.add_argument("--seed", type=int, default=0, help="demo: seed (0)")
    p.add_argument("--image-size", type=int, default=192, help="demo: scene side in px (192)")
    p.add_argument(
        "--shard-size", type=int, default=None, help="samples per shard (1000; 500 for --demo)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a dataset salient wrote before in OUT"
    )
    p.set_defaults(run=_run_ingest)


def _run_ingest(args) -> int:
    from salient.jobs.progress import progress_bar
    from salient.pipeline.ingest import ingest_demo, ingest_folder

    if args.demo:
        if args.src is not None:
            raise SalientError("give either SRC or --demo, not both")
        with progress_bar(args.n, "demo scenes") as bar:
            manifest = ingest_demo(
                args.out,
                n=args.n,
                seed=args.seed,
                overwrite=args.overwrite,
                shard_size=500 if args.shard_size is None else args.shard_size,
                image_size=args.image_size,
                progress=bar,
            )
    else:
        if args.src is None:
            raise SalientError("ingest needs SRC and OUT (or --demo OUT)")
        with progress_bar(None, "images") as bar:
            manifest = ingest_folder(
                args.src,
                args.out,
                shard_size=1000 if args.shard_size is None else args.shard_size,
                overwrite=args.overwrite,
                progress=bar,
            )
    _print_json(
        {
            "out": args.out,
            "images": manifest.num_samples,
            "shards": len(manifest.shards),
            "skipped": len(manifest.skipped),
            "classes": len(manifest.classes or []),
            "fingerprint": manifest.fingerprint,
        }
    )
    return 0


# ---------------------------------------------------------------- refresh


def _add_refresh(sub) -> None:
    p = sub.add_parser(
        "refresh",
        help="teacher saliency over every shard → a new store generation",
        description="Run a teacher ViT over every shard on Ray (one actor per "
        "worker, one shard per task) and write a new generation of saliency maps "
        "into the Zarr store; publish it when every shard is done. Rerunning the "
        "same command after a crash resumes, redoing only unfinished shards.",
    )
    p.add_argument("--data", required=True, help="dataset directory written by ingest")
    p.add_argument("--store", required=True, help="saliency store URL or path (created if missing)")
    p.add_argument(
        "--teacher",
        required=True,
        help="a salient checkpoint file, or timm:NAME with --weights FILE",
    )
    p.add_argument("--weights", help="local weights for timm:NAME (.safetensors or .pth)")
    p.add_argument(
        "--allow-random-teacher",
        action="store_true",
        help="accept timm:NAME without --weights (random weights; for tests)",
    )
    p.add_argument("--kind", default="cls_attn", help="cls_attn | gpa | heads (cls_attn)")
    p.add_argument(
        "--reduce",
        default=None,
        help="over heads: mean | minmax_mean (default: mean for cls_attn, last head for gpa)",
    )
    p.add_argument("--block", type=int, default=-1, help="block whose attention is read (-1)")
    p.add_argument("--head", type=int, default=None, help="one head instead of a reduction")
    p.add_argument("--image-size", type=int, default=224, help="teacher input side S (224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (64)")
    p.add_argument("--workers", type=int, default=1, help="teacher actors (1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per actor (0.5)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed shard (3)")
    p.set_defaults(run=_run_refresh)


def _run_refresh(args) -> int:
    from salient.jobs.refresh import RefreshConfig, run_refresh

    config = RefreshConfig(
        data=args.data,
        store=args.store,
        teacher=args.teacher,
        weights=args.weights,
        allow_random_teacher=args.allow_random_teacher,
        kind=args.kind,
        reduce=args.reduce,
        block=args.block,
        head=args.head,
        image_size=args.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        max_retries=args.max_retries,
    )
    _print_json(run_refresh(config))
    return 0


# ---------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="MAE / SimMIM on Ray Train with periodic saliency refresh",
        description="Train MAE or SimMIM with DDP on Ray Train. Random masking at "
        "--warmup-mask-ratio for the warmup epochs and until a generation exists; "
        "then the strategy. Every --refresh-every epochs a refresh from the latest "
        "checkpoint writes a new generation, used from the next epoch boundary.",
    )
    p.add_argument("--data", required=True, help="dataset directory written by ingest")
    p.add_argument("--store", default=None, help="saliency store URL or path")
    p.add_argument(
        "--model",
        default="mae-tiny",
        help="mae-{tiny,small,base} | simmim-{tiny,small,base} (mae-tiny)",
    )
    p.add_argument(
        "--strategy",
        default="amt",
        help="random | block | amt | attmask_high | attmask_low | attmask_hint | gpa (amt)",
    )
    p.add_argument("--mask-ratio", type=float, default=0.45, help="(0.45)")
    p.add_argument("--throw-ratio", type=float, default=0.40, help="(0.40)")
    p.add_argument(
        "--warmup-mask-ratio",
        type=float,
        default=0.75,
        help="random mask ratio of the warmup epochs (0.75)",
    )
    p.add_argument("--epochs", type=int, default=400, help="(400)")
    p.add_argument("--warmup-epochs", type=int, default=40, help="(40)")
    p.add_argument("--refresh-every", type=int, default=40, help="(40; 0 = never)")
    p.add_argument(
        "--refresh-wait",
        action="store_true",
        help="pause training while a refresh runs (deterministic)",
    )
    p.add_argument("--workers", type=int, default=1, help="DDP workers (1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16, nccl")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--run-dir", default="runs/train", help="checkpoints and metrics (runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (64)")
    p.add_argument("--lr", type=float, default=None, help="(1.5e-4 × global batch / 256)")
    p.add_argument("--image-size", type=int, default=224, help="(224)")
    p.add_argument("--patch-size", type=int, default=16, help="(16)")
    p.add_argument("--norm-pix-loss", action="store_true", help="normalised pixel target (MAE)")
    p.add_argument("--seed", type=int, default=0, help="(0)")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (2)")
    p.add_argument("--saliency-kind", default="cls_attn", help="kind the refreshes write")
    p.add_argument("--refresh-workers", type=int, default=1, help="refresh actors (1)")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from salient.jobs.train import TrainConfig, run_train

    config = TrainConfig(
        data=args.data,
        store=args.store,
        model=args.model,
        strategy=args.strategy,
        mask_ratio=args.mask_ratio,
        throw_ratio=args.throw_ratio,
        warmup_mask_ratio=args.warmup_mask_ratio,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        refresh_every=args.refresh_every,
        refresh_wait=args.refresh_wait,
        workers=args.workers,
        gpu=args.gpu,
        address=args.address,
        run_dir=args.run_dir,
        resume=args.resume,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        patch_size=args.patch_size,
        norm_pix_loss=args.norm_pix_loss,
        seed=args.seed,
        loader_workers=args.loader_workers,
        saliency_kind=args.saliency_kind,
        refresh_workers=args.refresh_workers,
    )
    _print_json(run_train(config))
    return 0


# ---------------------------------------------------------------- inspect


def _id_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ids takes comma-separated integers (got {text!r})"
        ) from None


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="stats, overlays, mask plans and an HTML report of the maps",
        description="Inspect a saliency store: per-generation stats, per-image "
        "panels (image, heat overlay, one mask plan), a generation diff with "
        "--compare, and a static HTML report; or one sample in the terminal "
        "with --id.",
    )
    p.add_argument("--store", required=True, help="saliency store URL or path")
    p.add_argument("--data", required=True, help="dataset directory written by ingest")
    p.add_argument("--out", help="report directory (index.html + PNGs)")
    p.add_argument("--generation", help="generation to inspect (default: current)")
    p.add_argument("--compare", help="a second generation to diff against")
    p.add_argument("--seed", type=int, default=0, help="seed for --n ids and mask plans (0)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ids", type=_id_list, help="sample ids, e.g. 1,5,9")
    which.add_argument("--n", type=int, default=32, help="number of random sample ids (32)")
    which.add_argument("--id", type=int, help="print one sample's map in the terminal")
    p.add_argument("--strategy", default="amt", help="mask strategy drawn on the panels (amt)")
    p.add_argument("--mask-ratio", type=float, default=0.45, help="(0.45)")
    p.add_argument("--throw-ratio", type=float, default=0.40, help="(0.40)")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from salient.jobs.inspect import InspectConfig, print_sample, run_inspect

    if args.id is not None:
        print(print_sample(args.store, args.data, args.id, args.generation), end="")
        return 0
    if not args.out:
        raise SalientError(
            "inspect needs --out DIR for the report, or --id N for one sample in the terminal"
        )
    config = InspectConfig(
        store=args.store,
        data=args.data,
        out=args.out,
        generation=args.generation,
        ids=args.ids,
        n=args.n,
        strategy=args.strategy,
        mask_ratio=args.mask_ratio,
        throw_ratio=args.throw_ratio,
        compare=args.compare,
        seed=args.seed,
    )
    _print_json(run_inspect(config))
    return 0


# ---------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole flow on the bundled demo data, local Ray",
        description="Run the end-to-end loop on the bundled demo dataset on an "
        "embedded local Ray: ingest the demo set, train an MAE with warmup epochs of random "
        "masking, refresh saliency from its own checkpoint, train on AMT masks, "
        "and write an inspection report. Resumes where it stopped.",
    )
    p.add_argument("--out", default="demo_run", help="working directory (demo_run)")
    p.add_argument("--n", type=int, default=2000, help="demo scenes (2000)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (5)")
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=2,
        help="epochs of random masking before the first refresh (2)",
    )
    p.add_argument("--refresh-every", type=int, default=1, help="epochs between refreshes (1)")
    p.add_argument("--fresh", action="store_true", help="start over: remove OUT first")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from salient.jobs.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=args.out,
        n=args.n,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        refresh_every=args.refresh_every,
        fresh=args.fresh,
    )
    _print_json(run_demo(config))
    return 0


# ---------------------------------------------------------------- bench


def _add_bench(sub) -> None:
    from salient.jobs.bench import BENCHES

    p = sub.add_parser(
        "bench",
        help="throughput benchmarks, as JSON",
        description="Measure throughput and print one JSON object. Targets "
        "and recorded figures are in BENCHMARKS.md.",
    )
    p.add_argument("what", choices=sorted(BENCHES), help="what to measure")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="also append the JSON line to this file")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from salient.jobs.bench import run_bench

    result = run_bench(args.what, quick=args.quick, device=args.device)
    _print_json(result)
    if args.out:
        with open(args.out, "a") as stream:
            stream.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    return 0


# ---------------------------------------------------------------- entry

_COMMANDS: list[Callable] = [
    _add_ingest,
    _add_refresh,
    _add_train,
    _add_inspect,
    _add_demo,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="salient",
        description="Attention-guided masked image modeling: "
        "ingest images, refresh teacher saliency into a Zarr store, train MAE / "
        "SimMIM on attention-driven masks, inspect the maps.",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="{ingest,refresh,train,inspect,bench,demo}",
    )
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SalientError as exc:
        print(f"salient {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"salient {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
