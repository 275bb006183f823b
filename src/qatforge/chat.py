"""Chat rendering, the BOS and turn-end rules, response-only label masking, batching and HF-side
exact-match / NLL evaluation.

Torch and transformers are imported inside the functions that need them, so this module can be
imported cheaply (e.g. by evaluation processes that only need ``is_correct``).
"""

from __future__ import annotations

from typing import Any, Sequence

IGNORE_INDEX = -100


def render(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """Render ``messages`` with the tokenizer's own chat template (text, not ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def strip_bos_text(text: str, bos_token: str | None) -> str:
    """``text`` without one leading BOS token text (what a template's ``{{ bos_token }}`` writes)."""
    return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text


def bos_policy(tokenizer: Any) -> dict[str, Any]:
    """How the model gets its one BOS: ``add_bos`` when its chat template writes a BOS or its
    tokenizer adds one (cached on the tokenizer, per template, BOS token and add_bos_token).

    Every runtime applies the same rule, which is llama.cpp's (``common/chat.cpp`` drops a rendered
    prompt's leading BOS text when the vocabulary adds BOS): the rendered text loses its leading
    BOS text and the tokenizer prepends the BOS id. Ollama does the same with a template that has
    no BOS, so no runtime sees two.
    """
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    key = (tokenizer.chat_template, bos, bos_id, getattr(tokenizer, "add_bos_token", None))
    cached = getattr(tokenizer, "_qatforge_bos_policy", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    probe = render(tokenizer, [{"role": "user", "content": "x"}], add_generation_prompt=True)
    in_template = bool(bos) and probe.startswith(bos)
    added = bos_id is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    policy = {"bos_token": bos, "bos_token_id": bos_id, "template_bos": in_template, "tokenizer_bos": added,
              "add_bos": bos_id is not None and (in_template or added)}
    try:
        tokenizer._qatforge_bos_policy = (key, policy)
    except AttributeError:  # pragma: no cover - a tokenizer type that refuses new attributes
        pass
    return policy


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` (a rendered text tokenized without special tokens) starting with exactly one BOS
    when the model uses one (:func:`bos_policy`); empty stays empty."""
    policy = bos_policy(tokenizer)
    if ids and policy["add_bos"] and ids[0] != policy["bos_token_id"]:
        return [policy["bos_token_id"], *ids]
    return ids


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat text as every runtime tokenizes it (see :func:`bos_policy`)."""
    return with_bos(tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the generation prompt."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


_TURN_PROBE = "\u2063qatforge-turn\u2063"


def turn_end_token(tokenizer: Any) -> str | None:
    """The special token that closes an assistant turn in the chat template (ChatML's
    ``<|im_end|>``, Llama-3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``), or the
    EOS when the template writes none there. Instruct checkpoints often keep ``<eos>`` /
    ``<|endoftext|>`` as the EOS and list the turn end in generation_config (Gemma-3, Phi-3)."""
    key = (tokenizer.chat_template, tokenizer.eos_token)
    cached = getattr(tokenizer, "_qatforge_turn_end", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        suffix = render(tokenizer, msgs, add_generation_prompt=False).split(_TURN_PROBE, 1)[1]
    except (IndexError, ValueError):
        suffix = ""
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found = [t for t in specials if t and suffix.lstrip().startswith(t)]
    end = max(found, key=len) if found else tokenizer.eos_token
    try:
        tokenizer._qatforge_turn_end = (key, end)
    except AttributeError:  # pragma: no cover
        pass
    return end


def stop_ids(tokenizer: Any) -> list[int]:
    """Ids that end a generated reply: the EOS and the template's turn end (:func:`turn_end_token`)."""
    end = turn_end_token(tokenizer)
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end) if end else None}
    return sorted(int(i) for i in ids if i is not None)


def _assistant_spans(tokenizer: Any, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn's content plus its end-of-turn token in ``text``."""
    eos = turn_end_token(tokenizer) or ""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        # Where the assistant content starts: right after the generation prompt when the template
        # is prefix-stable (ChatML is); otherwise the first occurrence after the previous span.
        start = len(prefix) if text.startswith(prefix) and len(prefix) >= cursor else cursor
        found = text.find(msg["content"], start)
        if found < 0:
            raise ValueError(f"assistant turn {i} content not found in the rendered conversation")
        end = found + len(msg["content"])
        if eos:
            nxt = text.find(eos, end)
            # The end token belongs to this turn when only whitespace separates it from the content.
            if nxt >= 0 and not text[end:nxt].strip():
                end = nxt + len(eos)
        spans.append((found, end))
        cursor = end
    return spans


def encode_for_training(tokenizer: Any, messages: Sequence[dict], max_len: int) -> dict:
    """Token ids of the rendered conversation and labels that are -100 outside assistant turns.

    Labels keep each assistant turn's content and its turn end (:func:`turn_end_token`; Unsloth's
    ``train_on_responses_only`` semantics); system/user turns and the role headers are masked.
    """
    text = render(tokenizer, messages, add_generation_prompt=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    spans = _assistant_spans(tokenizer, messages, text)
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(a < e and b > s for s, e in spans) if b > a else False
        labels.append(tok if inside else IGNORE_INDEX)
    full = with_bos(tokenizer, ids)
    if len(full) > len(ids):  # a BOS the tokenizer adds, not the template: never a label
        ids, labels = full, [IGNORE_INDEX, *labels]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def collate(batch: Sequence[dict], pad_id: int) -> dict:
    """Right-pad a batch of encoded rows into tensors (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if "labels" in r:
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Left-pad token id lists into ``input_ids`` / ``attention_mask`` tensors (for generation)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match comparison: surrounding whitespace stripped."""
    return str(text).strip()


def is_correct(generated: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return normalize_answer(generated) == normalize_answer(answer)


def hf_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy generation for chat prompts (left-padded batches); returns the decoded replies."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = pad_left([prompt_ids(tokenizer, p) for p in prompts[i : i + batch_size]], pad_id)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids(tokenizer),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def hf_exact_match(
    model: Any, tokenizer: Any, prompt_rows: Sequence[dict], max_new_tokens: int
) -> tuple[float, list[bool], list[str]]:
    """Exact-match accuracy of greedy replies to rows ``{"messages": [...], "answer": str}``."""
    gens = hf_generate(model, tokenizer, [r["messages"] for r in prompt_rows], max_new_tokens)
    correct = [is_correct(g, r["answer"]) for g, r in zip(gens, prompt_rows)]
    acc = sum(correct) / len(correct) if correct else 0.0
    return acc, correct, gens


def hf_nll(
    model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], max_len: int, batch_size: int = 16
) -> float:
    """Mean negative log-likelihood per assistant token (labels as in ``encode_for_training``)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [encode_for_training(tokenizer, c, max_len) for c in conversations]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            b = collate(rows[i : i + batch_size], pad_id)
            b = {k: v.to(model.device) for k, v in b.items()}
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = logits[:, :-1].float()
            target = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no assistant tokens to score in the given conversations")
    return total / count
