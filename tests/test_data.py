"""Data preparation on good JSONL / Parquet / datasets-dir input and on each kind of bad row;
the train/dev/test split and its leakage removal."""

import itertools
import json
import random
from pathlib import Path

import polars as pl
import pytest
import yaml

from qatforge import data, datagen

ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = datagen.generate(1, 60)
KW = dict(dev_fraction=0.2, test_fraction=0.2, max_tokens=256)


def _prepare(src, out, **kw):
    """``data.prepare`` into ``out/{train,dev,test}.parquet``."""
    return data.prepare(src, *(out / f"{s}.parquet" for s in data.SPLITS), **{**KW, **kw})


def _splits(out):
    return {s: data.read_conversations(out / f"{s}.parquet") for s in data.SPLITS}


def _conv(*qa):
    """A conversation of (question, answer) exchanges."""
    msgs = [{"role": "system", "content": "s"}]
    for q, a in qa:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def test_prepare_jsonl_split_is_deterministic(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    s1 = _prepare(src, tmp_path / "a", on_bad_rows="error")
    s2 = _prepare(src, tmp_path / "b", on_bad_rows="error")
    assert s1 == {**s2, "source": s1["source"]} and s1["rows_dropped"] == 0
    assert all(s1[f"{s}_rows"] for s in data.SPLITS)
    for s in data.SPLITS:
        assert (tmp_path / f"a/{s}.parquet").read_bytes() == (tmp_path / f"b/{s}.parquet").read_bytes()
    got = _splits(tmp_path / "a")
    assert sum(map(len, got.values())) + sum(s1["leakage_dropped"].values()) == 60
    schema = pl.read_parquet_schema(tmp_path / "a/train.parquet")
    assert schema["messages"] == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    assert schema["task"] == pl.String
    for name, convs in got.items():  # each conversation is where the hash of its final question says
        assert {data.split_of(data.final_question(c), 0.2, 0.2) for c in convs} == {name}


def test_shipped_dataset_splits_are_disjoint_and_stable(tmp_path):
    """Default config on the shipped data: no test question in train or dev, no dev one in train;
    the same split whatever the row order."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    kw = dict(dev_fraction=cfg["data"]["dev_fraction"], test_fraction=cfg["data"]["test_fraction"],
              max_tokens=cfg["data"]["max_tokens"], n_prompts=cfg["eval"]["n_prompts"], n_nll=cfg["eval"]["n_nll"])
    src = ROOT / cfg["data"]["path"]
    s = _prepare(src, tmp_path / "a", **kw)
    got = _splits(tmp_path / "a")
    users = {name: {m["content"] for c in convs for m in c if m["role"] == "user"} for name, convs in got.items()}
    finals = {name: {data.final_question(c) for c in convs} for name, convs in got.items()}
    assert not finals["test"] & (users["train"] | users["dev"])
    assert not finals["dev"] & users["train"]
    n = s["rows_kept"]
    assert all(got[name] for name in data.SPLITS)
    assert abs(len(got["test"]) / n - kw["test_fraction"]) < 0.03
    assert abs(len(got["dev"]) / n - kw["dev_fraction"]) < 0.02
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    _prepare(_write_jsonl(tmp_path / "shuffled.jsonl", rows), tmp_path / "b", **kw)
    for name, convs in _splits(tmp_path / "b").items():
        assert sorted(map(json.dumps, convs)) == sorted(map(json.dumps, got[name]))


def _question_in(split, prefix):
    """The first question ``<prefix><i>`` whose hash puts it in ``split`` (at KW's fractions)."""
    return next(f"{prefix}{i}" for i in itertools.count() if data.split_of(f"{prefix}{i}", 0.2, 0.2) == split)


def test_leaked_multi_turn_conversations_are_dropped(tmp_path):
    """A train or dev conversation with a test question in any user turn is dropped; a train one
    with a dev question too; duplicates inside a split stay."""
    qs = {name: _question_in(name, "q") for name in data.SPLITS}
    more, dev2 = [_question_in("train", "x"), _question_in("train", "y")], _question_in("dev", "d")
    rows = [
        _conv((qs["test"], "a")),
        _conv((qs["dev"], "a")),
        _conv((qs["train"], "a")), _conv((qs["train"], "a")),  # duplicates: both kept
        _conv((qs["test"], "a"), (more[0], "b")),  # train, but asks a test question first: dropped
        _conv((qs["dev"], "a"), (more[1], "b")),  # train, asks a dev question first: dropped
        _conv((qs["test"], "a"), (dev2, "b")),  # dev, asks a test question first: dropped
    ]
    s = _prepare(_write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o")
    got = _splits(tmp_path / "o")
    assert got == {"train": [rows[2]["messages"]] * 2, "dev": [rows[1]["messages"]], "test": [rows[0]["messages"]]}
    assert s["leakage_dropped"] == {"train": 2, "dev": 1}
    assert (s["train_rows"], s["dev_rows"], s["test_rows"]) == (2, 1, 1)


def test_prompts_from_parquet_answer_is_last_assistant_turn(tmp_path):
    rows = [_conv(("q1", "a1"), ("q2", "a2")), _conv(("q3", "a3"))]
    pq = tmp_path / "test.parquet"
    pl.DataFrame({"messages": [r["messages"] for r in rows], "task": ["t", ""]}).write_parquet(pq)
    got = data.prompts_from_parquet(pq, 2)
    assert got[0] == {"messages": rows[0]["messages"][:-1], "answer": "a2", "task": "t"}
    assert got[0]["messages"][-1] == {"role": "user", "content": "q2"}
    assert got[1] == {"messages": rows[1]["messages"][:-1], "answer": "a3", "task": ""}
    assert data.prompts_from_parquet(pq) == got and data.prompts_from_parquet(pq, 1) == got[:1]
    with pytest.raises(data.DataError, match=r"test\.parquet: the test split has 2 conversations.*eval\.n_prompts"):
        data.prompts_from_parquet(pq, 3)
    pl.DataFrame({"messages": [r["messages"] for r in rows]}).write_parquet(pq)  # no task column
    assert [p["task"] for p in data.prompts_from_parquet(pq)] == ["", ""]


def test_too_few_rows_name_the_split_and_the_setting(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(data.DataError, match=r"d\.jsonl: too few rows: the test split has \d+ .*eval\.n_prompts"):
        _prepare(src, tmp_path / "o", n_prompts=1000)
    with pytest.raises(data.DataError, match=r"the test split has \d+ .*eval\.n_nll"):
        _prepare(src, tmp_path / "o", n_nll=1000)
    with pytest.raises(data.DataError, match="too few rows: the dev split is empty"):
        _prepare(_write_jsonl(tmp_path / "one.jsonl", [_conv(("q", "a"))] * 3), tmp_path / "o",
                 dev_fraction=1e-9, test_fraction=1e-9)
    with pytest.raises(ValueError, match=r"data\.dev_fraction \+ data\.test_fraction must be < 1"):
        _prepare(src, tmp_path / "o", dev_fraction=0.5, test_fraction=0.5)
    assert not (tmp_path / "o").exists()


def test_parquet_and_datasets_dir_inputs(tmp_path):
    import datasets

    pq = tmp_path / "d.parquet"
    pl.DataFrame({"messages": [r["messages"] for r in GOOD]}).write_parquet(pq)
    assert data.load_rows(pq) == [{"messages": r["messages"]} for r in GOOD]
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(ds_dir))
    assert data.load_rows(ds_dir) == GOOD
    s = _prepare(ds_dir, tmp_path / "o")
    assert sum(s[f"{n}_rows"] for n in data.SPLITS) + sum(s["leakage_dropped"].values()) == 60


def test_unsupported_format_and_missing(tmp_path):
    bad = tmp_path / "d.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d\.csv.*JSONL.*Parquet.*datasets"):
        data.load_rows(bad)
    with pytest.raises(data.DataError, match="not found"):
        data.load_rows(tmp_path / "nope.jsonl")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(data.DataError, match="save_to_disk"):
        data.load_rows(plain_dir)


SYS = {"role": "system", "content": "s"}
USER = {"role": "user", "content": "q"}
ASSIST = {"role": "assistant", "content": "a"}
BAD_ROWS = [
    ({"text": "hi"}, "row of unknown shape (keys 'text'); expected messages: a 'messages' list"),
    ([USER, ASSIST], "row of unknown shape (a list, not an object)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "sharegpt-format row in a file of messages rows (the format of line 1)"),
    ({"instruction": "q", "output": "a"}, "alpaca-format row in a file of messages rows (the format of line 1)"),
    ({"messages": []}, "empty 'messages'"),
    ({"messages": [USER, {"role": "tool", "content": "x"}, ASSIST]}, "unknown role 'tool'"),
    ({"messages": [SYS, USER]}, "ends with a 'user' turn"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, "content is int"),
    ({"messages": [USER, {"role": "assistant", "content": "x" * 5000}]}, "over-length"),
    ({"messages": [USER, ASSIST], "task": 3}, "'task' is int"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("bad,msg", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_each_bad_row_kind_names_file_and_line(tmp_path, bad, msg):
    rows = list(GOOD[:5])
    src = _write_jsonl(tmp_path / "d.jsonl", rows[:3] + [bad] + rows[3:])
    with pytest.raises(data.DataError) as e:
        _prepare(src, tmp_path / "o")
    assert str(src) in str(e.value) and "line 4" in str(e.value) and msg in str(e.value)
    assert not (tmp_path / "o").exists()


def test_drop_mode_reports_dropped_rows_by_reason(tmp_path):
    rows = list(GOOD[:10])
    rows.insert(2, {"messages": [SYS, USER]})
    rows.insert(7, {"messages": [USER, {"role": "robot", "content": "x"}]})
    rows.insert(9, {"messages": [USER, {"role": "assistant", "content": "x" * 1100}]})  # > 256 x 4 characters
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    s = _prepare(src, tmp_path / "o", dev_fraction=0.3, test_fraction=0.3, on_bad_rows="drop")
    assert s["rows_dropped"] == 3 and s["rows_kept"] == 10
    assert [(p["location"], p["reason"]) for p in s["problems"]] == [
        ("line 3", "malformed"), ("line 8", "malformed"), ("line 10", "over-length")]
    assert s["dropped_by_reason"] == {"malformed": 2, "over-length": 1}
    assert _prepare(src, tmp_path / "o", dev_fraction=0.3, test_fraction=0.3, on_bad_rows="drop",
                    max_tokens=2048)["dropped_by_reason"] == {"malformed": 2, "over-length": 0}
    assert sum(s[f"{n}_rows"] for n in data.SPLITS) + sum(s["leakage_dropped"].values()) == 10


def test_validate_rows_row_numbers_and_token_bound(tmp_path):
    with pytest.raises(data.DataError, match=r"src\.parquet: row 2: empty"):
        data.validate_rows([GOOD[0], {"messages": []}], "src.parquet")
    good, probs = data.validate_rows([GOOD[0], {"messages": []}], "x", on_bad_rows="drop")
    assert good == [GOOD[0]] and probs == [{"location": "row 2", "reason": "malformed", "problem": "empty 'messages'"}]


def test_empty_and_too_small_dataset(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(data.DataError, match="empty"):
        _prepare(src, tmp_path / "o")
    src = _write_jsonl(tmp_path / "d.jsonl", GOOD[:1])
    with pytest.raises(data.DataError, match="too few rows: the (train|dev|test) split is empty"):
        _prepare(src, tmp_path / "o")


def test_json_array_file(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps(GOOD[:3], indent=1))
    assert data.load_rows(src) == GOOD[:3]
    src.write_text(json.dumps([GOOD[0], {"messages": []}]))
    with pytest.raises(data.DataError, match=r"d\.json: item 2: empty"):
        _prepare(src, tmp_path / "o")


# --- ShareGPT and Alpaca rows -------------------------------------------------------------------

SHIPPED = [json.loads(line) for line in (ROOT / "data" / "chat.jsonl").read_text().splitlines()]
# each row's turns are named by the next alias pair, so every accepted 'from' name is used
FROM_ALIASES = [("human", "gpt"), ("user", "assistant"), ("human", "model")]


def _as_sharegpt(row, i):
    user, assistant = FROM_ALIASES[i % len(FROM_ALIASES)]
    names = {"system": "system", "user": user, "assistant": assistant}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]],
            "task": row["task"]}


def _single_turn(row):
    """(system or None, question, answer) of a row with one user and one assistant turn, else None."""
    roles = [m["role"] for m in row["messages"]]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        return None
    system = row["messages"][0]["content"] if roles[0] == "system" else None
    return system, row["messages"][-2]["content"], row["messages"][-1]["content"]


def _parquet_bytes(out):
    return {s: (out / f"{s}.parquet").read_bytes() for s in data.SPLITS}


def _default_kw():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return dict(dev_fraction=cfg["data"]["dev_fraction"], test_fraction=cfg["data"]["test_fraction"],
                max_tokens=cfg["data"]["max_tokens"], n_prompts=cfg["eval"]["n_prompts"], n_nll=cfg["eval"]["n_nll"])


def test_shipped_data_as_sharegpt_gives_the_same_splits(tmp_path):
    kw = _default_kw()
    src = _write_jsonl(tmp_path / "sharegpt.jsonl", [_as_sharegpt(r, i) for i, r in enumerate(SHIPPED)])
    s_msg = _prepare(ROOT / "data" / "chat.jsonl", tmp_path / "m", **kw)
    s_sg = _prepare(src, tmp_path / "s", **kw)
    assert (s_msg["format"], s_sg["format"]) == ("messages", "sharegpt")
    assert {**s_sg, "source": "", "format": ""} == {**s_msg, "source": "", "format": ""}
    assert _parquet_bytes(tmp_path / "s") == _parquet_bytes(tmp_path / "m")
    assert s_msg["rows_kept"] == len(SHIPPED) and all(s_msg[f"{n}_rows"] for n in data.SPLITS)


def test_shipped_splits_are_the_same_at_256_and_2048_max_tokens(tmp_path):
    """The shipped chats are far below either bound: raising data.max_tokens keeps every row."""
    kw = _default_kw()
    _prepare(ROOT / "data" / "chat.jsonl", tmp_path / "short", **{**kw, "max_tokens": 256})
    _prepare(ROOT / "data" / "chat.jsonl", tmp_path / "long", **{**kw, "max_tokens": 2048})
    assert _parquet_bytes(tmp_path / "short") == _parquet_bytes(tmp_path / "long")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_alpaca_single_turn_rows_give_those_conversations(tmp_path, suffix):
    """Alpaca rows of the shipped single-turn conversations (every third without its system
    prompt, as a missing key in JSONL and a null in Parquet) split exactly like the conversations."""
    picked = [(i, t) for i, t in ((i, _single_turn(r)) for i, r in enumerate(SHIPPED)) if t][:600]
    alpaca, convs = [], []
    for i, (system, question, answer) in picked:
        system = system if i % 3 else None
        row = {"instruction": question, "input": "", "output": answer, "task": SHIPPED[i]["task"]}
        alpaca.append(row | ({"system": system} if system or suffix == ".parquet" else {}))
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        convs.append({"messages": ([{"role": "system", "content": system}] if system else []) + turns,
                      "task": SHIPPED[i]["task"]})
    assert len(alpaca) == 600 and 0 < sum(bool(r.get("system")) for r in alpaca) < 600
    src = tmp_path / f"alpaca{suffix}"
    if suffix == ".parquet":
        pl.DataFrame(alpaca).write_parquet(src)
    else:
        _write_jsonl(src, alpaca)
    good, problems = data.validate_rows(data.load_rows(src), str(src))
    assert good == convs and problems == []
    s = _prepare(src, tmp_path / "a")
    _prepare(_write_jsonl(tmp_path / "messages.jsonl", convs), tmp_path / "m")
    assert s["format"] == "alpaca" and s["rows_kept"] == 600
    assert _parquet_bytes(tmp_path / "a") == _parquet_bytes(tmp_path / "m")


def test_alpaca_input_joins_the_instruction_after_a_blank_line():
    rows = [{"instruction": "Translate to English", "input": "hola", "output": "hello", "system": "Be brief."},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Say hi", "input": None, "output": "hi", "system": ""}]
    good, _ = data.validate_rows(rows, "x")
    assert [c["messages"] for c in good] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate to English\nhola"},
         {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]


SG = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                       {"from": "gpt", "value": "a"}]}
BAD_FORMAT_ROWS = [  # (rows, data.format, bad line, what the error says)
    ([SG, SG, {"messages": [USER, ASSIST]}], "auto", 3,
     "messages-format row in a file of sharegpt rows (the format of line 1)"),
    ([{"instruction": "q", "output": "a"}, SG], "auto", 2, "sharegpt-format row in a file of alpaca rows"),
    ([{"prompt": "q", "completion": "a"}, SG], "auto", 1,
     "row of unknown shape (keys 'prompt', 'completion'); expected messages: a 'messages' list of role/content "
     "turns; sharegpt: a 'conversations' list of from/value turns; alpaca: 'instruction' and 'output'"),
    ([{"instruction": "q"}], "auto", 1, "row of unknown shape (keys 'instruction')"),
    ([SG, {"messages": [USER, ASSIST], "conversations": SG["conversations"]}], "auto", 2,
     "fits several formats: messages, sharegpt"),
    ([SG, SG], "alpaca", 1, "sharegpt-format row in a file of alpaca rows (data.format: alpaca)"),
]


@pytest.mark.parametrize("rows,fmt,line,msg", BAD_FORMAT_ROWS, ids=[m[:40] for *_, m in BAD_FORMAT_ROWS])
@pytest.mark.parametrize("on_bad_rows", ["error", "drop"])
def test_mixed_or_unknown_shape_is_refused_naming_the_row(tmp_path, rows, fmt, line, msg, on_bad_rows):
    """Shape errors fail whatever data.on_bad_rows says: the file is not what it seems."""
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataError) as e:
        _prepare(src, tmp_path / "o", on_bad_rows=on_bad_rows, data_format=fmt)
    assert str(e.value).startswith(f"{src}: line {line}: ") and msg in str(e.value)
    assert not (tmp_path / "o").exists()


def test_forced_format_must_be_known():
    with pytest.raises(ValueError, match="data.format must be one of auto, messages, sharegpt, alpaca"):
        data.validate_rows([SG], "x", data_format="openai")
    assert data.validate_rows([SG], "x", data_format="sharegpt")[0] == [
        {"messages": [SYS, USER, ASSIST]}]


SHAREGPT_BAD = [
    ({"from": "tool", "value": "x"}, "turn 2 of 'conversations' has unknown 'from' 'tool' (allowed: human, user, gpt"),
    ({"from": "gpt", "value": 3}, "turn 2 (gpt) 'value' is int, not a string"),
    ({"role": "user", "content": "x"}, "turn 2 of 'conversations' has unknown 'from' None"),
    ("x", "turn 2 of 'conversations' is not an object"),
]


@pytest.mark.parametrize("turn,msg", SHAREGPT_BAD, ids=[m[:30] for _, m in SHAREGPT_BAD])
def test_sharegpt_bad_turn_names_row_and_turn(tmp_path, turn, msg):
    rows = [_as_sharegpt(r, i) for i, r in enumerate(GOOD[:6])]
    rows[2] = {"conversations": [{"from": "human", "value": "q"}, turn, {"from": "gpt", "value": "a"}]}
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataError) as e:
        _prepare(src, tmp_path / "o")
    assert str(e.value).startswith(f"{src}: line 3: {msg}")
    good, problems = data.validate_rows(data.load_rows(src), str(src), on_bad_rows="drop")
    assert len(good) == 5 and [(p["location"], p["reason"]) for p in problems] == [("row 3", "malformed")]


def test_sharegpt_conversation_checked_as_messages(tmp_path):
    """A normalised ShareGPT row meets the messages checks: it must end with an assistant turn."""
    rows = [SG, {"conversations": SG["conversations"][:2]}]
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataError, match=r"d\.jsonl: line 2: conversation ends with a 'user' turn"):
        _prepare(src, tmp_path / "o")
    good, _ = data.validate_rows([{**SG, "system": "top"}], "x")
    assert good[0]["messages"][:2] == [{"role": "system", "content": "top"}, SYS]
