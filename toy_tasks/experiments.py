"""The experiments behind the results: methods x seeds on one budget, frontiers, and the long budget.

  python toy_tasks/experiments.py compare --methods grpo,iac,dlc,iac+dlc --seeds 0,1,2,3,4 --out runs/compare
  python toy_tasks/experiments.py frontier --seeds 0,1,2,3,4 --out runs/frontier       # --grid: the validation sweep

Every run of a comparison starts from the same warm-started base per seed and spends the same budget; `compare`
writes results.json, results.md (mean +- 95% CI over seeds, and each method's difference to GRPO paired by seed),
passk.png and training.png. A method may set knobs after '@' (grpo@rollout_temperature=1.5): one dial setting of a
frontier. Finished runs are reused, but only with the same settings and questions; summaries record which rlvr.py
and platform made them. Any rlvr.py knob is a flag here too (--steps, --eval-split val,test, ...).
"""
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import rlvr  # noqa: E402
from rlvr import Config, UserError  # noqa: E402


# -- Statistics over seeds
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t quantiles, df = 1..10


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% confidence interval (Student t over seeds)."""
    v = np.asarray(values, dtype=float)
    df = len(v) - 1  # beyond df 10: the t quantile's series in 1/df (Cornish-Fisher), within 0.001
    t = T_975[df - 1] if df <= 10 else 1.95996 + 2.37227 / df + 2.8225 / df**2 + 2.55585 / df**3
    return {"mean": float(v.mean()), "ci95": float(t * v.std(ddof=1) / math.sqrt(len(v))) if df else 0.0, "n": len(v)}


# every metric of a run, n the samples per query (the demo prints rlvr.COLUMNS only)
TABLE_COLUMNS = ("exact_pass@1", "exact_pass@n", "exact_coverage", "pass@1", "pass@8", "pass@n", "coverage",
                 "oversharpened", "noncanonical", "entropy")


def ci_cell(sign: str = ""):
    """A results_table cell: mean +- 95% CI (or a plain number)."""
    return lambda v: f"{v['mean']:{sign}.3f} +- {v['ci95']:.3f}" if isinstance(v, dict) else f"{v:{sign}.3f}"


def pyplot():
    """matplotlib's pyplot without a display, or None (with a hint) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no figures (pip install matplotlib)")


# -- Which code, questions and platform made a run: a finished run is reused only where they match
def code_sha() -> str:
    return hashlib.sha256(Path(rlvr.__file__).read_bytes()).hexdigest()[:12]


def tasks_sha(folder: str) -> str:  # each file's name with its content: moving a line between splits changes it
    return hashlib.sha256(b"".join(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest()
                                   for p in sorted(Path(folder).glob("*.jsonl")))).hexdigest()[:12]


def platform_id(device: torch.device) -> str:
    """Float results depend on the kernels, so on torch and the chip (two CPUs of one capability differ)."""
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo").read_text() if device.type == "cpu" and Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return f"torch {torch.__version__} {chip} {model}".strip()


def stamp(cfg: Config) -> dict:
    """Add to a finished run's summary.json which rlvr.py, questions and platform made it."""
    path = Path(cfg.out) / "summary.json"
    summary = json.loads(path.read_text()) | {"code": code_sha(), "platform": platform_id(rlvr.pick_device(cfg.device)),
                                              "task_files_sha": tasks_sha(cfg.tasks)}
    rlvr.write_json(path, summary)
    return summary


# -- compare: every method from the same base per seed, same budget, mean and 95% CI over seeds
def eval_records(run: dict) -> dict[int, dict]:
    """A run's evaluations during training, {step: metrics per split}, read from its metrics.jsonl."""
    path = Path(run["config"]["out"]) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["step"]: r["eval"] for r in map(json.loads, lines) if "eval" in r}


