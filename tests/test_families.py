"""The family matrix: every stage of the real pipeline on a seeded replica of each model family.

Each family (tests/families.py) gets its own project copy with the replica as ``model.base`` and
reduced settings (few steps, a small slice of the shipped dataset), and one real ``snakemake`` run
of every target: train (a baseline and a merge-exact int8-int4 QAT run), merge, QAT convert, GGUF
(BF16, Q4_K_M, IQ4_XS with an imatrix), TorchAO, ONNX, the Ollama Modelfile, evaluate and report,
with the parity gate on.
Then, on the built files, the token ids of the test prompts agree across HF, llama.cpp, onnxruntime
and Ollama's path (Go's text/template rendering of the Modelfile TEMPLATE, tokenized as Ollama
does, by llama.cpp with the GGUF's BOS rule). A replica missing a file its converter needs is
refused at parse time. The last test writes the matrix (``results/families.md``) and checks that the
README's "Supported model families" table is that matrix.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from conftest import ROOT, copy_project, deep_update, read_config, snakemake, write_config
from families import FAMILIES

DATA_ROWS = 800  # the first rows of the shipped dataset (every task present)
# A K-quant (the Ollama default) and an imatrix i-quant (llama-imatrix runs the family's graph); the
# other quant types differ only in llama-quantize's per-tensor rules, not per family.
# Q4_0 in llama.cpp's QAT mix is what the GGUF-targeted QAT run ships (and its PTQ twin).
QUANTS = {"Q4_K_M": {"type": "Q4_K_M"}, "IQ4_XS": {"type": "IQ4_XS", "imatrix": True},
          "Q4_0": {"type": "Q4_0", "token_embedding_type": "Q8_0", "output_tensor_type": "Q8_0"}}
STAGES = ("train", "merge", "QAT convert", "GGUF", "GGUF QAT", "TorchAO", "ONNX", "Ollama", "evaluate + parity",
          "report")
# the formats a family is refused, with the words the reason must hold: the pinned ONNX model builder
# fails on Gemma 4's per-layer config (qatforge.spec.onnx_archs.BUILDER_FAILURES)
REFUSED = {"gemma4": {"onnx": "AmbiguousGlobalPerLayerAttributeError"}}
STAGE_FORMAT = {"GGUF": "gguf", "GGUF QAT": "gguf", "Ollama": "gguf", "TorchAO": "torchao", "ONNX": "onnx"}
TABLE = ROOT / "results" / "families.md"
README_START, README_END = "<!-- families:start -->", "<!-- families:end -->"
_BUILDS: dict[str, Path] = {}
_MATRIX: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module")
def replicas(family_replicas) -> Path:
    return next(iter(family_replicas.values())).parent


def family_config(cfg: dict, name: str, base: Path) -> dict:
    """The default config with the replica as base and settings cut for the matrix."""
    cfg = deep_update(cfg, {
        "model": {"base": str(base), "name": None},
        "data": {"dev_fraction": 0.03, "test_fraction": 0.03},
        "train": {"max_steps": 8, "save_steps": 8, "batch_size": 8},
        "gguf": {"pre_tokenizer": FAMILIES[name].pre_tokenizer or "default", "quants": QUANTS,
                 "imatrix": {"chunks": 4, "ctx": 128}},
        "eval": {"n_prompts": 16, "n_nll": 24, "max_new_tokens": 8, "speed_prompts": 1, "speed_repeats": 1},
        # a format the family cannot reach is refused at parse time, before training, and the rest
        # runs (REFUSED says which family that may be)
        "formats": {"on_unsupported": "skip"},
    })
    # One torchao and one ONNX quantizer besides the float graph: the 8-bit ones exercise no other
    # path per family (the default's torchao int8 and ONNX int8 are built by the smoke pipeline).
    cfg["torchao"]["schemes"] = ["int8-int4"]
    cfg["onnx"]["variants"] = {v: cfg["onnx"]["variants"][v] for v in ("fp32", "int4")}
    cfg["runs"] = {
        "baseline": {"qat_scheme": None},
        "qat-int8-int4": {"qat_scheme": "int8-int4", "qat": {"mode": "merged", "distill_from": "baseline"},
                          "train": {"lr": 1.0e-3, "max_steps": 2, "save_steps": 2}, "formats": "matched"},
        "qat-gguf-q4_0": {"qat_scheme": "gguf-q4_0", "qat": {"mode": "merged", "distill_from": "baseline"},
                          "train": {"lr": 1.0e-3, "max_steps": 2, "save_steps": 2}, "formats": "matched"},
    }
    return cfg


def family_project(name: str, replicas: Path, dest: Path) -> Path:
    work = copy_project(dest)
    data = work / "data" / "chat.jsonl"
    data.write_text("\n".join(data.read_text().splitlines()[:DATA_ROWS]) + "\n")
    write_config(work, family_config(read_config(work), name, replicas / name))
    return work


# Two families build at once, each on one core: a family's DAG alone keeps about 1.4 of the 2 cores
# busy (training waits for data, exports for the merge), so this fills both for the whole matrix.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="family-build")
_PENDING: dict[str, Future] = {}


@pytest.fixture(scope="module", autouse=True)
def _queued_builds_cancelled():
    """An interrupted session does not go on building the queued families at exit."""
    yield
    _POOL.shutdown(wait=False, cancel_futures=True)


def _selected_families(session) -> list[str]:
    """The families the selected tests of this module ask for, in FAMILIES order."""
    asked = {item.callspec.params["name"] for item in session.items
             if item.module is not None and item.module.__name__ == __name__
             and getattr(item, "callspec", None) is not None and "name" in item.callspec.params}
    return [n for n in FAMILIES if n in asked]


def built(name: str, replicas: Path, tmp_path_factory, request) -> Path:
    """The family's project, built once per session (every target). The first call queues the
    builds of every selected family, two at a time."""
    for fam in [*_selected_families(request.session), name]:
        if fam not in _PENDING:
            work = family_project(fam, replicas, tmp_path_factory.mktemp(f"family-{fam}") / "project")
            _PENDING[fam] = _POOL.submit(lambda w=work: (w, snakemake(w, "--cores", "1", check=False)))
    if name not in _BUILDS:
        work, proc = _PENDING[name].result()
        if proc.returncode != 0:
            _MATRIX[name] = {s: "fail" for s in STAGES}
            raise AssertionError(f"{name}: snakemake failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        _BUILDS[name] = work
    return _BUILDS[name]


def stage_cells(work: Path) -> dict[str, str]:
    """pass / fail per stage, read from the built files and the report."""
    res = work / "results"
    cfg = read_config(work)
    report = pl.read_csv(res / "report.csv")
    ok = lambda fmt: bool(report.filter(pl.col("format") == fmt)["parity_pass"].all())  # noqa: E731
    ggufs = ["BF16", *cfg["gguf"]["quants"]]
    have = {(r["format"], r["variant"]) for r in report.iter_rows(named=True)}
    cells = {
        "train": all((res / "runs" / r / "best.json").is_file() for r in cfg["runs"]),
        "merge": all((res / "runs" / r / "merged/export.json").is_file() for r in cfg["runs"]),
        "QAT convert": (res / "runs/qat-int8-int4/qat_converted").is_dir(),
        "GGUF QAT": ("gguf", "Q4_0") in have and ok("gguf") and None,  # the bytes are checked by their own test
        "GGUF": all(("gguf", q) in have for q in ggufs) and ok("gguf"),
        "TorchAO": all(("torchao", s) in have for s in cfg["torchao"]["schemes"]) and ok("torchao"),
        "ONNX": all(("onnx", v) in have for v in cfg["onnx"]["variants"]) and ok("onnx"),
        "Ollama": None,  # the Go check of the Modelfile runs in the token-id test
        "evaluate + parity": bool(report.filter(pl.col("parity_pass").is_not_null())["parity_pass"].all()),
        "report": (res / "parity.ok").is_file() and (res / "report.md").is_file(),
    }
    out = {k: "not checked" if v is None else "pass" if v else "fail" for k, v in cells.items()}
    from qatforge.spec import config as qcfg

    for fmt, reason in qcfg.skipped_formats(cfg, work).items():  # refused at parse time, before training
        out |= {stage: f"refused at parse time: {reason}" for stage, f in STAGE_FORMAT.items() if f == fmt}
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_runs_every_stage_with_parity(name, replicas, tmp_path_factory, request):
    work = built(name, replicas, tmp_path_factory, request)
    from qatforge.spec import config as qcfg

    report = pl.read_csv(work / "results" / "report.csv")
    got = {(r["run"], r["format"], r["variant"]) for r in report.iter_rows(named=True)}
    assert got == set(qcfg.artifacts(read_config(work)))
    failing = report.filter(pl.col("parity_pass") == False)  # noqa: E712
    assert failing.height == 0, failing.select("run", "format", "variant", "failures")
    _MATRIX[name] = stage_cells(work)
    skipped = qcfg.skipped_formats(read_config(work), work)
    assert set(skipped) == set(REFUSED.get(name, {})), skipped
    for fmt, words in REFUSED.get(name, {}).items():
        assert words in skipped[fmt], skipped[fmt]
    assert {v for v in _MATRIX[name].values() if not v.startswith("refused")} == {"pass", "not checked"}, _MATRIX[name]


def _quantized_rows(data, n_rows: int) -> list[bytes]:
    """A quantized GGUF tensor's rows (blocks never cross a row), sorted: the converter may reorder
    the rows of a tensor (Llama's q/k permutation), never their contents."""
    import numpy as np

    raw = np.ascontiguousarray(data).view(np.uint8).reshape(n_rows, -1)
    return sorted(r.tobytes() for r in raw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gguf_qat_file_holds_exactly_what_it_trained(name, replicas, tmp_path_factory, request):
    """The qat-gguf-q4_0 file (llama.cpp's QAT mix: Q4_0 projections, Q8_0 token embedding and
    output) holds, tensor for tensor, gguf-py's Q4_0/Q8_0 quantization of the merged weights the run
    trained under those types (tied or untied); the base was checked before training."""
    import json

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, MODEL_ARCH_NAMES, get_tensor_name_map, quants
    from safetensors import safe_open

    from qatforge.io import read_json

    work = built(name, replicas, tmp_path_factory, request)
    run = work / "results/runs/qat-gguf-q4_0"
    gguf_file = next((run / "gguf").glob("*-Q4_0.gguf"))
    trained = read_json(gguf_file.with_name(gguf_file.name + ".json"))["provenance"]["qat_tensor_types"]["trained"]
    assert set(trained.values()) == {"Q4_0", "Q8_0"} and trained["token_embd.weight"] == "Q8_0"
    tied = FAMILIES[name].tied
    assert ("output.weight" in trained) is not tied
    check = read_json(work / "results/checks/gguf.json")  # the same verdict, before training
    assert check["qat_tensor_types"]["qat-gguf-q4_0"]["trained"] == trained

    reader = GGUFReader(str(gguf_file))
    arch = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), n_blocks)
    hf = {}
    with safe_open(str(run / "merged/model.safetensors"), "pt") as f:
        for key in f.keys():
            g = names.get_name(key, try_suffixes=(".weight",))
            if g is not None:
                hf[g] = f.get_tensor(key)
    tensors = {t.name: t for t in reader.tensors}
    for tname, qtype in trained.items():
        t = tensors[tname]
        assert t.tensor_type.name == qtype, tname
        w = hf[tname].float().numpy()  # merge stores bf16: exactly what the BF16 GGUF holds
        ref = quants.quantize(w, GGMLQuantizationType[qtype])
        assert _quantized_rows(t.data, w.shape[0]) == _quantized_rows(ref, w.shape[0]), f"{name}: {tname}"
    if name in _MATRIX:
        _MATRIX[name]["GGUF QAT"] = "pass"
    print(json.dumps({"family": name, "trained": len(trained)}))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_token_ids_agree_across_hf_llamacpp_onnxruntime_and_ollama(name, replicas, tmp_path_factory, request):
    """One BOS (or none) and identical ids in all four runtimes, on the family's test prompts."""
    import llama_cpp

    from qatforge.chat import bos_policy, prompt_ids, strip_bos_text
    from qatforge.evaluate.gguf import LlamaCppRuntime
    from qatforge.evaluate.onnx import OnnxRuntime
    from qatforge.export.ollama import check_modelfile_template, parse_modelfile, render_go_templates
    from qatforge.model import load_tokenizer

    work = built(name, replicas, tmp_path_factory, request)
    res = work / "results/runs/baseline"
    tok = load_tokenizer(res / "merged")
    test = pl.read_parquet(work / "results/data/test.parquet")
    prompts = []
    for row in test.head(16).iter_rows(named=True):
        msgs = [dict(m) for m in row["messages"]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
    hf = [prompt_ids(tok, p) for p in prompts]
    policy = bos_policy(tok)
    if tok.bos_token_id is not None:  # one leading BOS when the family uses one, never two
        assert all((ids[0] == tok.bos_token_id) == policy["add_bos"] for ids in hf)
        assert all(ids[:2] != [tok.bos_token_id] * 2 for ids in hf)
        for p, ids in zip(prompts, hf):  # and any other only where the template writes one (Llama-2's [INST] turns)
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            assert ids.count(tok.bos_token_id) == max(int(policy["add_bos"]), text.count(tok.bos_token))

    gguf_file = next((res / "gguf").glob("*-Q4_K_M.gguf"))
    gg = LlamaCppRuntime(gguf_file, n_ctx=512, threads=1)
    assert [gg.prompt_ids(p) for p in prompts] == hf
    if "onnx" not in REFUSED.get(name, {}):
        ort = OnnxRuntime(res / "onnx/fp32", threads=1)
        assert [ort.prompt_ids(p) for p in prompts] == hf

    modelfile = parse_modelfile(res / "gguf/Modelfile")
    assert modelfile["from"] == f"./{gguf_file.name}"
    check_modelfile_template(modelfile["template"], tok, [list(p) for p in prompts])
    texts = render_go_templates([(modelfile["template"], p) for p in prompts])
    if policy["template_bos"]:  # the leading BOS is Ollama's to add (Llama-2's later <s> turns stay)
        assert not any(t.startswith(tok.bos_token) for t in texts)
    vocab = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:  # Ollama tokenizes the rendered TEMPLATE with the GGUF's own add_bos
        ollama = [list(vocab.tokenize(t.encode(), add_bos=gg.add_bos, special=True)) for t in texts]
    finally:
        vocab.close()
    assert ollama == hf
    assert [strip_bos_text(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), tok.bos_token)
            if policy["template_bos"] else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts] == texts
    if name in _MATRIX:  # the Modelfile renders like HF in Go and tokenizes like the other three
        _MATRIX[name]["Ollama"] = "pass"


