"""Training curves as PNG from a step's metrics.jsonl alone (training lines as curves, evaluations as points)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOT_FILE = "training_curves.png"
# (panel title, keys of training lines, keys of evaluation lines): a panel is drawn when any key has a value.
# Step 1: loss, perplexity; step 2: loss, accuracy; DPO: loss, accuracy, margin; step 3: reward, KL, entropy,
# answer length (and each reward by name).
PANELS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("loss", ("loss",), ("dpo_loss",)),
    ("perplexity (held-out)", (), ("perplexity",)),
    ("accuracy", ("acc",), ("accuracy", "reward_accuracy", "longer_answer_accuracy")),
    ("reward margin", ("margin",), ("reward_margin",)),
    ("reward", ("reward_score",), ("reward_score", "gold_score")),
    ("KL to reference", ("kl",), ("kl",)),
    ("entropy", ("entropy",), ()),
    ("answer length (tokens)", ("answer_len",), ("answer_len",)),
    ("judge", (), ("judge",)),
    ("actor loss", ("actor_loss",), ()),
    ("learning rate", ("lr",), ()),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl (unreadable lines skipped; of lines for the same kind and step, the last)."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            latest[(str(line.get("kind", "train")), line["step"])] = line  # a resumed run logs a step again
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("kind") != "train"))


def series(lines: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the `kind` lines, finite numbers only."""
    xs, ys = [], []
    for line in lines:
        v = line.get(key)
        if line.get("kind", "train") == kind and isinstance(v, (int, float)) and not isinstance(v, bool) \
                and math.isfinite(v):
            xs.append(line["step"])
            ys.append(float(v))
    return xs, ys


def panels(lines: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels with data: (title, [(kind, key), ...]); rewards by name ("reward/<name>") get one of their own."""
    present = {(line.get("kind", "train"), k) for line in lines for k in line}
    out = []
    for title, train_keys, eval_keys in PANELS:
        keys = [("train", k) for k in train_keys if ("train", k) in present]
        keys += [("eval", k) for k in eval_keys if ("eval", k) in present]
        if keys:
            out.append((title, keys))
    named = sorted(k for k in present if k[1].startswith("reward/"))
    if named:
        out.append(("rewards by name", named))
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path | None = None, title: str = "") -> Path | None:
    """Draw every panel with data of `metrics_path` into one PNG (default: training_curves.png beside it);
    None when the file holds no plottable line."""
    lines = read_metrics(metrics_path)
    chosen = panels(lines)
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    png = Path(png_path) if png_path else Path(metrics_path).with_name(PLOT_FILE)
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, chosen):
        for kind, key in keys:
            xs, ys = series(lines, kind, key)
            if kind == "train":
                ax.plot(xs, ys, linewidth=1.2, label=f"train {key}")
            else:
                ax.plot(xs, ys, "o--", markersize=6, linewidth=0.8, label=f"held-out {key}")
        values = [v for kind, key in keys for v in series(lines, kind, key)[1]]
        if values and min(values) > 0 and max(values) / min(values) > 20:  # perplexity from an untrained model
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
