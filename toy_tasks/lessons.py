"""Why RLVR collapses, shown in seconds: sampling bias, semantic coupling, the mass on each correct answer, and
where DLC's diversity comes from.

  python toy_tasks/lessons.py                      # all four lessons, and runs/explain/explain.png
  python toy_tasks/lessons.py --lesson coupling    # one of bias, coupling, modes, credit
  python toy_tasks/lessons.py --runs runs/demo     # whose checkpoints join lesson 3 (run python rlvr.py first)
"""
import copy
import dataclasses
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import rlvr  # noqa: E402
from experiments import pyplot  # noqa: E402


def ideal_update(probs: Tensor, rewards: Tensor, beta: float = 1.0) -> Tensor:
    """The infinite-sample optimum of E[A] - beta KL(pi || pi_ref): pi* = pi_ref exp(A / beta) / Z.

    With 0/1 rewards every correct output has the same advantage, so every correct output is multiplied
    by the same factor exp(1/beta) / Z >= 1: none loses probability (moderate sharpening).
    """
    advantages = rewards - (probs * rewards).sum()
    unnorm = probs * torch.exp(advantages / beta)
    return unnorm / unnorm.sum()


def finite_group_update(probs: Tensor, rewards: Tensor, group_size: int, lr: float,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One GRPO step on categorical policies (a softmax over the outputs), each from ONE sampled group.

    probs: [chains, outputs], rewards: [outputs]. GRPO advantages sum to zero over a group, so the logit of an
    output that was not sampled does not move; sampled correct outputs go up, and the softmax normaliser
    takes the mass from everyone else, unsampled *correct* outputs included. Returns (new probs, sampled mask).
    """
    idx = torch.multinomial(probs, group_size, replacement=True, generator=generator)  # [chains, G]
    adv = rlvr.grpo_advantages(rewards[idx])
    logits = probs.log() + lr * torch.zeros_like(probs).scatter_add_(1, idx, adv) / group_size
    sampled = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    return torch.softmax(logits, dim=1), sampled


def sampling_bias_lesson(probs: Tensor, rewards: Tensor, group_sizes=(4, 8, 16, 64), groups: int = 2000,
                         lr: float = 1.0, steps: int = 30, seed: int = 0) -> dict:
    """One GRPO step from each of `groups` sampled groups, per group size G, against the ideal update.

    Per correct output: (1-p)^G, the share of groups after which it lost probability, its mean probability after
    a step when it was NOT sampled, and the ideal update at the same mean P(correct). Then `steps` steps in a
    row: the share of runs that leave a correct output below the base (in a tabular policy: none, see README).
    """
    gen = torch.Generator().manual_seed(seed)
    correct = rewards > 0
    p_c = probs[correct].sum()
    out = {"p_before": probs[correct].tolist(), "p_correct_before": p_c.item(), "groups_per_G": groups, "steps": steps,
           "G": {}}
    for G in group_sizes:
        start = probs.expand(groups, -1).clone()
        p, sampled = finite_group_update(start, rewards, G, lr, gen)
        fell = p[:, correct] < probs[correct] * (1 - 1e-9)  # a real loss, not float rounding of an all-correct group
        missed = ~sampled[:, correct]
        target = p[:, correct].sum(1).mean()
        # ideal at matched accuracy: pi*(correct) = p_c e^(1/beta) / (p_c e^(1/beta) + 1 - p_c) = target
        ideal = ideal_update(probs, rewards, beta=1 / math.log(target * (1 - p_c) / (p_c * (1 - target))))
        after_missed = torch.where(missed, p[:, correct], torch.nan).nanmean(0)
        for _ in range(steps - 1):
            p, _ = finite_group_update(p, rewards, G, lr, gen)
        out["G"][G] = {"miss_prob": ((1 - probs[correct]) ** G).tolist(), "fell": fell.double().mean(0).tolist(),
                       "fell_were_unsampled": (fell & missed).sum().item() / max(fell.sum().item(), 1),
                       "p_after_if_unsampled": after_missed.tolist(), "p_ideal": ideal[correct].tolist(),
                       "p_correct_after": target.item(),
                       "below_base_after_steps": (p[:, correct] < probs[correct] * (1 - 1e-9)).double().mean().item()}
    return out


def reinforce_one(model, tokenizer, prompt_ids: list[int], completion: str, steps: int, lr: float) -> None:
    """Push up log pi(completion | prompt) alone, as repeated positive advantages on one sample would.

    Plain SGD, so each step moves log pi(o'|q') of every other pair by about
    lr * <grad log pi(o'|q'), grad log pi(o|q)>:
    the coupling term of the paper, nothing an adaptive optimiser adds.
    """
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    r = rlvr.rollouts_from_text(tokenizer, [prompt_ids], [completion], device)
    for _ in range(steps):
        logp, _, _ = rlvr.completion_logprobs(model, r)
        loss = -(logp * r.completion_mask).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def overlap_group(reinforced: str, other: str) -> str:
    """How much a completion shares with the reinforced one: its exact text, its digits, its first token, or nothing."""
    if other == reinforced:
        return "same text"
    digits, other_digits = sorted(re.findall(r"\d", reinforced)), sorted(re.findall(r"\d", other))
    if digits == other_digits:
        return "same digits"
    if other[:1] == reinforced[:1]:
        return "same first token"
    return "some digits" if set(digits) & set(other_digits) else "none"


COUPLING_GROUPS = ("same text", "same digits", "same first token", "some digits", "none")


def coupling_lesson(model, tokenizer, splits: dict[str, rlvr.TaskSet], query: int, completion: str, steps: int = 30,
                    lr: float = 1e-3) -> dict:
    """Reinforce one completion of one training query; measure every correct completion of every OTHER query."""
    model, train = copy.deepcopy(model), splits["train"]
    # per split: the prompt of every correct completion, the completion, and its query's index
    flat = {name: list(zip(*[(p, s, i) for i, (p, sols) in enumerate(zip(ts.prompt_ids, ts.solutions)) for s in sols]))
            for name, ts in splits.items()}
    # the reinforced text as an answer to every other query (where it is wrong, unless it also solves that query)
    elsewhere = {name: [i for i in range(len(ts)) if not (name == "train" and i == query)]
                 for name, ts in splits.items()}

    def scores():
        correct = {name: rlvr.sequence_logprobs(model, tokenizer, list(p), list(c)) for name, (p, c, _) in flat.items()}
        reinforced = {name: rlvr.sequence_logprobs(model, tokenizer, [splits[name].prompt_ids[i] for i in idx],
                                              [completion] * len(idx)) for name, idx in elsewhere.items()}
        target = rlvr.sequence_logprobs(model, tokenizer, [train.prompt_ids[query]], [completion]).item()
        return correct, reinforced, target

    before, text_before, target_before = scores()
    reinforce_one(model, tokenizer, train.prompt_ids[query], completion, steps, lr)
    after, text_after, target_after = scores()
    result = {"query": train.tasks[query]["prompt"], "completion": completion,
              "p_before": math.exp(target_before), "p_after": math.exp(target_after), "splits": {}}
    for name, (_, comps, qidx) in flat.items():
        groups: dict[str, list[float]] = {g: [] for g in COUPLING_GROUPS}
        for i, (c, q) in enumerate(zip(comps, qidx)):
            if name == "train" and q == query:
                continue  # only OTHER queries
            groups[overlap_group(completion, c)].append((after[name][i] - before[name][i]).item())
        result["splits"][name] = {g: {"n": len(v), "mean_dlogp": float(np.mean(v)) if v else float("nan")}
                                  for g, v in groups.items()}
        result["splits"][name]["reinforced text"] = {"n": len(elsewhere[name]),
                                                     "mean_dlogp": (text_after[name] - text_before[name]).mean().item()}
    return result


def mode_mass_table(cfg: rlvr.Config, tokenizer, task: dict, prompt_ids: list[int], base, runs_dir: Path,
                    device) -> tuple[list[str], dict]:
    """Exact probability of each correct completion of `task` under the base and every checkpoint in runs_dir."""
    sols = rlvr.enumerate_solutions(task)
    columns = {"base": rlvr.sequence_logprobs(base, tokenizer, [prompt_ids] * len(sols), sols).exp()}
    for ckpt in sorted(runs_dir.glob("*/checkpoint")) if runs_dir.exists() else []:
        model, _ = rlvr.load_policy(ckpt, device, rlvr.attention_for(cfg))
        columns[ckpt.parent.name] = rlvr.sequence_logprobs(model, tokenizer, [prompt_ids] * len(sols), sols).exp()
    return sols, columns


def sequence_logq(model, memory, tokenizer, prompt_ids: list[list[int]], completions: list[str],
                  temperature: float, min_p: float = 0.0, batch: int = 256) -> Tensor:
    """Exact log q(completion + EOS | prompt) under DLC's sampler, built as `rlvr.sample` builds it at every
    position: the tempered policy, calibrated by the memory, cut to the untempered plausible tokens."""
    out = []
    for i in range(0, len(completions), batch):
        r = rlvr.rollouts_from_text(tokenizer, prompt_ids[i:i + batch], completions[i:i + batch],
                                    next(model.parameters()).device)
        with torch.no_grad(), rlvr.eval_mode(model):
            _, _, hidden = rlvr.completion_logprobs(model, r, amp=False)  # fp32, as pi's sequence_logprobs
            logits = model.get_output_embeddings()(hidden).float()
            logq = memory.calibrate(torch.log_softmax(logits / temperature, dim=-1), hidden)
            if min_p > 0:
                implausible = logits < logits.max(-1, keepdim=True).values + math.log(min_p)
                logq = torch.log_softmax(logq.masked_fill(implausible, -math.inf), dim=-1)
        out.append((logq.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1) * r.completion_mask).sum(1))
    return torch.cat(out)


def fit_memory(cfg: rlvr.Config, model, tokenizer, train: rlvr.TaskSet, steps: int = 5):
    """DLC's memory after its first `steps` steps, the policy held fixed: each step fitted to what the calibrated
    sampler drew for --queries-per-step training queries x --group-size samples, as in training."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the memory's init, without touching the caller's random state
        torch.manual_seed(cfg.seed)
        memory = rlvr.Memory(model.config.hidden_size, model.get_output_embeddings().weight.shape[0], cfg, device)
    rng, gen = random.Random(cfg.seed), torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in range(steps):
        queries = [rng.randrange(len(train)) for _ in range(cfg.queries_per_step)]
        prompts = [train.prompt_ids[q] for q in queries for _ in range(cfg.group_size)]
        r = rlvr.sample(model, tokenizer, prompts, cfg.max_new_tokens, cfg.rollout_temperature or cfg.temperature,
                        gen, memory=memory, min_p=cfg.rollout_min_p)
        with torch.no_grad():
            _, _, hidden = rlvr.completion_logprobs(model, r)
        memory.update(hidden, r.completion_ids, r.completion_mask)
    return memory


class SumOfUpdates:
    """An optimiser that keeps the gradient it is handed instead of taking a step; `add` sums it, unclipped."""

    def __init__(self, params):
        self.params = list(params)
        self.total = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none=True):
        self.last = None
        for p in self.params:
            p.grad = None

    def step(self):
        self.last = [p.grad.clone() for p in self.params]

    def add(self, grad_norm: float):
        """Add the last gradient as it was before `update_policy` clipped it to norm 1 (none if it skipped)."""
        if self.last is not None and math.isfinite(grad_norm):
            for total, g in zip(self.total, self.last):
                total += g * max(1.0, grad_norm + 1e-6)


