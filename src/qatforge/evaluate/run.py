"""The evaluation loop: one artifact in its own runtime, measured against the run's reference.

``run_eval`` opens the artifact in its format's runtime (``formats.Format.runtime``: transformers
for hf/torchao, llama.cpp for gguf, onnxruntime for onnx), in the calling process, and writes one
JSON holding exactly the report columns (``qatforge.spec.columns.REPORT_COLUMNS``, then
``SPEED_COLUMNS``) plus extras. Nothing here imports torch at module level: GGUF and ONNX
evaluations run without torch/transformers.

Speed is measured apart from parity: the parity runtime is released and a second instance is
opened with each runtime's deployment settings (``open_speed_runtime``, recorded in
``speed_settings``).

Command line: ``python -m qatforge.evaluate --artifact A --reference R --out J --run ... --format ...``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qatforge.decode import Runtime, greedy
from qatforge.reference import Reference, check_test_data, load
from qatforge.spec.columns import REPORT_COLUMNS, SPEED_COLUMNS
from qatforge.spec.formats import FORMATS, REFERENCE_ONLY, is_deployment_artifact, lookup, resolve


def tokenizer_checks(ref_meta: Mapping[str, Any], special: Mapping[str, Any], ids: Sequence[Sequence[int]]) -> dict:
    """BOS/EOS ids, double-BOS and chat-template equality of a runtime against the reference."""
    ref_bos, ref_eos = ref_meta.get("bos_token_id"), ref_meta.get("eos_token_id")
    bos, eos = special.get("bos_token_id"), special.get("eos_token_id")
    if bos is not None and bos < 0:
        bos = None
    add_bos = bool(special.get("add_bos"))
    # Without a reference BOS the model must not get one prepended; its id is then irrelevant.
    # and it gets one BOS exactly when the reference does (qatforge.chat.bos_policy).
    bos_ok = (not add_bos) if ref_bos is None else bos == ref_bos and add_bos == ref_meta["add_bos"]
    eos_ok = eos is not None and (eos == ref_eos or eos in ref_meta.get("stop_token_ids", []))
    doubles = [i for i, s in enumerate(ids) if bos is not None and len(s) >= 2 and s[0] == s[1] == bos]
    tmpl = special.get("chat_template")
    return {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "ref_bos_token_id": ref_bos,
        "ref_eos_token_id": ref_eos,
        "add_bos": add_bos,
        "ref_add_bos": ref_meta.get("add_bos"),
        "bos_ok": bool(bos_ok),
        "eos_ok": bool(eos_ok),
        "no_double_bos": not doubles,
        "chat_template_equal": tmpl == ref_meta.get("chat_template"),
    }


def speed(rt: Runtime, prompts: Sequence[Sequence[int]], max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """Prompt and generation tokens/s: medians over ``repeats`` x ``prompts`` runs, and their spread.

    One untimed warm-up pass over the prompts, then every prompt ``repeats`` times; each run
    generates exactly ``max_new_tokens`` (EOS ignored) from an empty cache. Generation counts the
    decode steps after the first token (that one comes with the prompt). The spread is the 25th
    and 75th percentile with at least 4 runs, else min and max (``speed_spread``). A runtime with
    ``timed_generate`` (llama.cpp) times itself; the others run ``decode.greedy``.
    """
    if not prompts:
        raise ValueError("no speed prompts")
    if repeats < 1:
        raise ValueError(f"speed_repeats must be >= 1, got {repeats}")

    def one(p: Sequence[int]) -> tuple[float, float, int, int]:
        if hasattr(rt, "timed_generate"):
            return rt.timed_generate(p, max_new_tokens)
        _, p_s, d_s, n = greedy(rt, p, max_new_tokens, set(), ignore_stop=True)
        return p_s, d_s, len(p), n

    for p in prompts:
        one(p)
    runs = [one(p) for _ in range(repeats) for p in prompts]
    quartiles = len(runs) >= 4
    out: dict[str, Any] = {}
    for col, t, n in (("prompt_tps", 0, 2), ("gen_tps", 1, 3)):
        tps = np.array([r[n] / r[t] if r[n] and r[t] > 0 else math.nan for r in runs])  # NaN: max_new_tokens 1
        lo, hi = np.percentile(tps, [25, 75]) if quartiles else (tps.min(), tps.max())
        out.update({col: float(np.median(tps)), f"{col}_p25": float(lo), f"{col}_p75": float(hi)})
    out.update(
        speed_spread="quartiles" if quartiles else "min-max", speed_runs=len(runs), speed_prompts=len(prompts),
        speed_repeats=repeats, speed_prompt_tokens=sum(r[2] for r in runs[: len(prompts)]),
        speed_gen_tokens=sum(r[3] for r in runs[: len(prompts)]),
    )
    return out


def evaluate_runtime(
    rt: Runtime,
    ref: Reference,
    *,
    format: str,
    variant: str,
    max_new_tokens: int,
    thresholds: Mapping[str, Any] | None,
    test_parquet: str | Path | None = None,
    baseline_ref: Reference | None = None,
) -> dict[str, Any]:
    """The parity and quality measurements shared by every runtime (not load time, size, RSS, speed).

    ``baseline_ref`` (a QAT run's artifacts: the baseline run's reference, on the same test ids)
    adds ``vs_baseline_*``: KLD / top-1 against the baseline merged model, per conversation too.

    ``test_parquet``, when given, must be the test split the reference was built from. A
    ``formats.REFERENCE_ONLY`` row (the base model) gets every metric but no parity verdict:
    ``parity_pass`` None, no failures, the reason in ``parity``.
    """
    from qatforge.chat import is_correct
    from qatforge.parity import compare_answers, gen_match, judge, thresholds_for, token_parity

    check_test_data(ref, test_parquet)
    ids = [rt.prompt_ids(m) for m in ref.prompts]
    out: dict[str, Any] = token_parity([p.tolist() for p in ref.prompt_ids], ids)
    special = rt.special_ids()
    out.update(tokenizer_checks(ref.meta, special, ids))

    stops = set(ref.stop_ids)
    if special.get("eos_token_id") is not None:
        stops.add(int(special["eos_token_id"]))
    gens = [greedy(rt, p, ref.meta["max_new_tokens"], stops)[0] for p in ids]
    texts = [rt.decode(g) for g in gens]
    correct = [is_correct(t, a) for t, a in zip(texts, ref.answers)]
    out["per_prompt_correct"] = correct
    out["accuracy"] = sum(correct) / len(correct)
    out["gen_match"] = gen_match([g.tolist() for g in ref.gen_ids], gens)
    out["per_prompt_gen_match"] = [g.tolist() == h for g, h in zip(ref.gen_ids, gens)]
    out["generations"] = texts[:10]

    if baseline_ref is not None:
        same = len(baseline_ref.nll_ids) == len(ref.nll_ids) and all(
            np.array_equal(a, b) for a, b in zip(baseline_ref.nll_ids, ref.nll_ids))
        if not same:
            raise ValueError("the baseline reference's test conversations tokenize differently from this run's: "
                             "QAT and baseline runs must share the tokenizer and the test split")
    # KLD, top-1 and NLL at the answer positions (parity.answer_positions), one conversation's logits
    # at a time; the per-conversation NLL sums and counts are for bootstrap CIs over conversations
    m = compare_answers(
        ref.nll_dists, (rt.logits(s.tolist()) for s in ref.nll_ids), ref.nll_ids, ref.nll_mask,
        baseline=baseline_ref.nll_dists if baseline_ref is not None else None,
    )
    vs = m.pop("vs_baseline", None)
    out.update(m)
    out["ppl"] = math.exp(out["nll"])
    if vs is not None:
        out.update({f"vs_baseline_{k}": vs[k] for k in ("kld_mean", "top1_agree", "per_seq_kld_sum")})
    out["ref_accuracy"] = ref.meta.get("accuracy")
    out["ref_nll"] = ref.meta.get("nll")

    if is_deployment_artifact(format, variant):
        th = thresholds_for(format, variant, thresholds)
        ok, failures = judge(out, th)
    else:
        th, ok, failures = None, None, []
        out["parity"] = f"not applicable: {REFERENCE_ONLY[(format, variant)]}"
    out.update(
        parity_pass=ok, failures=failures, thresholds=th, n_prompts=len(ids),
        n_nll=len(ref.nll_ids), n_logit_tokens=int(sum(out["per_seq_tokens"])),
        max_new_tokens=max_new_tokens, reference_merged_sha256=ref.meta.get("merged_sha256"),
    )
    return out


def speed_pass(open_speed_runtime: Any, artifact: Path, ref: Reference, *, format: str, threads: int,
               max_new_tokens: int, speed_prompts: int, speed_repeats: int) -> dict[str, Any]:
    """``speed`` on a fresh runtime with deployment settings, tokenizing the first prompts itself.

    Call it with the parity runtime released: ``speed_rss_mb`` is the peak RSS from here on.
    """
    from qatforge.bench import peak_rss_mb, reset_peak_rss

    reset = reset_peak_rss()
    rt, settings = open_speed_runtime(artifact, ref, format=format, threads=threads, max_new_tokens=max_new_tokens)
    out = speed(rt, [rt.prompt_ids(m) for m in ref.prompts[:speed_prompts]], max_new_tokens, speed_repeats)
    out.update(speed_rss_mb=peak_rss_mb() if reset else math.nan, speed_settings=settings)
    return out


def provenance(artifact: str | Path) -> dict[str, Any]:
    """sha256 and source checkpoint from the artifact's export record, else computed/derived."""
    from qatforge.io import manifest_path, read_json, sha256_path

    mp = manifest_path(artifact)
    rec = read_json(mp) if mp.is_file() else {}
    prov = rec.get("provenance") or {}
    sha = rec.get("sha256") or sha256_path(artifact)
    src = _nested(prov, "checkpoint") or _nested(prov, "merged_dir") or str(artifact)
    return {"sha256": sha, "source_checkpoint": str(src), "manifest": str(mp) if rec else None}


