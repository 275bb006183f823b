"""GGUF export with llama.cpp's vendored converter, quantizer and imatrix tool, on the tiny model."""

from __future__ import annotations

import json

import pytest
from export_helpers import parity_corpus, synthetic_conversations, tiny_checkpoint

from qatforge.export import gguf
from qatforge.io import read_json
from qatforge.spec.quant_types import check_quant

THREADS = 2


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(merged))


@pytest.fixture(scope="module")
def bf16(merged, hf_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "Tiny-BF16.gguf"
    info = gguf.convert(merged, out, outtype="bf16", pre_tokenizer="qwen2", model_name="Tiny",
                        parity_texts=parity_corpus(hf_tokenizer), source={"run": "test", "checkpoint": "tiny"})
    return out, info


@pytest.fixture(scope="module")
def q4_k_m(bf16):
    src, _ = bf16
    out = src.with_name("Tiny-Q4_K_M.gguf")
    return out, gguf.quantize(src, out, qtype="Q4_K_M", threads=THREADS, on_fallback="fail")


def _greedy(gguf_file, hf_tokenizer, n=6):
    import llama_cpp

    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                              add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=128, n_threads=THREADS, seed=0, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
    finally:
        llm.close()
    return out


def test_quant_names_match_llama_cpp_bindings():
    import llama_cpp
    from gguf import GGMLQuantizationType  # gguf-py (this module's `gguf` is qatforge.export.gguf)

    from qatforge.spec.quant_types import GGML_TYPES, NEEDS_IMATRIX, QUANT_FTYPES, QUANT_NAMES, TENSOR_TYPE_NAMES

    prefix = "LLAMA_FTYPE_MOSTLY_"
    ftypes = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    ftypes |= {k[len(prefix):]: int(getattr(llama_cpp, k)) for k in dir(llama_cpp) if k.startswith(prefix)}
    assert QUANT_FTYPES == ftypes
    bindings = {k[len("GGML_TYPE_"):]: int(getattr(llama_cpp, k)) for k in dir(llama_cpp)
                if k.startswith("GGML_TYPE_") and k != "GGML_TYPE_COUNT"}
    reader_enum = {t.name: t.value for t in GGMLQuantizationType}
    for name, value in GGML_TYPES.items():
        assert name in bindings or name in reader_enum, name
        assert bindings.get(name, value) == value and reader_enum.get(name, value) == value, name
    assert set(bindings) <= set(GGML_TYPES)
    assert {"Q4_K", "Q6_K", "Q8_0", "F16", "BF16"} <= set(TENSOR_TYPE_NAMES)
    assert "Q4_K_M" not in TENSOR_TYPE_NAMES and "Q8_K" not in TENSOR_TYPE_NAMES
    assert NEEDS_IMATRIX <= set(QUANT_NAMES)


def test_convert_applies_pre_tokenizer_and_records(bf16, merged, hf_tokenizer):
    out, info = bf16
    record = read_json(out.with_name(out.name + ".json"))
    prov = record["provenance"]
    assert prov == {k: v for k, v in info.items() if k not in ("size_bytes", "sha256")}
    # The locally trained tokenizer is unknown to llama.cpp: the configured fallback was used.
    assert prov["pre_tokenizer"] == {"pre_tokenizer": "qwen2", "recognized": False}
    assert prov["metadata"]["tokenizer.ggml.pre"] == "qwen2"
    assert prov["metadata"]["general.architecture"] == "qwen3"
    assert prov["metadata"]["tokenizer.ggml.eos_token_id"] == hf_tokenizer.eos_token_id
    assert prov["tokenizer_parity"]["n"] == prov["tokenizer_parity"]["identical"] > 60
    assert set(prov["tensor_types"]) == {"BF16", "F32"}
    assert prov["tool"]["llama_cpp_python"] == "0.3.36" and prov["tool"]["llama_cpp_commit"]
    assert prov["source"]["run"] == "test" and prov["source"]["checkpoint"] == "tiny"
    assert prov["source"]["merged_dir"] == str(merged) and len(prov["source"]["merged_sha256"]) == 64
    assert record["size_bytes"] == out.stat().st_size
    assert not list(out.parent.glob(".*tmp*"))  # atomic: no temp files left


def test_tokenizer_parity_hf_vs_llama_cpp(bf16, merged, hf_tokenizer):
    out, _ = bf16
    texts = parity_corpus(hf_tokenizer, n=150)
    res = gguf.tokenizer_parity(out, merged, texts)
    assert res["identical"] == res["n"] == len(texts), res["mismatches"]


def test_unrecognized_tokenizer_without_fallback_fails(merged, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError, match="BPE pre-tokenizer was not recognized"):
        gguf.convert(merged, out, pre_tokenizer=None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_q4_k_m_has_no_fallback_tensors(q4_k_m):
    out, info = q4_k_m
    hist = gguf.tensor_type_histogram(out)
    assert info["tensor_types"] == hist
    assert set(hist) == {"F32", "Q4_K", "Q6_K"}, hist
    assert info["fallbacks"] == [] and gguf.find_fallbacks(out, "Q4_K_M") == []
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["provenance"]["settings"]["type"] == "Q4_K_M"
    assert record["provenance"]["source"]["gguf"] == "Tiny-BF16.gguf"


def test_q8_0_loads_and_generates(bf16, hf_tokenizer):
    src, _ = bf16
    out = src.with_name("Tiny-Q8_0.gguf")
    info = gguf.quantize(src, out, qtype="Q8_0", threads=THREADS)
    assert set(info["tensor_types"]) == {"F32", "Q8_0"}
    res = _greedy(out, hf_tokenizer)
    assert res["usage"]["completion_tokens"] > 0


def test_bf16_logits_match_hf(bf16, merged, hf_tokenizer):
    """The converted model computes what the HF model computes (argmax and close logits)."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    src, _ = bf16
    text = hf_tokenizer.apply_chat_template(synthetic_conversations(2, seed=5)[1], tokenize=False)
    ids = hf_tokenizer(text)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(src), n_ctx=256, n_threads=THREADS, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert got.shape == ref.shape
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_unknown_quant_type_is_rejected_with_valid_list(bf16, tmp_path):
    src, _ = bf16
    with pytest.raises(ValueError, match=r"unknown llama.cpp quantization type 'Q4_K_X'.*Q4_K_M"):
        gguf.quantize(src, tmp_path / "x.gguf", qtype="Q4_K_X")
    with pytest.raises(ValueError, match="needs an importance matrix"):
        gguf.quantize(src, tmp_path / "x.gguf", qtype="IQ2_XXS")
    with pytest.raises(ValueError, match="unknown quantization option 'frobnicate'"):
        gguf.quantize(src, tmp_path / "x.gguf", qtype="Q8_0", options={"frobnicate": True})
    with pytest.raises(ValueError, match="unknown ggml tensor type 'Q4_K_M'"):
        gguf.quantize(src, tmp_path / "x.gguf", qtype="Q8_0", options={"output_tensor_type": "Q4_K_M"})
    assert not list(tmp_path.iterdir())


def test_per_quant_options_are_applied(bf16):
    src, _ = bf16
    out = src.with_name("Tiny-Q4_K_M-pure.gguf")
    info = gguf.quantize(src, out, qtype="Q4_K_M", threads=THREADS,
                         options={"pure": True, "output_tensor_type": "Q8_0", "token_embedding_type": "F16"})
    from gguf import GGUFReader  # the gguf-py package (this module's `gguf` is qatforge.export.gguf)

    by_name = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert by_name["output.weight"] == "Q8_0" and by_name["token_embd.weight"] == "F16"
    assert {v for k, v in by_name.items() if k.startswith("blk.") and k.endswith(".weight")} - {"F32"} == {"Q4_K"}
    assert info["settings"]["options"]["pure"] is True


def test_tensor_type_and_override_kv_reach_llama_quantize(bf16):
    src, _ = bf16
    out = src.with_name("Tiny-Q4_0-tt.gguf")
    options = {"tensor_type": {"attn_v": "Q8_0", "ffn_down": "Q6_K"},
               "override_kv": {"general.name": "Overridden", "qatforge.test_flag": True}}
    info = gguf.quantize(src, out, qtype="Q4_0", threads=THREADS, options=options)
    from gguf import GGUFReader

    by_name = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert {by_name[f"blk.{i}.attn_v.weight"] for i in (0, 1)} == {"Q8_0"}
    assert {by_name[f"blk.{i}.ffn_down.weight"] for i in (0, 1)} == {"Q6_K"}
    assert by_name["blk.0.attn_q.weight"] == "Q4_0"
    meta = gguf.gguf_metadata(out)
    assert meta["general.name"] == "Overridden" and meta["qatforge.test_flag"] is True
    assert info["settings"]["options"] == options
    with pytest.raises(ValueError, match="tensor_type"):
        check_quant("Q4_0", options={"tensor_type": {"attn_v": "Q4_K_M"}})
    with pytest.raises(ValueError, match="override_kv"):
        check_quant("Q4_0", options={"override_kv": {"general.name": ["a list"]}})


def test_quantize_command_spells_every_option_as_llama_quantize_does(tmp_path):
    options = {"pure": True, "leave_output_tensor": False, "allow_requantize": True, "output_tensor_type": "Q8_0",
               "token_embedding_type": "F16", "tensor_type": {"ffn_down": "Q6_K", "attn_v": "Q8_0"},
               "override_kv": {"general.name": "x", "a.flag": True, "a.n": 3, "a.f": 0.5}}
    cmd = gguf.quantize_command(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M", imatrix=tmp_path / "im.gguf",
                                options=options, threads=2)
    assert cmd[1:] == [
        "--pure", "--output-tensor-type", "Q8_0", "--token-embedding-type", "F16", "--allow-requantize",
        "--tensor-type", "attn_v=Q8_0", "--tensor-type", "ffn_down=Q6_K",
        "--override-kv", "a.f=float:0.5", "--override-kv", "a.flag=bool:true", "--override-kv", "a.n=int:3",
        "--override-kv", "general.name=str:x", "--imatrix", "im.gguf",
        str(tmp_path / "in.gguf"), str(tmp_path / "out.gguf"), "Q4_K_M", "2"]


def test_llama_quantize_is_byte_identical_to_the_bindings_quantizer(bf16, merged, tmp_path):
    """The tool path writes exactly what the former in-process ``llama_model_quantize`` call wrote."""
    from quantize_reference import quantize_with_bindings

    src, _ = bf16
    calib = tmp_path / "calibration.txt"
    gguf.write_calibration_text(synthetic_conversations(120, seed=5), merged, calib)
    im = tmp_path / "imatrix.gguf"
    gguf.imatrix(src, calib, im, chunks=2, ctx=64, threads=THREADS)
    for imatrix in (None, im):
        tool, ref = tmp_path / "tool-Q4_K_M.gguf", tmp_path / "ref-Q4_K_M.gguf"
        gguf.quantize(src, tool, qtype="Q4_K_M", imatrix=imatrix, threads=THREADS)
        quantize_with_bindings(src, ref, "Q4_K_M", imatrix=imatrix, threads=THREADS)
        assert tool.read_bytes() == ref.read_bytes(), f"imatrix={imatrix}"
        if imatrix is not None:
            meta = gguf.gguf_metadata(tool)
            assert meta["quantize.imatrix.file"] == "imatrix.gguf"
            assert meta["quantize.imatrix.dataset"] == "calibration.txt"  # path-independent


def test_iq4_xs_with_imatrix(bf16, merged, hf_tokenizer, tmp_path_factory):
    src, _ = bf16
    d = src.parent
    calib = d / "calibration.txt"
    stats = gguf.write_calibration_text(synthetic_conversations(200, seed=3), merged, calib)
    assert stats["conversations"] == 200
    im = gguf.imatrix(src, calib, d / "imatrix.gguf", chunks=4, ctx=64, threads=THREADS)
    assert im["entries"] >= 7 * 2  # every linear of both layers (output excluded by default)
    assert im["chunks_processed"] == 4 and im["perplexity"] > 1
    out = d / "Tiny-IQ4_XS.gguf"
    info = gguf.quantize(src, out, qtype="IQ4_XS", imatrix=d / "imatrix.gguf", threads=THREADS, on_fallback="fail")
    assert "IQ4_XS" in info["tensor_types"] and info["fallbacks"] == []
    assert info["settings"]["imatrix"]["entries"] == im["entries"]
    meta = gguf.gguf_metadata(out)
    assert meta["quantize.imatrix.file"] == "imatrix.gguf"
    assert meta["quantize.imatrix.entries_count"] == im["entries"]
    # The importance matrix changes the result.
    plain = d / "Tiny-IQ4_XS-noimatrix.gguf"
    gguf.quantize(src, plain, qtype="IQ4_XS", threads=THREADS)
    assert plain.read_bytes() != out.read_bytes()
    assert _greedy(out, hf_tokenizer)["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def odd_bf16(merged, tmp_path_factory):
    """A model whose MLP rows (384) do not fit 256-blocks: K-quants must fall back."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d = tmp_path_factory.mktemp("odd")
    cfg = json.loads((merged / "config.json").read_text())
    cfg.update(intermediate_size=384, num_hidden_layers=1)
    cfg.pop("layer_types", None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}))
    model.save_pretrained(d / "hf", safe_serialization=True)
    for f in merged.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, d / "hf" / f.name)
    out = d / "Odd-BF16.gguf"
    gguf.convert(d / "hf", out)
    return out


