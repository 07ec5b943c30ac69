"""Training logs: a progress bar with ETA, a line every `logging_steps`, metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm


class MetricsLog:
    """Writes only on the main process; rows past `start_step` from an interrupted run are dropped first."""

    def __init__(self, output_dir: str, *, start_step: int, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._drop_rows_after(start_step)
        self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _drop_rows_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def advance(self) -> None:
        if self.enabled:
            self._bar.update(1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        shown = ("loss", "accuracy", "grad_norm", "learning_rate", "examples_per_s", "mfu")
        self._bar.write(f"step {step}: " + "  ".join(f"{k} {row[k]:.4g}" for k in shown if k in row))

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._writer.close()
