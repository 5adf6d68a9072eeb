"""The per-run report: ``metrics.json``, ``config.yaml`` and an HTML page with plots.

Plots (matplotlib, written as PNG beside the page): the retrieval training loss, Recall@K
and NDCG@K of the model, through the index and of the popularity baseline, the index
tuning curve (partitions searched vs recall against exact search), the ranker's
calibration, the AutoFAS pre-ranker's quality against measured latency beside its teacher
(with the searched feature masks), and the heatmap of the item features' normalized
mutual information.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

REPORTS_DIR = "reports"


def _plots(metrics: Dict[str, Any], stats_dir: Optional[str], out_dir: str) -> List[Tuple[str, str]]:
    """Writes the PNGs; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: List[Tuple[str, str]] = []

    losses = (metrics.get("retrieval_training") or {}).get("loss") or []
    if losses:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title("Retrieval training loss")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "retrieval_loss.png"), dpi=110)
        plt.close(fig)
        made.append(("retrieval_loss.png", "Retrieval training loss per epoch"))

    drift = (metrics.get("retrieval_training") or {}).get("feature_drift")
    if drift and drift.get("rows"):
        from models.feature_drift import plot_feature_drift

        plot_feature_drift(drift["rows"], drift["every_n_steps"], os.path.join(out_dir, "feature_drift.png"))
        made.append(("feature_drift.png", "Feature drift of the item encoder: choose retrieval.warmup_steps "
                                          "where the curve has flattened"))

    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("retrieval.recall@")})
    if ks:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, what in zip(axes, ("recall", "ndcg")):
            for name, label in (("retrieval", "model (exact)"), ("index", "model (index)"),
                                ("baseline.popularity", "most popular")):
                ax.plot(ks, [metrics.get(f"{name}.{what}@{k}", float("nan")) for k in ks], marker="o", label=label)
            ax.set_xlabel("K")
            ax.set_ylabel(f"{what.upper()}@K")
            ax.set_xticks(ks)
        axes[0].legend()
        fig.suptitle("Retrieval quality over the full corpus (training items removed)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "recall_at_k.png"), dpi=110)
        plt.close(fig)
        made.append(("recall_at_k.png", "Recall@K and NDCG@K: model, through the index, popularity baseline"))

    curve = ((metrics.get("index_build") or {}).get("tuning") or {}).get("curve")
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o")
        ax.axhline(metrics["index_build"]["tuning"]["target_recall@10"], color="grey", linestyle="--")
        ax.set_xlabel("partitions searched")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title("ScaNN tuning on sample queries")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "index_tuning.png"), dpi=110)
        plt.close(fig)
        made.append(("index_tuning.png", "Index auto-tuning: recall against exact search vs partitions searched"))

    ranker = metrics.get("ranker") or {}
    bins = [b for b in (ranker.get("calibration") or {}).get("bins", []) if b.get("count")]
    if bins:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
        ax.plot([b["mean_predicted"] for b in bins], [b["observed_rate"] for b in bins], marker="o",
                label=f"{ranker.get('model', 'ranker')} (test)")
        ax.set_xlabel("predicted click probability")
        ax.set_ylabel("observed click rate")
        ax.set_title("Ranker calibration")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ranker_calibration.png"), dpi=110)
        plt.close(fig)
        made.append(("ranker_calibration.png", "Ranker calibration on the test events: observed click rate "
                                               "per bin of predicted probability"))

    pre = metrics.get("preranker") or {}
    if ranker.get("latency") and pre.get("latency") and (pre.get("metrics") or {}).get("auc") is not None:
        sizes = (ranker["latency"].get("candidates"), pre["latency"].get("candidates"))
        # Each is timed for the candidates it scores when serving: say so when they differ.
        named = ([f" ({n} candidates)" for n in sizes] if sizes[0] != sizes[1] else ["", ""])
        points = [(ranker.get("model", "ranker") + " (teacher)" + named[0], ranker["latency"]["median_ms"],
                   (ranker.get("metrics") or {}).get("auc")),
                  ("AutoFAS pre-ranker" + named[1], pre["latency"]["median_ms"], pre["metrics"]["auc"])]
        keep_by_feature = (pre.get("search") or {}).get("keep_probabilities") or {}
        names = sorted(keep_by_feature, key=lambda n: -keep_by_feature[n])
        keep = [keep_by_feature[n] for n in names]
        fig, axes = plt.subplots(1, 2 if keep else 1, figsize=(9, 3.6), squeeze=False)
        ax = axes[0, 0]
        for label, ms, auc in points:
            if auc is not None:
                ax.scatter([ms], [auc], s=40)
                ax.annotate(label, (ms, auc), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(f"measured median ms per {sizes[0]} candidates" if sizes[0] == sizes[1]
                      else "measured median ms per call")
        ax.set_ylabel("test AUC")
        ax.set_title("AutoFAS: quality vs latency")
        if axes.shape[1] == 2:
            ax = axes[0, 1]
            kept = set(pre.get("features") or [])
            ax.barh(range(len(names)), keep, color=["tab:blue" if n in kept else "tab:grey" for n in names])
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_xlabel("keep probability after search")
            ax.set_title("Feature masks (blue: kept)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "preranker_tradeoff.png"), dpi=110)
        plt.close(fig)
        made.append(("preranker_tradeoff.png", "AutoFAS: test AUC against measured latency of the teacher ranker "
                                               "and the searched pre-ranker, and the searched feature masks "
                                               "(the λ sweep's Pareto curve is benchmarks/preranker.py)"))

    mi_path = os.path.join(stats_dir, "feature_mi.json") if stats_dir else None
    if mi_path and os.path.exists(mi_path):
        with open(mi_path) as f:
            mi = json.load(f)
        if len(mi.get("features", [])) >= 2:
            import numpy as np

            m = np.asarray(mi["normalized_mi"], dtype=float)
            fig, ax = plt.subplots(figsize=(4.5, 4))
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(mi["features"])), mi["features"], rotation=45, ha="right")
            ax.set_yticks(range(len(mi["features"])), mi["features"])
            for i in range(len(m)):
                for j in range(len(m)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
            fig.colorbar(im, ax=ax, shrink=0.8)
            ax.set_title("Item features: normalized MI")
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "feature_mi.png"), dpi=110)
            plt.close(fig)
            made.append(("feature_mi.png", "Normalized mutual information between categorical item features"))
    return made