def _run_one(job: tuple[dict, str]) -> str:
    cfg, kind = Config(**job[0]), job[1]
    if kind == "base":
        tokenizer = rlvr.load_tokenizer(cfg.model)
        train = rlvr.TaskSet.build(rlvr.load_tasks(cfg.tasks, "train"), tokenizer)
        rlvr.get_base(cfg, train, tokenizer, rlvr.pick_device(cfg.device))
    else:
        rlvr.train(cfg)
        stamp(cfg)
    return cfg.out


def run_name(method: str, seed: int) -> str:
    return f"{method.replace('+', '-').replace('@', '_').replace('=', '')}-s{seed}"


# what every run of a comparison shares: its base, its evaluation, where it runs
SHARED_KNOBS = {"method", "seed", "out", "threads", "device", "tasks", "model", "cache_dir", "base_seed", "n_embd",
                "n_layer", "n_head", "ws_steps", "ws_batch", "ws_lr", "eval_n", "eval_split", "temperature",
                "max_new_tokens"}
RUN_ONLY = {"out", "threads", "cache_dir", "tasks", "micro_batch", "save_every"}  # never change a sample (tasks: hash)
# knobs an older rlvr.py had, at the values that made them no-ops: a run made with any other value is not reused
REMOVED_KNOBS = {"iac_renorm": False, "weight_decay": 0.0, "clip_eps": 0.2, "max_grad_norm": 1.0}


def variant_config(cfg: Config, variant: str) -> Config:
    """A method with knobs set after '@': 'iac+dlc', 'grpo@rollout_temperature=1.5', 'iac+dlc@dlc_mu=1@mem_lr=0.01'."""
    method, *settings = variant.split("@")
    changes: dict[str, object] = {"method": method}
    for setting in settings:
        name, _, value = setting.partition("=")
        name = name.replace("-", "_")
        if name not in Config.__dataclass_fields__ or not value:
            raise UserError(f"{variant!r}: '@{setting}' is not knob=value with a Config knob (e.g. dlc_mu=1.5)")
        if name in SHARED_KNOBS:
            raise UserError(f"{variant!r}: {name} is shared by every run: set it with --{name.replace('_', '-')}")
        kind = type(getattr(cfg, name))
        try:
            if kind is bool and value.lower() not in ("true", "false"):
                raise ValueError
            changes[name] = value.lower() == "true" if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"{variant!r}: {value!r} is not a valid {name}") from None
    return dataclasses.replace(cfg, **changes)


