"""Rendering for ``salient inspect``: PNG panels, the histogram and a static ``index.html``.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot global state,
no display). Every file is written under a temporary name in ``OUT`` and renamed, and
``index.html`` is written last by the caller, so a report on disk never links a half-written
image. The page uses relative links and no script: it opens from disk without a server.

The map covers the whole image linearly (docs/ARCHITECTURE.md, "Saliency maps"): it is drawn with
``extent=(0, W, H, 0)`` so cell (u, v) lies over pixels ``[u·W/G, (u+1)·W/G) × [v·H/G,
(v+1)·H/G)``; the heat overlay is that grid upsampled bilinearly, the mask plan the same grid
drawn cell by cell (AMT Figure 3: masked grey, thrown black, visible untouched).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from salient.jobs.inspect.stats import normalize_maps
from salient.trainer.provenance import describe_teacher

__all__ = [
    "PAGE_CSS",
    "PLAN_COLOURS",
    "new_figure",
    "render_compare",
    "render_generator",
    "render_histogram",
    "render_sample",
    "render_training",
    "save_png",
    "write_index",
    "write_page",
]

# RGBA per plan state (0 visible, 1 masked, 2 thrown); AMT Figure 3's colours.
PLAN_COLOURS = np.array([[0.0, 0.0, 0.0, 0.0], [0.62, 0.62, 0.62, 1.0], [0.0, 0.0, 0.0, 1.0]])
_HEAT_ALPHA = 0.5
_DPI = 90


def _figure(columns: int, legend: bool):
    fig = new_figure(2.6 * columns, 3.1 if legend else 2.85)
    axes = fig.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` × ``height`` inches at the reports' resolution."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI)


def save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written under a temporary name and renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png", dpi=_DPI)
    os.replace(tmp, path)


def _draw_image(ax, image, box=None) -> None:
    ax.imshow(np.asarray(image))
    _draw_box(ax, box)


def _draw_box(ax, box) -> None:
    """The object box, dashed white (nothing when None)."""
    from matplotlib.patches import Rectangle

    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ls="--", edgecolor="white")
        )


def _draw_heat(ax, image, raw: np.ndarray | None) -> None:
    """The image with its min-max normalised map upsampled bilinearly over it."""

    ax.imshow(np.asarray(image))
    if raw is None:
        ax.text(
            0.5,
            0.5,
            "no valid map",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            bbox={"facecolor": "black", "alpha": 0.6},
        )
        return
    grid = raw.shape[-1]
    p = normalize_maps(raw[None])[0].reshape(grid, grid)
    heat = ax.imshow(
        p,
        cmap="jet",
        alpha=_HEAT_ALPHA,
        vmin=0.0,
        vmax=1.0,
        interpolation="bilinear",
        extent=(0, image.width, image.height, 0),
    )
    # the scale of the min-max normalised map (0 = least, 1 = most salient cell of the image)
    bar = ax.figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, ticks=[0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=7, pad=1)


def _draw_plan(ax, image, state: np.ndarray) -> None:
    """The image under the plan's cells: masked grey, thrown black, visible untouched."""
    ax.imshow(np.asarray(image))
    ax.imshow(
        PLAN_COLOURS[state], interpolation="nearest", extent=(0, image.width, image.height, 0)
    )


def _plan_legend(fig, state: np.ndarray) -> None:
    from matplotlib.patches import Patch

    counts = [int((state == k).sum()) for k in (1, 2, 0)]
    handles = [
        Patch(facecolor=PLAN_COLOURS[1], label=f"masked ({counts[0]})"),
        Patch(facecolor=PLAN_COLOURS[2], label=f"thrown ({counts[1]})"),
        Patch(facecolor="white", edgecolor="black", label=f"visible ({counts[2]})"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)


def render_sample(
    out: Path,
    sample,
    generation: str,
    raw: np.ndarray | None,
    state: np.ndarray,
    strategy: str,
    label: str | None,
) -> dict:
    """``panels/<id>.png``: image (object box dashed), map heat overlay, mask plan.

    ``raw [G, G]`` raw map or None; ``state [G, G]`` 0 visible / 1 masked / 2 thrown.
    Returns the panel's entry for the index (id, label, relative path, strategy used).
    """
    fig, axes = _figure(3, legend=True)
    _draw_image(axes[0], sample.image, sample.box)
    axes[0].set_title(f"id {sample.sample_id}" + (f" · {label}" if label else ""), fontsize=9)
    _draw_heat(axes[1], sample.image, raw)
    axes[1].set_title(f"{generation} map", fontsize=9)
    _draw_plan(axes[2], sample.image, state)
    axes[2].set_title(f"{strategy} plan", fontsize=9)
    _plan_legend(fig, state)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.1, wspace=0.12)
    rel = f"panels/{sample.sample_id:09d}.png"
    save_png(fig, out / rel)
    return {
        "id": sample.sample_id,
        "label": label,
        "png": rel,
        "strategy": strategy,
        "has_map": raw is not None,
    }


