"""Chat template rendering, response-only labels, batching and HF-side evaluation helpers."""

import pytest
import torch

from qatforge import chat, data, datagen, tiny

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "Sort the digits: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]


@pytest.fixture(scope="module")
def tok():
    rows = datagen.generate(0, 300)
    return tiny.build_tokenizer((t for r in rows for m in r["messages"] for t in (m["role"] + "\n", m["content"])), 512)


def test_render_chatml_with_special_tokens_as_single_ids(tok):
    text = chat.render(tok, MSGS[:2], add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse: a b c<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert ids[0] == start  # no BOS prepended


def test_labels_cover_only_assistant_content_and_end_token(tok):
    enc = chat.encode_for_training(tok, MSGS, max_len=256)
    assert len(enc["input_ids"]) == len(enc["labels"])
    kept = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != chat.IGNORE_INDEX]
    assert all(l in (chat.IGNORE_INDEX, i) for i, l in zip(enc["input_ids"], enc["labels"]))
    assert tok.decode(kept) == "c b a<|im_end|>1 2 3<|im_end|>"
    short = chat.encode_for_training(tok, MSGS, max_len=10)
    assert len(short["input_ids"]) == 10 and short["input_ids"] == enc["input_ids"][:10]


def test_collate_right_pads(tok):
    rows = [chat.encode_for_training(tok, MSGS[:3], 256), chat.encode_for_training(tok, MSGS, 256)]
    b = chat.collate(rows, pad_id=tok.pad_token_id)
    n0 = len(rows[0]["input_ids"])
    assert b["input_ids"].shape == (2, len(rows[1]["input_ids"]))
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (b["input_ids"].shape[1] - n0)
    assert (b["input_ids"][0, n0:] == tok.pad_token_id).all() and (b["labels"][0, n0:] == -100).all()


def test_exact_match_normalisation():
    assert chat.is_correct("  c b a\n", "c b a")
    assert not chat.is_correct("c b a a", "c b a")
    assert chat.normalize_answer(" x ") == "x"


def test_generate_and_nll_on_a_real_model(tok):
    model = tiny.build_model(tok, layers=1, seed=0)
    prompts = [data.as_prompt(r["messages"], r["task"]) for r in datagen.generate(0, 3)]
    acc, correct, gens = chat.hf_exact_match(model, tok, prompts, max_new_tokens=4)
    assert len(correct) == len(gens) == 3 and 0.0 <= acc <= 1.0
    assert all(isinstance(g, str) and "<|im" not in g for g in gens)
    # Left padding must not change greedy output: batch of 3 == one by one.
    singles = [chat.hf_generate(model, tok, [p["messages"]], 4)[0] for p in prompts]
    assert singles == gens
    nll = chat.hf_nll(model, tok, [MSGS, MSGS[:3]], max_len=256)
    assert 0 < nll < 20
    assert tok.padding_side == "right"


@pytest.fixture(scope="module")
def family_tokenizers(family_replicas):
    """Tokenizers of four replicas (tests/families.py): template BOS, tokenizer BOS, no BOS."""
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(family_replicas[n]) for n in ("llama3", "llama-spm", "gemma3", "phi3")}


@pytest.mark.parametrize("name, template_bos, tokenizer_bos, add_bos", [
    ("llama3", True, True, True),  # {{ bos_token }} and a BOS-adding post-processor
    ("llama-spm", False, True, True),  # TinyLlama: the tokenizer adds BOS, the template does not
    ("gemma3", True, True, True),
    ("phi3", False, False, False),  # a BOS token that the model never gets
])
def test_one_bos_rule_across_template_and_tokenizer(family_tokenizers, name, template_bos, tokenizer_bos, add_bos):
    t = family_tokenizers[name]
    policy = chat.bos_policy(t)
    assert (policy["template_bos"], policy["tokenizer_bos"], policy["add_bos"]) == (template_bos, tokenizer_bos, add_bos)
    ids = chat.prompt_ids(t, MSGS[:2])
    assert ids.count(t.bos_token_id) == int(add_bos) and (ids[0] == t.bos_token_id) == add_bos
    text = chat.render(t, MSGS[:2], add_generation_prompt=True)
    # the HF default (add_special_tokens=True) doubles a template's BOS; the rule never does
    assert chat.encode(t, text) == ids
    rest = chat.strip_bos_text(text, t.bos_token)
    assert rest == (text[len(t.bos_token):] if template_bos else text)
    enc = chat.encode_for_training(t, MSGS, max_len=256)
    assert enc["input_ids"][: len(ids) - 1] == ids[:-1] or enc["input_ids"][0] == ids[0]
    assert enc["input_ids"].count(t.bos_token_id) == int(add_bos) and enc["labels"][0] == chat.IGNORE_INDEX


@pytest.mark.parametrize("name, end", [("llama3", "<|eot_id|>"), ("llama-spm", "</s>"), ("gemma3", "<end_of_turn>"),
                                       ("phi3", "<|end|>")])
def test_turn_end_is_the_templates_not_always_the_eos(family_tokenizers, name, end):
    t = family_tokenizers[name]
    assert chat.turn_end_token(t) == end
    assert chat.stop_ids(t) == sorted({t.eos_token_id, t.convert_tokens_to_ids(end)})
    enc = chat.encode_for_training(t, MSGS, max_len=256)
    kept = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != chat.IGNORE_INDEX]
    assert kept.count(t.convert_tokens_to_ids(end)) == 2  # each assistant turn learns to stop


def test_bos_policy_follows_a_changed_template(family_tokenizers):
    import copy

    t = copy.deepcopy(family_tokenizers["llama3"])
    assert chat.bos_policy(t)["template_bos"]
    t.chat_template = t.chat_template.replace("{{- bos_token }}", "")
    assert not chat.bos_policy(t)["template_bos"] and chat.bos_policy(t)["add_bos"]  # the tokenizer still adds it
