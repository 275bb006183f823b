"""Ollama Modelfile next to the GGUF exports, with the HF chat template translated to a Go template.

Go's own ``text/template`` is the checker: ``tools/ollama_template/main.go`` (built by
``make install`` into ``<venv>/bin/qatforge-gotemplate``) executes a TEMPLATE with the data Ollama
gives it (``.Messages`` of ``.Role``/``.Content``; empty ``.System``/``.Prompt``/``.Response``), and
:func:`render_go_template` / :func:`render_go_templates` call it (Go's parse and exec errors raise
``TemplateError``). No Go-template text is interpreted in Python.

The translation targets per-message wrapper templates: the HF template is rendered on probe
conversations to learn the user and assistant (prefix, suffix), the generation prompt, and how a
leading system message is rendered, then emitted as

    {{ range .Messages }}{{ if eq .Role "system" }}...{{ .Content }}...{{ else if ... }}{{ end }}{{ end }}<gen>

or the compact ``<|im_start|>{{ .Role }}...`` form when all roles share one pattern (ChatML, Phi-3,
Llama-3). Two family shapes are handled on top:

- BOS rule: exactly one BOS, added by the runtime's tokenizer (llama.cpp / Ollama prepend it from
  the GGUF's ``tokenizer.ggml.add_bos_token``), never by template text. When the HF template writes
  ``tokenizer.bos_token`` first (Llama-3, Gemma; :func:`template_bos_text`), that leading BOS text
  is stripped from every HF rendering before the wrappers are derived and before comparing.
- Gemma fold: no system turn of its own; a system message is folded into the first user turn as
  ``<user prefix>{system}<sep>{user}<user suffix>`` (Gemma-3: ``sep`` is ``\\n\\n``; text before
  ``{system}`` is allowed too, e.g. Llama-2's ``<<SYS>>``), learnt from a [system, user] probe. The
  Go template keeps the system text in a variable (``$sys``) until the next user turn.

Every translation is verified by :func:`check_modelfile_template` (Go output == HF rendering on
each generation prompt of some conversations); other templates (default system prompts, tool
blocks, position-dependent turns) are refused with ``TemplateError``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qatforge.io import atomic_file, read_json

ROLES = ("system", "user", "assistant")
GOTEMPLATE_ENV = "QATFORGE_GOTEMPLATE"
EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
_S, _U, _A, _U2 = (f"\u2063QATFORGE-{k}\u2063" for k in ("S", "U", "A", "U2"))
CHECK_CONVERSATIONS = (
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And {{ 4 }} * 6?\nAnswer briefly."},
        {"role": "assistant", "content": "24"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
)
_REFUSED = ("the chat template is not a per-message wrapper template (e.g. it adds a default system "
            "prompt or depends on message position)")


class TemplateError(ValueError):
    """A chat template that cannot be translated, or a Go template that Go cannot parse or execute."""


# --------------------------------------------------------------------------- Go's text/template

def gotemplate_binary() -> Path:
    """The Go-template checker: ``$QATFORGE_GOTEMPLATE`` or ``<sys.prefix>/bin/qatforge-gotemplate``."""
    env = os.environ.get(GOTEMPLATE_ENV)
    path = Path(env) if env else Path(sys.prefix) / "bin" / "qatforge-gotemplate"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"Go-template checker {path} not found: run `make install` (tools/install_go_template.sh "
            f"builds tools/ollama_template/main.go) or set {GOTEMPLATE_ENV}"
        )
    return path


def render_go_templates(cases: Sequence[tuple[str, Sequence[Mapping[str, str]]]]) -> list[str]:
    """Render ``(template, messages)`` pairs with Go's text/template in one process call.

    Raises ``TemplateError`` with Go's message on the first case Go cannot parse or execute.
    """
    payload = {"cases": [
        {"template": t, "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
        for t, msgs in cases
    ]}
    proc = subprocess.run([str(gotemplate_binary())], input=json.dumps(payload), capture_output=True,
                          text=True, encoding="utf-8", check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"qatforge-gotemplate failed ({proc.returncode}): {proc.stderr.strip()}")
    out = []
    for r in json.loads(proc.stdout):
        if "error" in r:
            raise TemplateError(f"Go text/template: {r['error']}")
        out.append(r["output"])
    return out


def render_go_template(template: str, messages: Sequence[Mapping[str, str]]) -> str:
    """``template`` rendered by Go's text/template with Ollama's data for ``messages``."""
    return render_go_templates([(template, messages)])[0]


render_ollama_template = render_go_template  # the former name


# --------------------------------------------------------------------------- HF -> Go template

def template_bos_text(tokenizer: Any) -> str | None:
    """``tokenizer.bos_token`` if its chat template writes it first (Llama-3, Gemma), else None:
    :func:`qatforge.chat.bos_policy`, whose ``add_bos`` the GGUF carries for Ollama to add it."""
    from qatforge.chat import bos_policy

    policy = bos_policy(tokenizer)
    return policy["bos_token"] if policy["template_bos"] and policy["add_bos"] else None


def _hf(tokenizer: Any, messages: Sequence[Mapping[str, str]], gen: bool, bos: str | None) -> str:
    """HF rendering of ``messages`` minus the template's leading BOS text ``bos``."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
    if bos:
        if not text.startswith(bos):
            raise TemplateError(f"the chat template writes BOS {bos!r} on some renderings only: {text!r}")
        text = text[len(bos):]
    return text


