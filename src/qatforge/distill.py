"""Knowledge distillation for QAT runs (``runs.<name>.qat.distill_from``).

The student is the teacher's merged model with a fresh adapter (so step 0 is PTQ of the teacher);
the loss is ``α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE``, where ``_T`` is the softmax at
temperature ``T``, the KL is averaged over the scored positions (``all``: every position whose
next token is not padding; ``answer``: those whose next token is an assistant token, as the CE
and the report's metrics use) and the CE over the assistant tokens.

Training uses :func:`chunked_kd_loss`, the same loss computed over blocks of positions with its
gradient formed in the forward: the ``[B, L, V]`` log-softmax copies of :func:`kd_loss` (six or so
at once, 0.5 GiB each at batch 16 x 55 tokens over a 151,936 vocabulary) are never all alive.
"""

from __future__ import annotations

from typing import Any

POSITIONS = ("all", "answer")
IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # logits per block of chunked_kd_loss (64 MiB in float32)


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


def _scored(labels: Any, attention_mask: Any | None, positions: str) -> tuple[Any, Any, Any]:
    """``(target, kl_mask, answer)`` of every position ``[B, L]``: the next token (IGNORE_INDEX at the
    last position), where the KL is scored, where the CE is (the next token is an assistant token)."""
    import torch

    if positions not in POSITIONS:
        raise ValueError(f"qat.kd_positions {positions!r} is not one of {', '.join(POSITIONS)}")
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    answer = target != IGNORE_INDEX
    if positions == "answer":
        mask = answer
    else:
        mask = torch.zeros_like(answer)
        mask[:, :-1] = attention_mask[:, 1:].bool() if attention_mask is not None else True
    return target, mask, answer


_KD = None


def _block_terms(s: Any, t: Any, target: Any, mask: Any, answer: Any, n: Any, n_ans: Any, temp: float) -> tuple[Any, Any]:
    """One block's share of :func:`kd_loss`'s KD and CE terms, with its operations (so the autograd
    gradient of each row is the one the whole-batch graph gives)."""
    import torch
    import torch.nn.functional as F

    log_ps = F.log_softmax(s / temp, dim=-1)
    log_pt = F.log_softmax(t / temp, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kd = (kl * mask).sum() / n * temp * temp
    if bool(answer.any()):
        ce = F.cross_entropy(s[answer], target[answer], reduction="sum") / n_ans
    else:
        ce = s.sum() * 0.0
    return kd, ce


def _chunked_fn():
    """The autograd Function of :func:`chunked_kd_loss` (built lazily: no torch at import)."""
    global _KD
    if _KD is None:
        import torch
        import torch.nn.functional as F

        class ChunkedKD(torch.autograd.Function):
            @staticmethod
            def forward(ctx, s, t, target, mask, answer, alpha, temp, rows):
                v = s.shape[-1]
                s2, t2 = s.reshape(-1, v), t.reshape(-1, v)  # views: logits are contiguous
                tg, m, ans = target.reshape(-1), mask.reshape(-1), answer.reshape(-1)
                n, n_ans = m.sum().clamp(min=1), ans.sum()
                need_grad = ctx.needs_input_grad[0]
                grad = torch.empty(s2.shape, dtype=s.dtype, device=s.device) if need_grad else None
                kd_sum = s2.new_zeros((), dtype=torch.float32)
                ce_sum = s2.new_zeros((), dtype=torch.float32)
                for r0 in range(0, s2.shape[0], rows):
                    r1 = min(r0 + rows, s2.shape[0])
                    with torch.enable_grad():  # kd_loss's own graph on one block: the same per-row gradients
                        sc = s2[r0:r1].detach().float().requires_grad_(need_grad)
                        kd_c, ce_c = _block_terms(sc, t2[r0:r1].float(), tg[r0:r1], m[r0:r1], ans[r0:r1],
                                                  n, n_ans, temp)
                        if need_grad:
                            g, = torch.autograd.grad(alpha * kd_c + (1.0 - alpha) * ce_c, sc)
                            grad[r0:r1] = g
                    kd_sum += kd_c.detach()
                    ce_sum += ce_c.detach()
                kd, ce = kd_sum, ce_sum
                ctx.grad = grad.view(s.shape) if need_grad else None
                ctx.mark_non_differentiable(kd, ce)
                return alpha * kd + (1.0 - alpha) * ce, kd, ce

            @staticmethod
            def backward(ctx, g_loss, _g_kd, _g_ce):
                grad, ctx.grad = ctx.grad, None
                return (grad * g_loss if grad is not None else None), None, None, None, None, None, None, None

        _KD = ChunkedKD
    return _KD


def chunked_kd_loss(
    student_logits: Any,
    teacher_logits: Any,
    labels: Any,
    attention_mask: Any | None,
    *,
    alpha: float,
    temperature: float,
    positions: str = "all",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Any, dict[str, float]]:
    """:func:`kd_loss` over blocks of ``chunk_elements // V`` positions, its gradient with respect to
    the student logits formed block by block in the forward (one ``[B, L, V]`` buffer, handed to
    the backward): equal to :func:`kd_loss` up to float summation order."""
    target, mask, answer = _scored(labels, attention_mask, positions)
    rows = max(1, int(chunk_elements) // int(student_logits.shape[-1]))
    loss, kd, ce = _chunked_fn().apply(student_logits, teacher_logits.detach(), target, mask, answer,
                                       float(alpha), float(temperature), rows)
    return loss, {"kd": float(kd), "ce": float(ce)}


def share_frozen_tensors(teacher: Any, student: Any) -> int:
    """Point each of ``teacher``'s parameters at the student's frozen tensor of the same name when
    the two are bitwise equal, and return the bytes so freed.

    The student is the teacher's merged model with an adapter: its LoRA base weights, norms and,
    unless the scheme replaced them by their round trips (a GGUF or ONNX embedding or LM head), its
    other frozen weights hold the teacher's values, so one copy serves both (a whole float32 model at
    size). Names are matched after peft's ``base_model.model.`` prefix and ``.base_layer`` are
    dropped; a tensor that differs in any bit, shape or dtype, or that the student trains, keeps its
    own copy, so the teacher's forward is unchanged."""
    import torch

    from qatforge.qat import hf_model

    frozen = {}
    for name, p in hf_model(student).named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            frozen.setdefault(name.replace(".base_layer.", "."), p)
    freed = 0
    with torch.no_grad():
        for name, p in teacher.named_parameters():  # a tied pair is one parameter: counted once
            s = frozen.get(name)
            if (s is None or s.data_ptr() == p.data_ptr() or s.shape != p.shape or s.dtype != p.dtype
                    or not torch.equal(s, p)):
                continue
            p.data = s.data
            freed += p.numel() * p.element_size()
    return freed


def kd_trainer_class(base: type) -> type:
    """A subclass of the trainer class ``base`` whose loss distills from ``self.teacher``
    (:func:`chunked_kd_loss`; it also counts the input tokens trl's ``num_tokens`` log reports)."""

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
            with torch.no_grad():  # teacher first: its activations are gone before the student's exist
                t = self.teacher(input_ids=ids, attention_mask=mask).logits
            out = model(input_ids=ids, attention_mask=mask)
            loss, _ = chunked_kd_loss(out.logits, t, inputs["labels"], mask, **self.kd)
            del t
            if model.training and hasattr(self, "_total_train_tokens"):  # trl's tokens/s counter
                self._total_train_tokens += int(mask.sum()) if mask is not None else ids.numel()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            if return_outputs:
                return loss, out
            out.logits = None  # no need to keep the logits: the gradient is already formed
            return loss

    return KDTrainer
