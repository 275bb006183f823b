"""A run's reference outputs, computed once from its merged HF model (like llama.cpp's
``--kl-divergence-base`` file) and read by every artifact's evaluation.

Everything is measured on the test split only (``n_prompts`` prompts and ``n_nll`` conversations
from its start); dev is for checkpoint selection.

``<out_dir>/reference.npz`` (numpy only, ragged sequences stored flat with offsets):
  prompt_ids / prompt_offsets   rendered test prompts (chat template, generation prompt), token ids
  gen_ids / gen_offsets         greedy generation per prompt (stop token excluded)
  nll_ids / nll_mask / nll_offsets   full token ids of ``n_nll`` test conversations and their
                                     answer-token mask (``chat.encode_for_training``'s labels;
                                     scored at ``parity.answer_positions``)
  ans_offsets                   per conversation, its rows in the ans_* arrays: one row per
                                ``parity.answer_positions`` position, in order
  ans_head_ids / ans_head_logit / ans_tail_logp / ans_lse / ans_sample_ids / ans_sample_logit
                                the reference's next-token distribution at those positions,
                                compact (``qatforge.answer_dists``: top-k head, tail mass, tail
                                samples): bytes per position independent of the vocabulary
``<out_dir>/reference.json``: special-token ids, stop ids, chat template, the prompts and their
expected answers, tokenizer-files hash, merged and test-split sha256, settings and the
reference's own scores.

Loading (``load``) needs numpy only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qatforge.answer_dists import ARRAYS, AnswerDists, compress
from qatforge.io import atomic_dir, manifest_path, read_json, sha256_path, write_json

NPZ = "reference.npz"
META = "reference.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
# 2: prompts and NLL conversations from the test split, test_sha256; 3: add_bos;
# 4: answer-position distributions (answer_dists) instead of full logits
FORMAT_VERSION = 4


@dataclass
class Reference:
    """A loaded reference: metadata plus per-sequence numpy arrays."""

    meta: dict[str, Any]
    prompt_ids: list[np.ndarray]
    gen_ids: list[np.ndarray]
    nll_ids: list[np.ndarray]
    nll_mask: list[np.ndarray]
    nll_dists: list[AnswerDists]  # per conversation, at its answer positions

    @property
    def prompts(self) -> list[list[dict]]:
        return [p["messages"] for p in self.meta["prompts"]]

    @property
    def answers(self) -> list[str]:
        return [p["answer"] for p in self.meta["prompts"]]

    @property
    def stop_ids(self) -> set[int]:
        return set(self.meta["stop_token_ids"])


def _flat(seqs: Sequence[Sequence[Any]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    parts = [np.asarray(s, dtype=dtype) for s in seqs]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return flat, offsets


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def tokenizer_files_hash(model_dir: str | Path) -> str:
    """sha256 over the tokenizer/chat-template files present in ``model_dir``."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = model_dir / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode())
    if not found:
        raise FileNotFoundError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return h.hexdigest()


def recorded_sha256(artifact: str | Path) -> str:
    """The artifact's sha256 from its manifest when present, else computed now."""
    mp = manifest_path(artifact)
    if mp.is_file():
        rec = read_json(mp)
        if rec.get("sha256"):
            return str(rec["sha256"])
    return sha256_path(artifact)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end a greedy generation: the tokenizer's eos and the template's turn end
    (:func:`qatforge.chat.stop_ids`) plus generation_config's eos."""
    from qatforge.chat import stop_ids

    ids: set[int] = set(stop_ids(tokenizer))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return sorted(ids)


