"""Tests for experiments.py: comparisons, their statistics and reuse bookkeeping, frontiers, chosen checkpoints."""
import dataclasses
import itertools
import json
import math
import shutil

import numpy as np
import pytest

import experiments
import rlvr
from test_rlvr import tiny_cfg


def test_compare_writes_results_and_resumes(tmp_path, task_dir, capsys):
    cfg = tiny_cfg(tmp_path, task_dir, out=str(tmp_path / "cmp"), steps=2, eval_every=1)
    results = experiments.compare(cfg, ["grpo", "iac+dlc"], [0, 1], jobs=1)
    out = tmp_path / "cmp"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == ["grpo", "iac+dlc"] and on_disk["seeds"] == [0, 1]
    assert sorted(on_disk["runs"]) == ["grpo-s0", "grpo-s1", "iac-dlc-s0", "iac-dlc-s1"]
    for name in ("base", "grpo", "iac+dlc"):
        for split in ("train", "test"):
            cell = on_disk["summary"][name][split]["coverage"]
            assert set(cell) == {"mean", "ci95", "n"} and cell["n"] == 2 and cell["ci95"] >= 0
    values = [on_disk["runs"][f"grpo-s{s}"]["final"]["test"]["coverage"] for s in (0, 1)]
    assert on_disk["summary"]["grpo"]["test"]["coverage"]["mean"] == pytest.approx(np.mean(values))
    assert on_disk["summary"]["iac+dlc"]["budget"]["rollouts"]["mean"] == 2 * 4 * 4
    diffs = [on_disk["runs"][f"iac-dlc-s{s}"]["final"]["test"]["coverage"] - values[s] for s in (0, 1)]
    assert on_disk["paired_vs"] == "grpo"
    assert on_disk["paired"]["iac+dlc"]["test"]["coverage"]["mean"] == pytest.approx(np.mean(diffs))
    table = (out / "results.md").read_text()
    assert "| iac+dlc |" in table and "+-" in table
    try:
        import matplotlib  # noqa: F401
        assert (out / "passk.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
    except ImportError:
        pass
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    capsys.readouterr()
    again = experiments.compare(cfg, ["grpo", "iac+dlc"], [0, 1], jobs=1)
    printed = capsys.readouterr().out
    assert "4 runs, 4 already finished" in printed and "made by another rlvr.py" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps  # nothing was redone
    assert again["summary"] == results["summary"] and again["runs_done_now"] == 0
    assert again["wall_s"] == results["wall_s"]
    saved = out / "runs" / "grpo-s1" / "summary.json"  # a run made by an edited rlvr.py: reused, with a warning
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"code": "0" * 12}))
    experiments.compare(cfg, ["grpo", "iac+dlc"], [0, 1], jobs=1)
    assert "1 reused run(s) were made by another rlvr.py or platform (grpo-s1)" in capsys.readouterr().out
    unstamped = json.loads(saved.read_text())  # made outside compare (rlvr.py train), or stopped before its stamp
    saved.write_text(json.dumps({k: v for k, v in unstamped.items() if k != "task_files_sha"}))
    with pytest.raises(rlvr.UserError, match="grpo-s1: no record of the questions it ran on"):
        experiments.compare(cfg, ["grpo", "iac+dlc"], [0, 1], jobs=1)
    unstamped["config"]["weight_decay"] = 0.1  # a knob an older rlvr.py had, set to something that acted
    saved.write_text(json.dumps(unstamped))
    with pytest.raises(rlvr.UserError, match="ran with other settings \\(weight_decay=0.1, not 0.0\\)"):
        experiments.compare(cfg, ["grpo", "iac+dlc"], [0, 1], jobs=1)



def test_tasks_sha_changes_when_a_line_moves_between_splits(tmp_path):
    for name, (train, test) in {"a": ("x\ny\n", "z\n"), "b": ("y\n", "z\nx\n")}.items():  # same test + train bytes
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.jsonl").write_text(test)
        (tmp_path / name / "train.jsonl").write_text(train)
    assert experiments.tasks_sha(str(tmp_path / "a")) != experiments.tasks_sha(str(tmp_path / "b"))