def _table(rows: List[Tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_html(metrics: Dict[str, Any], plots: List[Tuple[str, str]]) -> str:
    quality = [(k, metrics[k]) for k in sorted(metrics)
               if ("@" in k or k.startswith(("ranker.", "preranker."))) and isinstance(metrics[k], (int, float))]
    promotion = metrics.get("promotion", {})
    stages = sorted((metrics.get("stage_seconds") or {}).items())
    data = metrics.get("data", {})
    overview = [
        ("run", metrics.get("run_id")),
        ("export version", metrics.get("export_version")),
        ("promoted", f"{promotion.get('promote')} ({promotion.get('reason', '')})"),
        ("total seconds", metrics.get("total_seconds")),
        ("skipped stages (unchanged)", ", ".join(metrics.get("skipped_stages", [])) or "none"),
        ("data source", data.get("source")),
        ("rows train / test", f"{data.get('rows', {}).get('train')} / {data.get('rows', {}).get('test')}"),
        ("rows rejected while reading", (data.get("read") or {}).get("rows_rejected")),
        ("evaluated users / items", f"{metrics.get('evaluation', {}).get('users')} / "
                                     f"{metrics.get('evaluation', {}).get('items')}"),
        ("index", json.dumps({k: v for k, v in (metrics.get("index_build") or {}).items() if k != "tuning"})),
    ]
    figures = "".join(
        f'<figure><a href="{html.escape(f)}"><img src="{html.escape(f)}" alt="{html.escape(c)}"></a>'
        f"<figcaption>{html.escape(c)}</figcaption></figure>" for f, c in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recfunnel run {html.escape(str(metrics.get('run_id')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td {{ border: 1px solid #ccc; padding: 3px 8px; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} img {{ max-width: 520px; }}
</style></head><body>
<h1>recfunnel run {html.escape(str(metrics.get('run_id')))}</h1>
<h2>Overview</h2>{_table(overview)}
<h2>Quality</h2>{_table(quality)}
<h2>Stage times (seconds)</h2>{_table(stages) if stages else "<p>all stages were unchanged and skipped</p>"}
<h2>Plots</h2>{figures or "<p>no plots</p>"}
<p>Files: <a href="metrics.json">metrics.json</a>, <a href="config.yaml">config.yaml</a></p>
</body></html>
"""


def write_report(workdir: str, run_id: str, config_yaml: str, metrics: Dict[str, Any],
                 stats_dir: Optional[str] = None) -> str:
    """Writes ``reports/<run_id>/`` and refreshes ``reports/latest/`` (both atomically)."""
    reports = os.path.join(workdir, REPORTS_DIR)
    os.makedirs(reports, exist_ok=True)
    tmp = os.path.join(reports, f".{run_id}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(config_yaml)
    plots = _plots(metrics, stats_dir, tmp)
    with open(os.path.join(tmp, "index.html"), "w") as f:
        f.write(render_html(metrics, plots))
    final = os.path.join(reports, run_id)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = os.path.join(reports, ".latest.tmp")
    if os.path.exists(latest_tmp):
        shutil.rmtree(latest_tmp)
    shutil.copytree(final, latest_tmp)
    latest = os.path.join(reports, "latest")
    old = os.path.join(reports, ".latest.old")
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(latest):
        os.rename(latest, old)
    os.rename(latest_tmp, latest)
    shutil.rmtree(old, ignore_errors=True)
    return final