def render_compare(out: Path, sample, generations: list[str], raws: list, label: str | None) -> str:
    """``panels/<id>-compare.png``: the image and its map in each generation, in the order
    given (AMT Figure 2: oldest first)."""
    fig, axes = _figure(1 + len(generations), legend=False)
    _draw_image(axes[0], sample.image, sample.box)
    axes[0].set_title(f"id {sample.sample_id}" + (f" · {label}" if label else ""), fontsize=9)
    for ax, name, raw in zip(axes[1:], generations, raws):
        _draw_heat(ax, sample.image, raw)
        ax.set_title(name, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.97, top=0.9, bottom=0.02, wspace=0.12)
    rel = f"panels/{sample.sample_id:09d}-compare.png"
    save_png(fig, out / rel)
    return rel


def render_generator(
    out: Path,
    sample,
    head_maps: np.ndarray,
    prob: np.ndarray,
    state: np.ndarray,
    label: str | None,
    shown_heads: int = 3,
) -> str:
    """``panels/<id>-generator.png``: the image, its stored maps (the heads' mean and the
    first ``shown_heads`` heads), the AutoMAE generator's mask probability and one sampled
    mask, the object box dashed on each (``salient.jobs.inspect.generator``).

    ``head_maps [H, G, G]`` raw, ``prob [g, g]``, ``state [g, g]`` (1 masked, 0 visible)."""
    heads = min(shown_heads, len(head_maps))
    fig, axes = _figure(4 + heads, legend=True)
    _draw_image(axes[0], sample.image, sample.box)
    axes[0].set_title(f"id {sample.sample_id}" + (f" · {label}" if label else ""), fontsize=9)
    maps = [("stored: head mean", head_maps.mean(0))]
    maps += [(f"stored: head {h}", head_maps[h]) for h in range(heads)]
    maps.append(("generator: mask prob.", prob))
    for ax, (title, raw) in zip(axes[1:], maps):
        _draw_heat(ax, sample.image, raw)
        _draw_box(ax, sample.box)
        ax.set_title(title, fontsize=9)
    _draw_plan(axes[-1], sample.image, state)
    _draw_box(axes[-1], sample.box)
    axes[-1].set_title("sampled AutoMAE mask", fontsize=9)
    _plan_legend(fig, state)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.1, wspace=0.12)
    rel = f"panels/{sample.sample_id:09d}-generator.png"
    save_png(fig, out / rel)
    return rel


def render_histogram(out: Path, histograms: dict[str, dict]) -> str:
    """``histogram.png``: share of cells per normalised-saliency bin, one bar set per generation."""
    fig = new_figure(6.0, 2.8)
    ax = fig.subplots()
    width = 1.0 / len(histograms)
    for k, (name, hist) in enumerate(histograms.items()):
        edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"], dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        step = np.diff(edges)
        ax.bar(edges[:-1] + step * k * width, share, width=step * width, align="edge", label=name)
    ax.set_xlabel("min-max normalised saliency of a cell")
    ax.set_ylabel("share of cells")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    save_png(fig, out / "histogram.png")
    return "histogram.png"


def render_training(out: Path, training: dict) -> str:
    """``training.png``: the run's loss per epoch and, where probed, its k-NN top-1 per epoch."""
    epochs = training["epochs"]
    fig = new_figure(8.0, 2.8)
    loss_ax, knn_ax = fig.subplots(1, 2)
    loss_ax.plot([e["epochs_done"] for e in epochs], [e["loss"] for e in epochs], marker=".")
    loss_ax.set_xlabel("epochs done")
    loss_ax.set_ylabel("training loss")
    for key, label in (("knn_cls", "CLS token"), ("knn_mean", "mean patch token")):
        points = [(e["epochs_done"], e[key]) for e in epochs if e[key] is not None]
        if points:
            knn_ax.plot(*zip(*points), marker="o", label=label)
    knn_ax.set_xlabel("epochs done")
    knn_ax.set_ylabel("k-NN top-1 (held-out)")
    if knn_ax.lines:
        knn_ax.legend(fontsize=8, frameon=False)
    else:
        knn_ax.text(0.5, 0.5, "no probe (train --val)", ha="center", transform=knn_ax.transAxes)
    fig.tight_layout()
    save_png(fig, out / "training.png")
    return "training.png"