def _nested(d: Any, key: str, depth: int = 3) -> Any:
    """First string value of ``key`` in ``d`` or its nested dicts (breadth-first, e.g. provenance.source)."""
    level = [d]
    for _ in range(depth):
        nxt = []
        for x in level:
            if isinstance(x, dict):
                if isinstance(x.get(key), str) and x[key]:
                    return x[key]
                nxt += [v for v in x.values() if isinstance(v, dict)]
        level = nxt
    return None


def run_eval(
    artifact: str | Path,
    reference_dir: str | Path,
    test_parquet: str | Path | None,
    out_json: str | Path | None,
    *,
    run: str,
    qat_scheme: str | None,
    format: str,
    variant: str,
    threads: int = 1,
    max_new_tokens: int = 24,
    speed_prompts: int = 4,
    speed_repeats: int = 3,
    thresholds: Mapping[str, Any] | None = None,
    record_errors: bool = False,
    baseline_reference: str | Path | None = None,
    baseline_run: str | None = None,
    qat_mode: str | None = None,
) -> dict[str, Any]:
    """Evaluate one artifact with its own runtime and write ``out_json`` (atomically).

    ``baseline_reference`` (QAT runs): the reference of ``baseline_run``, for ``vs_baseline_*``.
    With ``record_errors`` a failing evaluation still writes a row (metrics NaN, parity_pass
    false, the error in ``failures``) so that the report lists it instead of stopping the run.
    """
    from qatforge.bench import peak_rss_mb, size_mb
    from qatforge.io import atomic_file
    from qatforge.model import release_freed_memory

    runtime_module = lookup(format).runtime
    artifact = Path(artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"artifact {artifact} does not exist")
    parity_peak = 0.0
    try:
        runtime = resolve(runtime_module)
        ref = load(reference_dir)
        t0 = time.perf_counter()
        rt, about = runtime.open_runtime(artifact, ref, format=format, threads=threads, max_new_tokens=max_new_tokens)
        load_s = time.perf_counter() - t0
        result = evaluate_runtime(
            rt, ref, format=format, variant=variant, max_new_tokens=max_new_tokens,
            thresholds=dict(thresholds) if thresholds else None, test_parquet=test_parquet,
            baseline_ref=load(baseline_reference) if baseline_reference else None,
        )
        result.update(load_s=load_s, **about)

        del rt  # the speed pass gets a runtime of its own, without the reference logits around
        ref.nll_dists = []
        release_freed_memory()
        parity_peak = peak_rss_mb()
        result.update(speed_pass(
            runtime.open_speed_runtime, artifact, ref, format=format, threads=threads, max_new_tokens=max_new_tokens,
            speed_prompts=speed_prompts, speed_repeats=speed_repeats,
        ))
    except Exception as e:
        if not record_errors:
            raise
        result = {k: math.nan for k in REPORT_COLUMNS + SPEED_COLUMNS}
        result.update(token_parity=False, parity_pass=False, failures=[f"evaluation error: {type(e).__name__}: {e}"],
                      traceback=traceback.format_exc(limit=5))
    # the whole process's peak: the mark restarted with the speed pass (and the kernel's count is approximate)
    peak = float(np.nanmax([parity_peak, peak_rss_mb(), result.get("speed_rss_mb", math.nan)]))
    result.update(
        run=run, qat_scheme=qat_scheme, qat_mode=qat_mode, baseline_run=baseline_run,
        format=format, variant=variant, threads=threads,
        artifact=str(artifact), size_mb=size_mb(artifact), peak_rss_mb=peak,
        **provenance(artifact),
    )
    missing = [c for c in REPORT_COLUMNS + SPEED_COLUMNS if c not in result]
    if missing:
        raise RuntimeError(f"evaluation of {artifact} produced no {missing}")
    ordered = {c: result[c] for c in REPORT_COLUMNS + SPEED_COLUMNS}
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    ordered = _jsonable(ordered)
    if out_json is not None:  # report columns first, in their fixed order (write_json would sort keys)
        with atomic_file(out_json) as tmp:
            tmp.write_text(json.dumps(ordered, indent=2, allow_nan=False) + "\n")
    return ordered


