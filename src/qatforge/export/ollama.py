"""Ollama Modelfile next to the GGUF exports, with the HF chat template translated to Go-template syntax.

The translation targets per-message wrapper templates (ChatML and the like): the HF template is
rendered on probe conversations to learn each role's prefix/suffix and the generation prompt,
the result is re-checked against the HF template on a multi-turn conversation, and emitted as

    {{ range .Messages }}{{ if eq .Role "system" }}...{{ .Content }}...{{ else if ... }}{{ end }}{{ end }}<gen>

(or the compact ``<|im_start|>{{ .Role }}...`` form when all roles share one pattern). Templates
that are not of that shape (default system prompts, tool blocks, ...) are refused with a clear error.
``render_ollama_template`` is a small interpreter of exactly the Go-template subset emitted here,
used to verify the Modelfile renders the same prompt text as the HF template.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from qatforge.io import atomic_file, read_json

ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063QATFORGE\u2063"
EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class TemplateError(ValueError):
    """A chat template that cannot be translated, or Go-template text outside the supported subset."""


# --------------------------------------------------------------------------- HF -> Go template

def _wrappers(tokenizer: Any) -> tuple[dict[str, tuple[str, str]], str]:
    """Per-role (prefix, suffix) and the generation prompt of a per-message wrapper template."""
    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    wrappers = {}
    for role in ROLES:
        try:
            text = render([{"role": role, "content": _SENTINEL}], False)
        except Exception as e:  # a template may reject e.g. a lone assistant message
            raise TemplateError(f"chat template cannot render a single {role!r} message: {e}") from e
        if text.count(_SENTINEL) != 1:
            raise TemplateError(f"chat template does not render a {role!r} message's content exactly once")
        prefix, suffix = text.split(_SENTINEL)
        wrappers[role] = (prefix, suffix)
    user_only = render([{"role": "user", "content": _SENTINEL}], False)
    with_gen = render([{"role": "user", "content": _SENTINEL}], True)
    if not with_gen.startswith(user_only):
        raise TemplateError("the generation prompt is not appended after the conversation")
    return wrappers, with_gen[len(user_only):]


def _go_literal(text: str) -> str:
    """Template text that renders ``text`` verbatim (``{{`` is emitted through a string action)."""
    return text.replace("{{", '{{ "{{" }}')


def translate_chat_template(tokenizer: Any, check_messages: Sequence[Mapping[str, str]] | None = None) -> str:
    """Ollama Go-template equivalent of ``tokenizer``'s chat template (see the module docstring).

    Raises ``TemplateError`` when the HF template is not a per-message wrapper template or the
    translation does not reproduce it on ``check_messages`` (default: a 4-turn conversation).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("tokenizer has no chat template")
    wrappers, gen = _wrappers(tokenizer)
    shared = {}
    for role, (pre, suf) in wrappers.items():
        shared[role] = (pre.replace(role, "\0ROLE\0", 1) if pre.count(role) == 1 else None, suf)
    patterns = set(shared.values())
    if len(patterns) == 1 and None not in next(iter(patterns)):
        pre, suf = next(iter(patterns))
        a, b = pre.split("\0ROLE\0")
        body = f"{_go_literal(a)}{{{{ .Role }}}}{_go_literal(b)}{{{{ .Content }}}}{_go_literal(suf)}"
    else:
        parts = []
        for i, (role, (pre, suf)) in enumerate(wrappers.items()):
            kw = "if" if i == 0 else "else if"
            parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{_go_literal(pre)}{{{{ .Content }}}}{_go_literal(suf)}')
        body = "".join(parts) + "{{ end }}"
    template = f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{_go_literal(gen)}"
    msgs = list(check_messages or [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 * 6?\nAnswer briefly."},
    ])
    want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    got = render_ollama_template(template, msgs)
    if got != want:
        raise TemplateError(
            "the chat template is not a per-message wrapper template (e.g. it adds a default system "
            f"prompt or depends on message position); translated rendering {got!r} != HF {want!r}"
        )
    return template


def stop_tokens(tokenizer: Any, model_dir: str | os.PathLike | None = None) -> list[str]:
    """Stop strings: the tokenizer's EOS, generation_config EOS ids, and end-of-turn special tokens."""
    stops: list[str] = []

    def add(tok: str | None) -> None:
        if tok and tok not in stops:
            stops.append(tok)

    add(tokenizer.eos_token)
    gen_cfg = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen_cfg is not None and gen_cfg.is_file():
        ids = read_json(gen_cfg).get("eos_token_id")
        for i in ([ids] if isinstance(ids, int) else ids or []):
            add(tokenizer.convert_ids_to_tokens(int(i)))
    specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for name in EOT_NAMES:
        if name in specials and name != tokenizer.pad_token:
            add(name)
    return stops


def modelfile(
    tokenizer_dir: str | os.PathLike, gguf_filename: str, out_path: str | os.PathLike
) -> dict[str, Any]:
    """Write an Ollama Modelfile: ``FROM ./<gguf_filename>``, the translated TEMPLATE, stop PARAMETERs.

    ``gguf_filename`` is resolved relative to the Modelfile's directory (keep them side by side).
    Returns ``{"path", "from", "template", "stop"}``.
    """
    from transformers import AutoTokenizer

    if "/" in gguf_filename or "\\" in gguf_filename:
        raise ValueError(f"gguf_filename must be a bare file name next to the Modelfile, got {gguf_filename!r}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = translate_chat_template(tok)
    if '"""' in template:
        raise TemplateError('the translated template contains """ and cannot be quoted in a Modelfile')
    stops = stop_tokens(tok, tokenizer_dir)
    lines = [
        "# Generated by qatforge from the merged checkpoint's tokenizer and chat template.",
        f"FROM ./{gguf_filename}",
        f'TEMPLATE """{template}"""',
        *[f"PARAMETER stop {json.dumps(s)}" for s in stops],
    ]
    with atomic_file(out_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"path": str(out_path), "from": gguf_filename, "template": template, "stop": stops}


def parse_modelfile(path: str | os.PathLike) -> dict[str, Any]:
    """``{"from", "template", "parameters": {name: [values]}}`` of a Modelfile written by :func:`modelfile`."""
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, Any] = {"from": None, "template": None, "parameters": {}}
    m = re.search(r'^TEMPLATE """(.*?)"""', text, flags=re.S | re.M)
    if m:
        out["template"] = m.group(1)
        text = text[: m.start()] + text[m.end():]
    for line in text.splitlines():
        if line.startswith("FROM "):
            out["from"] = line[5:].strip()
        elif line.startswith("PARAMETER "):
            name, _, value = line[10:].partition(" ")
            value = value.strip()
            out["parameters"].setdefault(name, []).append(json.loads(value) if value.startswith('"') else value)
    return out


# --------------------------------------------------------------------------- Go-template subset interpreter

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\$?\.[A-Za-z_][A-Za-z0-9_]*)|(\.)|([A-Za-z_]+)')


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos].isspace():
            pos += 1
            continue
        m = _TOKEN.match(expr, pos)
        if not m:
            raise TemplateError(f"unsupported template expression {expr!r}")
        if m.group(1) is not None:
            out.append(("str", json.loads(f'"{m.group(1)}"')))
        elif m.group(2):
            out.append(("field", m.group(2)))
        elif m.group(3):
            out.append(("dot", "."))
        else:
            out.append(("ident", m.group(4)))
        pos = m.end()
    return out