# ---------------------------------------------------------------- index.html

PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th:first-child,td:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0}figcaption{font-size:.8em;color:#555}
code{background:#f4f4f4;padding:0 .2em}"""

_ROWS = [  # (label, path into a generation's stats, format)
    ("samples", ("samples",), "{:d}"),
    ("valid share", ("valid_share",), "{:.4f}"),
    ("usable maps", ("usable",), "{:d}"),
    ("entropy (nats)", ("entropy_mean",), "{:.4f}"),
    ("entropy / ln G²", ("entropy_norm_mean",), "{:.4f}"),
    ("mass in top 25 % cells", ("top25_mass_mean",), "{:.4f}"),
    ("box: mass inside", ("box", "mass_mean"), "{:.4f}"),
    ("box: area share", ("box", "area_mean"), "{:.4f}"),
    ("box: lift (mass / area)", ("box", "lift_mean"), "{:.3f}"),
    ("box: images with mass > area", ("box", "hit_share"), "{:.3f}"),
]


def _cell(stats: dict, path: tuple, fmt: str) -> str:
    value = stats
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "–" if value is None else fmt.format(value)


def _stats_table(generations: dict) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in generations)
    rows = []
    for label, path, fmt in _ROWS:
        cells = "".join(f"<td>{_cell(g['stats'], path, fmt)}</td>" for g in generations.values())
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    info = "".join(f"<td>{html.escape(_describe(g['info']))}</td>" for g in generations.values())
    rows.append(f"<tr><td>teacher</td>{info}</tr>")
    return f"<table><tr><th>statistic</th>{head}</tr>{''.join(rows)}</table>"


def _describe(info: dict) -> str:
    teacher = info.get("teacher") or {}
    parts = [
        info.get("kind") or teacher.get("kind"),
        describe_teacher(teacher),
        None if info.get("epoch") is None else f"epoch {info['epoch']}",
        str(info.get("created") or "")[:16].replace("T", " "),
    ]
    return " · ".join(str(p) for p in parts if p)


def _compare_table(diff: dict) -> str:
    rows = [
        ("images in both", diff["images"], "{:d}"),
        ("mean |Δ| of normalised maps", diff["mean_abs_change"], "{:.4f}"),
        ("Spearman rank correlation", diff["spearman_mean"], "{:.4f}"),
        ("constant maps (no ranking)", diff["constant"], "{:d}"),
    ]
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{'–' if v is None else f.format(v)}</td></tr>"
        for k, v, f in rows
    )
    return f"<table>{body}</table>"


_CLASS_COLUMNS = [  # (heading, path into a class's stats, format)
    ("images", ("samples",), "{:d}"),
    ("usable maps", ("usable",), "{:d}"),
    ("entropy / ln G²", ("entropy_norm_mean",), "{:.4f}"),
    ("top-25 % mass", ("top25_mass_mean",), "{:.4f}"),
    ("box lift", ("box", "lift_mean"), "{:.3f}"),
    ("box hit share", ("box", "hit_share"), "{:.3f}"),
]


def _class_table(per_class: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in _CLASS_COLUMNS)
    rows = [
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_cell(stats, path, fmt)}</td>" for _, path, fmt in _CLASS_COLUMNS)
        + "</tr>"
        for name, stats in per_class.items()
    ]
    return f"<table><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"


