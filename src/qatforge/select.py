"""Checkpoint selection: score every saved LoRA checkpoint, pick one, record all candidates."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from qatforge.train.settings import TrainSettings

METRICS = ("accuracy", "eval_loss")
TEACHER_METRIC = "teacher_kld"  # distilled QAT runs: dev KLD to the teacher at the answer positions


class SelectError(ValueError):
    """No usable checkpoint, an unknown metric, or a pinned checkpoint that does not exist."""


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-{step}`` holding a LoRA adapter, by step."""
    from qatforge.train import checkpoint_step

    root = Path(checkpoints_dir)
    if not root.is_dir():
        raise SelectError(f"{root}: checkpoints directory not found")
    out = []
    for d in root.iterdir():
        step = checkpoint_step(d)
        if step is not None and d.is_dir() and (d / "adapter_config.json").is_file():
            out.append((step, d))
    if not out:
        raise SelectError(f"{root}: no checkpoint-<step>/ directory with an adapter_config.json")
    return sorted(out)


def parse_pinned(pinned: str | int | None) -> int | None:
    """``checkpoint-40`` / ``40`` / 40 → 40; None stays None."""
    if pinned is None:
        return None
    s = str(pinned).strip()
    s = s[len("checkpoint-"):] if s.startswith("checkpoint-") else s
    if not s.isdigit():
        raise SelectError(f"pinned checkpoint {pinned!r} is not 'checkpoint-<step>' or a step number")
    return int(s)


def rank_key(metric: str) -> Callable[[dict], tuple]:
    """Sort key, best first: the metric, then the other metric, then the later step."""
    if metric == "accuracy":
        return lambda c: (-c["accuracy"], c["eval_loss"], -c["step"])
    if metric == "eval_loss":
        return lambda c: (c["eval_loss"], -c["accuracy"], -c["step"])
    if metric == TEACHER_METRIC:
        return lambda c: (c[TEACHER_METRIC], c["eval_loss"], -c["step"])
    raise SelectError(f"unknown select metric {metric!r}; choose one of {', '.join(METRICS)}")


def choose(candidates: list[dict], metric: str, pinned: int | None = None) -> dict:
    """The pinned candidate, or the best by ``metric`` (ties: other metric, then later step)."""
    if not candidates:
        raise SelectError("no candidates to choose from")
    if pinned is not None:
        for c in candidates:
            if c["step"] == pinned:
                return c
        raise SelectError(
            f"pinned checkpoint-{pinned} does not exist; available: "
            + ", ".join(f"checkpoint-{c['step']}" for c in candidates)
        )
    usable = [c for c in candidates if math.isfinite(c["eval_loss"])]
    if not usable:
        raise SelectError("every checkpoint has a non-finite eval loss")
    return sorted(usable, key=rank_key(metric))[0]


def answer_predictions(model: Any, tok: Any, convs: list, max_len: int, batch_size: int = 16) -> list[tuple[Any, Any]]:
    """``(fp32 logits [positions, vocab], next tokens [positions])`` of each conversation at its
    ``parity.answer_positions``, those :func:`qatforge.chat.hf_nll` scores (right-padded batches: a
    position's logits do not depend on the padding after it)."""
    import torch

    from qatforge.chat import IGNORE_INDEX, collate, encode_for_training

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [encode_for_training(tok, c, max_len) for c in convs]
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = collate(rows[i:i + batch_size], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            target = b["labels"][:, 1:]
            scored = target != IGNORE_INDEX  # position t scores token t+1
            out += [(lg[:-1][m], y[m]) for lg, y, m in zip(logits, target, scored)]
    return out


class SpilledLogits:
    """The teacher's answer logits, kept in a file (float32, exact) rather than in memory: at a
    151,936-token vocabulary they are 0.6 MB a position, ~1.7 GB for a dev split of 190 chats.
    Iterating reads them back one conversation at a time."""

    def __init__(self, logits: Any, directory: Path) -> None:
        import tempfile

        import numpy as np

        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory)
        self.shapes = []
        for t in logits:
            a = np.ascontiguousarray(t.numpy(), dtype=np.float32)
            self._file.write(a.tobytes())
            self.shapes.append(a.shape)
        self._file.flush()

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Any:
        import numpy as np
        import torch

        self._file.seek(0)
        for shape in self.shapes:
            count = int(np.prod(shape))
            a = np.frombuffer(self._file.read(count * 4), dtype=np.float32, count=count)
            yield torch.from_numpy(a.copy()).reshape(shape)

    def close(self) -> None:
        self._file.close()


