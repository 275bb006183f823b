"""Knowledge distillation for QAT runs (``runs.<name>.qat.distill_from``).

The student is the teacher's merged model with a fresh adapter (so step 0 is PTQ of the teacher);
the loss is ``α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE``, where ``_T`` is the softmax at
temperature ``T``, the KL is averaged over the scored positions (``all``: every position whose
next token is not padding; ``answer``: those whose next token is an assistant token, as the CE
and the report's metrics use) and the CE over the assistant tokens.
"""

from __future__ import annotations

from typing import Any

POSITIONS = ("all", "answer")
IGNORE_INDEX = -100


def kd_loss(
    student_logits: Any,
    teacher_logits: Any,
    labels: Any,
    attention_mask: Any | None,
    *,
    alpha: float,
    temperature: float,
    positions: str = "all",
) -> tuple[Any, dict[str, float]]:
    """The distillation loss of one batch (``[B, L, V]`` logits, ``[B, L]`` labels) and its parts."""
    import torch
    import torch.nn.functional as F

    if positions not in POSITIONS:
        raise ValueError(f"qat.kd_positions {positions!r} is not one of {', '.join(POSITIONS)}")
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    target = labels[:, 1:]
    answer = target != IGNORE_INDEX
    if positions == "answer":
        mask = answer
    elif attention_mask is not None:
        mask = attention_mask[:, 1:].bool()
    else:
        mask = torch.ones_like(answer)
    temp = float(temperature)
    log_ps = F.log_softmax(s / temp, dim=-1)
    log_pt = F.log_softmax(t / temp, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    n = mask.sum().clamp(min=1)
    kd = (kl * mask).sum() / n * temp * temp
    if answer.any():
        ce = F.cross_entropy(s[answer], target[answer])
    else:
        ce = s.sum() * 0.0
    loss = alpha * kd + (1.0 - alpha) * ce
    return loss, {"kd": float(kd.detach()), "ce": float(ce.detach())}


def kd_trainer_class(base: type) -> type:
    """A subclass of the trainer class ``base`` whose loss distills from ``self.teacher``."""

    class KDTrainer(base):
        def __init__(self, *args: Any, teacher: Any, alpha: float, temperature: float, positions: str, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.kd = {"alpha": alpha, "temperature": temperature, "positions": positions}
            # The loss below is a per-batch mean: let the Trainer divide it by the accumulation steps.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            out = model(input_ids=ids, attention_mask=mask)
            with torch.no_grad():
                t = self.teacher(input_ids=ids, attention_mask=mask).logits
            loss, _ = kd_loss(out.logits, t, inputs["labels"], mask, **self.kd)
            return (loss, out) if return_outputs else loss

    return KDTrainer
