"""Tests for make_tasks.py: the committed task files are its output, and its splits stay apart."""
import pytest

import rlvr
from make_tasks import make_tasks

TOY = rlvr.HERE / "toy_tasks"


def test_committed_task_files_are_the_generator_output(tmp_path):
    make_tasks(tmp_path, seed=0)
    for folder in ("", "word_problems", "small_lm"):
        for split in ("train", "val", "test"):
            path = f"{folder}/{split}.jsonl".lstrip("/")
            assert (tmp_path / path).read_text() == (TOY / path).read_text(), path
    for t in rlvr.load_tasks(tmp_path, "train"):
        assert t["num_solutions"] == len(rlvr.enumerate_solutions(t)) >= 3


@pytest.mark.parametrize("folder", ["", "word_problems", "small_lm"])
def test_no_question_is_asked_in_two_splits_however_worded(folder):
    keys = {s: [rlvr.question_key(t) for t in rlvr.load_tasks(TOY / folder, s)] for s in ("train", "val", "test")}
    assert all(len(set(k)) == len(k) for k in keys.values())
    assert not set(keys["train"]) & set(keys["test"]) and not set(keys["train"]) & set(keys["val"])
    assert not set(keys["val"]) & set(keys["test"])


@pytest.mark.parametrize("folder,ops,words", [("word_problems", "+-*", "with only +, - and *"),
                                              ("small_lm", "+*", "with + or *")])
def test_the_verifier_allows_the_operators_the_prompt_names(folder, ops, words):
    for split in ("train", "val", "test"):
        for t in rlvr.load_tasks(TOY / folder, split):
            assert words in t["prompt"] and t["ops"] == ops, t["id"]
            assert t["num_solutions"] == len(rlvr.enumerate_solutions(t)) >= 1
            assert all(set(s) - set("0123456789") <= set(ops) for s in rlvr.enumerate_solutions(t))


@pytest.mark.parametrize("n_val", [40, 10])
def test_validation_size_never_moves_train_or_test(tmp_path, n_val):
    make_tasks(tmp_path, seed=0, countdown=(48, n_val, 48))
    assert len(rlvr.load_tasks(tmp_path, "val")) == 4 + n_val < len(rlvr.load_tasks(TOY, "val"))
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (TOY / f"{split}.jsonl").read_text()
    small = (tmp_path / "val.jsonl").read_text().splitlines()
    assert (TOY / "val.jsonl").read_text().splitlines()[:len(small)] == small
