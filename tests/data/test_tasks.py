from __future__ import annotations

import pytest

from realflow.data.tasks import TASKS, get_task, item_credit, make_mixed_examples, score


@pytest.mark.parametrize("name", sorted(TASKS))
def test_correct_answer_scores_one_and_wrong_less(name):
    task = TASKS[name]
    for ex in task.make_paired_examples(50, seed=1):
        assert ex["task"] == name and ex["chosen"] == ex["answer"]
        assert ex["answer"].startswith(" ") and ex["prompt"].endswith(" =")
        assert task.score(ex, ex["answer"]) == 1.0
        assert score(ex, "  " + ex["answer"].strip() + " ") == 1.0  # whitespace is normalised
        assert ex["rejected"] != ex["chosen"]
        assert 0.0 <= task.score(ex, ex["rejected"]) < 1.0
        assert task.score(ex, "") == 0.0
        assert task.score(ex, ex["answer"] + " 5") < 1.0


def test_examples_are_deterministic_and_seeded():
    for task in TASKS.values():
        assert task.make_examples(20, seed=7) == task.make_examples(20, seed=7)
        assert task.make_examples(20, seed=7) != task.make_examples(20, seed=8)
        assert task.make_paired_examples(20, seed=7) == task.make_paired_examples(20, seed=7)


def test_answers_are_right():
    ex = {"task": "reverse", "prompt": "rev 4 7 1 2 =", "answer": " 2 1 7 4"}
    assert score(ex, " 2 1 7 4") == 1.0
    assert score(ex, " 2 1 7 9") == 0.75
    for ex in get_task("sort").make_examples(20):
        assert ex["answer"].split() == sorted(ex["prompt"].split()[1:-1])
    for ex in get_task("add").make_examples(20):
        a, _, b = ex["prompt"].split()[1:4]
        assert int(ex["answer"]) == int(a) + int(b)
    for ex in get_task("copy").make_examples(20):
        digits = ex["prompt"].split()[1:-1]
        assert ex["answer"].split() == digits + digits


def test_partial_credit():
    assert item_credit(list("1234"), list("1234")) == 1.0
    assert item_credit(list("1299"), list("1234")) == 0.5
    assert item_credit(list("12345"), list("1234")) == 0.8
    assert item_credit([], list("12")) == 0.0
    add = {"task": "add", "prompt": "add 12 + 7 =", "answer": " 19"}
    assert score(add, " 19") == 1.0 and score(add, " 18") == 0.5


def test_mixed_and_unknown():
    rows = make_mixed_examples(8, seed=0)
    assert [r["task"] for r in rows[:4]] == list(TASKS)
    with pytest.raises(ValueError, match="Did you mean 'reverse'"):
        get_task("revers")