def _split(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise TemplateError(f"chat template does not render a {what} message's content exactly once")
    pre, suf = text.split(sentinel)
    return pre, suf


def _wrappers(tokenizer: Any, bos: str | None) -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None, str]:
    """Per-role (prefix, suffix); the (prefix, separator) of a system message folded into the first
    user turn after the user prefix (Gemma; None: system is its own turn); the generation prompt."""
    def render(msgs: list[dict], gen: bool = False, what: str = "") -> str:
        try:
            return _hf(tokenizer, msgs, gen, bos)
        except TemplateError:
            raise
        except Exception as e:  # e.g. a template that rejects a system message
            raise TemplateError(f"chat template cannot render {what}: {e}") from e

    def msg(role: str, content: str) -> dict:
        return {"role": role, "content": content}

    u = render([msg("user", _U)], what="a single 'user' message")
    upre, usuf = _split(u, _U, "'user'")
    with_gen = render([msg("user", _U)], True, "a generation prompt")
    if not with_gen.startswith(u):
        raise TemplateError("the generation prompt is not appended after the conversation")
    # assistant: between two user turns, as in every checked prompt
    u2 = upre + _U2 + usuf
    t = render([msg("user", _U), msg("assistant", _A), msg("user", _U2)], what="a user/assistant/user conversation")
    if not (t.startswith(u) and t.endswith(u2) and len(t) >= len(u) + len(u2)):
        raise TemplateError(f"{_REFUSED}: user turns render differently by position: {t!r}")
    wrappers = {"assistant": _split(t[len(u):len(t) - len(u2)], _A, "'assistant'")}
    # system: its own turn before the user's, or folded into the first user turn (Gemma)
    t = render([msg("system", _S), msg("user", _U)], what="a system message before a user message")
    fold = None
    if t.endswith(u) and t[:-len(u)].count(_S) == 1:
        wrappers["system"] = _split(t[:-len(u)], _S, "'system'")
    elif t.startswith(upre) and t.endswith(_U + usuf) and t[len(upre):len(t) - len(_U + usuf)].count(_S) == 1:
        fold = _split(t[len(upre):len(t) - len(_U + usuf)], _S, "'system'")
    else:
        raise TemplateError(f"{_REFUSED}: a system message is neither its own turn nor folded into the "
                            f"first user turn: {t!r}")
    wrappers["user"] = (upre, usuf)
    return {r: wrappers[r] for r in ROLES if r in wrappers}, fold, with_gen[len(u):]


def _go_literal(text: str) -> str:
    """Template text that renders ``text`` verbatim (``{{`` and a trailing ``{`` go through string actions)."""
    out = text.replace("{{", '{{ "{{" }}')
    return out[:-1] + '{{ "{" }}' if out.endswith("{") else out


def _go_template(wrappers: dict[str, tuple[str, str]], fold: tuple[str, str] | None, gen: str) -> str:
    """The Go template of the derived wrappers (compact ``{{ .Role }}`` form when they share a pattern)."""
    lit = _go_literal
    shared = {(pre.replace(role, "\0ROLE\0", 1) if pre.count(role) == 1 else None, suf)
              for role, (pre, suf) in wrappers.items()}
    if fold is None and len(shared) == 1 and None not in next(iter(shared)):
        pre, suf = next(iter(shared))
        a, b = pre.split("\0ROLE\0")
        body = f"{lit(a)}{{{{ .Role }}}}{lit(b)}{{{{ .Content }}}}{lit(suf)}"
        return f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{lit(gen)}"
    parts, head = [], ""
    if fold is not None:
        head = '{{ $sys := "" }}{{ $fold := false }}'
        parts.append('{{ if eq .Role "system" }}{{ $sys = .Content }}{{ $fold = true }}')
    for role, (pre, suf) in wrappers.items():
        kw = "else if" if parts else "if"
        sys_text = "" if fold is None or role != "user" else (
            f"{{{{ if $fold }}}}{lit(fold[0])}{{{{ $sys }}}}{lit(fold[1])}{{{{ $fold = false }}}}{{{{ end }}}}")
        parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{lit(pre)}{sys_text}{{{{ .Content }}}}{lit(suf)}')
    return f"{head}{{{{ range .Messages }}}}{''.join(parts)}{{{{ end }}}}{{{{ end }}}}{lit(gen)}"