def _nll_and_teacher_kld(model: Any, tok: Any, convs: list, max_len: int, teacher: Any) -> tuple[float, float]:
    """From one pass over ``convs``: the NLL per answer token (:func:`qatforge.chat.hf_nll`'s) and
    the mean KL(teacher ‖ model) over the same positions."""
    nll, kld, n = 0.0, 0.0, 0
    for t, (s, y) in zip(teacher, _answer_predictions_iter(model, tok, convs, max_len)):
        lt, ls = t.double().log_softmax(-1), s.double().log_softmax(-1)
        nll -= float(ls.gather(-1, y[:, None]).sum())
        kld += float((lt.exp() * (lt - ls)).sum())
        n += len(t)
    if n == 0:
        raise ValueError("no assistant tokens to score in the given conversations")
    return nll / n, kld / n


def _answer_predictions_iter(model: Any, tok: Any, convs: list, max_len: int, batch_size: int = 16) -> Any:
    """:func:`answer_predictions` one batch at a time (the student's are not all kept either)."""
    for i in range(0, len(convs), batch_size):
        yield from answer_predictions(model, tok, convs[i:i + batch_size], max_len, batch_size)


def _summary(scores: dict) -> str:
    if TEACHER_METRIC in scores:
        return f"eval_loss {scores['eval_loss']:.4f} {TEACHER_METRIC} {scores[TEACHER_METRIC]:.3g}"
    return f"eval_loss {scores['eval_loss']:.4f} accuracy {scores['accuracy']:.3f}"


