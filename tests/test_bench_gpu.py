"""`salient bench gpu` runs end to end on the CPU (`--device cpu --quick`): the same code a GPU
lease runs, so the one device call is proven on every CI run."""

from __future__ import annotations

import json

from salient.jobs.bench.gpu import FIGURES_FILE
from salient.jobs.cli import main

LIMITED = {  # figure -> the limit it is measured against
    "refresh_img_s": "forward-only img/s",
    "loader_img_s": "bare decode_jpeg img/s",
    "train_loader_img_s_mae_amt_45_40": "synthetic-input img/s",
    "train_ibot_img_s_attmask_high": "random-mask step img/s",
    "ibot_views_loader_img_s": "attmask_high step img/s",
    "automae_train_img_s_store_synthetic": "teacher on every batch img/s",
    "automae_train_img_s_store_loader": "teacher on every batch img/s",
}


def test_bench_gpu_writes_one_line_per_figure(ray_session, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (out / FIGURES_FILE).read_text().splitlines()]
    assert [r["figure"] for r in rows] == [r["figure"] for r in summary["figures"]]
    by_name = {r["figure"]: r for r in rows}
    expected = {"masking_ms_amt", "masking_ms_gpa", "train_mae_amt_vs_random", *LIMITED}
    expected |= {
        "train_ibot_img_s_block",
        "train_ibot_img_s_random",
        "train_ibot_attmask_vs_random",
        "automae_store_vs_online_synthetic",
        "automae_store_vs_online_loader",
    }
    assert expected <= set(by_name)
    for row in rows:
        assert row["device"] == "cpu" and row["date"] and row["torch"]
        if row["figure"] != "automae_heads_spearman":  # a correlation: any sign
            assert row["value"] > 0
    for name, limit in LIMITED.items():
        row = by_name[name]
        assert row["limit"] == limit and row["ratio"] == round(row["value"] / row["limit_value"], 4)
    assert set(summary["seconds_per_step"]) == {
        "masking", "refresh", "loader", "train", "ibot", "automae",
    }  # fmt: skip
    assert -1 <= by_name["automae_heads_spearman"]["value"] <= 1
    assert by_name["automae_store_vs_online_loader"]["heads"] >= 1
    ibot = by_name["train_ibot_img_s_attmask_high"]
    assert ibot["model"] == "ibot-micro" and ibot["local_crops"] == 2  # ViT-S/16 on CUDA
