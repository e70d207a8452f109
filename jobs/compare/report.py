"""The report of ``salient compare``: ``OUT/index.html`` and its figures, in the style of
``salient inspect`` (its page, styles and PNG writing: ``jobs.inspect.report``).

Per arm, over its seeds: the k-NN curves per epoch (the mean, a band of ± one sd, each seed's
points), the box lift of each generation of maps it trained on, the share of its masked
patches inside the object box through its loader, and the final tables — probes with each
arm's difference from the reference arm and its verdict, equal compute, maps. Figures are
drawn with matplotlib's object API on the Agg canvas; the page opens from disk.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from salient.jobs.compare.measure import PROBES
from salient.jobs.compare.noise import ALPHA
from salient.jobs.inspect.report import new_figure, save_png, write_page

__all__ = ["write_report"]

_PROBE_NAMES = {
    "knn_cls": "k-NN CLS",
    "knn_mean": "k-NN mean",
    "linear_cls": "linear CLS",
    "linear_mean": "linear mean",
}


def _curve_points(records: list[dict], key: str) -> dict[int, list[float]]:
    """``{epochs done: [value per seed]}`` of one probe over an arm's runs."""
    points: dict[int, list[float]] = {}
    for record in records:
        for epoch, probes in record["curve"].items():
            if key in probes:
                points.setdefault(int(epoch), []).append(probes[key])
    return dict(sorted(points.items()))


def _band(ax, xs, groups: list[list[float]], label: str, colour) -> None:
    """Mean line, ± one sd band (two or more values), and every value as a faint point."""
    means = np.array([np.mean(g) for g in groups])
    ax.plot(xs, means, marker="o", ms=3, label=label, color=colour)
    if all(len(g) > 1 for g in groups):
        sds = np.array([np.std(g, ddof=1) for g in groups])
        ax.fill_between(xs, means - sds, means + sds, alpha=0.2, color=colour, lw=0)
    for x, group in zip(xs, groups):
        ax.scatter([x] * len(group), group, s=6, alpha=0.4, color=colour)


def _colours(names: list[str]) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


def _curves(out: Path, records: dict, colours: dict, chance: float) -> str:
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(9.0, 3.2)
    for ax, key in zip(fig.subplots(1, 2), ("knn_cls", "knn_mean")):
        for name, runs in records.items():
            points = _curve_points(runs, key)
            if points:
                _band(ax, list(points), list(points.values()), name, colours[name])
        ax.axhline(chance, ls=":", color="grey", lw=1)
        ax.set_xlabel("epochs done (0: random initialisation)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{_PROBE_NAMES[key]} top-1 (held-out)")
        if ax.get_legend_handles_labels()[0]:  # none when no arm has a curve to draw
            ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_png(fig, out / "curves.png")
    return "curves.png"


def _lifts(out: Path, records: dict, colours: dict) -> str | None:
    fig = new_figure(9.0, 3.2)
    maps_ax, masks_ax = fig.subplots(1, 2)
    drawn, most = False, 0
    for name, runs in records.items():
        per_run = [list((r.get("generations") or {}).values()) for r in runs]
        count = min((len(g) for g in per_run), default=0)
        groups = [[g[i]["lift"] for g in per_run if g[i]["lift"] is not None] for i in range(count)]
        if groups and all(groups):
            _band(maps_ax, list(range(1, count + 1)), groups, name, colours[name])
            drawn, most = True, max(most, count)
    names = [
        n for n, runs in records.items() if any((r.get("masks") or {}).get("lift") for r in runs)
    ]
    for i, name in enumerate(names):
        lifts = [r["masks"]["lift"] for r in records[name] if (r.get("masks") or {}).get("lift")]
        sd = np.std(lifts, ddof=1) if len(lifts) > 1 else 0.0
        masks_ax.bar(i, np.mean(lifts), yerr=sd, color=colours[name], capsize=3)
        masks_ax.scatter([i] * len(lifts), lifts, s=6, color="black", alpha=0.5)
        drawn = True
    if not drawn:
        return None
    for ax in (maps_ax, masks_ax):
        ax.axhline(1.0, ls=":", color="grey", lw=1)
    if most:
        maps_ax.set_xlabel("generation (oldest first)")
        maps_ax.set_xticks(range(1, most + 1))
        maps_ax.set_xlim(0.5, most + 0.5)
        maps_ax.set_ylabel("box lift of the maps")
        maps_ax.legend(fontsize=7, frameon=False)
    else:  # no arm has maps with a lift (random masks only, or no object boxes)
        maps_ax.set_axis_off()
        maps_ax.text(0.5, 0.5, "no maps with a box lift", ha="center", va="center")
    masks_ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    masks_ax.set_ylabel("masked share in box ÷ box area")
    fig.tight_layout()
    save_png(fig, out / "lifts.png")
    return "lifts.png"


