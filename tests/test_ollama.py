"""Ollama Modelfile: Go-template translation of the chat template, parity with HF rendering, stops."""

from __future__ import annotations

import copy

import pytest
from export_helpers import tiny_checkpoint

from qatforge.export import ollama

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 17 + 25?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And {{ 6 }} times 7?\nOnly the number, please."},
]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(merged))


def test_modelfile_template_renders_like_hf_chat_template(merged, tokenizer, tmp_path):
    out = tmp_path / "Modelfile"
    info = ollama.modelfile(merged, "TinyQwen3-Q4_K_M.gguf", out)
    parsed = ollama.parse_modelfile(out)
    assert parsed["from"] == "./TinyQwen3-Q4_K_M.gguf"
    assert parsed["template"] == info["template"]
    assert "{{ range .Messages }}" in parsed["template"]
    for n in (2, 3, 4):  # system/user, +assistant, +user; all with the generation prompt
        msgs = CONVERSATION[:n]
        want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama.render_ollama_template(parsed["template"], msgs) == want
    # without a system prompt too
    want = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False, add_generation_prompt=True)
    assert ollama.render_ollama_template(parsed["template"], CONVERSATION[1:]) == want


def test_stop_tokens_come_from_eos(merged, tokenizer, tmp_path):
    info = ollama.modelfile(merged, "m.gguf", tmp_path / "Modelfile")
    assert info["stop"][0] == tokenizer.eos_token == "<|im_end|>"
    assert ollama.parse_modelfile(tmp_path / "Modelfile")["parameters"]["stop"] == info["stop"]
    assert tokenizer.pad_token not in info["stop"]  # <|endoftext|> is only padding here


def test_per_role_template_is_translated_with_branches(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]\n"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}<|im_end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %} {% endif %}"
    )
    template = ollama.translate_chat_template(tok)
    assert 'eq .Role "system"' in template and 'else if eq .Role "user"' in template
    for msgs in (CONVERSATION, CONVERSATION[1:]):
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama.render_ollama_template(template, msgs) == want


def test_template_with_default_system_prompt_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ollama.TemplateError, match="per-message wrapper"):
        ollama.translate_chat_template(tok)


def test_interpreter_subset():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    t = '{{- range .Messages }}\n  {{ if eq .Role "user" }}U:{{ .Content }}{{ else }}A:{{ .Content }}{{ end }}\n{{- end }} {{ "{{" }}'
    assert ollama.render_ollama_template(t, msgs) == "\n  U:hi\n  A:yo {{"
    assert ollama.render_ollama_template('{{ range .Messages }}{{ if ne .Role "user" }}{{ .Role }}{{ end }}{{ end }}', msgs) == "assistant"
    with pytest.raises(ollama.TemplateError):
        ollama.render_ollama_template("{{ range .Messages }}x", msgs)
    with pytest.raises(ollama.TemplateError):
        ollama.render_ollama_template("{{ len .Messages }}", msgs)


def test_gguf_filename_must_be_local(merged, tmp_path):
    with pytest.raises(ValueError, match="bare file name"):
        ollama.modelfile(merged, "../x.gguf", tmp_path / "Modelfile")
