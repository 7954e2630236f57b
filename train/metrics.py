"""Metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard when installed,
Weights & Biases when asked for (`logging.report_to: [wandb]`, the optional `wandb` extra), a
progress bar on a terminal and plain log lines otherwise, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from vlp.core.files import atomic_write
from vlp.train.config import WandbConfig


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it readable
    return value


# Telemetry shown in the progress line as well as metrics.jsonl: the share of step time spent
# waiting for data, and model FLOPs utilisation where the device's peak is known.
PROGRESS_TELEMETRY = ("data_wait_frac", "mfu")


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int = 0,
                 report_to: tuple[str, ...] = ("tensorboard",), wandb_config: Any = None,
                 run_config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.path = self.run_dir / "metrics.jsonl"
        self.total = total_steps
        self._bar = None
        self._tb = None
        self._wandb = None
        self._last_line = 0.0
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step or None)
            except Exception:  # tensorboard is an optional extra
                self._tb = None
        if "wandb" in report_to:
            self._wandb = start_wandb(self.run_dir, wandb_config, run_config or {}, resumed=start_step > 0)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file has one line per step."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue
        atomic_write(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
        loss = record.get("loss/total")
        if self._bar is not None:
            self._bar.n = step
            shown = {"loss": f"{loss:.4f}" if isinstance(loss, float) else loss}
            for key in PROGRESS_TELEMETRY:  # where the step time goes, beside the loss
                if isinstance(record.get(key), float):
                    shown[key] = f"{record[key]:.2f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
        elif time.time() - self._last_line > 5 or step == self.total:
            self._last_line = time.time()
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k in ("step", "loss/total", "lr", "samples_per_s", *PROGRESS_TELEMETRY) or k.startswith("eval/")
            )
            print(f"[vlp] {shown} / {self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(run_dir: Path, config: WandbConfig, run_config: dict, resumed: bool) -> Any:
    """A W&B run in `run_dir/wandb/`, its id kept in `run_dir/wandb_id` so a resumed run logs
    into the same W&B run (open_clip keeps it alike). `config.mode` offline: nothing leaves the
    machine (`wandb sync runs/NAME/wandb/offline-run-*` uploads it later)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.report_to: wandb needs the wandb extra: pip install 'vlp[wandb]'") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    kwargs = dict(project=getattr(config, "project", "vlp"), entity=getattr(config, "entity", None),
                  tags=list(getattr(config, "tags", []) or []), name=run_dir.name, id=run_id,
                  resume="allow", dir=str(run_dir), config=run_config)
    mode = getattr(config, "mode", None)
    if mode is not None:
        kwargs["mode"] = mode
    return wandb.init(**kwargs)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """PNG of every `loss/*` series against step; None when there is nothing to plot."""
    records = [r for r in read_metrics(metrics_path) if "loss/total" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=key.removeprefix("loss/"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