def credit_lesson(cfg: rlvr.Config, model, tokenizer, train: rlvr.TaskSet, query: int, groups: int = 100,
                  lr: float = 0.005, caps: tuple = (0.0, 1.0)) -> dict:
    """Where DLC's diversity comes from. For each correct answer of one query: its probability under the policy
    (pi) and under DLC's sampler (q), in how many of `groups` groups q drew it, its credit (the mean over groups of
    advantage x the summed token weights of its draws: what the loss pushes it up by), and how the expected IAC+DLC
    update moves log pi: the mean gradient of those groups (the same groups for every cap), applied as one step of
    norm `lr`, small enough to be linear (training clips its batch gradient to norm 1, so directions are what
    differ). Without an importance weight (the default) every drawn answer gets full on-policy credit; with
    min(pi/q, cap) per token, the answers q draws more often than pi would get less."""
    memory = fit_memory(cfg, model, tokenizer, train)
    T, sols, prompt = cfg.rollout_temperature or cfg.temperature, train.solutions[query], train.prompt_ids[query]
    logp = rlvr.sequence_logprobs(model, tokenizer, [prompt] * len(sols), sols, temperature=T)
    logq = sequence_logq(model, memory, tokenizer, [prompt] * len(sols), sols, T, cfg.rollout_min_p)
    out = {"query": train.tasks[query]["prompt"], "completions": sols, "pi": logp.exp().tolist(),
           "q": logq.exp().tolist(), "q/pi": (logq - logp).exp().tolist(), "groups": groups, "G": cfg.group_size,
           "lr": lr, "delta": {}, "credit": {}, "groups_drawn": dict.fromkeys(sols, 0)}
    for cap in caps:
        step_cfg, policy = dataclasses.replace(cfg, method="iac+dlc", dlc_is_cap=cap), copy.deepcopy(model)
        updates, credit = SumOfUpdates(policy.parameters()), dict.fromkeys(sols, 0.0)
        for g in range(groups):
            batch = rlvr.collect_rollouts(step_cfg, policy, tokenizer, train, [query], 1000 + g, memory=memory)
            updates.add(rlvr.update_policy(step_cfg, policy, updates, batch)["grad_norm"])
            mask = batch.rollouts.completion_mask
            pushed = (mask if batch.weights is None else mask * batch.weights).sum(1) * batch.advantages
            for text, r, push in zip(batch.rollouts.texts, batch.rewards.view(-1).tolist(), pushed.tolist()):
                if r > 0 and text in credit:
                    credit[text] += push / groups
            if cap == caps[0]:  # every cap sees the same groups: the policy moves only after the last one
                for text in {t for t, r in zip(batch.rollouts.texts, batch.rewards.view(-1).tolist()) if r > 0}:
                    out["groups_drawn"][text] += 1
        norm = torch.cat([t.flatten() for t in updates.total]).norm().clamp(min=1e-12)  # 0 if no group had a gradient
        with torch.no_grad():  # a step of norm lr: training clips its batch gradient to norm 1 (almost every step)
            for total, p in zip(updates.total, updates.params):
                p -= lr * total / norm
        out["delta"][cap] = (rlvr.sequence_logprobs(policy, tokenizer, [prompt] * len(sols), sols, temperature=T)
                             - logp).tolist()
        out["credit"][cap] = [credit[o] for o in sols]
    return out