def check_modelfile_template(
    template: str, tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]]
) -> int:
    """Check that Go renders ``template`` like ``tokenizer``'s HF chat template; returns the prompt count.

    ``conversations`` is a list of conversations (lists of ``{"role", "content"}``). Every prefix
    ending before an assistant turn, and each whole conversation not ending with one, is a prompt:
    HF renders it with ``add_generation_prompt=True`` minus the leading BOS text
    (:func:`template_bos_text`), Go renders it as ``.Messages`` (all prompts in one process call).
    Raises ``TemplateError`` on the first mismatch (or Go's parse/exec error).
    """
    bos = template_bos_text(tokenizer)
    prompts = []
    for conv in conversations:
        conv = [{"role": m["role"], "content": m["content"]} for m in conv]
        ends = [i for i, m in enumerate(conv) if i > 0 and m["role"] == "assistant"]
        prompts += [conv[:i] for i in ends + ([len(conv)] if conv and conv[-1]["role"] != "assistant" else [])]
    wants = [_hf(tokenizer, p, True, bos) for p in prompts]
    for p, want, got in zip(prompts, wants, render_go_templates([(template, p) for p in prompts]), strict=True):
        if got != want:
            raise TemplateError(f"Go renders {got!r} != HF {want!r} (messages {p!r})")
    return len(prompts)


def translate_chat_template(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]] | None = None
) -> str:
    """Ollama Go-template equivalent of ``tokenizer``'s chat template (see the module docstring).

    The result never writes the template's leading BOS text. Raises ``TemplateError`` when the HF
    template is not of a supported shape or Go's rendering of the translation differs from HF on
    ``conversations`` (default :data:`CHECK_CONVERSATIONS`; a single conversation is accepted too).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("tokenizer has no chat template")
    template = _go_template(*_wrappers(tokenizer, template_bos_text(tokenizer)))
    convs = list(conversations or CHECK_CONVERSATIONS)
    if convs and isinstance(convs[0], Mapping):
        convs = [convs]
    try:
        check_modelfile_template(template, tokenizer, convs)
    except TemplateError as e:
        raise TemplateError(f"{_REFUSED}; translated template {template!r}: {e}") from e
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
    Returns ``{"path", "from", "template", "stop", "template_bos_stripped"}`` (the last: the HF
    template writes BOS, which the TEMPLATE leaves to the runtime's tokenizer).
    """
    from qatforge.model import auto_tokenizer

    if "/" in gguf_filename or "\\" in gguf_filename:
        raise ValueError(f"gguf_filename must be a bare file name next to the Modelfile, got {gguf_filename!r}")
    tok = auto_tokenizer(tokenizer_dir)
    template = translate_chat_template(tok)
    if '"""' in template:
        raise TemplateError('the translated template contains """ and cannot be quoted in a Modelfile')
    stops = stop_tokens(tok, tokenizer_dir)
    bos = template_bos_text(tok)
    lines = [
        "# Generated by qatforge from the merged checkpoint's tokenizer and chat template.",
        *([f"# The chat template's leading BOS {bos} is not in TEMPLATE: the runtime's tokenizer adds it."]
          if bos else []),
        f"FROM ./{gguf_filename}",
        f'TEMPLATE """{template}"""',
        *[f"PARAMETER stop {json.dumps(s)}" for s in stops],
    ]
    with atomic_file(out_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"path": str(out_path), "from": gguf_filename, "template": template, "stop": stops,
            "template_bos_stripped": bos is not None}


def parse_modelfile(path: str | os.PathLike) -> dict[str, Any]:
    """``{"from", "template", "parameters": {name: [values]}}`` of a Modelfile written by :func:`modelfile`."""
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, Any] = {"from": None, "template": None, "parameters": {}}
    m = re.search(r'^TEMPLATE """(.*?)"""', text, flags=re.DOTALL | re.MULTILINE)
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
