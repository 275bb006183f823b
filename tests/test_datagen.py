"""The dataset and base-corpus generators: deterministic, mixed as documented, exact answers, disjoint."""

import json
from pathlib import Path

from qatforge import data, datagen

ROOT = Path(__file__).resolve().parents[1]


def test_generate_is_deterministic_and_seed_dependent():
    a, b = datagen.generate(7, 200), datagen.generate(7, 200)
    assert a == b
    assert datagen.generate(8, 200) != a
    assert len(a) == 200


def test_rows_are_valid_chat_conversations():
    rows = datagen.generate(0, 300)
    for r in rows:
        msgs = r["messages"]
        assert msgs[0]["role"] == "system"
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * ((len(msgs) - 1) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        assert r["task"] in datagen.TASKS
    assert any(len(r["messages"]) == 5 for r in rows)  # some multi-turn conversations


def test_answers_are_exactly_right():
    rows = [data.as_prompt(r["messages"], r["task"]) for r in datagen.generate(3, 50)]
    for r in rows:
        q, a, task = r["messages"][-1]["content"], r["answer"], r["task"]
        arg = q.split(": ", 1)[-1]
        if task == "reverse":
            assert a == " ".join(reversed(arg.split()))
        elif task == "sort":
            assert a == " ".join(sorted(arg.split()))
        elif task == "uppercase":
            assert a == arg.upper()
        elif task == "largest":
            assert a == max(arg.split())
        elif task == "convert":
            nums = [int(t) for t in q.rstrip(".?").split() if t.isdigit()]
            assert int(a) % nums[0] == 0 and int(a) // nums[0] in (10, 100, 1000)
        elif task == "smallest":
            assert a == min(arg.split())
        elif task == "last":
            assert a == arg.split()[-1]
        elif task == "count":
            assert a == str(len(arg.split()))
        elif task == "convert_back":
            v = [int(t) for t in q.rstrip(".?").split() if t.isdigit()][0]
            assert v % int(a) == 0 and v // int(a) in (10, 100, 1000)
    assert {r["task"] for r in rows} == set(datagen.TASKS)


def test_dataset_mix_weights_new_tasks_three_to_one():
    tasks = [r["task"] for r in datagen.generate(0, 1700)]
    for t in datagen.BASE_TASKS:
        assert 0.04 < tasks.count(t) / len(tasks) < 0.08, t  # 1/17 each (second turns add noise)
    for t in datagen.NEW_TASKS:
        assert 0.15 < tasks.count(t) / len(tasks) < 0.20, t  # 3/17 each


def test_base_corpus_holds_base_tasks_only_and_no_dataset_question():
    corpus = datagen.base_corpus(0, 2000)
    assert {r["task"] for r in corpus} == set(datagen.BASE_TASKS)
    base_q = {m["content"] for r in corpus for m in r["messages"] if m["role"] == "user"}
    data_q = {m["content"] for r in datagen.generate(0, 4000) for m in r["messages"] if m["role"] == "user"}
    assert base_q and data_q and not base_q & data_q
    assert all(datagen.is_base_problem(q) for q in base_q) and not any(datagen.is_base_problem(q) for q in data_q)


def test_main_writes_files_and_shipped_files_match_generator(tmp_path):
    datagen.main(["--out", str(tmp_path), "--n", "50", "--seed", "0"])
    chat = [json.loads(l) for l in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert chat == datagen.generate(0, 50)
    assert [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]
    # The committed file is exactly what the default command produces.
    shipped = (ROOT / "data" / "chat.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in shipped] == datagen.generate(0, len(shipped))
    assert (ROOT / "data" / "chat.jsonl").stat().st_size < 3 * 2**20
