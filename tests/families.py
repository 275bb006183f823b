"""Seeded local replicas of real model families, for the family matrix (tests/test_families.py).

Each replica is a small random-init checkpoint (2 layers, hidden 256) of the family's own
transformers config class, with a tokenizer trained here on the shipped dataset's text: byte-level
BPE for the tiktoken-style families, a SentencePiece ``tokenizer.model`` for the Llama-2/TinyLlama,
Gemma and Phi-3 styles. Each carries its family's special tokens and a chat template written in its
style (BOS in the template for Llama-3 and Gemma, added by the tokenizer for the SentencePiece Llama,
system folded into the first user turn for Gemma). As in the instruct checkpoints, Gemma's EOS is
``<eos>`` and Phi-3's ``<|endoftext|>``, with the turn end (``<end_of_turn>``, ``<|end|>``) listed
in generation_config. The 2026 families (Qwen3.5, Gemma 4, Ministral 3) are saved in their published
multimodal form, a *ForConditionalGeneration with a tiny random vision tower around the text model
(Qwen3.5 with its ``mtp.*`` tensors); the base stage extracts the text model
(``qatforge.base.write_text_model``). Nothing is downloaded; the same seed gives the same files.

    python tests/families.py OUT_DIR [FAMILY ...]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "chat.jsonl"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
VOCAB = 1024
WARMUP_STEPS, WARMUP_ROWS = 60, 1000

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (  # Mistral's Tekken tokenizer (llama.cpp's "tekken" pre-tokenizer)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
ZEPHYR = (  # TinyLlama-1.1B-Chat's style: plain-text role tags, BOS from the tokenizer
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
GEMMA3 = (  # Gemma-3's shape: BOS in the template, system folded into the first user turn, "model"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
LLAMA2 = (  # Llama-2-chat's shape: BOS text before each [INST], system folded into the first user turn
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
PHI3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
GEMMA4 = (  # Gemma-4's shape: BOS in the template, <|turn>role ... <turn|>, a native system turn, "model"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<|turn>' + role + '\\n' + message['content'] + '<turn|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|turn>model\\n' }}{%- endif %}"
)
MINISTRAL3 = (  # Ministral-3's shape: BOS in the template, [SYSTEM_PROMPT] block, [INST] turns, EOS after answers
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    """One replica: its config class and arguments, tokenizer kind, specials and template."""

    name: str
    config_class: str
    model_class: str
    tokenizer: str  # "bpe" (byte-level, tokenizer.json) or "spm" (SentencePiece tokenizer.model)
    template: str
    eos: str
    pad: str
    bos: str | None
    add_bos: bool
    specials: tuple[str, ...]  # special (control) tokens besides bos/eos/pad
    tied: bool
    pre_tokenizer: str | None = None  # the gguf.pre_tokenizer fallback a user sets for this style
    split: str | None = None
    legacy: bool = True  # SentencePiece: a "▁" after every special token (False: only at the text's start)
    config: dict = field(default_factory=dict)
    note: str = ""
    # The published multimodal form: the replica is saved as ``wrapper_model`` (a
    # *ForConditionalGeneration) whose ``text_config`` is ``config_class`` and whose vision tower is
    # ``vision`` (tiny, random); None: saved as ``model_class`` (the text CausalLM).
    wrapper_config: str | None = None
    wrapper_model: str | None = None
    vision: dict = field(default_factory=dict)
    wrapper_args: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "bpe", CHATML, "<|im_end|>", "<|endoftext|>", None, False,
           ("<|im_start|>",), tied=True, pre_tokenizer="qwen2", split=QWEN2_SPLIT,
           note="q/k/v biases, tied (Qwen2.5-0.5B)"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "bpe", CHATML, "<|im_end|>", "<|endoftext|>", None, False,
           ("<|im_start|>",), tied=True, pre_tokenizer="qwen2", split=QWEN2_SPLIT,
           config={"head_dim": HEAD_DIM}, note="q/k norms, tied (Qwen3-0.6B)"),
    Family("llama3", "LlamaConfig", "LlamaForCausalLM", "bpe", LLAMA3, "<|eot_id|>", "<|finetune_right_pad_id|>",
           "<|begin_of_text|>", True, ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
           tied=True, pre_tokenizer="llama-bpe", split=LLAMA3_SPLIT,
           note="BOS in the template, tied (Llama-3.2-1B)"),
    Family("llama-spm", "LlamaConfig", "LlamaForCausalLM", "spm", ZEPHYR, "</s>", "</s>", "<s>", True, (),
           tied=False, note="SentencePiece tokenizer.model, BOS added by the tokenizer (TinyLlama-Chat)"),
    Family("llama2-spm", "LlamaConfig", "LlamaForCausalLM", "spm", LLAMA2, "</s>", "</s>", "<s>", True, (),
           tied=False, legacy=False,
           note="SentencePiece with legacy: false, BOS text before [INST] (Llama-2-chat template)"),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "spm", GEMMA3, "<eos>", "<pad>", "<bos>", True,
           ("<start_of_turn>", "<end_of_turn>"), tied=True,
           config={"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 128},
           note="BOS in the template, SentencePiece, scaled embeddings, system folded into the user turn"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "spm", PHI3, "<|endoftext|>", "<|endoftext|>", "<s>", False,
           ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), tied=False,
           note="fused qkv_proj / gate_up_proj"),
    # The 2026 families, published as multimodal checkpoints: fine-tuned and exported as their text model.
    Family("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "bpe", CHATML, "<|im_end|>", "<|endoftext|>", None,
           False, ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
           tied=True, pre_tokenizer="qwen35", split=QWEN2_SPLIT,
           config={"head_dim": HEAD_DIM, "layer_types": ["linear_attention", "full_attention"],
                   "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 32,
                   "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "mtp_num_hidden_layers": 1,
                   "mtp_use_dedicated_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0,
                                       "partial_rotary_factor": 0.25, "mrope_section": [3, 3, 2],
                                       "mrope_interleaved": True}},
           wrapper_config="Qwen3_5Config", wrapper_model="Qwen3_5ForConditionalGeneration",
           vision={"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "out_hidden_size": HIDDEN, "num_position_embeddings": 64},
           wrapper_args={"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                         "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"},
           note="Gated-DeltaNet linear attention + gated full attention, MTP declared, tied, "
                "Qwen3_5ForConditionalGeneration with a vision tower (Qwen3.5-0.8B)"),
    Family("gemma4", "Gemma4TextConfig", "Gemma4ForCausalLM", "spm", GEMMA4, "<eos>", "<pad>", "<bos>", True,
           ("<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>"), tied=True,
           config={"head_dim": HEAD_DIM, "global_head_dim": 2 * HEAD_DIM, "sliding_window": 128,
                   "layer_types": ["sliding_attention", "full_attention"], "hidden_size_per_layer_input": 64,
                   "final_logit_softcapping": 30.0},
           wrapper_config="Gemma4Config", wrapper_model="Gemma4ForConditionalGeneration",
           vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 32, "position_embedding_size": 256},
           wrapper_args={"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                         "video_token_id": None, "boa_token_id": None, "eoa_token_index": None,
                         "audio_token_id": None},
           note="sliding + full attention (wider global heads), per-layer input embeddings, soft-capped "
                "logits, tied, Gemma4ForConditionalGeneration with a vision tower (Gemma-4-E2B)"),
    Family("ministral3", "Ministral3Config", "Ministral3ForCausalLM", "bpe", MINISTRAL3, "</s>", "<pad>", "<s>",
           True, ("<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"), tied=True,
           pre_tokenizer="tekken", split=TEKKEN_SPLIT,
           config={"head_dim": HEAD_DIM, "rope_parameters": {
               "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0, "original_max_position_embeddings": 1024,
               "max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0,
               "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
           wrapper_config="Mistral3Config", wrapper_model="Mistral3ForConditionalGeneration",
           vision={"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "head_dim": 32, "patch_size": 14, "image_size": 56},
           wrapper_args={"image_token_index": "[IMG]", "spatial_merge_size": 2},
           note="YaRN + Llama-4 attention scaling, Tekken BPE, BOS in the template, tied, "
                "Mistral3ForConditionalGeneration with a Pixtral tower (Ministral-3-3B)"),
)}


def conversations(limit: int = 3000) -> list[list[dict]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [r["messages"] for r in rows[:limit]]


def _texts(convs: Iterable[list[dict]]) -> Iterable[str]:
    for c in convs:
        for m in c:
            yield m["role"]
            yield m["content"]


def _bpe_tokenizer(fam: Family, convs: list[list[dict]]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (fam.bos, fam.eos, fam.pad, *fam.specials) if t]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC() if fam.name.startswith("qwen") else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(convs), trainer=trainer)
    if fam.bos and fam.add_bos:  # Llama-3's tokenizer.json prepends BOS in its post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
            special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
        additional_special_tokens=[t for t in fam.specials],
        model_input_names=["input_ids", "attention_mask"], chat_template=fam.template,
        clean_up_tokenization_spaces=False, padding_side="right", model_max_length=4096,
    )


def _spm_tokenizer(fam: Family, convs: list[list[dict]], work: Path) -> Any:
    import sentencepiece as spm
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    from jinja2 import Template

    corpus = work / "corpus.txt"  # rendered conversations, one line per line of text
    render = Template(fam.template).render
    lines = (render(messages=c, bos_token="", eos_token=fam.eos, add_generation_prompt=False) for c in convs)
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    gemma = fam.name.startswith("gemma")
    ids = ({"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3} if gemma
           else {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1})
    pieces = {"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>"} if gemma else {}
    # Gemma's turn tokens live in its tokenizer.model; Phi-3's are added tokens on top of it.
    user_defined = list(fam.specials) if gemma else []
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=not gemma,
        user_defined_symbols=user_defined, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2, **ids, **pieces,
    )
    from tokenizers import AddedToken

    cls = GemmaTokenizer if gemma else LlamaTokenizer
    # Llama-2/TinyLlama and Phi-3 tokenizer.json files are "legacy": a "▁" is always prepended, as
    # SentencePiece (and llama.cpp) do; Gemma adds no dummy prefix; with legacy: false only the text's
    # start gets one (none after a special token).
    # transformers 5 builds the (tokenizers-backed) tokenizer from a tokenizer.model only in
    # from_pretrained; constructing the class with vocab_file= gives an empty vocabulary.
    spm_dir = work / "spm"
    spm_dir.mkdir()
    shutil.copyfile(work / "spm.model", spm_dir / "tokenizer.model")
    slow = cls.from_pretrained(spm_dir, bos_token=fam.bos, eos_token="<eos>" if gemma else "</s>",
                               unk_token="<unk>", pad_token=fam.pad if gemma else None, add_bos_token=fam.add_bos,
                               add_eos_token=False, legacy=fam.legacy and not gemma, sp_model_kwargs={},
                               clean_up_tokenization_spaces=False)
    extra = [t for t in (fam.pad, fam.eos, *fam.specials) if t and t not in slow.get_vocab()]
    if extra:  # Phi-3's chat tokens and <|endoftext|> are added tokens on top of the SentencePiece vocab,
        # its role and end tokens with rstrip (the "\n" a template writes after them is dropped)
        slow.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, rstrip=t != "<|endoftext|>", lstrip=False, special=True, normalized=False) for t in extra]})
    slow_dir = work / "slow"
    slow.save_pretrained(slow_dir)
    fast = AutoTokenizer.from_pretrained(slow_dir, use_fast=True, from_slow=True, legacy=fam.legacy and not gemma)
    fast.eos_token, fast.pad_token = fam.eos, fam.pad
    fast.chat_template = fam.template
    fast.padding_side = "right"
    fast.model_max_length = 4096
    return fast


def _as_published(tok: Any, out_dir: Path, spm_model: Path | None, *, legacy_spm: bool) -> None:
    """The tokenizer files as the published checkpoints ship them (written by transformers 4), which
    transformers 5 no longer writes: tokenizer.model beside tokenizer.json, tokenizer_config.json
    with ``added_tokens_decoder`` and ``add_bos_token``, and for a legacy SentencePiece tokenizer
    (Llama-2/TinyLlama, Phi-3) the normalizer that prepends "▁" to every text between special
    tokens (transformers 5 converts to a Metaspace pre-tokenizer that skips texts starting with a
    space)."""
    from qatforge.chat import bos_policy

    if spm_model is not None:
        shutil.copyfile(spm_model, out_dir / "tokenizer.model")
    if legacy_spm:
        tj_path = out_dir / "tokenizer.json"
        tj = json.loads(tj_path.read_text())
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        tj["pre_tokenizer"] = None
        tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    added = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"]
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                       "single_word", "special")} for t in added}
    cfg["add_bos_token"] = bos_policy(tok)["add_bos"]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the ``name`` replica (config, safetensors, tokenizer files, template) to ``out_dir``."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from qatforge.chat import stop_ids
    from qatforge.tiny import warmup

    fam = FAMILIES[name]
    out_dir = Path(out_dir)
    convs = conversations()
    with tempfile.TemporaryDirectory() as work:
        tok = _bpe_tokenizer(fam, convs) if fam.tokenizer == "bpe" else _spm_tokenizer(fam, convs, Path(work))
        bos = tok.convert_tokens_to_ids(fam.bos) if fam.bos else None
        eos, pad = tok.convert_tokens_to_ids(fam.eos), tok.convert_tokens_to_ids(fam.pad)
        text_args = dict(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            max_position_embeddings=4096, tie_word_embeddings=fam.tied, bos_token_id=bos,
            eos_token_id=eos, pad_token_id=pad, torch_dtype="bfloat16",
        ) | fam.config
        if fam.name.startswith("gemma4"):  # the per-layer input embeddings cover the whole vocabulary
            text_args["vocab_size_per_layer_input"] = len(tok)
        cfg = getattr(transformers, fam.config_class)(**text_args)
        if fam.wrapper_config:  # the published form: the text model inside a *ForConditionalGeneration
            ids = {k: tok.convert_tokens_to_ids(v) if isinstance(v, str) else v for k, v in fam.wrapper_args.items()}
            cfg = getattr(transformers, fam.wrapper_config)(
                text_config=cfg.to_dict(), vision_config=dict(fam.vision), tie_word_embeddings=fam.tied,
                torch_dtype="bfloat16", **ids)
        torch.manual_seed(seed)
        model = getattr(transformers, fam.wrapper_model or fam.model_class)(cfg)
        # A short full-parameter warm-up, so that the replica predicts with some confidence as a
        # pretrained checkpoint does (a random init's flat logits turn quantization noise into
        # top-1 flips that say nothing about the export).
        warmup(model, tok, convs[:WARMUP_ROWS], steps=WARMUP_STEPS, batch_size=8, lr=3e-3, seed=seed, max_len=256)
        model = model.to(torch.bfloat16)
        # generation_config lists the template's turn end beside the EOS (Gemma-3-it and Phi-3 do)
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=stop_ids(tok), pad_token_id=pad,
                                                   do_sample=False)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        _as_published(tok, out_dir, Path(work) / "spm.model" if fam.tokenizer == "spm" else None,
                      legacy_spm=fam.tokenizer == "spm" and fam.legacy and not fam.name.startswith("gemma"))
    if getattr(cfg.get_text_config(), "mtp_num_hidden_layers", 0):
        _add_mtp_weights(out_dir, seed)
    return out_dir


def _add_mtp_weights(out_dir: Path, seed: int) -> None:
    """Qwen3.5's published checkpoints carry their multi-token-prediction block as ``mtp.*`` tensors
    (``mtp_num_hidden_layers`` in the text config), which transformers does not load: write them as
    the real files have them, a full-attention layer (a copy of the replica's) plus the fc that
    reads [embedding; hidden] and three norms."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    cfg = json.loads((out_dir / "config.json").read_text())["text_config"]
    full = cfg["layer_types"].index("full_attention")
    prefix = f"model.language_model.layers.{full}."
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = cfg["hidden_size"]
    for n in range(cfg["mtp_num_hidden_layers"]):
        for k, v in list(tensors.items()):
            if k.startswith(prefix):
                tensors[f"mtp.layers.{n}.{k[len(prefix):]}"] = v.clone()
    tensors["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen) * 0.02).to(torch.bfloat16)
    for norm in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        tensors[f"mtp.{norm}.weight"] = torch.zeros(hidden, dtype=torch.bfloat16)  # (1 + w) RMSNorm
    save_file(tensors, str(path), metadata=metadata)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for fam_name in sys.argv[2:] or FAMILIES:
        print(build(fam_name, Path(sys.argv[1]) / fam_name))
