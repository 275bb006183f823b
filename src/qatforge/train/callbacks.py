"""The trainer callback: per-step loss.csv, console logging, NaN/divergence stop."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Callable

from qatforge.train.settings import LOSS_FIELDS, TrainingDiverged, TrainSettings


def make_callback(loss_csv: Path, settings: TrainSettings, log: Callable[[str], None]) -> Any:
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Per-step loss.csv, dense console logging early, NaN/divergence stop."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.last_t = self.t0
            self.last_tokens: float | None = None
            self.ema: float | None = None
            self.min_ema = math.inf
            self.f: Any = None
            self.w: Any = None

        def _write(self, rec: dict) -> None:
            if self.f is None:  # append: a resumed run continues the trimmed file
                loss_csv.parent.mkdir(parents=True, exist_ok=True)
                new = not loss_csv.is_file()
                self.f = open(loss_csv, "a", newline="")
                self.w = csv.DictWriter(self.f, fieldnames=LOSS_FIELDS)
                if new:
                    self.w.writeheader()
            self.w.writerow(rec)
            self.f.flush()

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            # trl counts tokens from 0 in each trainer (a resumed run too): the first step has a rate
            self.last_t, self.last_tokens = time.perf_counter(), 0.0

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            logs = logs or {}
            if "loss" not in logs:
                if "eval_loss" in logs:
                    log(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
                return
            step = state.global_step
            now = time.perf_counter()
            tokens = logs.get("num_tokens")
            tps = float("nan")
            if tokens is not None:
                delta = tokens - self.last_tokens if self.last_tokens is not None and tokens >= self.last_tokens else None
                if delta is not None and now > self.last_t:
                    tps = delta / (now - self.last_t)
                self.last_tokens = tokens
            self.last_t = now
            loss = float(logs["loss"])
            gn = float(logs.get("grad_norm", float("nan")))
            rec = {"step": step, "loss": f"{loss:.6g}", "grad_norm": f"{gn:.6g}",
                   "lr": f"{float(logs.get('learning_rate', float('nan'))):.6g}",
                   "tokens_per_s": f"{tps:.1f}", "elapsed_s": f"{now - self.t0:.2f}"}
            self._write(rec)
            if step <= settings.dense_steps or step % settings.log_every == 0 or step == state.max_steps:
                log(f"step {step}/{state.max_steps}: loss {loss:.4f} grad_norm {gn:.3g} lr {rec['lr']} "
                    f"tokens/s {rec['tokens_per_s']}")
            if not math.isfinite(loss) or (logs.get("grad_norm") is not None and not math.isfinite(gn)):
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss {loss}, grad_norm {gn} (non-finite); "
                    f"lower train.lr or use another qat_scheme"
                )
            self.ema = loss if self.ema is None else 0.7 * self.ema + 0.3 * loss
            if step > settings.dense_steps and self.ema > settings.divergence_factor * self.min_ema + settings.divergence_margin:
                raise TrainingDiverged(
                    f"training diverged at step {step}: smoothed loss {self.ema:.4f} climbed far above its running "
                    f"minimum {self.min_ema:.4f}; lower train.lr"
                )
            self.min_ema = min(self.min_ema, self.ema)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.f is not None:
                self.f.close()
                self.f = None

    return Watch()