def _score(model: Any, tok: Any, convs: list, prompts: list[dict], max_len: int, max_new_tokens: int,
           teacher: list[Any] | None = None) -> dict:
    from qatforge.chat import hf_exact_match, hf_nll
    from qatforge.qat_lora import weight_cache

    t0 = time.perf_counter()
    with weight_cache(model, False):  # batched forwards: no cached copy of every merged QAT weight
        if teacher is not None:  # selected on teacher_kld: no generation (the report has test accuracy)
            loss, kld = _nll_and_teacher_kld(model, tok, convs, max_len, teacher)
            return {"eval_loss": loss, "accuracy": None, "per_task": {}, TEACHER_METRIC: kld,
                    "seconds": round(time.perf_counter() - t0, 2)}
        loss = hf_nll(model, tok, convs, max_len)
    acc, correct, _ = hf_exact_match(model, tok, prompts, max_new_tokens)
    tasks: dict[str, list[bool]] = {}
    for row, ok in zip(prompts, correct):
        tasks.setdefault(row.get("task") or "all", []).append(ok)
    return {
        "eval_loss": loss,
        "accuracy": acc,
        "per_task": {t: sum(v) / len(v) for t, v in sorted(tasks.items())},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def select_best(
    base_dir: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    dev_parquet: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    settings: TrainSettings,
    metric: str = "accuracy",
    pinned: str | int | None = None,
    n_prompts: int = 100,
    max_new_tokens: int = 24,
    n_eval: int | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Score every checkpoint on the dev split and write ``out_json``.

    The scores are the NLL of the dev conversations (the first ``n_eval``; None: all) and greedy
    exact match on the prompts of the first ``n_prompts`` of them; a dev split smaller than
    ``n_prompts`` gives all its conversations (the number used is recorded as ``n_prompts``).
    The test split is never read here. ``settings`` are the run's training settings: a QAT run is
    scored as it trained, with its scheme's fake quantization in its ``qat_mode``, at ``max_len``
    tokens on ``threads`` threads. The base model (adapters disabled) is scored too, for reference;
    for a distilled QAT run (``distill``: its base is the teacher) it is a candidate,
    ``checkpoint: null``: fake-quantized, it is PTQ of the teacher.
    Such a run is selected by ``teacher_kld`` (dev KLD to the teacher at the answer positions,
    whatever ``metric`` says): the checkpoint that gets furthest below PTQ.
    Returns the record written.
    """
    import torch
    from peft import PeftModel

    from qatforge.data import prompts_from_parquet, read_conversations
    from qatforge.learned_scales import load_thetas
    from qatforge.io import write_json
    from qatforge.model import load_causal_lm, load_tokenizer
    from qatforge.train import apply_qat

    if metric not in METRICS:
        raise SelectError(f"unknown select metric {metric!r}; choose one of {', '.join(METRICS)}")
    pin = parse_pinned(pinned)
    ckpts = list_checkpoints(checkpoints_dir)
    if pin is not None and pin not in {s for s, _ in ckpts}:
        raise SelectError(
            f"pinned checkpoint-{pin} not found in {checkpoints_dir}; available: "
            + ", ".join(p.name for _, p in ckpts)
        )
    qat_scheme, max_len, step0 = settings.qat_scheme, settings.max_len, settings.distill
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(base_dir, trust_remote_code=trust_remote_code)
    convs = read_conversations(dev_parquet)[: n_eval or None]
    prompts = prompts_from_parquet(dev_parquet)[:n_prompts]
    if len(prompts) < n_prompts:
        log(f"{dev_parquet}: the dev split has {len(prompts)} conversations, fewer than eval.n_prompts="
            f"{n_prompts}: selecting on all {len(prompts)}")

    base = load_causal_lm(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    teacher = (SpilledLogits((lg for lg, _ in _answer_predictions_iter(base.eval(), tok, convs, max_len)),
                             Path(out_json).parent)
               if step0 else None)
    if step0:
        metric = TEACHER_METRIC
    model = None
    candidates = []
    for i, (step, path) in enumerate(ckpts):
        name = f"step{step}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=False)
            apply_qat(model, settings, log)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        if qat_scheme and settings.block_scales == "learned":
            load_thetas(model, path, name)  # PEFT loads them only into a θ that already exists
        model.set_adapter(name)
        model.eval()
        scores = _score(model, tok, convs, prompts, max_len, max_new_tokens, teacher)
        candidates.append({"step": step, "checkpoint": path.name, **scores})
        log(f"{path.name}: {_summary(scores)}")
        if i:
            model.delete_adapter(f"step{ckpts[i - 1][0]}")
    with model.disable_adapter():
        base_scores = _score(model, tok, convs, prompts, max_len, max_new_tokens, teacher)
    log(f"base (adapters off{', fake-quantized' if qat_scheme else ''}): {_summary(base_scores)}")

    if step0:
        teacher.close()
        candidates.insert(0, {"step": 0, "checkpoint": None, **base_scores})
    best = choose(candidates, metric, pin)
    record = {
        "metric": metric,
        "pinned": f"checkpoint-{pin}" if pin is not None else None,
        "best": best,
        "selected": best["checkpoint"],
        "checkpoint": best["checkpoint"],
        "step": best["step"],
        "accuracy": best["accuracy"],
        "eval_loss": best["eval_loss"],
        "candidates": candidates,
        "base": base_scores,
        "adapted_modules": _adapted(checkpoints_dir),
        "qat_scheme": qat_scheme,
        "qat_mode": settings.qat_mode if qat_scheme else None,
        "scored_with_fake_quant": bool(qat_scheme),
        "n_prompts": len(prompts),
        "n_prompts_asked": n_prompts,
        "n_eval_conversations": len(convs),
        "dev_parquet": str(dev_parquet),
        "max_new_tokens": max_new_tokens,
        "checkpoints_dir": str(checkpoints_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out_json, record)
    log(f"selected {best['checkpoint'] or 'step 0 (the teacher, zero adapter)'} by {metric}" + (" (pinned)" if pin is not None else "")
        + f": {_summary(best)}")
    return record


def _adapted(checkpoints_dir: str | os.PathLike) -> list[str] | None:
    """The modules the run's adapter wraps, as ``train.json`` recorded them."""
    from qatforge.io import read_json

    p = Path(checkpoints_dir) / "train.json"
    return read_json(p).get("adapted_modules") if p.is_file() else None


def best_checkpoint_dir(best_json: str | os.PathLike, checkpoints_dir: str | os.PathLike) -> Path | None:
    """The adapter directory a ``best.json`` chose; None when it chose step 0 (no adapter)."""
    from qatforge.io import read_json

    rec = read_json(best_json)
    if rec["selected"] is None:
        return None
    path = Path(checkpoints_dir) / rec["selected"]
    if not (path / "adapter_config.json").is_file():
        raise SelectError(f"{best_json} chose {rec['selected']}, but {path} holds no adapter")
    return path
