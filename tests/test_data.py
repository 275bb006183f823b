"""Data preparation on good JSONL / Parquet / datasets-dir input and on each kind of bad row."""

import json

import polars as pl
import pytest

from qatforge import data, datagen


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = datagen.generate(1, 60)


def test_prepare_jsonl_split_is_deterministic(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    kw = dict(seed=5, eval_fraction=0.1, max_tokens=256, on_bad_rows="error")
    s1 = data.prepare(src, tmp_path / "a/train.parquet", tmp_path / "a/eval.parquet", **kw)
    s2 = data.prepare(src, tmp_path / "b/train.parquet", tmp_path / "b/eval.parquet", **kw)
    assert (s1["train_rows"], s1["eval_rows"], s1["rows_dropped"]) == (54, 6, 0)
    assert (tmp_path / "a/train.parquet").read_bytes() == (tmp_path / "b/train.parquet").read_bytes()
    tr = data.read_conversations(tmp_path / "a/train.parquet")
    ev = data.read_conversations(tmp_path / "a/eval.parquet")
    assert sorted(map(json.dumps, tr + ev)) == sorted(json.dumps(r["messages"]) for r in GOOD)
    schema = pl.read_parquet_schema(tmp_path / "a/train.parquet")
    assert schema["messages"] == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    s3 = data.prepare(src, tmp_path / "c/train.parquet", tmp_path / "c/eval.parquet", **{**kw, "seed": 6})
    assert data.read_conversations(tmp_path / "c/eval.parquet") != ev
    assert s3["eval_rows"] == 6


def test_parquet_and_datasets_dir_inputs(tmp_path):
    import datasets

    pq = tmp_path / "d.parquet"
    pl.DataFrame({"messages": [r["messages"] for r in GOOD]}).write_parquet(pq)
    assert data.load_rows(pq) == GOOD
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(ds_dir))
    assert data.load_rows(ds_dir) == GOOD
    s = data.prepare(ds_dir, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.05, max_tokens=256)
    assert s["train_rows"] + s["eval_rows"] == 60


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
    ({"text": "hi"}, "missing 'messages'"),
    ({"messages": []}, "empty 'messages'"),
    ({"messages": [USER, {"role": "tool", "content": "x"}, ASSIST]}, "unknown role 'tool'"),
    ({"messages": [SYS, USER]}, "ends with a 'user' turn"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, "content is int"),
    ({"messages": [USER, {"role": "assistant", "content": "x" * 5000}]}, "over-length"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("bad,msg", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_each_bad_row_kind_names_file_and_line(tmp_path, bad, msg):
    rows = list(GOOD[:5])
    src = _write_jsonl(tmp_path / "d.jsonl", rows[:3] + [bad] + rows[3:])
    with pytest.raises(data.DataError) as e:
        data.prepare(src, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.2, max_tokens=256)
    assert str(src) in str(e.value) and "line 4" in str(e.value) and msg in str(e.value)
    assert not (tmp_path / "t.parquet").exists()


def test_drop_mode_reports_dropped_rows(tmp_path):
    rows = list(GOOD[:10])
    rows.insert(2, {"messages": [SYS, USER]})
    rows.insert(7, {"messages": [USER, {"role": "robot", "content": "x"}]})
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    s = data.prepare(src, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.2,
                     max_tokens=256, on_bad_rows="drop")
    assert s["rows_dropped"] == 2 and s["rows_kept"] == 10
    assert [p["location"] for p in s["problems"]] == ["line 3", "line 8"]
    assert s["train_rows"] + s["eval_rows"] == 10


def test_validate_rows_row_numbers_and_token_bound(tmp_path):
    with pytest.raises(data.DataError, match=r"src\.parquet: row 2: empty"):
        data.validate_rows([GOOD[0], {"messages": []}], "src.parquet")
    good, probs = data.validate_rows([GOOD[0], {"messages": []}], "x", on_bad_rows="drop")
    assert good == [GOOD[0]] and probs == [{"location": "row 2", "problem": "empty 'messages'"}]


def test_empty_and_too_small_dataset(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(data.DataError, match="empty"):
        data.prepare(src, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.1, max_tokens=256)
    src = _write_jsonl(tmp_path / "d.jsonl", GOOD[:1])
    with pytest.raises(data.DataError, match="too few"):
        data.prepare(src, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.1, max_tokens=256)


def test_load_eval_prompts(tmp_path):
    rows = datagen.eval_prompts(0, 5)
    src = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert data.load_eval_prompts(src, 3) == rows[:3]
    with pytest.raises(data.DataError, match=r"p\.jsonl: 5 eval prompts, but 9"):
        data.load_eval_prompts(src, 9)
    bad = dict(rows[1], messages=rows[1]["messages"] + [{"role": "assistant", "content": "x"}])
    src = _write_jsonl(tmp_path / "q.jsonl", [rows[0], bad])
    with pytest.raises(data.DataError, match=r"q\.jsonl: line 2: .*user turn"):
        data.load_eval_prompts(src, 2)
    src = _write_jsonl(tmp_path / "r.jsonl", [{k: v for k, v in rows[0].items() if k != "answer"}])
    with pytest.raises(data.DataError, match="answer"):
        data.load_eval_prompts(src, 1)


def test_shipped_eval_prompts_load():
    from pathlib import Path

    rows = data.load_eval_prompts(Path(__file__).resolve().parents[1] / "data" / "eval_prompts.jsonl", 200)
    assert len(rows) == 200


def test_json_array_file(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps(GOOD[:3], indent=1))
    assert data.load_rows(src) == GOOD[:3]
    src.write_text(json.dumps([GOOD[0], {"messages": []}]))
    with pytest.raises(data.DataError, match=r"d\.json: item 2: empty"):
        data.prepare(src, tmp_path / "t.parquet", tmp_path / "e.parquet", seed=0, eval_fraction=0.5, max_tokens=256)
