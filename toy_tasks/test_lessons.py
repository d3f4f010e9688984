"""Tests for lessons.py: the ideal update never lowers a correct answer, finite groups do, and coupling follows what
answers share."""
import numpy as np
import torch

import lessons
import rlvr

TOY = rlvr.HERE / "toy_tasks"


def test_ideal_update_never_lowers_a_correct_output_but_a_finite_group_does():
    probs = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.05, 0.20], dtype=torch.float64)  # five correct + a wrong bucket
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64)
    for beta in (0.1, 1.0, 10.0):
        ideal = lessons.ideal_update(probs, rewards, beta)
        assert (ideal[:5] >= probs[:5]).all() and torch.isclose(ideal.sum(), torch.tensor(1.0, dtype=torch.float64))
    new, sampled = lessons.finite_group_update(probs.expand(200, -1).clone(), rewards, 4, 1.0,
                                               torch.Generator().manual_seed(0))
    fell = (new[:, :5] < probs[:5] * (1 - 1e-9)) & ~sampled[:, :5]
    assert fell.any(), "some group of 4 must miss a correct output that then loses mass"
    lesson = lessons.sampling_bias_lesson(probs, rewards, group_sizes=(4, 64), groups=500, steps=2)
    assert np.mean(lesson["G"][4]["fell"]) > np.mean(lesson["G"][64]["fell"])  # smaller groups miss more
    assert all(a >= b for a, b in zip(lesson["G"][4]["p_ideal"], lesson["p_before"]))


def test_coupling_spreads_through_shared_structure(tokenizer):
    full = {s: rlvr.TaskSet.build(rlvr.load_tasks(TOY, s), tokenizer) for s in ("train", "test")}
    cfg = rlvr.Config(n_embd=32, n_layer=1, n_head=2, ws_steps=150, ws_batch=64)
    model = rlvr.warm_start(cfg, full["train"], tokenizer, torch.device("cpu"))
    q = next(i for i, t in enumerate(full["train"].tasks) if t["prompt"] == "sum3=15:")
    result = lessons.coupling_lesson(model, tokenizer, full, q, "8+5+2")
    assert result["p_after"] > result["p_before"]
    groups = result["splits"]["train"]
    most = next(g for g in lessons.COUPLING_GROUPS if groups[g]["n"] > 0)
    assert groups["none"]["n"] > 0 and groups[most]["mean_dlogp"] > groups["none"]["mean_dlogp"]
    assert lessons.overlap_group("8+5+2", "2+8+5") == "same digits"
    assert lessons.overlap_group("8+5+2", "8+1+6") == "same first token"
    assert lessons.overlap_group("8+5+2", "1+3+9") == "none"
    assert lessons.overlap_group("8+5+2", "1+5+9") == "some digits"


def test_the_lessons_run_from_the_command_line(tmp_path, task_dir, capsys):
    lessons.main(["--tasks", str(task_dir), "--cache-dir", str(tmp_path / "cache"), "--n-embd", "32", "--n-layer",
                  "1", "--n-head", "2", "--ws-steps", "30", "--ws-batch", "32", "--out", str(tmp_path / "explain"),
                  "--runs", str(tmp_path / "none")])
    printed = capsys.readouterr().out
    for heading in ("1. SAMPLING BIAS", "2. SEMANTIC COUPLING", "3. MODE MASS", "no trained checkpoints found",
                    "4. WHERE DLC'S DIVERSITY COMES FROM"):
        assert heading in printed
    assert (tmp_path / "explain" / "explain.png").exists() == (lessons.pyplot() is not None)


def test_an_importance_weight_gives_rare_answers_the_sampler_draws_less_credit(tmp_path, tokenizer):
    """Lesson 4 on the demo's base policy: correct answers the policy rarely samples but DLC's sampler draws
    (q/pi >= 2) lose a larger share of their credit to min(pi/q, 1) than the other drawn answers, and the expected
    update (steps of one size) raises them less than full credit (the default) does."""
    cfg = rlvr.Config(cache_dir=str(tmp_path / "cache"))
    train = rlvr.TaskSet.build(rlvr.load_tasks(TOY, "train"), tokenizer)
    model = rlvr.warm_start(cfg, train, tokenizer, torch.device("cpu"))
    query = max(range(len(train)), key=lambda i: (train.tasks[i]["type"] == "digit_sum", len(train.solutions[i])))
    c = lessons.credit_lesson(cfg, model, tokenizer, train, query)
    cats = lessons.credit_categories(c)
    rare, rest = cats["rare under pi, drawn by q (q/pi >= 2)"], cats["drawn, q/pi < 2"]
    credit = {cap: np.array(c["credit"][cap]) for cap in (0.0, 1.0)}
    kept = {name: credit[1.0][rows].sum() / credit[0.0][rows].sum() for name, rows in (("rare", rare), ("rest", rest))}
    assert rare.sum() >= 3 and kept["rare"] < kept["rest"] < 1  # the weight targets what q over-draws
    assert not credit[0.0][cats["never drawn"]].any()  # no draw, no credit
    no, capped = np.array(c["delta"][0.0]), np.array(c["delta"][1.0])
    assert no[rare].mean() > capped[rare].mean() + 0.04
    assert abs(sum(c["pi"]) - sum(np.exp(no) * c["pi"])) < 0.05  # a small, linear step