def _jsonable(obj: Any) -> Any:
    """numpy scalars → Python; NaN/inf → None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _load_thresholds(arg: str | None) -> dict | None:
    if not arg:
        return None
    p = Path(arg)
    if p.is_file():
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    return json.loads(arg)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qatforge.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--reference", required=True, help="the run's reference directory")
    ap.add_argument("--test-data", default=None, help="the test split the reference was built from (checked)")
    ap.add_argument("--out", required=True, help="evaluation JSON to write")
    ap.add_argument("--run", required=True)
    ap.add_argument("--qat-scheme", default=None)
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--speed-prompts", type=int, default=4)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--thresholds", default=None, help="JSON text or a .json/.yaml file (report.thresholds)")
    ap.add_argument("--record-errors", action="store_true")
    a = ap.parse_args(argv)
    res = run_eval(
        a.artifact, a.reference, a.test_data, a.out, run=a.run,
        qat_scheme=a.qat_scheme if a.qat_scheme not in (None, "", "none", "null") else None,
        format=a.format, variant=a.variant, threads=a.threads, max_new_tokens=a.max_new_tokens,
        speed_prompts=a.speed_prompts, speed_repeats=a.speed_repeats,
        thresholds=_load_thresholds(a.thresholds), record_errors=a.record_errors,
    )
    if res["parity_pass"] is None:
        status = res.get("parity") or "not judged"
    else:
        status = "PASS" if res["parity_pass"] else "FAIL: " + "; ".join(res.get("failures") or [])
    print(f"{a.run}/{a.format}/{a.variant}: accuracy={res['accuracy']} kld_mean={res['kld_mean']} "
          f"top1={res['top1_agree']} gen_match={res['gen_match']} parity {status}", file=sys.stderr)
    return 0