def test_mean_ci_uses_student_t_beyond_the_table():
    v = [0.1, 0.4, 0.2, 0.5, 0.3, 0.6, 0.2, 0.9, 0.1, 0.4, 0.7, 0.3]  # 12 seeds: t(0.975, df 11) = 2.201
    assert experiments.mean_ci(v)["ci95"] == pytest.approx(2.201 * np.std(v, ddof=1) / math.sqrt(12), rel=1e-3)
    assert experiments.mean_ci(v[:3])["ci95"] == pytest.approx(4.303 * np.std(v[:3], ddof=1) / math.sqrt(3), rel=1e-4)
    assert experiments.mean_ci([0.5])["ci95"] == 0.0


def test_variant_config_sets_knobs_and_refuses_bad_ones():
    cfg = rlvr.Config()
    v = experiments.variant_config(cfg, "iac+dlc@dlc_mu=1.5@rollout-min-p=0.1@passk_k=3@grad_checkpointing=true")
    assert (v.method, v.dlc_mu, v.rollout_min_p, v.passk_k, v.grad_checkpointing) == ("iac+dlc", 1.5, 0.1, 3, True)
    assert experiments.variant_config(cfg, "grpo") == dataclasses.replace(cfg, method="grpo")
    assert experiments.run_name("grpo@rollout_temperature=1.5", 2) == "grpo_rollout_temperature1.5-s2"
    assert experiments.variant_config(cfg, "grpo@lr=1e-4").lr == 1e-4
    for bad in ("grpo@nope=1", "grpo@dlc_mu", "grpo@dlc_mu=high", "grpo@seed=3", "grpo@grad_checkpointing=yes",
                "grpo@eval_n=4"):
        with pytest.raises(rlvr.UserError, match="grpo@"):
            experiments.variant_config(cfg, bad)
    for shared, flag in (("temperature=1.5", "--temperature"), ("max_new_tokens=9", "--max-new-tokens")):
        with pytest.raises(rlvr.UserError, match=f"shared by every run: set it with {flag}"):  # evaluation reads them
            experiments.variant_config(cfg, f"grpo@{shared}")


def test_matched_gap_hand_computed():
    # curve through (0.2, 0.5), (0.4, 0.3), (0.8, 0.1), given out of order; points at x 0.3, 0.6, 0.9 (outside)
    gaps = experiments.matched_gap([0.3, 0.6, 0.9, 0.2], [0.5, 0.3, 0.9, 0.5], [0.8, 0.2, 0.4], [0.1, 0.5, 0.3])
    assert gaps[0] == pytest.approx(0.1) and gaps[1] == pytest.approx(0.1) and gaps[2] is None
    assert gaps[3] == pytest.approx(0.0)


