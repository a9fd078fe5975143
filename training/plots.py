"""PNG plots (matplotlib, headless): the augmentation report (with report.md) and the training loss curve."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(path: Path, report: dict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    base, aug = report["baseline_acc"], report["augmented_acc"]
    for b, a in zip(base, aug):
        ax.plot([0, 1], [b * 100, a * 100], color="grey", alpha=0.6, marker="o")
    ax.bar(
        [0, 1],
        [report["baseline_acc_mean"] * 100, report["augmented_acc_mean"] * 100],
        alpha=0.4,
        color=["tab:blue", "tab:orange"],
    )
    ax.set_xticks([0, 1], ["real only", "real + synthetic"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"gain {report['gain_points']:+.2f} points (lines: seeds)")
    return _save(plt, fig, path)


def plot_per_intent(path: Path, report: dict) -> Path:
    plt = _pyplot()
    gains = sorted(report["per_intent_gain_points"].items(), key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(7, max(3, 0.13 * len(gains))))
    ax.barh([g[0] for g in gains], [g[1] for g in gains], color=["tab:red" if g[1] < 0 else "tab:green" for g in gains])
    ax.set_xlabel("recall gain (points, mean over seeds)")
    ax.tick_params(axis="y", labelsize=6)
    return _save(plt, fig, path)


def plot_margin_precision(path: Path, sweep: list[dict]) -> Path:
    """The label check's margin against the share of rows it keeps and their judged precision."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    margins = [row["margin"] for row in sweep]
    ax.plot(margins, [row["label_precision"] * 100 for row in sweep], marker="o", label="labelled as requested")
    ax.plot(margins, [row["kept_share"] * 100 for row in sweep], marker="s", linestyle="--", label="rows kept")
    ax.set_xlabel("label margin (nats per token)")
    ax.set_ylabel("%")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_lengths(path: Path, real, synthetic) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = range(0, 260, 10)
    ax.hist([len(r.text) for r in real], bins=bins, alpha=0.5, density=True, label="real")
    ax.hist([len(s.text) for s in synthetic], bins=bins, alpha=0.5, density=True, label="synthetic")
    ax.set_xlabel("text length (characters)")
    ax.legend()
    return _save(plt, fig, path)


def plot_loss_curve(path: Path, metrics: dict) -> Path:
    """Training loss per logged step, and the validation loss where it was computed (metrics.json)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(row["step"], row["loss"]) for row in metrics.get("train", []) if row.get("loss") is not None]
    evals = [(row["step"], row["eval_loss"]) for row in metrics.get("eval", []) if row.get("eval_loss") is not None]
    if train:
        ax.plot(
            [s for s, _ in train],
            [v for _, v in train],
            color="tab:blue",
            marker="." if len(train) < 50 else None,
            label="training loss",
        )
    if evals:
        ax.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            color="tab:orange",
            marker="o",
            linestyle="--",
            label="validation loss",
        )
    if not train and not evals:
        ax.text(
            0.5,
            0.5,
            "no loss logged yet (fewer steps than logging_steps)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (cross-entropy per token)")
    steps = metrics.get("global_step")
    world = metrics.get("world_size", 1)
    ax.set_title(f"{steps} steps" + (f", {world} processes" if world and world > 1 else ""))
    if train or evals:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_plots(folder: Path, report: dict, real, synthetic) -> dict[str, Path]:
    return {
        "accuracy": plot_accuracy(folder / "accuracy.png", report),
        "per_intent": plot_per_intent(folder / "per_intent_gain.png", report),
        "lengths": plot_lengths(folder / "lengths.png", real, synthetic),
    }


def _percent(value) -> str:
    return "not recorded" if value is None else f"{value:.1%}"


def write_markdown(path: Path, report: dict, plots: dict[str, Path]) -> Path:
    config = report["config"]
    rows = "\n".join(
        f"| {seed} | {b:.4f} | {a:.4f} | {(a - b) * 100:+.2f} |"
        for seed, b, a in zip(config["seeds"], report["baseline_acc"], report["augmented_acc"])
    )
    low, high = report["gain_ci95"]
    text = f"""# condgen augmentation report

{config["shots"]} real examples per intent, {config["per_intent"]} synthetic records per intent,
base model `{config["base_model"]}`{" (quick run, tiny model)" if config["quick"] else ""}, seeds {config["seeds"]}.
Classifier: TF-IDF (word 1-2, char 2-5) + logistic regression, fixed hyper-parameters.

| seed | real only | real + synthetic | gain (points) |
|---|---|---|---|
{rows}

- accuracy gain: **{report["gain_points"]:+.2f} points**, 95% CI [{low:+.2f}, {high:+.2f}] (paired over seeds)
- macro-F1 gain: {report["macro_f1_gain_points"]:+.2f} points
- fidelity (full-train judge, mean P(requested intent)): {report["fidelity_mean"]:.3f}
- copies of the few-shot set: {report["train_copy_rate"]:.2%}; distinct-2: {report["distinct_2"]:.3f};
  acceptance: {_percent(report["acceptance_rate"])}
- time: {report["seconds"] / 60:.1f} minutes

![accuracy]({plots["accuracy"].name})
![per-intent gain]({plots["per_intent"].name})
![lengths]({plots["lengths"].name})
"""
    path.write_text(text)
    return path