def compare(cfg: Config, methods: list[str], seeds: list[int], jobs: int = 1) -> dict:
    """Run every (method, seed) not already finished into cfg.out/runs/, then aggregate and plot."""
    for m in methods:
        rlvr.validate_config(variant_config(cfg, m))
    out = Path(cfg.out)
    t0 = time.perf_counter()
    threads = cfg.threads or max(1, min(4, (os.cpu_count() or 1) // jobs))
    cfgs = {(m, s): dataclasses.replace(variant_config(cfg, m), seed=s, threads=threads,
                                        out=str(out / "runs" / run_name(m, s))) for s in seeds for m in methods}
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {','.join(map(str, seeds))}: a repeated seed would count one run twice")
    if len({run_name(m, 0) for m in methods}) < len(methods):
        raise UserError("two --methods share a run folder name: spell each variant differently")
    todo = [c for c in cfgs.values() if not (Path(c.out) / "summary.json").exists()]  # resumable
    made_elsewhere = []  # another rlvr.py or platform: warned, not refused (a comment edit changes the code hash)
    for c in [c for c in cfgs.values() if c not in todo]:  # a finished run is reused only with the same settings
        summary, now = json.loads((Path(c.out) / "summary.json").read_text()), dataclasses.asdict(c)
        if (summary.get("code"), summary.get("platform")) != (code_sha(), platform_id(rlvr.pick_device(c.device))):
            made_elsewhere.append(Path(c.out).name)
        if "task_files_sha" not in summary:  # made outside compare, or stopped before `stamp`
            raise UserError(f"{c.out}: no record of the questions it ran on: delete it to rerun it")
        now["task_files_sha"] = tasks_sha(c.tasks)  # a knob added later reads as its default
        saved = summary["config"] | {"task_files_sha": summary["task_files_sha"]}
        differ = [k for k, v in now.items() if k not in RUN_ONLY and saved.get(k, getattr(Config, k, None)) != v]
        differ += [k for k, v in REMOVED_KNOBS.items() if saved.get(k, v) != v]
        if differ:
            raise UserError(f"{c.out} ran with other settings ({differ[0]}={saved.get(differ[0])!r}, not "
                            f"{now.get(differ[0], REMOVED_KNOBS.get(differ[0]))!r}): compare into a new --out")
    print(f"compare: {len(cfgs)} runs, {len(cfgs) - len(todo)} already finished, {jobs} parallel job(s)")
    if made_elsewhere:
        print(f"compare: {len(made_elsewhere)} reused run(s) were made by another rlvr.py or platform "
              f"({', '.join(made_elsewhere[:3])}{', ...' if len(made_elsewhere) > 3 else ''}); delete them to rerun")
    bases = [(dataclasses.asdict(dataclasses.replace(cfg, threads=threads)), "base")]  # one base for every run
    work = [(dataclasses.asdict(c), "run") for c in todo]
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(jobs) as pool:  # spawn: no forked torch thread pools
            list(pool.imap_unordered(_run_one, bases))  # warm-start each seed's base once, before the runs share it
            list(rlvr.progress(pool.imap_unordered(_run_one, work), total=len(work), desc="compare"))
            pool.close()  # let the workers exit on their own: leaving the block would terminate() them mid-shutdown
            pool.join()
    else:
        for job in bases + work:
            _run_one(job)
    runs = {run_name(m, s): json.loads((Path(c.out) / "summary.json").read_text()) for (m, s), c in cfgs.items()}
    for (m, s), c in cfgs.items():  # where the run is now (its metrics.jsonl), wherever the folder was first made
        runs[run_name(m, s)]["config"]["out"] = c.out
    results = {"methods": methods, "seeds": seeds, "config": dataclasses.asdict(cfg), "runs": runs, "summary": {},
               "wall_s": round(time.perf_counter() - t0, 1), "runs_done_now": len(todo)}
    if not todo and (out / "results.json").exists():  # nothing ran: keep the wall time of the invocation that did
        results["wall_s"] = json.loads((out / "results.json").read_text()).get("wall_s", results["wall_s"])
    splits = list(next(iter(runs.values()))["final"])
    stale = [name for name, run in runs.items() if "exact_pass@k" not in run["final"][splits[0]]]
    if stale:
        raise UserError(f"{out}/runs/{stale[0]}/summary.json was written by an older rlvr.py (no exact metrics): "
                        "delete it, or compare into a new --out")

    def final(name, seed, split):  # the base's metrics come from any run of that seed: they share the base
        run = runs[run_name(methods[0] if name == "base" else name, seed)]
        return rlvr.flat_metrics(run["base" if name == "base" else "final"][split])

    for name in ["base"] + methods:
        results["summary"][name] = {split: {k: mean_ci([final(name, s, split)[k] for s in seeds])
                                            for k in final(name, seeds[0], split)} for split in splits}
    reference = "grpo" if "grpo" in methods else methods[0]
    results["paired_vs"], results["paired"] = reference, {}
    for m in methods:  # per-seed differences to the reference: same base, same seed, so much of the noise cancels
        if m != reference:
            results["paired"][m] = {split: {k: mean_ci([final(m, s, split)[k] - final(reference, s, split)[k]
                                                        for s in seeds]) for k in final(m, seeds[0], split)}
                                    for split in splits}
    for m in methods:
        results["summary"][m]["budget"] = {k: mean_ci([runs[run_name(m, s)]["budget"][k] for s in seeds])
                                           for k in ("rollouts", "generated_tokens")}
        results["summary"][m]["rl_s"] = mean_ci([runs[run_name(m, s)]["timing"]["rl_s"] for s in seeds])
    if splits[1:] == ["val", "test"]:  # the paper keeps its peak checkpoint: ours is chosen on val, reported on test
        results["chosen"], results["chosen_paired"] = chosen_checkpoints(results)
    rlvr.write_json(out / "results.json", results)
    (out / "results.md").write_text(compare_report(results))
    plot_results(results, out)
    return results


CHOOSE_BY = 8  # exact pass@8 (the paper's headline PASS@8, or pass@n if --eval-n is below 8), measured on val


def chosen_checkpoints(results: dict) -> tuple[dict, dict]:
    """Per method: the train and test metrics of each run at its evaluation with the highest val exact pass@8
    (steps >= 1, so the base is never chosen), and the chosen steps; mean and 95% CI over seeds. Then each method's
    difference to the reference there, paired by seed."""
    chosen, picks, key = {}, {}, f"exact_pass@{min(CHOOSE_BY, results['config']['eval_n'])}"
    for m in results["methods"]:
        picks[m] = []
        for s in results["seeds"]:
            records = eval_records(results["runs"][run_name(m, s)])
            step = max(records, key=lambda k: (rlvr.flat_metrics(records[k]["val"])[key], -k))  # ties: the earlier
            picks[m].append((step, {split: rlvr.flat_metrics(records[step][split]) for split in ("train", "test")}))
        chosen[m] = {split: {k: mean_ci([p[1][split][k] for p in picks[m]]) for k in picks[m][0][1][split]}
                     for split in ("train", "test")} | {"steps": [p[0] for p in picks[m]]}
    ref = results["paired_vs"]
    paired = {m: {split: {k: mean_ci([p[1][split][k] - r[1][split][k] for p, r in zip(picks[m], picks[ref])])
                          for k in picks[m][0][1][split]} for split in ("train", "test")}
              for m in results["methods"] if m != ref}
    return chosen, paired


def compare_report(results: dict) -> str:
    """results.md: mean +- 95% CI over seeds, then each method's difference to the reference paired by seed."""
    seeds, splits = results["seeds"], list(results["summary"]["base"])
    text = f"Mean +- 95% CI over {len(seeds)} seeds ({', '.join(map(str, seeds))}).\n\n"
    text += rlvr.results_table(results["summary"], splits, TABLE_COLUMNS, ci_cell())
    if results["paired"]:
        text += (f"\n*Difference to {results['paired_vs']}, paired by seed (same base and seed)*\n\n"
                 + rlvr.results_table(results["paired"], splits, TABLE_COLUMNS, ci_cell("+")))
    if "chosen" in results:
        k = min(CHOOSE_BY, results["config"]["eval_n"])
        text += (f"\n*At the checkpoint chosen on val (highest val exact pass@{k}); chosen steps per seed: "
                 + "; ".join(f"{m} {c['steps']}" for m, c in results["chosen"].items()) + "*\n\n"
                 + rlvr.results_table(results["chosen"], ["train", "test"], TABLE_COLUMNS, ci_cell()))
        if results.get("chosen_paired"):
            text += (f"\n*At the chosen checkpoints, difference to {results['paired_vs']}'s, paired by seed*\n\n"
                     + rlvr.results_table(results["chosen_paired"], ["train", "test"], TABLE_COLUMNS, ci_cell("+")))
    return text


def plot_results(results: dict, out: Path) -> None:
    """passk.png: exact pass@k vs k; training.png: accuracy and held-out diversity over training, and against each
    other (matched accuracy)."""
    if (plt := pyplot()) is None:
        return
    summary, splits = results["summary"], list(results["summary"]["base"])
    colors = list(plt.cm.tab10.colors) + ["#6b3d9a", "#b15928", "#1f3f5f", "#8c8c00"]
    style = {m: {"color": colors[i % len(colors)], "lw": 2.6 if m in ("grpo", "iac+dlc") else 1.2}
             for i, m in enumerate(results["methods"])} | {"base": {"color": "k", "ls": "--"}}
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for name, per_split in summary.items():
            ks = sorted(int(k[len("exact_pass@"):]) for k in per_split[split] if k.startswith("exact_pass@"))
            mean, ci = (np.array([per_split[split][f"exact_pass@{k}"][s] for k in ks]) for s in ("mean", "ci95"))
            ax.plot(ks, mean, marker="o", ms=3, label=name, **style[name])
            ax.fill_between(ks, mean - ci, mean + ci, alpha=0.15, color=style[name]["color"])
        ax.set_xscale("log", base=2)
        ax.set(title=f"{split} queries", xlabel="k", ylabel="pass@k (exact)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "passk.png", dpi=80)
    plt.close(fig)
    # over training: (train pass@1, held-out coverage, held-out pass@1) of every eval record, averaged per step
    held, curves = splits[-1], {}

    def point(ev):
        return ev["train"]["exact_pass@k"]["1"], ev[held]["exact_coverage"], ev[held]["exact_pass@k"]["1"]

    for method, seed in itertools.product(results["methods"], results["seeds"]):
        run = results["runs"][run_name(method, seed)]
        for step, ev in ({0: run["base"]} | eval_records(run)).items():  # every curve starts at the base
            curves.setdefault(method, {}).setdefault(step, []).append(point(ev))
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
    base = point({split: {"exact_pass@k": {"1": m["exact_pass@1"]["mean"]},
                          "exact_coverage": m["exact_coverage"]["mean"]} for split, m in summary["base"].items()})
    for method, by_step in curves.items():
        steps = sorted(by_step)
        avg = np.array([np.mean(by_step[s], axis=0) for s in steps])
        for ax, (x, y) in zip(axes, ((steps, avg[:, 0]), (steps, avg[:, 1]), (avg[:, 0], avg[:, 1]),
                                     (avg[:, 0], avg[:, 2]))):
            ax.plot(x, y, marker="o", ms=3, label=method, **style[method])
        for ax, column in zip(axes[:2], (0, 1)):  # 95% CI over seeds around the curves over steps
            ci = np.array([mean_ci([p[column] for p in by_step[s]])["ci95"] for s in steps])
            ax.fill_between(steps, avg[:, column] - ci, avg[:, column] + ci, alpha=0.15, color=style[method]["color"])
    axes[0].axhline(base[0], color="k", ls="--", lw=1, label="base")
    axes[1].axhline(base[1], color="k", ls="--", lw=1)
    axes[2].plot([base[0]], [base[1]], "k*", ms=10)
    axes[3].plot([base[0]], [base[2]], "k*", ms=10)
    axes[0].set(xlabel="RL step", ylabel="train pass@1", title="accuracy over training")
    axes[1].set(xlabel="RL step", ylabel=f"{held} coverage", title="held-out diversity over training")
    axes[2].set(xlabel="train pass@1", ylabel=f"{held} coverage",
                title="diversity at matched accuracy (higher is better)")
    axes[3].set(xlabel="train pass@1", ylabel=f"{held} pass@1", title="generalisation at matched accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(out / "training.png", dpi=80)
    plt.close(fig)


# -- Frontiers: every method's accuracy-diversity dial swept, curves compared at matched accuracy
# family: (method, the knob it sweeps, values). The grid is run on the validation split; FRONTIER keeps the values
# chosen there before the test run (toy_tasks/results/README.md#frontiers). "grpo+T": GRPO, hotter rollouts only.
FRONTIER_GRID = {
    "grpo+T": ("grpo", "rollout_temperature", (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)),
    "grpo+T+minp": ("grpo@rollout_min_p=0.05", "rollout_temperature", (1.0, 1.5, 2.0, 3.0, 5.0)),
    "iac+T": ("iac", "rollout_temperature", (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)),
    "iac+T+minp": ("iac@rollout_min_p=0.05", "rollout_temperature", (1.0, 1.5, 2.0, 3.0, 5.0)),
    "iac+dlc": ("iac+dlc", "dlc_mu", (0.25, 0.5, 1.0, 1.5, 2.0)),
    "dlc": ("dlc", "dlc_mu", (0.25, 0.5, 1.0, 1.5, 2.0)),
    "entropy": ("grpo+entropy", "entropy_coef", (0.001, 0.003, 0.01, 0.03, 0.1)),
    "kl": ("grpo+kl", "kl_coef", (0.01, 0.04, 0.1, 0.3, 1.0)),
    "wreinforce": ("wreinforce", "wreinforce_weight", (0.03, 0.1, 0.3, 0.5, 1.0)),
    "passk": ("passk", "passk_k", (2, 3, 4, 6)),  # k = G = 8 credits nothing (it never moved: now refused)
    "grpo steps": ("grpo@eval_every=25", "steps", (300,)),  # one run (of --steps): GRPO's trajectory from the base
}
# chosen on val (seeds 100-101): per family 4 settings that learned (train pass@1 above the base's), its default
# included, spread over its train pass@1 range; the min-p variants lay below the plain ones and are not rerun
FRONTIER = {
    "grpo+T": ("grpo", "rollout_temperature", (1.0, 1.25, 1.5, 2.0)),
    "iac+T": ("iac", "rollout_temperature", (1.0, 1.25, 1.5, 2.0)),
    "iac+dlc": ("iac+dlc", "dlc_mu", (0.25, 0.5, 1.0, 2.0)),
    "dlc": ("dlc", "dlc_mu", (0.25, 0.5, 1.0, 2.0)),
    "entropy": ("grpo+entropy", "entropy_coef", (0.001, 0.003, 0.01, 0.03)),
    "kl": ("grpo+kl", "kl_coef", (0.04, 0.1, 0.3, 1.0)),
    "wreinforce": ("wreinforce", "wreinforce_weight", (0.1, 0.3, 0.5, 1.0)),
    "passk": ("passk", "passk_k", (2, 3, 4, 6)),
    "grpo steps": ("grpo@eval_every=25", "steps", (300,)),
}
REFERENCE = "iac+dlc"  # the paper's method: every other curve is compared with it
AXES = (("train", "exact_pass@1"), ("held", "exact_pass@1"))  # matched accuracy: on train, or held out
HEIGHTS = ("exact_coverage", "exact_pass@n")  # held-out diversity


def frontier_variants(families: dict) -> dict[str, list[str]]:
    return {f: [f"{method}@{dial}={v}" for v in values] for f, (method, dial, values) in families.items()}


def matched_gap(x: list[float], y: list[float], curve_x: list[float], curve_y: list[float]) -> list[float | None]:
    """How far each point (x, y) lies above a curve at the same x: y - the curve linearly interpolated between its
    points (sorted by x); None where x is outside the curve's range (no extrapolation)."""
    order = np.argsort(curve_x)
    cx, cy = np.asarray(curve_x, dtype=float)[order], np.asarray(curve_y, dtype=float)[order]
    return [float(yi - np.interp(xi, cx, cy)) if cx[0] <= xi <= cx[-1] else None for xi, yi in zip(x, y)]


def frontier_points(results: dict, families: dict) -> dict[str, dict]:
    """{family: {"split/metric": [per seed, the value at each dial setting]}} for every axis and height. A family
    whose dial is `steps` is one run's trajectory: the base, then its evaluations every --eval-every steps."""
    held, n = list(results["summary"]["base"])[-1], results["config"]["eval_n"]
    value = lambda ev, key: rlvr.flat_metrics(ev[key[0].replace("held", held)])[key[1].replace("@n", f"@{n}")]  # noqa
    run = lambda name, s: results["runs"][run_name(name, s)]  # noqa: E731

    def evals(family, s):
        names = frontier_variants({family: families[family]})[family]
        if families[family][1] == "steps":
            return [ev for _, ev in sorted(({0: run(names[0], s)["base"]} | eval_records(run(names[0], s))).items())]
        return [run(v, s)["final"] for v in names]

    keys = AXES + tuple(("held", h) for h in HEIGHTS)
    return {family: {"/".join(key): [[value(ev, key) for ev in evals(family, s)] for s in results["seeds"]]
                     for key in keys} for family in families}


def frontier_gaps(points: dict[str, dict]) -> dict:
    """IAC+DLC's height above each other curve at matched accuracy, paired by seed, per IAC+DLC setting:
    {family: {axis: {height: [mean_ci over the seeds where that setting's x lies inside the curve's range]}}}."""
    ref, gaps = points[REFERENCE], {}
    for family, pts in points.items():
        if family == REFERENCE:
            continue
        for axis in ("/".join(a) for a in AXES):
            for height in ("held/" + h for h in HEIGHTS):
                per_setting = list(zip(*[matched_gap(ref[axis][s], ref[height][s], pts[axis][s], pts[height][s])
                                         for s in range(len(ref[axis]))]))
                gaps.setdefault(family, {}).setdefault(axis, {})[height] = [
                    mean_ci([g for g in seeds if g is not None]) if any(g is not None for g in seeds) else None
                    for seeds in per_setting]
    return gaps


def frontier(cfg: Config, seeds: list[int], jobs: int = 1, families: dict | None = None) -> dict:
    """Run every family's dial settings (`compare`, resumable), then frontier.md and frontier.png."""
    families = {f: (method, dial, (cfg.steps,) if dial == "steps" else values)  # the trajectory runs --steps long
                for f, (method, dial, values) in (FRONTIER if families is None else families).items()}
    variants = frontier_variants(families)
    # each dial setting is one point, its final evaluation; a trajectory family sets its own --eval-every
    results = compare(dataclasses.replace(cfg, eval_every=0), [v for names in variants.values() for v in names],
                      seeds, jobs)
    points = frontier_points(results, families)
    report = {"families": families, "variants": variants, "points": points,
              "gaps": frontier_gaps(points) if REFERENCE in points else {}, "seeds": seeds,
              "held": list(results["summary"]["base"])[-1], "wall_s": results["wall_s"]}
    rlvr.write_json(Path(cfg.out) / "frontier.json", report)
    (Path(cfg.out) / "frontier.md").write_text(frontier_report(report, results))
    plot_frontier(report, results, Path(cfg.out))
    return report


def frontier_report(report: dict, results: dict) -> str:
    """frontier.md: every point (mean +- 95% CI over seeds), then IAC+DLC's height above each curve."""
    held, n = report["held"], results["config"]["eval_n"]
    cell = lambda v, sign="", seeds=True: "-" if v is None else f"{v['mean']:{sign}.3f}" + (  # noqa: E731
        f" +- {v['ci95']:.3f}" if v["n"] > 1 else "") + (f" ({v['n']})" if seeds else "")  # one seed: no interval
    text = (f"Frontiers on {held}: mean +- 95% CI over seeds {report['seeds']}; exact metrics.\n\n"
            f"| family | setting | train pass@1 | {held} pass@1 | {held} coverage | {held} pass@{n} |\n"
            "|---|---|---|---|---|---|\n")
    for family, names in report["variants"].items():
        for name in names:
            m = results["summary"][name]
            row = [m["train"]["exact_pass@1"]] + [m[held][f"exact_{k}"] for k in ("pass@1", "coverage", f"pass@{n}")]
            text += f"| {family} | {name.split('@')[-1]} | " + " | ".join(cell(v, seeds=False) for v in row) + " |\n"
    settings = [name.split("@")[-1] for name in report["variants"].get(REFERENCE, [])]
    for axis in ("/".join(a) for a in AXES):
        for height in ("held/" + h for h in HEIGHTS):
            text += (f"\n*{REFERENCE} minus each curve, at the same {axis.replace('held', held)} (interpolated, "
                     f"paired by seed; (k): seeds inside the curve's range): "
                     f"{height.replace('held', held).replace('@n', f'@{n}')}*\n\n"
                     f"| curve | " + " | ".join(settings) + " |\n" + "|---" * (len(settings) + 1) + "|\n")
            text += "".join(f"| {family} | " + " | ".join(cell(v, "+") for v in by_axis[axis][height]) + " |\n"
                            for family, by_axis in report["gaps"].items())
    return text


def plot_frontier(report: dict, results: dict, out: Path) -> None:
    """frontier.png: held-out coverage and pass@n against train and held-out pass@1, a curve per family with 95% CI
    bars over seeds, the base as a star, GRPO's training trajectory dashed."""
    if (plt := pyplot()) is None:
        return
    held, n, base = report["held"], results["config"]["eval_n"], results["summary"]["base"]
    fig, axes = plt.subplots(len(HEIGHTS), len(AXES), figsize=(6 * len(AXES), 4.5 * len(HEIGHTS)), squeeze=False)
    colors = dict(zip(report["points"], itertools.cycle(plt.cm.tab10.colors + plt.cm.Dark2.colors)))
    for (r, height), (c, axis) in itertools.product(enumerate(HEIGHTS), enumerate(AXES)):
        ax, xkey, ykey = axes[r][c], "/".join(axis), "held/" + height
        split = "train" if axis[0] == "train" else held
        means = [(base[split]["exact_pass@1"]["mean"], base[held][height.replace("@n", f"@{n}")]["mean"])]
        for family, pts in report["points"].items():
            xs, ys = np.array(pts[xkey]), np.array(pts[ykey])  # [seeds, settings]
            ci = lambda a: [mean_ci(col)["ci95"] for col in a.T]  # noqa: E731
            trajectory = report["families"][family][1] == "steps"
            ax.errorbar(xs.mean(0), ys.mean(0), xerr=ci(xs), yerr=ci(ys), marker="o", ms=4, capsize=2, label=family,
                        color=colors[family], ls="--" if trajectory else "-", lw=2.6 if family == REFERENCE else 1.2,
                        elinewidth=0.7, zorder=3 if family == REFERENCE else 2)
            means += list(zip(xs.mean(0), ys.mean(0)))
        ax.plot(*means[0], "k*", ms=14, label="base", zorder=4)
        lo, hi, pad = np.min(means, 0), np.max(means, 0), 1e-3 + 0.1 * np.ptp(means, 0)  # the means set the view
        ax.set(xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]))  # CI bars may run off
        ax.set(xlabel=f"{split} pass@1 (exact)", ylabel=f"{held} {height.replace('@n', f'@{n}')}".replace("_", " "))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(out / "frontier.png", dpi=80)
    plt.close(fig)


# -- The command line
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else ""
    if cmd not in ("compare", "frontier"):
        sys.exit("usage: python toy_tasks/experiments.py compare|frontier [--help]")
    p = rlvr.config_parser(f"experiments.py {cmd}")
    p.set_defaults(out=f"runs/{cmd}")
    if cmd == "compare":
        p.add_argument("--methods", default="grpo,iac,dlc,iac+dlc",
                       help="comma-separated methods, same base per seed (knobs after @: grpo@lr=1e-4)")
    else:
        p.add_argument("--grid", action="store_true", help="the wider validation grid (needs --eval-split val)")
    p.add_argument("--seeds", default="0,1,2" if cmd == "compare" else "0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel (each gets cores/jobs threads)")
    args = p.parse_args(argv[1:])
    cfg, seeds = rlvr.config_from(args), [int(x) for x in args.seeds.split(",")]
    if cmd == "compare":
        results = compare(cfg, args.methods.split(","), seeds, args.jobs)
        print(compare_report(results))
        print(f"compare finished in {results['wall_s']:.0f}s; results in {cfg.out}/results.json, results.md, *.png")
    else:
        if args.grid and cfg.eval_split != "val":
            raise UserError("--grid chooses the sweep values: run it with --eval-split val, never on test")
        report = frontier(cfg, seeds, args.jobs, FRONTIER_GRID if args.grid else None)
        print((Path(cfg.out) / "frontier.md").read_text())
        print(f"frontier finished in {report['wall_s']:.0f}s; {cfg.out}/frontier.md, frontier.png, results.md")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"experiments.py: error: {e}", file=sys.stderr)
        sys.exit(2)