# ---------------------------------------------------------------- tables


def _stat(stats: dict | None, spec: str = ".3f") -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    text = format(stats["mean"], spec)
    return text if stats.get("sd") is None else f"{text} ± {format(stats['sd'], spec)}"


def _verdict(v: dict | None) -> str:
    if not v:
        return ""
    text = f"{v['diff']:+.3f}"
    if v["exceeds"] is None:
        return f"{text} (noise unknown)"
    detail = f"p {v['p']:.3f}" if v["p"] is not None else f"noise {v['noise']:.3f}"
    mark = "<b>exceeds</b>" if v["exceeds"] else "within"
    return f"{text} · {mark} noise ({detail})"


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _probe_table(summary: dict) -> str:
    head = ["arm", *(_PROBE_NAMES[p] for p in PROBES)]
    rows = [["random initialisation", *(_stat(summary["init"][p]) for p in PROBES)]]
    for name, arm in summary["arms"].items():
        rows.append([html.escape(name), *(_stat(arm["figures"][p]) for p in PROBES)])
    return _table(head, rows)


def _difference_table(summary: dict, key: str, label: str) -> str:
    head = ["arm", *(_PROBE_NAMES[p] for p in PROBES)]
    rows = [
        [html.escape(name), *(_verdict(arm[key].get(p)) for p in PROBES)]
        for name, arm in summary["arms"].items()
        if arm[key]
    ]
    return f"<h3>{html.escape(label)}</h3>" + _table(head, rows) if rows else ""


def _compute_table(summary: dict) -> str:
    head = ["arm", "train s", "wall s", "refresh s", "images seen", "k-NN CLS at equal time",
            "k-NN mean at equal time", "vs reference (k-NN CLS)"]  # fmt: skip
    rows = []
    for name, arm in summary["arms"].items():
        f = arm["figures"]
        rows.append(
            [
                html.escape(name),
                _stat(f["train_s"], ".0f"),
                _stat(f["wall_s"], ".0f"),
                _stat(f["refresh_s"], ".0f"),
                _stat(f["images"], ".0f"),
                _stat(f["equal_time_knn_cls"]),
                _stat(f["equal_time_knn_mean"]),
                _verdict(arm["versus_reference"].get("equal_time_knn_cls")),
            ]
        )
    return _table(head, rows)


def _maps_table(summary: dict, records: dict) -> str:
    head = ["arm", "maps", "box lift per generation", "masked share in box", "box area",
            "masks lift", "final encoder's box lift"]  # fmt: skip
    rows = []
    for name, arm in summary["arms"].items():
        f = arm["figures"]
        runs = records[name]
        gens = [list((r.get("generations") or {}).values()) for r in runs]
        count = min((len(g) for g in gens), default=0)
        lifts = " / ".join(
            _stat(_mean_sd([g[i]["lift"] for g in gens if g[i]["lift"] is not None]))
            for i in range(count)
        )
        areas = [r["masks"]["box_area"] for r in runs if (r.get("masks") or {}).get("box_area")]
        rows.append(
            [
                html.escape(name),
                html.escape(arm["teacher"] or "none"),
                lifts or "–",
                _stat(f["masked_in_box"]),
                _stat(_mean_sd(areas)),
                _stat(f["masks_lift"]),
                _stat(f["final_maps_lift"]),
            ]
        )
    return _table(head, rows)


