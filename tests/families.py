"""Seeded local replicas of real model families, for the family matrix (tests/test_families.py).

Each replica is a small random-init checkpoint (2 layers, hidden 256) of the family's own
transformers config class, with a tokenizer trained here on the shipped dataset's text: byte-level
BPE for the tiktoken-style families, a SentencePiece ``tokenizer.model`` for the Llama-2/TinyLlama,
Gemma and Phi-3 styles. Each carries its family's special tokens and a chat template written in its
style (BOS in the template for Llama-3 and Gemma, added by the tokenizer for the SentencePiece Llama,
system folded into the first user turn for Gemma). As in the instruct checkpoints, Gemma's EOS is
``<eos>`` and Phi-3's ``<|endoftext|>``, with the turn end (``<end_of_turn>``, ``<|end|>``) listed
in generation_config. Nothing is downloaded; the same seed gives the same files.

    python tests/families.py OUT_DIR [FAMILY ...]
"""

from __future__ import annotations

import json
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
    slow = cls(vocab_file=str(work / "spm.model"), bos_token=fam.bos, eos_token="<eos>" if gemma else "</s>",
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
        cfg = getattr(transformers, fam.config_class)(
            vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            max_position_embeddings=4096, tie_word_embeddings=fam.tied, bos_token_id=bos,
            eos_token_id=eos, pad_token_id=pad, torch_dtype="bfloat16", **fam.config,
        )
        torch.manual_seed(seed)
        model = getattr(transformers, fam.model_class)(cfg)
        # A short full-parameter warm-up, so that the replica predicts with some confidence as a
        # pretrained checkpoint does (a random init's flat logits turn quantization noise into
        # top-1 flips that say nothing about the export).
        warmup(model, tok, convs[:WARMUP_ROWS], steps=WARMUP_STEPS, batch_size=8, lr=3e-3, seed=seed, max_len=256)
        model = model.to(torch.bfloat16)
        # generation_config lists the template's turn end beside the EOS (Gemma-3-it and Phi-3 do)
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=stop_ids(tok), pad_token_id=pad,
                                                   do_sample=False)
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for fam_name in sys.argv[2:] or FAMILIES:
        print(build(fam_name, Path(sys.argv[1]) / fam_name))
