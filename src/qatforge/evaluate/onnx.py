"""Evaluation of an ONNX export with onnxruntime directly (no torch, no transformers).

The prompt is rendered from the directory's own chat template with jinja2 (the same sandboxed
settings transformers uses: trim_blocks, lstrip_blocks, loopcontrols) and tokenized with
``tokenizers``; decoding feeds input_ids / attention_mask / position_ids and the state (the KV
cache ``past_key_values.N.key|value`` → ``present.N.key|value``, and a hybrid model's recurrent
``past.N.conv|recurrent`` → ``present.N.…``), starting from an empty cache and zero state.
Speed is measured on the deployment path instead: ``onnxruntime_genai``'s ``Generator`` on the
folder (:class:`GenAIRuntime`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


PAST_PREFIXES = ("past_key_values.", "past.")


def present_name(past: str) -> str:
    """The output that carries an input state forward: past_key_values.N.key -> present.N.key,
    past.N.conv -> present.N.conv."""
    for prefix in PAST_PREFIXES:
        if past.startswith(prefix):
            return "present." + past[len(prefix):]
    raise ValueError(f"{past!r} is not a state input")


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def find_onnx_file(model_dir: Path) -> Path:
    """The model file of an export directory: the only ``*.onnx``, else ``model.onnx``."""
    files = sorted(model_dir.glob("*.onnx"))
    if len(files) == 1:
        return files[0]
    for name in ("model.onnx", "model_quantized.onnx"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir}: expected one .onnx model file, found {[f.name for f in files] or 'none'}"
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_chat_template(model_dir: Path) -> str:
    """The chat template saved with the tokenizer (``chat_template.jinja`` or tokenizer_config)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: use "default"
        tmpl = {t["name"]: t["template"] for t in tmpl}.get("default")
    if not tmpl:
        raise ValueError(f"{model_dir}: no chat template (chat_template.jinja / tokenizer_config.json)")
    return tmpl


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool, **special: Any) -> str:
    """Render a HF chat template with jinja2 in a sandbox, as ``apply_chat_template`` does."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template error: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special
    )


class FolderTokenizer:
    """The tokenizer side of an ONNX Runtime GenAI folder: its chat template rendered with jinja2 and
    its ``tokenizer.json`` with ``tokenizers`` (no transformers), with the BOS rule the merged
    checkpoint recorded (``qatforge.chat.bos_policy``)."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise NotADirectoryError(f"ONNX artifact {self.dir} is not a directory")
        tok_file = self.dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{self.dir}: tokenizer.json missing (the export must carry its tokenizer)")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        cfg_p = self.dir / "tokenizer_config.json"
        self.tok_cfg = json.loads(cfg_p.read_text()) if cfg_p.is_file() else {}
        self.template = load_chat_template(self.dir)
        self.special_tokens = {
            k: _token_text(self.tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.bos_id = self._token_id(self.special_tokens["bos_token"])
        self.add_bos = bool(self.tok_cfg.get("add_bos_token", False)) and self.bos_id is not None
        genai = self.dir / "genai_config.json"
        self.genai_config = json.loads(genai.read_text()) if genai.is_file() else {}
        self.head_size = int(self.genai_config.get("model", {}).get("decoder", {}).get("head_size", 0))

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        text = render_chat(
            self.template, messages, True, **{k: v for k, v in self.special_tokens.items() if v is not None}
        )
        # As HF does (chat.encode): the template's BOS text, if any, is parsed as the BOS token (so a
        # tokenizer that prefixes only a text's start sees no start after it), and one is prepended
        # when the template wrote none.
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return [self.bos_id, *ids] if self.add_bos and ids and ids[0] != self.bos_id else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def special_ids(self) -> dict[str, Any]:
        return {
            "bos_token_id": self.bos_id,
            "eos_token_id": self._token_id(self.special_tokens["eos_token"]),
            "add_bos": self.add_bos,
            "chat_template": self.template,
        }


class OnnxRuntime(FolderTokenizer):
    """The folder's ``model.onnx`` in an onnxruntime ``InferenceSession`` on CPU: logits at every
    position, and greedy decoding through the KV cache, for parity."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1):
        import onnxruntime as ort

        super().__init__(model_dir)
        self.onnx_file = find_onnx_file(self.dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session_options = so
        self.session = ort.InferenceSession(str(self.onnx_file), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # the KV cache (past_key_values.N.key|value) and, in hybrid models, recurrent state
        # (Qwen3.5's linear-attention layers: past.N.conv, past.N.recurrent)
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIXES)]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise ValueError(f"{self.onnx_file}: not a causal-LM export (inputs {list(self.inputs)})")
        for n in self.past_names:
            present = present_name(n)
            if present not in self.output_names:
                raise ValueError(f"{self.onnx_file}: input {n} has no matching output {present}")

    # --- model side -----------------------------------------------------------------------
    def _empty_past(self) -> dict[str, np.ndarray]:
        past = {}
        for n in self.past_names:
            meta = self.inputs[n]
            # batch 1, no past positions; the builder leaves the KV head size symbolic
            # ('kv_cache_dim'), which genai_config.json gives; a recurrent state has fixed sizes.
            shape = [1 if i == 0 else d if isinstance(d, int) else self.head_size if d == "kv_cache_dim" else 0
                     for i, d in enumerate(meta.shape)]
            past[n] = np.zeros(shape, dtype=_ORT_TYPES.get(meta.type, np.float32))
        return past

    def _step(self, ids: Sequence[int], past: dict[str, np.ndarray], n_past: int) -> tuple[np.ndarray, dict]:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, n_past + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            pos = np.arange(n_past, n_past + n, dtype=np.int64)[None, :]
            # multimodal RoPE (Qwen3.5: [3, batch, seq]): text positions are the same in all three rows
            feed["position_ids"] = np.broadcast_to(pos, (3, 1, n)).copy() if len(self.inputs["position_ids"].shape) == 3 else pos
        feed.update(past)
        outs = self.session.run(None, feed)
        named = dict(zip(self.output_names, outs))
        new_past = {n_: named[present_name(n_)] for n_ in self.past_names}
        return named["logits"][0], new_past

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._step(list(ids), self._empty_past(), 0)[0].astype(np.float32)

    def start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        logits, self._past = self._step(list(prompt_ids), self._empty_past(), 0)
        self._n_past = len(prompt_ids)
        return logits[-1]

    def advance(self, token: int) -> np.ndarray:
        logits, self._past = self._step([token], self._past, self._n_past)
        self._n_past += 1
        return logits[-1]


def open_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                 max_new_tokens: int) -> tuple[OnnxRuntime, dict[str, Any]]:
    """An ONNX export directory in onnxruntime (CPU)."""
    from qatforge.io import package_versions

    rt = OnnxRuntime(artifact_path, threads=threads)
    return rt, {"runtime": "onnxruntime", "onnx_file": rt.onnx_file.name,
                "runtime_versions": package_versions("onnxruntime", "tokenizers", "jinja2")}


class GenAIRuntime(FolderTokenizer):
    """The deployment path: ``onnxruntime_genai``'s ``Generator`` on the folder, greedy, with the
    folder's own ``genai_config.json`` but the thread count. Only timed generation (speed)."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1):
        import onnxruntime_genai as og

        super().__init__(model_dir)
        self._og = og
        cfg = og.Config(str(self.dir))
        self.overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        cfg.overlay(json.dumps(self.overlay))
        self.model = og.Model(cfg)

    def timed_generate(self, prompt: Sequence[int], max_new_tokens: int) -> tuple[float, float, int, int]:
        """(prompt_s, decode_s, prompt tokens, decode steps): ``append_tokens`` runs the prompt and
        gives the first token's logits; each later ``generate_next_token`` runs one decode step
        (the first only selects). EOS is ignored (``min_length``), as in ``run.speed``."""
        import time

        og = self._og
        total = len(prompt) + max_new_tokens
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        t1 = time.perf_counter()
        calls = 0
        while not gen.is_done():
            gen.generate_next_token()
            calls += 1
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, len(prompt), max(calls - 1, 0)


def open_speed_runtime(artifact_path: str | Path, ref: Any, *, format: str, threads: int,
                       max_new_tokens: int) -> tuple[GenAIRuntime, dict[str, Any]]:
    """``onnxruntime_genai``'s Generator on the folder, as it ships: the deployment runtime."""
    from qatforge.io import package_versions

    rt = GenAIRuntime(artifact_path, threads=threads)
    return rt, {"runtime": "onnxruntime-genai", "config_overlay": rt.overlay, "search": "greedy",
                "kv_cache": "past_present_share_buffer" if rt.genai_config.get("search", {}).get(
                    "past_present_share_buffer") else "separate",
                "runtime_versions": package_versions("onnxruntime-genai", "onnxruntime"),
                "timing": "wall clock (time.perf_counter) around append_tokens / generate_next_token"}