def _fake_results(tmp_path, methods, seeds, per_run, n=8):
    """A compare results dict whose runs hold the given metrics: per_run(method, seed) -> (final, {step: eval});
    the third value of each split is pass@n (n = --eval-n)."""
    def split(p1, cov, p8):
        return {"exact_pass@k": {"1": p1, str(n): p8}, "pass@k": {"1": p1, str(n): p8}, "exact_coverage": cov}
    runs = {}
    for m, s in itertools.product(methods, seeds):
        final, records = per_run(m, s)
        out = tmp_path / experiments.run_name(m, s)
        out.mkdir(parents=True)
        lines = [{"step": k, "eval": {sp: split(*v) for sp, v in ev.items()}} for k, ev in records.items()]
        (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        runs[experiments.run_name(m, s)] = {"config": {"out": str(out)},
                                            "final": {sp: split(*v) for sp, v in final.items()},
                                            "base": {sp: split(0.1, 0.5, 0.4) for sp in final}}
    base = {sp: {"exact_pass@1": {"mean": 0.1}} for sp in ("train", "test")}
    return {"methods": methods, "seeds": seeds, "runs": runs, "config": {"eval_n": n}, "summary": {"base": base},
            "paired_vs": methods[0]}


def test_frontier_points_and_gaps_are_paired_by_seed_on_the_right_splits(tmp_path):
    # two families on two seeds; values (train p@1, test p@1, test coverage) chosen so that every gap is known by hand
    finals = {("a@x=1", 0): (0.2, 0.05, 0.30), ("a@x=2", 0): (0.6, 0.15, 0.10),
              ("a@x=1", 1): (0.4, 0.05, 0.40), ("a@x=2", 1): (0.8, 0.25, 0.20),
              ("iac+dlc@dlc_mu=1", 0): (0.4, 0.10, 0.30), ("iac+dlc@dlc_mu=1", 1): (0.9, 0.10, 0.60)}
    traj = {1: {"train": (0.3, 0.2, 0.5), "test": (0.1, 0.2, 0.3)},
            2: {"train": (0.5, 0.2, 0.5), "test": (0.1, 0.1, 0.3)}}
    families = {"a": ("a", "x", (1, 2)), "iac+dlc": ("iac+dlc", "dlc_mu", (1,)), "steps": ("g", "steps", (300,))}

    def per_run(m, s):
        if m.startswith("g"):
            return {"train": (0.5, 0.2, 0.5), "test": (0.1, 0.1, 0.3)}, traj
        p1, held_p1, cov = finals[(m, s)]
        return {"train": (p1, 0.9, 0.9), "test": (held_p1, cov, 0.5)}, {}

    results = _fake_results(tmp_path, ["a@x=1", "a@x=2", "iac+dlc@dlc_mu=1", "g@steps=300"], [0, 1], per_run)
    pts = experiments.frontier_points(results, families)
    assert pts["a"]["train/exact_pass@1"] == [[0.2, 0.6], [0.4, 0.8]]
    assert pts["a"]["held/exact_pass@1"] == [[0.05, 0.15], [0.05, 0.25]]
    assert pts["a"]["held/exact_coverage"] == [[0.30, 0.10], [0.40, 0.20]]
    assert pts["steps"]["train/exact_pass@1"] == [[0.1, 0.3, 0.5]] * 2  # the base, then each evaluation
    gaps = experiments.frontier_gaps(pts)
    # seed 0: x 0.4 on the segment 0.2 -> 0.6, coverage 0.30 -> 0.10 gives 0.20: gap +0.10; seed 1: x 0.9 is outside
    g = gaps["a"]["train/exact_pass@1"]["held/exact_coverage"][0]
    assert g["mean"] == pytest.approx(0.10) and g["n"] == 1
    # at matched held-out pass@1: seed 0 x 0.10 -> 0.20 (gap +0.10), seed 1 x 0.10 -> 0.40 - 0.2 * 0.25 = 0.35 (+0.25)
    g = gaps["a"]["held/exact_pass@1"]["held/exact_coverage"][0]
    assert g["mean"] == pytest.approx(0.175) and g["n"] == 2
    # the trajectory at train pass@1 0.4: halfway between steps 1 and 2, coverage 0.15; seed 1's 0.9 is outside
    g = gaps["steps"]["train/exact_pass@1"]["held/exact_coverage"][0]
    assert g["mean"] == pytest.approx(0.30 - 0.15) and g["n"] == 1


def test_the_checkpoint_is_chosen_on_val_and_reported_on_test(tmp_path):
    # val exact pass@8 peaks at step 2 on seed 0 and ties at steps 1 and 3 on seed 1 (the earlier wins); test differs
    val8 = {0: {1: 0.3, 2: 0.5, 3: 0.4}, 1: {1: 0.6, 2: 0.2, 3: 0.6}}

    def per_run(m, s):
        records = {k: {"train": (0.1 * k, 0.5, 0.5), "val": (0.1, 0.2, v), "test": (0.1, 0.01 * k + s, 0.9 - v)}
                   for k, v in val8[s].items()}
        return {"train": (0.5, 0.5, 0.5), "val": (0.1, 0.2, 0.3), "test": (0.1, 0.2, 0.3)}, records

    for n in (8, 4):  # with --eval-n below 8 the choice falls back to exact pass@n
        chosen, paired = experiments.chosen_checkpoints(_fake_results(tmp_path / str(n), ["grpo", "iac"], [0, 1],
                                                                      per_run, n))
        assert paired["iac"]["test"]["exact_coverage"] == {"mean": 0.0, "ci95": 0.0, "n": 2}  # the same runs
        chosen = chosen["grpo"]
        assert chosen["steps"] == [2, 1]
        assert chosen["test"]["exact_coverage"]["mean"] == pytest.approx(np.mean([0.02, 1.01]))
        assert chosen["test"][f"exact_pass@{n}"]["mean"] == pytest.approx(np.mean([0.4, 0.3]))
        assert chosen["train"]["exact_pass@1"]["mean"] == pytest.approx(np.mean([0.2, 0.1]))


def test_frontier_runs_every_setting_and_refuses_reused_runs_with_other_settings(tmp_path, task_dir):
    families = {"grpo+T": ("grpo", "rollout_temperature", (1.0, 2.0)), "iac+dlc": ("iac+dlc", "dlc_mu", (0.5,)),
                "grpo steps": ("grpo@eval_every=1", "steps", (300,))}  # the trajectory runs --steps (2), not 300
    cfg = tiny_cfg(tmp_path, task_dir, out=str(tmp_path / "fr"), steps=2, eval_split="val")
    report = experiments.frontier(cfg, [0, 1], jobs=1, families=families)
    results = json.loads((tmp_path / "fr" / "results.json").read_text())
    assert len(results["runs"]) == 8 and report["held"] == "val"
    assert [len(p) for p in report["points"]["grpo steps"]["train/exact_pass@1"]] == [3, 3]  # base, steps 1, 2
    assert results["runs"]["grpo_rollout_temperature2.0-s1"]["config"]["rollout_temperature"] == 2.0
    assert "| grpo+T | rollout_temperature=2.0 |" in (tmp_path / "fr" / "frontier.md").read_text()
    assert results["runs"]["grpo_eval_every1_steps2-s0"]["config"]["steps"] == 2
    assert (tmp_path / "fr" / "frontier.png").exists() == (experiments.pyplot() is not None)
    saved = tmp_path / "fr" / "runs" / "iac-dlc_dlc_mu0.5-s0" / "summary.json"  # a run from before a knob existed
    summary = json.loads(saved.read_text())
    del summary["config"]["rollout_min_p"]
    saved.write_text(json.dumps(summary))
    again = experiments.compare(dataclasses.replace(cfg, eval_every=0, micro_batch=3), ["iac+dlc@dlc_mu=0.5"], [0, 1])
    assert again["runs_done_now"] == 0  # a missing knob reads as its default; --micro-batch never changes a sample
    other_tasks = tmp_path / "other"
    shutil.copytree(task_dir, other_tasks)
    (other_tasks / "test.jsonl").write_text("".join((other_tasks / "test.jsonl").read_text().splitlines(True)[:-1]))
    for changed, knob in ((dict(eval_batch=7), "eval_batch"), (dict(tasks=str(other_tasks)), "task_files_sha")):
        with pytest.raises(rlvr.UserError, match=f"ran with other settings \\({knob}="):  # sampled metrics, questions
            experiments.compare(dataclasses.replace(cfg, eval_every=0, **changed), ["iac+dlc@dlc_mu=0.5"], [0, 1])
    with pytest.raises(rlvr.UserError, match="repeated seed"):
        experiments.compare(cfg, ["grpo"], [0, 0])
    with pytest.raises(rlvr.UserError, match="ran with other settings"):  # a test frontier must not reuse val runs
        experiments.frontier(dataclasses.replace(cfg, eval_split="test"), [0, 1], jobs=1, families=families)
    with pytest.raises(rlvr.UserError, match="share a run folder"):
        experiments.compare(cfg, ["grpo@lr=1e+2", "grpo@lr=1e-2"], [0])


def test_compare_runs_from_the_command_line(tmp_path, task_dir, capsys):
    args = ["--tasks", str(task_dir), "--cache-dir", str(tmp_path / "cache"), "--n-embd", "32", "--n-layer", "1",
            "--n-head", "2", "--ws-steps", "30", "--ws-batch", "32", "--steps", "1", "--queries-per-step", "2",
            "--group-size", "4", "--eval-n", "4", "--eval-every", "0", "--jobs", "1", "--out", str(tmp_path / "cmp")]
    experiments.main(["compare", "--methods", "grpo,iac", "--seeds", "0", *args])
    assert "| iac |" in capsys.readouterr().out and (tmp_path / "cmp" / "results.md").exists()
    with pytest.raises(rlvr.UserError, match="--grid chooses the sweep values"):
        experiments.main(["frontier", "--grid", *args])