def _value(tok: tuple[str, str], dot: Any, root: Mapping[str, Any]) -> Any:
    kind, v = tok
    if kind == "str":
        return v
    if kind == "dot":
        return dot
    if kind == "field":
        base, name = (root, v[2:]) if v.startswith("$.") else (dot, v[1:])
        if isinstance(base, Mapping) and name in base:
            return base[name]
        raise TemplateError(f"field {v} not found")
    raise TemplateError(f"unsupported identifier {v!r}")


def _eval(expr: str, dot: Any, root: Mapping[str, Any]) -> Any:
    toks = _tokens(expr)
    if not toks:
        raise TemplateError("empty template action")
    if toks[0][0] == "ident":
        fn, args = toks[0][1], [_value(t, dot, root) for t in toks[1:]]
        if fn == "eq" and len(args) >= 2:
            return any(args[0] == a for a in args[1:])
        if fn == "ne" and len(args) == 2:
            return args[0] != args[1]
        if fn == "not" and len(args) == 1:
            return not args[0]
        raise TemplateError(f"unsupported template function {fn!r} in {expr!r}")
    if len(toks) != 1:
        raise TemplateError(f"unsupported template pipeline {expr!r}")
    return _value(toks[0], dot, root)


def _lex(template: str) -> list[tuple[str, str]]:
    """Text and action items, with ``{{-`` / ``-}}`` whitespace trimming applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            items.append(("text", text))
        items.append(("action", m.group(2)))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        items.append(("text", text))
    return items


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str | None]:
    """Nodes until one of the ``stop`` keywords (returned with the index after it)."""
    nodes: list = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i, val
        if word == "range":
            body, i, end = _parse(items, i + 1, ("end",))
            if end != "end":
                raise TemplateError("unterminated {{ range }}")
            nodes.append(("range", val[len("range"):].strip(), body))
            i += 1
        elif word == "if":
            branches, cond = [], val[len("if"):].strip()
            while True:
                body, i, end = _parse(items, i + 1, ("else", "end"))
                if end is None:
                    raise TemplateError("unterminated {{ if }}")
                branches.append((cond, body))
                if end == "end":
                    break
                rest = end[len("else"):].strip()
                if rest.startswith("if "):
                    cond = rest[3:].strip()
                elif rest == "":
                    cond = None
                else:
                    raise TemplateError(f"unsupported {{{{ {end} }}}}")
            nodes.append(("if", branches))
            i += 1
        elif word in ("end", "else"):
            raise TemplateError(f"unexpected {{{{ {val} }}}}")
        elif val.startswith("/*"):
            i += 1
        else:
            nodes.append(("expr", val))
            i += 1
    return nodes, i, None


def _exec(nodes: list, dot: Any, root: Mapping[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            v = _eval(node[1], dot, root)
            out.append("" if v is None else str(v))
        elif node[0] == "range":
            seq = _eval(node[1], dot, root)
            for item in seq or []:
                _exec(node[2], item, root, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _eval(cond, dot, root):
                    _exec(body, dot, root, out)
                    break


def render_ollama_template(template_text: str, messages: Sequence[Mapping[str, str]]) -> str:
    """Render a Go template of the emitted subset (range/if/else if/else/end, eq/ne/not, fields,
    string literals, ``{{-``/``-}}`` trimming) with Ollama's data: ``.Messages`` of ``.Role``/``.Content``."""
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    nodes, i, end = _parse(_lex(template_text), 0, ())
    if end is not None:
        raise TemplateError(f"unexpected {{{{ {end} }}}}")
    out: list[str] = []
    _exec(nodes, root, root, out)
    return "".join(out)