def test_fallbacks_warn_or_fail(odd_bf16):
    warn_out = odd_bf16.with_name("Odd-Q4_K_M.gguf")
    with pytest.warns(UserWarning, match="fell back"):
        info = gguf.quantize(odd_bf16, warn_out, qtype="Q4_K_M", threads=THREADS, on_fallback="warn")
    assert {f["tensor"] for f in info["fallbacks"]} == {"blk.0.ffn_down.weight"}
    fb = info["fallbacks"][0]
    assert (fb["wanted"], fb["type"]) in {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")} and fb["row_length"] == 384
    assert warn_out.is_file()
    fail_out = odd_bf16.with_name("Odd-Q5_K_M.gguf")
    with pytest.raises(gguf.FallbackError, match="ffn_down"):
        gguf.quantize(odd_bf16, fail_out, qtype="Q5_K_M", threads=THREADS, on_fallback="fail")
    assert not fail_out.exists() and not fail_out.with_name(fail_out.name + ".json").exists()


def test_missing_llama_cpp_tools_say_make_install(tmp_path, monkeypatch):
    from qatforge import llamacpp

    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make install"):
        llamacpp.find_converter()
    monkeypatch.setattr("sys.prefix", str(tmp_path))
    monkeypatch.setattr(llamacpp, "bindings_lib_dir", lambda: tmp_path / "lib")
    for tool in llamacpp.TOOLS:
        with pytest.raises(FileNotFoundError, match=f"{tool} not found.*make install"):
            llamacpp.find_tool(tool)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="make install"):
        gguf.convert(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_installed_layout_is_complete():
    from qatforge import llamacpp

    script = llamacpp.find_converter()
    assert (script.parent / "models" / "templates").is_dir()
    info = llamacpp.source_info()
    assert info["llama_cpp_python"] == "0.3.36" and info["llama_cpp_commit"] and info["ggml"]
    import subprocess

    lib = llamacpp.bindings_lib_dir()
    assert (lib / "libllama.so").is_file()  # the bindings load the library of the tools' build
    for tool in llamacpp.TOOLS:
        path = llamacpp.find_tool(tool)
        assert path.resolve() == (lib / tool).resolve()
        proc = subprocess.run([str(path), "--help"], capture_output=True, text=True)
        assert "usage" in (proc.stdout + proc.stderr).lower(), tool


def test_imatrix_from_training_parquet(bf16, tmp_path):
    import polars as pl

    src, _ = bf16
    train = tmp_path / "train.parquet"
    pl.DataFrame({"messages": synthetic_conversations(120, seed=9)}).write_parquet(train)
    out = tmp_path / "imatrix.gguf"
    info = gguf.imatrix_from_parquet(src, train, out, chunks=2, ctx=64, seed=1, threads=THREADS)
    assert out.is_file() and info["chunks_processed"] == 2
    assert info["source"]["conversations"] == 120 and len(info["source"]["calibration_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf", "imatrix.gguf.json", "train.parquet"]
