"""What a run records: JSONL (one record per log or eval), TensorBoard, a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append-only JSONL plus TensorBoard scalars, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss(metrics_path: Path, png: Path, title: str = "") -> Path:
    """Training and validation loss against step."""
    return plot_curves(metrics_path, png, [("loss", "train loss", ".-"), ("val_loss", "validation loss", "o-")],
                       "cross-entropy (nats/token)", title)


def plot_curves(metrics_path: Path, png: Path, curves: list[tuple[str, str, str]], ylabel: str,
                title: str = "") -> Path:
    """Each (metrics key, label, matplotlib style) against step, from the JSONL records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label, style in curves:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
