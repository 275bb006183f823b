"""Ollama Modelfile: Go-template translation of the chat template, checked by Go's own text/template."""

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
CONVERSATIONS = [  # with and without a system message, multi-turn, a "{{" in the content
    CONVERSATION + [{"role": "assistant", "content": "42 {{ .Content }}"}, {"role": "user", "content": "Thanks"}],
    CONVERSATION[1:],
    [{"role": "system", "content": ""}, *CONVERSATION[1:3]],
]
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA3 = (  # Gemma-3's shape: BOS, system folded into the first user turn, strict alternation, "model"
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ first if loop.first else '' }}{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(merged))


def family_tokenizer(tokenizer, template: str, bos: str | None = None):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    if bos:
        tok.add_special_tokens({"bos_token": bos})
    return tok


def hf(tok, msgs, strip: str = "") -> str:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith(strip)
    return text[len(strip):]


def test_modelfile_template_renders_like_hf_chat_template(merged, tokenizer, tmp_path):
    out = tmp_path / "Modelfile"
    info = ollama.modelfile(merged, "TinyQwen3-Q4_K_M.gguf", out)
    parsed = ollama.parse_modelfile(out)
    assert parsed["from"] == "./TinyQwen3-Q4_K_M.gguf"
    assert parsed["template"] == info["template"]
    assert info["template_bos_stripped"] is False and "BOS" not in out.read_text()
    assert parsed["template"].startswith("{{ range .Messages }}<|im_start|>{{ .Role }}")
    for n in (2, 3, 4):  # system/user, +assistant, +user; all with the generation prompt
        msgs = CONVERSATION[:n]
        assert ollama.render_go_template(parsed["template"], msgs) == hf(tokenizer, msgs)
    assert ollama.render_ollama_template(parsed["template"], CONVERSATION[1:]) == hf(tokenizer, CONVERSATION[1:])
    assert ollama.check_modelfile_template(parsed["template"], tokenizer, CONVERSATIONS) == 3 + 2 + 1


def test_stop_tokens_come_from_eos(merged, tokenizer, tmp_path):
    info = ollama.modelfile(merged, "m.gguf", tmp_path / "Modelfile")
    assert info["stop"][0] == tokenizer.eos_token == "<|im_end|>"
    assert ollama.parse_modelfile(tmp_path / "Modelfile")["parameters"]["stop"] == info["stop"]
    assert tokenizer.pad_token not in info["stop"]  # <|endoftext|> is only padding here


def test_per_role_template_is_translated_with_branches(tokenizer):
    tok = family_tokenizer(tokenizer, (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]\n"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}<|im_end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %} {% endif %}"
    ))
    template = ollama.translate_chat_template(tok)
    assert 'eq .Role "system"' in template and 'else if eq .Role "user"' in template
    for msgs in (CONVERSATION, CONVERSATION[1:]):
        assert ollama.render_go_template(template, msgs) == hf(tok, msgs)
    ollama.check_modelfile_template(template, tok, CONVERSATIONS)


def test_template_with_default_system_prompt_is_refused(tokenizer):
    tok = family_tokenizer(tokenizer, (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ))
    with pytest.raises(ollama.TemplateError, match="per-message wrapper"):
        ollama.translate_chat_template(tok)


def test_llama3_bos_in_template_is_left_to_the_runtime(tokenizer, tmp_path):
    bos = "<|begin_of_text|>"
    tok = family_tokenizer(tokenizer, LLAMA3, bos)
    assert ollama.template_bos_text(tok) == bos and ollama.template_bos_text(tokenizer) is None
    template = ollama.translate_chat_template(tok)
    assert bos not in template and "{{ .Role }}" in template
    for msgs in CONVERSATIONS:
        assert ollama.render_go_template(template, msgs) == hf(tok, msgs, bos)
    assert ollama.check_modelfile_template(template, tok, CONVERSATIONS) == 6
    tok.save_pretrained(tmp_path / "tok")
    info = ollama.modelfile(tmp_path / "tok", "m.gguf", tmp_path / "Modelfile")
    assert info["template"] == template and info["template_bos_stripped"] is True
    assert f"# The chat template's leading BOS {bos} is not in TEMPLATE" in (tmp_path / "Modelfile").read_text()