def credit_categories(c: dict) -> dict:
    """The lesson's three kinds of correct answer (boolean masks over c['completions'])."""
    drawn = np.array([c["groups_drawn"][o] > 0 for o in c["completions"]])
    over = np.array(c["q/pi"]) >= 2
    return {"rare under pi, drawn by q (q/pi >= 2)": over & drawn, "never drawn": ~drawn,
            "drawn, q/pi < 2": ~over & drawn}


def explain(cfg: rlvr.Config, runs_dir: Path, lesson: str = "all") -> dict:
    """Print (and plot, with matplotlib) the four lessons; each runs in seconds on a CPU."""
    rlvr.set_threads(cfg)
    device = rlvr.pick_device(cfg.device)
    tokenizer = rlvr.load_tokenizer(cfg.model)
    splits = {s: rlvr.TaskSet.build(rlvr.load_tasks(cfg.tasks, s), tokenizer) for s in ("train", "test")}
    base_path, _ = rlvr.get_base(cfg, splits["train"], tokenizer, device)
    base, _ = rlvr.load_policy(base_path, device, rlvr.attention_for(cfg))
    train = splits["train"]
    # the lessons use the training query with the most correct completions (a digit sum)
    query = max(range(len(train)), key=lambda i: (train.tasks[i]["type"] == "digit_sum", len(train.solutions[i])))
    task, sols = train.tasks[query], train.solutions[query]
    report: dict = {}
    if lesson in ("all", "bias"):
        # the training query whose base spreads its correct mass least evenly: sampling bias needs a dominant mode
        shares = []
        for i, sols_i in enumerate(train.solutions):
            lp_i = rlvr.sequence_logprobs(base, tokenizer, [train.prompt_ids[i]] * len(sols_i), sols_i).double()
            shares.append(((lp_i.exp() / lp_i.exp().sum()).max().item(), i, lp_i))
        _, bq, lp = max(shares, key=lambda x: x[0])
        task_b, sols_b = train.tasks[bq], train.solutions[bq]
        # the base's exact shares among the correct completions, at P(correct) = 0.8: an easy query, or any query
        # mid-training. (Far below that, pushing the wrong bucket down frees mass for everyone and nothing falls.)
        share = lp.exp() / lp.exp().sum()
        probs = torch.cat([0.8 * share, torch.tensor([0.2], dtype=torch.float64)])  # correct modes + one wrong bucket
        rewards = torch.cat([torch.ones(len(sols_b)), torch.zeros(1)]).double()
        bias = sampling_bias_lesson(probs, rewards, seed=cfg.seed)
        report["bias"] = {"query": task_b["prompt"], "completions": sols_b, **bias}
        order = list(np.argsort(bias["p_before"])[::-1])
        by_G = bias["G"]
        per_G = lambda fmt: ", ".join(f"G={G}: {fmt(g)}" for G, g in by_G.items())  # noqa: E731
        print(f"\n1. SAMPLING BIAS on {task_b['prompt']!r}: {len(sols_b)} correct completions with the base's exact "
              "shares, scaled to")
        print(f"   P(correct) = 0.8, plus one 'wrong' bucket: a categorical policy. One GRPO step from each of "
              f"{bias['groups_per_G']} groups of size G.")
        print("   miss = (1-p)^G, the chance a group never samples it; fell = share of groups after which it LOST "
              "probability;")
        print("   if-missed = its mean probability after a step from a group that missed it; "
              "ideal = pi_ref exp(A/beta)/Z at the same P(correct).")
        print(f"   {'completion':>10} {'p base':>7}"
              + "".join(f" | G={G:<3}{'miss':>5}{'fell':>5}{'if-missed':>10}{'ideal':>7}" for G in by_G))
        for i in order if len(order) <= 10 else order[:5] + order[len(order) // 2:len(order) // 2 + 2] + order[-3:]:
            print(f"   {sols_b[i]:>10} {bias['p_before'][i]:7.4f}" + "".join(
                f" | {'':5}{g['miss_prob'][i]:5.2f}{g['fell'][i]:5.2f}{g['p_after_if_unsampled'][i]:10.4f}"
                f"{g['p_ideal'][i]:7.4f}" for g in by_G.values()))
        print("   ideal update: " + per_G(lambda g: sum(a < b for a, b in zip(g['p_ideal'], bias['p_before'])))
              + f" of {len(sols_b)} correct completions fell. Finite groups: a correct completion fell after "
              + per_G(lambda g: f"{np.mean(g['fell']):.0%}") + " of steps;")
        print("   those that fell had not been sampled in " + per_G(lambda g: f"{g['fell_were_unsampled']:.0%}")
              + " of cases.")
        print(f"   After {bias['steps']} steps in a row, share of (run, completion) pairs below the base: "
              + per_G(lambda g: f"{g['below_base_after_steps']:.0%}")
              + " (a table has no shared parameters; see lesson 2)")
    if lesson in ("all", "coupling"):
        rng = random.Random(cfg.seed)
        completion = rng.choice(sols)
        coup = coupling_lesson(base, tokenizer, splits, query, completion)
        report["coupling"] = coup
        print(f"\n2. SEMANTIC COUPLING: reinforce only {completion!r} on {task['prompt']!r} for 30 SGD steps: "
              f"p {coup['p_before']:.4f} -> {coup['p_after']:.4f}")
        print("   mean change in log-prob of the correct completions of OTHER queries, by what they share with it:")
        print(f"   {'shares':>18}" + "".join(f"{s + ' (n)':>22}" for s in coup["splits"]))
        for g in COUPLING_GROUPS + ("reinforced text",):
            if g == "reinforced text":
                print(f"   and {completion!r} itself as the answer to every other query (mostly wrong there):")
            cells = (f"{v[g]['mean_dlogp']:+14.3f} ({v[g]['n']:4d})  " for v in coup["splits"].values())
            print(f"   {g:>18}" + "".join(cells))
    if lesson in ("all", "modes"):
        sols_m, cols = mode_mass_table(cfg, tokenizer, task, train.prompt_ids[query], base, runs_dir, device)
        report["modes"] = {"query": task["prompt"], "completions": sols_m,
                           "probs": {k: v.tolist() for k, v in cols.items()}}
        order = torch.argsort(cols["base"], descending=True).tolist()
        print(f"\n3. MODE MASS on {task['prompt']!r}: exact probability of each correct completion "
              f"(checkpoints in {runs_dir})")
        if len(cols) == 1:
            print("   (no trained checkpoints found: run `python rlvr.py` first to add GRPO and IAC+DLC columns)")
        print(f"   {'completion':>10}" + "".join(f"{k:>12}" for k in cols))
        for i in order:
            print(f"   {sols_m[i]:>10}" + "".join(f"{v[i].item():12.4f}" for v in cols.values()))
        print(f"   {'total':>10}" + "".join(f"{v.sum().item():12.4f}" for v in cols.values()))
        print(f"   {'below base':>10}" + "".join(f"{int((v < cols['base']).sum()):12d}" for v in cols.values()))
    if lesson in ("all", "credit"):
        c = report["credit"] = credit_lesson(cfg, base, tokenizer, train, query)
        pi, q, ratio, G = np.array(c["pi"]), np.array(c["q"]), np.array(c["q/pi"]), c["G"]
        drawn = np.array([c["groups_drawn"][o] for o in c["completions"]])
        no, capped = (np.array(c["delta"][cap]) for cap in (0.0, 1.0))
        cr_no, cr_capped = (np.array(c["credit"][cap]) for cap in (0.0, 1.0))
        print(f"\n4. WHERE DLC'S DIVERSITY COMES FROM on {c['query']!r}: DLC's memory after its first 5 steps (the "
              "policy held fixed). Per correct completion:")
        print(f"   pi and q, its exact probability under the policy and under DLC's sampler; in a group: the chance "
              f"that a group of {G} drawn from pi holds it,")
        print(f"   1-(1-pi)^{G}, and the share of {c['groups']} groups drawn from q that did; credit: per group, "
              "advantage x the summed token weights of its draws;")
        print(f"   d log pi: the change from the expected IAC+DLC update (the mean gradient of those groups as one "
              f"step of norm {c['lr']}; training clips")
        print("   its gradient, so steps have one size). Each with no importance weight (the default) and with "
              "min(pi/q, 1) per token.")
        print(f"   {'':>10} {'':>8} {'':>8} {'':>6} {'in a group':>10} {'credit':>6} {'':>8} {'d log pi':>8}")
        print(f"   {'completion':>10} {'pi':>8} {'q':>8} {'q/pi':>6} {'pi':>5} {'q':>4} {'none':>7} {'min':>6} "
              f"{'none':>8} {'min':>8}")
        order = list(np.argsort(ratio)[::-1])
        rows = order if len(order) <= 12 else order[:6] + order[len(order) // 2:len(order) // 2 + 2] + order[-4:]
        for i in rows:
            print(f"   {c['completions'][i]:>10} {pi[i]:8.4f} {q[i]:8.4f} {ratio[i]:6.2f} {1 - (1 - pi[i]) ** G:5.2f} "
                  f"{drawn[i] / c['groups']:4.2f} {cr_no[i]:7.3f} {cr_capped[i]:6.3f} {no[i]:+8.4f} {capped[i]:+8.4f}")
        after = [(pi * np.exp(d)).sum() for d in (no, capped)]
        print(f"   ...     ({len(pi)} rows in all; P(correct) {pi.sum():.4f} under pi, {q.sum():.4f} under q; after "
              f"the update {after[0]:.4f} with no weight, {after[1]:.4f} with it)")
        mean = lambda v, rows: f"{v[rows].mean():+.4f}" if rows.any() else "      -"  # noqa: E731
        cats = credit_categories(c)
        for name, rows in cats.items():
            print(f"   {name:>38} ({int(rows.sum()):2d}): credit {mean(cr_no, rows)} -> {mean(cr_capped, rows)}, "
                  f"d log pi {mean(no, rows)} -> {mean(capped, rows)} (no weight -> weight)")
        rare, rest = cats["rare under pi, drawn by q (q/pi >= 2)"], cats["drawn, q/pi < 2"]
        if rare.any() and rest.any():
            print(f"   The weight takes {1 - cr_capped[rare].sum() / cr_no[rare].sum():.0%} of the rare answers' credit "
                  f"and {1 - cr_capped[rest].sum() / cr_no[rest].sum():.0%} of the other drawn answers'; at one step "
                  f"size the rare ones gain {no[rare].mean() - no[rest].mean():+.4f}")
            print(f"   more than the other drawn answers with full credit, {capped[rare].mean() - capped[rest].mean():+.4f}"
                  " with the weight. One step shows the push; the runs show what it adds up to (the credit control).")
    plot_explain(report, Path(cfg.out))
    return report


def plot_explain(report: dict, out: Path) -> None:
    if (plt := pyplot()) is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    panels = [k for k in ("bias", "coupling", "modes", "credit") if k in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        r = report[key]
        if key == "bias":
            p = np.array(r["p_before"])
            for G, g in r["G"].items():
                ax.scatter(p, g["fell"], s=10, label=f"G={G}")
            ax.scatter(p, np.zeros_like(p), marker="x", color="k", label="ideal update (never falls)")
            ax.set(xscale="log", xlabel="probability of a correct completion",
                   ylabel="share of one-step updates that lowered it",
                   title=f"sampling bias on {r['query']!r}")
        elif key == "coupling":
            names = list(r["splits"])
            x = np.arange(len(COUPLING_GROUPS))
            for j, name in enumerate(names):
                means = [r["splits"][name][g]["mean_dlogp"] for g in COUPLING_GROUPS]
                ax.bar(x + 0.4 * j, means, 0.4, label=f"{name} queries")
            ax.set_xticks(x + 0.2, COUPLING_GROUPS, rotation=20, fontsize=8)
            ax.axhline(0, color="k", lw=0.5)
            ax.set(ylabel="mean change in log-prob", title=f"reinforcing {r['completion']!r} on {r['query']!r}")
        elif key == "credit":
            ratio, drawn = np.array(r["q/pi"]), np.array([r["groups_drawn"][o] > 0 for o in r["completions"]])
            ax.vlines(ratio, r["delta"][0.0], r["delta"][1.0], color="0.7", lw=0.8)  # one answer's two updates
            for cap, label, color in ((0.0, "no importance weight", "C0"), (1.0, "min(pi/q, 1)", "C1")):
                delta = np.array(r["delta"][cap])
                for rows, kind, face in ((drawn, "drawn by q", color), (~drawn, "never drawn", "none")):
                    if rows.any():
                        ax.scatter(ratio[rows], delta[rows], s=14, facecolors=face, edgecolors=color,
                                   label=f"{label} ({kind})")
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xscale="log", xlabel="q / pi of a correct completion", ylabel="change in log pi, expected update",
                   title=f"credit under DLC on {r['query']!r}")
        else:
            order = np.argsort(r["probs"]["base"])[::-1]
            for name, probs in r["probs"].items():
                ax.plot(np.array(probs)[order], marker="o", ms=3, label=name, ls="--" if name == "base" else "-")
            ax.set(yscale="log", xlabel="correct completions, by base probability", ylabel="exact probability",
                   title=f"mode mass on {r['query']!r}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "explain.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = rlvr.config_parser("lessons.py")
    p.set_defaults(out="runs/explain")
    p.add_argument("--runs", default="runs/demo", help="folder whose */checkpoint columns join the mode mass table")
    p.add_argument("--lesson", default="all", choices=["all", "bias", "coupling", "modes", "credit"],
                   help="which lesson to run")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    explain(rlvr.config_from(args), Path(args.runs), args.lesson)


if __name__ == "__main__":
    try:
        main()
    except rlvr.UserError as e:
        print(f"lessons.py: error: {e}", file=sys.stderr)
        sys.exit(2)