def test_converter_needing_tokenizer_model_is_refused_before_training(replicas, tmp_path):
    """Phi-3 without its tokenizer.model: refused at parse time, naming the architecture and file."""
    base = tmp_path / "phi3-no-spm"
    shutil.copytree(replicas / "phi3", base)
    (base / "tokenizer.model").unlink()
    work = family_project("phi3", replicas, tmp_path / "project")
    cfg = read_config(work)
    cfg["model"]["base"] = str(base)
    cfg["formats"]["on_unsupported"] = "error"
    write_config(work, cfg)
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Phi3ForCausalLM" in out and "tokenizer.model" in out, out[-3000:]
    line = next(line for line in out.splitlines() if "no gguf export" in line)
    reason = line.split("no gguf export: ", 1)[1].split(" (formats.on_unsupported", 1)[0]
    _MATRIX["phi3, no tokenizer.model"] = {s: "refused" for s in STAGES} | {"GGUF": f"refused at parse time: {reason}"}


def matrix_table(matrix: dict[str, dict[str, str]]) -> str:
    head = "| family | replica | " + " | ".join(STAGES) + " |"
    rows = [head, "|" + "---|" * (len(STAGES) + 2)]
    for name, cells in matrix.items():
        note = FAMILIES[name].note if name in FAMILIES else "the phi3 replica without tokenizer.model"
        rows.append(f"| {name} | {note} | " + " | ".join(cells[s] for s in STAGES) + " |")
    return "\n".join(rows) + "\n"


def test_readme_supported_families_table_is_the_matrix():
    missing = [n for n in FAMILIES if n not in _MATRIX]
    if missing:
        pytest.skip(f"the matrix is incomplete (not run: {missing}); run the whole module")
    order = [*FAMILIES, *(k for k in _MATRIX if k not in FAMILIES)]
    table = matrix_table({k: _MATRIX[k] for k in order})
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(table)
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    assert readme[start:end].strip() == table.strip(), f"README's family table is stale; the matrix is in {TABLE}"