def _training_table(training: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    rows = [
        f"<tr><td>{e['epochs_done']}</td><td>{html.escape(str(e['strategy']))}</td>"
        f"<td>{fmt(e['loss'], '.4f')}</td><td>{fmt(e['knn_cls'], '.3f')}</td>"
        f"<td>{fmt(e['knn_mean'], '.3f')}</td><td>{html.escape(str(e['generation'] or '–'))}</td>"
        "</tr>"
        for e in training["epochs"]
    ]
    head = (
        "<tr><th>epochs done</th><th>masking</th><th>loss</th><th>k-NN top-1 (CLS)</th>"
        "<th>k-NN top-1 (mean)</th><th>generation</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _generator_section(generator: dict, inspected: dict, panels: list[dict]) -> list[str]:
    """AutoMAE's generator beside the stored maps: box figures and the generator panels."""
    ours, teacher = generator.get("stats") or {}, inspected["stats"].get("box") or {}
    rows = [
        ("box: mass inside", "mass_mean", "{:.4f}"),
        ("box: area share", "area_mean", "{:.4f}"),
        ("box: lift (mass / area)", "lift_mean", "{:.3f}"),
        ("box: images with mass > area", "hit_share", "{:.3f}"),
    ]
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_cell(ours, (key,), fmt)}</td>"
        f"<td>{_cell(teacher, (key,), fmt)}</td></tr>"
        for label, key, fmt in rows
    )
    masked = _cell(ours, ("masked_box_share_mean",), "{:.3f}")
    return [
        f"<h2>AutoMAE generator · <code>{html.escape(generator['checkpoint'])}</code></h2>",
        "<table><tr><th>statistic</th><th>generator's mask probability</th>"
        f"<th>stored maps (min-max)</th></tr>{body}</table>",
        f"<p>Share of the object box a sampled AutoMAE mask covers: {masked} (random masking: "
        f"{_cell(ours, ('mask_ratio',), '{:.2f}')} on average). Panels: stored maps, the "
        "generator's mask probability (no Gumbel noise) and one sampled mask, on the whole "
        "image.</p>",
        _figures([p for p in panels if p.get("generator")], "generator"),
    ]


def _figures(panels: list[dict], key: str) -> str:
    items = []
    for panel in panels:
        caption = f"id {panel['id']}" + (f" · {panel['label']}" if panel["label"] else "")
        if key == "png" and not panel["has_map"]:
            caption += " · no valid map (random plan)"
        items.append(
            f'<figure><img src="{html.escape(panel[key])}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return f'<div class="grid">{"".join(items)}</div>'


def write_index(out: Path, body: dict, panels: list[dict]) -> Path:
    """``index.html`` from the stats body and the rendered panels; written last, atomically."""
    names = list(body["generations"])
    config = body["config"]
    parts = [
        f"<h1>salient inspect · {html.escape(' vs '.join(names))}</h1>",
        f"<p>store <code>{html.escape(body['store'])}</code> · dataset "
        f"<code>{html.escape(body['dataset'])}</code> · grid {body['grid']}×{body['grid']}</p>",
        "<h2>Statistics</h2>",
        _stats_table(body["generations"]),
        "<p>Each map is min-max normalised per image and read as a distribution over its "
        "cells (details in <code>stats.json</code> and "
        "<code>salient.jobs.inspect.stats</code>).</p>",
        '<img src="histogram.png" alt="histogram of normalised saliency">',
    ]
    if body.get("per_class"):
        parts += [f"<h2>Per class · {html.escape(names[0])}</h2>", _class_table(body["per_class"])]
    if body["compare"] is not None:
        diff = body["compare"]
        parts += [
            f"<h2>Change: {html.escape(diff['from'])} vs {html.escape(diff['to'])}</h2>",
            _compare_table(diff),
        ]
    if body.get("training"):
        parts += [
            f"<h2>Training · <code>{html.escape(body['training']['run_dir'])}</code></h2>",
            '<img src="training.png" alt="loss and k-NN probe over epochs">',
            _training_table(body["training"]),
        ]
    parts += [
        f"<h2>Samples · {html.escape(config['strategy'])} plan, mask "
        f"{config['mask_ratio']}, throw {config['throw_ratio']}, seed {config['seed']}</h2>",
        "<p>Object box dashed; heat maps min-max normalised per image (colour bar: 0 = the "
        "image's least, 1 = its most salient cell); masked cells grey, thrown black, visible "
        "untouched (AMT Figure 3). Plans are drawn on the whole image at the teacher grid.</p>",
        _figures(panels, "png"),
    ]
    if body.get("generator"):
        parts += _generator_section(body["generator"], body["generations"][names[0]], panels)
    if body.get("history"):
        shown = ", ".join(body["history"])
        parts += [
            f"<h2>Across generations</h2><p>Oldest first: {html.escape(shown)}.</p>",
            _figures(panels, "compare"),
        ]
    return write_page(out, f"salient inspect · {names[0]}", parts)


def write_page(out: Path, title: str, parts: list[str]) -> Path:
    """``out/index.html``: a static page (no script, relative links) of the HTML ``parts``
    under ``title``, styled as every salient report; written last, atomically."""
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        *parts,
        "</body></html>\n",
    ]
    path = out / "index.html"
    tmp = out / ".index.html.partial"
    tmp.write_text("\n".join(page), encoding="utf-8")
    os.replace(tmp, path)
    return path
