"""docs/results.md and its plots from the aggregated records of research/experiments.py."""

from __future__ import annotations

from pathlib import Path

MODEL_LABELS = {
    "vql": "VQL (quantized keys, per-code state)",
    "full": "full attention (unquantized, ceiling)",
    "din50": "DIN, last 50",
    "din200": "DIN, last 200",
    "sim": "SIM-hard (target category, last 200)",
    "sdim": "SDIM (SimHash buckets)",
    "mean": "mean pooling",
}


def _lookup(records: list[dict]) -> dict[tuple, dict]:
    return {(r["dataset"], r["model"], r["metric"], r["L"]): r for r in records}


def markdown_table(records: list[dict], dataset: str, state_bytes: int) -> str:
    main = [r for r in records if r["dataset"] == dataset and r["metric"] == "auc"]
    full_length = max(r["L"] for r in main)
    table = _lookup(records)
    lines = [
        "| model | AUC | GAUC | logloss | train s/epoch | state or input per user |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in MODEL_LABELS:
        auc = table.get((dataset, model, "auc", full_length))
        if auc is None:
            continue
        cells = [MODEL_LABELS[model]]
        for metric in ("auc", "gauc", "logloss"):
            r = table[(dataset, model, metric, full_length)]
            cells.append(f"{r['value']:.4f} ± {r['std']:.4f}")
        speed = table.get((dataset, model, "train_seconds_per_epoch", full_length))
        cells.append(f"{speed['value']:.1f}" if speed else "")
        cells.append(f"{state_bytes:,} B state" if model == "vql" else "raw history")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, path: Path, legend_size: int | None = 7) -> None:
    """The house style of every plot in docs/: grid, legend, tight layout, 110 dpi PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_auc_vs_length(records: list[dict], dataset: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for model in MODEL_LABELS:
        points = sorted((r["L"], r["value"], r["std"]) for r in records
                        if r["dataset"] == dataset and r["model"] == model and r["metric"] == "auc")
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=MODEL_LABELS[model])
    ax.set_xscale("log")
    ax.set_xlabel("history length visible at test time (newest events)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"{dataset}: AUC vs history length")
    save_figure(fig, [ax], path)


def plot_state_bytes(lengths: list[int], state_bytes: list[int], raw_bytes: list[float], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(lengths, state_bytes, marker="o", label="VQL state (float32)")
    ax.plot(lengths, raw_bytes, marker="s", label="raw history (JSON events)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events in the history (L)")
    ax.set_ylabel("bytes per user")
    save_figure(fig, [ax], path, legend_size=None)


def write_results(records: list[dict], datasets, out_dir: Path, state_sizes: list[dict] | None = None) -> None:
    """docs/results.md: a table per dataset and the AUC-vs-length plot of each; with
    ``state_sizes`` (rows of vql.bench.state_size.measure), state bytes against L."""
    from vql.model.config import ModelConfig
    from vql.schemas.user_state import full_state_bytes

    cfg = ModelConfig()
    full_state = full_state_bytes(cfg.groups, cfg.codes, cfg.rates, cfg.group_dim, len("user-000000"))
    sections = ["# Results", "",
                "Produced by `vql evaluate --datasets synthetic movielens --seeds 3` (or partly by a rerun of some "
                "models with `--merge`, which keeps the others' figures); machine-readable in results.jsonl. "
                "The recipes, the running time and what the figures say: docs/training.md.",
                "Mean ± std over seeds; L is the longest history in the dataset.", ""]
    for dataset in datasets:
        plot = out_dir / "plots" / f"auc_vs_length_{dataset.name}.png"
        plot_auc_vs_length(records, dataset.name, plot)
        sections += [f"## {dataset.name}", "", dataset.description, "",
                     markdown_table(records, dataset.name, full_state), "",
                     f"![AUC vs history length](plots/{plot.name})", ""]
    if state_sizes:
        plot = out_dir / "plots" / "state_bytes_vs_length.png"
        plot_state_bytes([r["L"] for r in state_sizes], [r["state_bytes"] for r in state_sizes],
                         [r["raw_bytes"] for r in state_sizes], plot)
        sections += ["## State bytes per user against history length", "",
                     "The published float32 state of one user (default config) after L random behaviors, "
                     "next to the raw history as JSON events (`vql bench state-size`).", "",
                     "| L | state bytes | occupied cells | raw history bytes |", "| --- | --- | --- | --- |"]
        sections += [f"| {r['L']:,} | {r['state_bytes']:,} | {r['cells']} | {r['raw_bytes']:,.0f} |"
                     for r in state_sizes]
        sections += ["", f"![state bytes vs history length](plots/{plot.name})", ""]
    (out_dir / "results.md").write_text("\n".join(sections))