def _mean_sd(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "sd": None}
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
    }


def _teacher_section(teacher: dict | None) -> list[str]:
    if not teacher:
        return []
    stores = "; ".join(
        f"{html.escape(s['kind'])}: box lift "
        + " / ".join(
            "–" if g["lift"] is None else f"{g['lift']:.3f}" for g in s["generations"].values()
        )
        for s in teacher.get("stores", {}).values()
    )
    return [
        "<h2>Label-aware teacher</h2>",
        f"<p>A ViT ({html.escape(teacher['settings']['model'])}'s encoder) trained on the "
        f"dataset's labels: held-out "
        f"top-1 {teacher['val_top1']:.3f} after {teacher['epochs']} epochs "
        f"({', '.join(f'{a:.3f}' for a in teacher['val_top1_per_epoch'])}); "
        f"{teacher['seconds']:.0f} s in all ({teacher['cpu_s']:.0f} CPU s): decoding "
        f"{teacher['decode_s']:.0f} s, training {teacher['train_s']:.0f} s, held-out probes "
        f"{teacher['eval_s']:.0f} s. Maps: {stores or '–'}.</p>",
    ]


def _noise_text(summary: dict) -> str:
    k = len(summary["seeds"])
    if k >= 3:
        rule = f"Welch's two-sided t-test over the {k} seeds gives p &lt; {ALPHA}"
    elif k == 2:
        rule = "it is larger than 2 × the pooled sd of the two seeds"
    else:
        rule = (
            "it is larger than 2 × the sd of a difference of two top-1 accuracies on "
            f"{summary['held_out']} held-out images (sampling noise only; seed noise needs "
            "--seeds 2 or more)"
        )
    return (
        f"<p>Values are mean ± sd over the seeds. A difference exceeds its noise when {rule}.</p>"
    )


def write_report(out: Path, summary: dict, records: dict) -> Path:
    """``OUT/index.html`` with ``curves.png`` and ``lifts.png``; returns the page's path."""
    names = list(records)
    colours = _colours(names)
    seeds = ", ".join(str(s) for s in summary["seeds"])
    parts = [
        f"<h1>salient compare · {html.escape(', '.join(names) or 'random initialisation')}</h1>",
        f"<p>data <code>{html.escape(summary['data'])}</code> · held-out "
        f"<code>{html.escape(summary['val'])}</code> ({summary['held_out']} images, chance "
        f"{summary['chance']:.3f}) · seeds {seeds} · reference arm "
        f"<b>{html.escape(summary['reference'])}</b></p>",
        "<h2>Held-out top-1</h2>",
        _probe_table(summary),
        _noise_text(summary),
        _difference_table(summary, "versus_reference", f"Difference from {summary['reference']}"),
        _difference_table(summary, "versus_init", "Difference from the arm's own initialisation"),
    ]
    if any(records.values()):
        parts += [
            "<h2>Probe curves</h2>",
            f'<img src="{_curves(out, records, colours, summary["chance"])}" alt="k-NN per epoch">',
            "<h2>Equal compute</h2>",
            "<p>Train s: from the first epoch's start to the last one's end, refreshes waited "
            "for included. At equal time: the checkpoint of the last epoch each run had ended "
            "when the fastest arm of its seed finished.</p>",
            _compute_table(summary),
            "<h2>Maps and masks</h2>",
        ]
        lifts = _lifts(out, records, colours)
        if lifts:
            parts.append(f'<img src="{lifts}" alt="box lift per generation, masks in the box">')
        parts += [
            "<p>Box lift: the maps' saliency mass inside the object box ÷ the box's area share "
            "(1 = uniform). Masks lift: the share of masked patch area inside the box through "
            "the arm's loader ÷ the box's share of the crop (1 = random masks).</p>",
            _maps_table(summary, records),
        ]
    parts += _teacher_section(summary.get("teacher"))
    settings = html.escape(", ".join(f"{k}={v}" for k, v in summary["settings"].items()))
    parts += ["<h2>Settings</h2>", f"<p><code>{settings}</code></p>"]
    return write_page(out, "salient compare", parts)