def test_gemma3_system_is_folded_into_the_first_user_turn(tokenizer):
    tok = family_tokenizer(tokenizer, GEMMA3, "<bos>")
    assert tok.apply_chat_template([{"role": "system", "content": "S"}], tokenize=False) == "<bos>"
    template = ollama.translate_chat_template(tok)
    assert "<bos>" not in template and "$sys" in template
    convs = CONVERSATIONS + [CONVERSATION[1:] + [{"role": "assistant", "content": "x {{ y }}"}, CONVERSATION[1]]]
    for msgs in convs:
        assert ollama.render_go_template(template, msgs) == hf(tok, msgs, "<bos>")
    want = "<start_of_turn>user\nYou are a careful assistant.\n\nWhat is 17 + 25?<end_of_turn>\n<start_of_turn>model\n"
    assert ollama.render_go_template(template, CONVERSATION[:2]) == want
    assert ollama.check_modelfile_template(template, tok, convs) == 3 + 2 + 1 + 3


def test_fold_with_text_before_the_system_message(tokenizer):
    tok = family_tokenizer(tokenizer, (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% if m['role'] == 'user' %}[INST] {{ sys if loop.first else '' }}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
    ))
    template = ollama.translate_chat_template(tok)
    assert "[INST] {{ if $fold }}<<SYS>>\n{{ $sys }}\n<</SYS>>\n\n" in template
    assert ollama.check_modelfile_template(template, tok, CONVERSATIONS) == 6


def test_phi3_compact_template(tokenizer):
    tok = family_tokenizer(tokenizer, PHI3)
    template = ollama.translate_chat_template(tok)
    assert template == (
        "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    )
    assert ollama.check_modelfile_template(template, tok, CONVERSATIONS) == 6


def test_mismatch_is_reported(tokenizer):
    tok = family_tokenizer(tokenizer, PHI3)
    with pytest.raises(ollama.TemplateError, match="Go renders"):
        ollama.check_modelfile_template("{{ range .Messages }}{{ .Content }}{{ end }}", tok, CONVERSATIONS)


def test_go_renderer():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    t = ('{{- range .Messages }}\n  {{ if eq .Role "user" }}U:{{ .Content }}{{ else }}A:{{ .Content }}{{ end }}'
         '\n{{- end }} {{ "{{" }}')
    assert ollama.render_go_template(t, msgs) == "\n  U:hi\n  A:yo {{"
    assert ollama.render_go_templates([
        ('{{ range .Messages }}{{ if ne .Role "user" }}{{ .Role }}{{ end }}{{ end }}', msgs),
        ("{{ len .Messages }}{{ .System }}{{ .Prompt }}{{ .Response }}", msgs),
        ("{{ range .Messages }}{{ end }}", []),
    ]) == ["assistant", "2", ""]
    with pytest.raises(ollama.TemplateError, match="unexpected EOF"):  # Go's parse error
        ollama.render_go_template("{{ range .Messages }}x", msgs)
    with pytest.raises(ollama.TemplateError, match="can't evaluate field Tools"):  # Go's exec error
        ollama.render_go_template("{{ .Tools }}", msgs)


def test_missing_go_binary_names_make_install(monkeypatch, tmp_path):
    monkeypatch.setenv(ollama.GOTEMPLATE_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="make install"):
        ollama.render_go_template("x", [])


def test_gguf_filename_must_be_local(merged, tmp_path):
    with pytest.raises(ValueError, match="bare file name"):
        ollama.modelfile(merged, "../x.gguf", tmp_path / "Modelfile")