def build(
    merged_dir: str | Path,
    test_parquet: str | Path,
    out_dir: str | Path,
    *,
    n_prompts: int,
    n_nll: int,
    max_new_tokens: int,
    max_len: int,
    top_k: int = 512,
    tail_samples: int = 256,
    threads: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Compute and store the reference of ``merged_dir`` (fp32 compute); return reference.json.

    Each conversation's logits are reduced to its answer positions' ``AnswerDists`` (``top_k``
    head, ``tail_samples``) as soon as they are computed: memory holds one conversation's logits.
    """
    import torch

    from qatforge.chat import IGNORE_INDEX, bos_policy, encode_for_training, is_correct
    from qatforge.data import prompts_from_parquet, read_conversations
    from qatforge.decode import greedy
    from qatforge.hf_runtime import HFRuntime
    from qatforge.io import package_versions

    if threads:
        torch.set_num_threads(threads)
    merged_dir = Path(merged_dir)
    rows = prompts_from_parquet(test_parquet, n_prompts)
    convs = read_conversations(test_parquet)
    if len(convs) < n_nll:
        raise ValueError(
            f"{test_parquet}: the test split has {len(convs)} conversations, but eval.n_nll asks for {n_nll}"
        )
    convs = convs[:n_nll]

    rt = HFRuntime(merged_dir, compute_dtype="float32", trust_remote_code=trust_remote_code)
    tok = rt.tokenizer
    stops = stop_token_ids(tok, getattr(rt.model, "generation_config", None))

    prompt_ids = [rt.prompt_ids(r["messages"]) for r in rows]
    gens = [greedy(rt, ids, max_new_tokens, set(stops))[0] for ids in prompt_ids]
    texts = [rt.decode(g) for g in gens]
    correct = [is_correct(t, r["answer"]) for t, r in zip(texts, rows)]

    enc = [encode_for_training(tok, c, max_len) for c in convs]
    nll_ids = [e["input_ids"] for e in enc]
    nll_mask = [[lab != IGNORE_INDEX for lab in e["labels"]] for e in enc]
    from qatforge.parity import answer_positions, nll_terms

    for i, m in enumerate(nll_mask):
        if not len(answer_positions(m)):
            raise ValueError(f"{test_parquet}: test conversation {i} has no assistant tokens within max_len={max_len}")
    dists, nll_sum, nll_n, vocab = [], 0.0, 0, 0
    for j, (ids, mask) in enumerate(zip(nll_ids, nll_mask)):
        logits = rt.logits(ids)
        vocab = int(logits.shape[-1])
        total, n = nll_terms(logits, np.asarray(ids), np.asarray(mask))
        nll_sum, nll_n = nll_sum + total, nll_n + n
        dists.append(compress(logits[answer_positions(mask)], top_k, tail_samples, seed=j))
        del logits
    nll = nll_sum / nll_n
    ans = AnswerDists.concat(dists)
    tail_mass = np.exp(ans.tail_logp)

    p_flat, p_off = _flat(prompt_ids, np.int32)
    g_flat, g_off = _flat(gens, np.int32)
    n_flat, n_off = _flat(nll_ids, np.int32)
    m_flat, _ = _flat(nll_mask, np.bool_)
    a_off = np.concatenate([[0], np.cumsum([len(d) for d in dists])]).astype(np.int64)

    meta = {
        "format_version": FORMAT_VERSION,
        "merged_dir": str(merged_dir),
        "merged_sha256": recorded_sha256(merged_dir),
        "tokenizer_sha256": tokenizer_files_hash(merged_dir),
        "bos_token_id": tok.bos_token_id,
        "add_bos": bos_policy(tok)["add_bos"],
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "stop_token_ids": stops,
        "chat_template": tok.chat_template,
        "vocab_size": vocab,
        "n_prompts": n_prompts,
        "n_nll": n_nll,
        "n_nll_tokens": int(n_flat.shape[0]),
        "n_answer_positions": len(ans),
        "answer_dists": {
            "top_k": int(ans.head_ids.shape[1]), "tail_samples": int(ans.sample_ids.shape[1]),
            "tail_mass_mean": float(tail_mass.mean()), "tail_mass_max": float(tail_mass.max()),
            "exact": not bool(tail_mass.any()), "bytes": ans.nbytes,
        },
        "max_new_tokens": max_new_tokens,
        "max_len": max_len,
        "max_seq_len": int(max([len(x) for x in nll_ids] + [len(p) + max_new_tokens for p in prompt_ids])),
        "prompts": [
            {"messages": list(r["messages"]), "answer": str(r["answer"]), "task": r.get("task")} for r in rows
        ],
        "test_parquet": str(test_parquet),
        "test_sha256": sha256_path(test_parquet),
        "compute_dtype": "float32",
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "per_prompt_correct": correct,
        "nll": nll,
        "ppl": math.exp(nll),
        "generations": texts,
        "versions": package_versions("torch", "transformers", "numpy"),
    }
    with atomic_dir(out_dir) as tmp:
        with open(tmp / NPZ, "wb") as f:
            np.savez(
                f,
                prompt_ids=p_flat, prompt_offsets=p_off,
                gen_ids=g_flat, gen_offsets=g_off,
                nll_ids=n_flat, nll_mask=m_flat, nll_offsets=n_off,
                ans_offsets=a_off,
                **{f"ans_{a}": getattr(ans, a) for a in ARRAYS},
            )
        write_json(tmp / META, meta)
    return meta


def load(ref_dir: str | Path) -> Reference:
    """Read ``reference.npz`` + ``reference.json`` (numpy only); clear error when missing/corrupt."""
    ref_dir = Path(ref_dir)
    npz, meta_p = ref_dir / NPZ, ref_dir / META
    for p in (npz, meta_p):
        if not p.is_file():
            raise FileNotFoundError(f"reference file {p} is missing (build it with qatforge.reference.build)")
    meta = read_json(meta_p)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_p}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    try:
        with np.load(npz, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / numpy errors on a truncated file
        raise ValueError(f"{npz}: cannot read reference arrays: {e}") from e
    need = {"prompt_ids", "prompt_offsets", "gen_ids", "gen_offsets", "nll_ids", "nll_mask", "nll_offsets",
            "ans_offsets", *(f"ans_{a}" for a in ARRAYS)}
    if missing := need - set(d):
        raise ValueError(f"{npz}: missing arrays {sorted(missing)}")
    ref = Reference(
        meta=meta,
        prompt_ids=_split(d["prompt_ids"], d["prompt_offsets"]),
        gen_ids=_split(d["gen_ids"], d["gen_offsets"]),
        nll_ids=_split(d["nll_ids"], d["nll_offsets"]),
        nll_mask=_split(d["nll_mask"], d["nll_offsets"]),
        nll_dists=[],
    )
    ans = AnswerDists(*(d[f"ans_{a}"] for a in ARRAYS))
    off = d["ans_offsets"]
    ref.nll_dists = [ans.rows(int(off[i]), int(off[i + 1])) for i in range(len(off) - 1)]
    if len(ref.nll_dists) != len(ref.nll_ids):
        raise ValueError(f"{npz}: {len(ref.nll_dists)} answer-distribution sequences for {len(ref.nll_ids)} conversations")
    if len(ref.prompt_ids) != len(meta["prompts"]) or len(ref.gen_ids) != len(meta["prompts"]):
        raise ValueError(f"{ref_dir}: {len(meta['prompts'])} prompts in {META} but {len(ref.prompt_ids)} in {NPZ}")
    return ref


def check_test_data(ref: Reference, test_parquet: str | Path | None) -> None:
    """Raise when ``test_parquet`` is not the test split the reference was built from (sha256)."""
    if test_parquet is None:
        return
    if sha256_path(test_parquet) != ref.meta["test_sha256"]:
        raise ValueError(
            f"{test_parquet} differs from the test split the reference was built from "
            f"({ref.meta.get('test_parquet')}); rebuild the reference"
        )
