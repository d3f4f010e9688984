"""rlvr.py: reinforcement learning with verifiable rewards (RLVR), and how it over-sharpens, in one file.

A tiny GPT-2 (one token per character) is warm-started on uniformly sampled correct answers of toy arithmetic
questions: the diverse base. RL samples a group of G answers per question in one batched KV-cache decode, scores them
with exact verifiers (reward 1 or 0), turns rewards into per-group advantages and takes a PPO-clip step. Every correct
answer of a toy question can be enumerated, so pass@k, coverage and over-sharpening are also computed exactly.
The paper (arXiv 2601.15609): IAC scales successes' advantages by (G - #correct)^alpha; DLC samples rollouts from
softmax(log pi - mu log m), m a memory network of recent rollouts. Departures from the textbook: a token-level loss
(DAPO); one update per batch, so the PPO ratio is 1; no EOS means reward 0; no KL unless --method names kl (as TRL);
the loss's log-probs at the rollout temperature (TRL, verl); no dropout; fp32 weights, bf16 autocast where it pays.

  python rlvr.py            # the demo: GRPO vs IAC+DLC, one table (a minute on a CPU)
  python rlvr.py train -h   # any method, any knob: train --method iac+dlc --out runs/x
  python -m pytest -q       # the tests; the lab (lessons, experiments, bench): toy_tasks/
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep the demo's output readable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

transformers.utils.logging.disable_progress_bar()
HERE = Path(__file__).resolve().parent

# ==== PART 1: THE ALGORITHM, top to bottom: each definition uses only what stands above it ====
# -- Config: every knob, with its help
def knob(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class Config:
    tasks: str = knob(str(HERE / "toy_tasks"), "folder of train/val/test.jsonl")
    out: str = knob("runs/demo", "output folder")
    seed: int = knob(0, "RL and evaluation seed (the warm-start uses --base-seed)")
    method: str = knob("grpo", "an estimator + modifiers, e.g. grpo, iac+dlc, rloo+kl")
    device: str = knob("auto", "auto (cuda if available), cpu or cuda")
    threads: int = knob(0, "CPU threads (0: all cores, at most 4)")
    # policy
    model: str = knob("", "a Hugging Face causal LM (folder or hub name) for the built-in GPT-2")
    grad_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    n_embd: int = knob(64, "built-in GPT-2: hidden size")
    n_layer: int = knob(2, "built-in GPT-2: layers")
    n_head: int = knob(4, "built-in GPT-2: attention heads")
    # warm-start: SFT on uniformly sampled correct answers
    ws_steps: int = knob(300, "warm-start SFT steps")
    ws_batch: int = knob(128, "warm-start sequences per step")
    ws_lr: float = knob(3e-3, "warm-start learning rate")
    base_seed: int = knob(0, "warm-start seed: one base for every method and RL seed")
    cache_dir: str = knob(str(HERE / ".cache"), "cache of warm-started bases")
    # RL
    steps: int = knob(300, "RL steps")
    queries_per_step: int = knob(16, "training queries per RL step")
    group_size: int = knob(8, "completions per query (G)")
    lr: float = knob(3e-4, "RL learning rate (AdamW, no weight decay)")
    micro_batch: int = knob(0, "sequences per forward/backward (0: auto)")
    ppo_epochs: int = knob(1, "updates per batch (1: the PPO ratio is 1)")
    temperature: float = knob(1.0, "sampling temperature (rollouts, loss, evaluation)")
    # exploration, any method; evaluation samples the plain policy at --temperature
    rollout_temperature: float = knob(0.0, "rollouts' and loss's temperature in training (0: --temperature)")
    rollout_min_p: float = knob(0.0, "training rollouts drop tokens with p < min_p max p (at temperature 1)")
    max_new_tokens: int = knob(8, "longest completion, EOS included")
    # the paper's calibrations, used when --method names them
    iac_alpha: float = knob(1.0, "IAC: successes' advantages x (G - #correct)^alpha")  # the paper's 1
    dlc_mu: float = knob(2.0, "DLC: sample from z_policy - mu * z_memory")  # chosen on val
    dlc_min_p: float = knob(0.05, "DLC re-weights only tokens with p >= min_p max p (p tempered; 0: all)")
    dlc_is_cap: float = knob(0.0, "per-token weight min(pi/q, cap) on DLC or min-p samples (0: off)")
    mem_width: int = knob(64, "memory network width")
    mem_window: int = knob(4, "memory trained on the last this many steps' rollouts")
    mem_steps: int = knob(4, "memory Adam steps on its window per RL step")
    mem_lr: float = knob(3e-3, "memory learning rate")
    # competing methods, each read only when --method names it (default: its paper's value)
    entropy_coef: float = knob(0.001, "[entropy] loss - coef x mean token entropy")  # a common PPO value
    kl_coef: float = knob(0.04, "[kl] k3 KL coefficient")  # the GRPO paper's
    unlikely_beta: float = knob(0.25, "[unlikely] rank penalty beta")
    passk_k: int = knob(4, "[passk] k")  # G/2: at k = G every sample of a solved group gets the same credit
    wreinforce_weight: float = knob(0.1, "[wreinforce] a correct sample's advantage")
    count_c: float = knob(0.5, "[count] bonus scale c")  # < reward gap
    fgrpo_gamma: float = knob(0.5, "[fgrpo] exponent gamma")
    # evaluation
    eval_n: int = knob(64, "samples per query for the sampled metrics")
    eval_every: int = knob(50, "evaluate every this many steps (0: at the end only)")
    save_every: int = knob(50, "checkpoint every this many steps (0: at the end, on Ctrl-C)")
    eval_split: str = knob("test", "held-out split(s): test to report, val to tune, or val,test")
    eval_batch: int = knob(2048, "sequences per batched evaluation call")

def progress(iterable, desc, leave=True, **kwargs):
    """Live on a terminal, a line every 30 s in logs and notebooks."""
    live = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, leave=leave or not live, mininterval=0.1 if live else 30, **kwargs)

# -- Tasks and verifiers: many correct answers per query, all enumerable
MAX_ANSWER_CHARS = 64  # longer is wrong, unparsed: verifiers stay O(1) on any input
_DIGIT_SUM = re.compile(r"[1-9](?:\+[1-9])*")
_EXPR = re.compile(r"[0-9]{1,3}(?:[+\-*][0-9]{1,3})*")
_BOXED, _LABEL = "\\boxed{", re.compile(r"^[A-Za-z][A-Za-z ]{0,24}:")

def answer_line(completion):
    """The last \\boxed{...}, else the last non-empty line, without labels ('Answer:'), markdown, spaces or a final
    period, '×' and '\\cdot' as '*'; toy completions pass unchanged. Reads only the last 4096 characters."""
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
    answer = re.sub(r"[\s$`*×]|\\[a-z]+", lambda m: "*" if m.group() in ("*", "×", "\\times", "\\cdot") else "", answer)
    return answer.rstrip(".")

def extract_answer(completion):  # distinct answers are counted without their stated result
    return answer_line(completion).split("=")[0]

def eval_plus_minus_times(expr):
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

def verify_digit_sum(task, completion):
    """`terms` digits 1-9 joined by '+' that add up to `target`, e.g. 15 -> '4+9+2'."""
    if not _DIGIT_SUM.fullmatch(completion):
        return 0.0
    digits = completion.split("+")
    return float(len(digits) == task["terms"] and sum(map(int, digits)) == task["target"])

def enumerate_digit_sum(task):
    digits = itertools.product(range(1, 10), repeat=task["terms"])
    return ["+".join(map(str, d)) for d in digits if sum(d) == task["target"]]

def verify_countdown(task, completion):
    """Use each of `numbers` exactly once with `ops` (default +-*; usual precedence, no brackets) to reach `target`."""
    if not _EXPR.fullmatch(completion) or set(re.findall(r"[+\-*]", completion)) - set(task.get("ops", "+-*")):
        return 0.0
    used = sorted(int(x) for x in re.findall(r"[0-9]+", completion))
    return float(used == sorted(task["numbers"]) and eval_plus_minus_times(completion) == task["target"])

def enumerate_countdown(task):
    sols = set()
    for perm in set(itertools.permutations(task["numbers"])):
        for ops in itertools.product(task.get("ops", "+-*"), repeat=len(perm) - 1):
            expr = str(perm[0]) + "".join(op + str(n) for op, n in zip(ops, perm[1:]))
            if eval_plus_minus_times(expr) == task["target"]:
                sols.add(expr)
    return sorted(sols)

@dataclass(frozen=True)
class TaskType:
    """Verifier, enumerator of correct completions, a record's fields (name: type), a check of their values."""
    verify: Callable[[dict, str], float]
    enumerate: Callable[[dict], list[str]]
    fields: dict
    check: Callable[[dict], str | None] = lambda task: None

def _check_countdown(task):
    ops = task.get("ops", "+-*")  # optional: the operators the prompt allows
    if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
        return f"'ops' must be some of '+-*', got {ops!r}"
    ok = 1 <= len(task["numbers"]) <= 5 and all(isinstance(n, int) and 0 <= n < 1000 for n in task["numbers"])
    return None if ok else f"'numbers' must be 1..5 integers in 0..999, got {task['numbers']!r}"

# Add yours here (the README shows how). The checks keep enumeration small: 9^terms digit sums, 5! orders.
TASK_TYPES = {
    "digit_sum": TaskType(verify_digit_sum, enumerate_digit_sum, {"terms": int, "target": int}, lambda t: None
                          if 1 <= t["terms"] <= 6 else f"'terms' must be 1..6 (9^terms answers), got {t['terms']}"),
    "countdown": TaskType(verify_countdown, enumerate_countdown, {"numbers": list, "target": int}, _check_countdown)}
TASK_TYPES["word_problem"] = TASK_TYPES["countdown"]  # a countdown query in a story, for real language models

def verify(task, completion):
    """1.0 if `completion` solves `task` (a JSONL record), any result it states being the target, else 0.0. Never
    raises, never eval()s."""
    try:
        answer, *stated = answer_line(completion).split("=")
        ok = len(answer) <= MAX_ANSWER_CHARS and all(s == str(task["target"]) for s in stated)
        return TASK_TYPES[task["type"]].verify(task, answer) if ok else 0.0
    except Exception:  # a malformed task record is reported when loading, not here
        return 0.0

def enumerate_solutions(task):
    """Every correct completion of `task`, in canonical form, sorted."""
    return TASK_TYPES[task["type"]].enumerate(task)

# -- Tokenizer and policy: a transformers GPT-2, one token per character
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TINY_ATTENTION = "eager"  # with 16-dim heads the eager kernels' backward beats SDPA's on CPU

def build_tokenizer():
    """One token per printable ASCII character; round-trips through save/from_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tokenizer.padding_side = "left"  # prompts end at the same column, so completions start together
    tokenizer.id_to_text = [tok.id_to_token(i) for i in range(len(vocab))]  # for fast decoding
    return tokenizer

def build_policy(cfg, tokenizer):
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: RL log-probs must be deterministic
        activation_function="gelu_pytorch_tanh",  # GPT-2's gelu, fused (its default: 8 elementwise ops)
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = TINY_ATTENTION
    return GPT2LMHeadModel(config)

def format_prompts(tokenizer, prompts):
    """Token ids of each prompt: in the chat template if any (it writes the BOS), else with the tokenizer's BOS."""
    if chat := bool(getattr(tokenizer, "chat_template", None)):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    return tokenizer(prompts, add_special_tokens=not chat)["input_ids"]

@dataclass
class TaskSet:
    """One split: its tasks, tokenised prompts and enumerated correct completions."""
    tasks: list[dict]
    prompt_ids: list[list[int]]
    solutions: list[list[str]]

    @classmethod
    def build(cls, tasks, tokenizer):
        prompt_ids = format_prompts(tokenizer, [t["prompt"] for t in tasks])
        return cls(tasks, prompt_ids, [enumerate_solutions(t) for t in tasks])

    def __len__(self):
        return len(self.tasks)

def amp_dtype(device):
    """bf16 forwards on GPUs of compute capability 8+ (a T4 only emulates it), else fp32 (None)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else None

def autocast(device):
    dtype = amp_dtype(device)  # log-softmax stays fp32: see the .float() calls
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (KV cache on); the model's own mode is restored after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)

# -- Sampling: every prompt x G completions in one batched KV-cache decode
@dataclass
class Rollouts:
    """A batch of prompt+completion sequences laid out as [left-padded prompt | completion | pad]."""
    input_ids: Tensor        # [B, P+T]
    attention_mask: Tensor   # [B, P+T]  0 on left padding (pads after EOS are never attended)
    completion_mask: Tensor  # [B, T]    1 on completion tokens up to and including EOS
    prompt_len: int          # P
    texts: list[str]         # decoded completions, EOS excluded
    finished: Tensor         # [B] bool, emitted EOS within max_new_tokens
    entropy: Tensor | None = None      # [B, T] token entropy of the policy while sampling
    sample_logp: Tensor | None = None  # [B, T] log-prob under the distribution that drew each token

    @property
    def completion_ids(self):
        return self.input_ids[:, self.prompt_len:]

    def rows(self, i, j):
        return Rollouts(**{k: v if v is None or k == "prompt_len" else v[i:j] for k, v in vars(self).items()})

def cat_rollouts(parts):
    """Join chunks sampled with one prompt width."""
    def join(values):
        if values[0] is None or isinstance(values[0], int):
            return values[0]
        return torch.cat(values) if isinstance(values[0], Tensor) else [x for v in values for x in v]
    return Rollouts(**{k: join([vars(p)[k] for p in parts]) for k in vars(parts[0])})

def pad_left(seqs, pad_id, device, width=0):
    width = max(width, max(len(s) for s in seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), mask.to(device)

def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts prompts: count real tokens only

class GroupNoise:
    """The sampler's uniform noise [rows, vocab], one stream per group (seed + group index): a query's rollouts do
    not depend on how the batch is split."""
    def __init__(self, seed, first, rows, group_size, device):
        self.first, self.rows, self.group_size, self.device = first, rows, group_size, device
        groups = range(first // group_size, (first + rows - 1) // group_size + 1)  # the groups these rows overlap
        self.streams = [(g, torch.Generator(device=device).manual_seed(seed + g)) for g in groups]

    def __call__(self, vocab):
        G = self.group_size
        rows = torch.cat([torch.rand((G, vocab), generator=gen, device=self.device) for _, gen in self.streams])
        offset = self.first - self.streams[0][0] * G
        return rows[offset:offset + self.rows]

def end_ids(tokenizer):  # EOS, or what `load_tokenizer` found
    return torch.tensor(getattr(tokenizer, "end_ids", [tokenizer.eos_token_id]))

def _make_rollouts(tokenizer, prompt_ids, prompt_mask, completion, entropy=None, sample_logp=None):
    is_eos = torch.isin(completion, end_ids(tokenizer).to(completion.device))
    finished = is_eos.any(1)
    completion_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # tokens up to and including the first EOS
    lengths = (completion_mask.sum(1) - finished.long()).tolist()
    rows = [row[:n] for row, n in zip(completion.tolist(), lengths)]
    table = getattr(tokenizer, "id_to_text", None)  # the built-in tokenizer: faster, and "<unk>" is never correct
    texts = (["".join(table[i] for i in row) for row in rows] if table
             else tokenizer.batch_decode(rows, skip_special_tokens=True))
    input_ids = torch.cat([prompt_ids, completion], 1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    return Rollouts(input_ids, attention_mask, completion_mask.long(), prompt_ids.shape[1], texts, finished, entropy,
                    sample_logp)

def _cache_kwarg(model):  # renamed within transformers 5 (5.0: past_key_values; later: cache)
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"

@torch.no_grad()
def sample(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, generator=None, with_entropy=False,
           memory=None, min_p=0.0, noise=None, width=0):
    """One completion per prompt (a group repeats its prompt), batched, KV cache, stop at an end id. memory: DLC's
    (draws from its `calibrate`); min_p: drop tokens below min_p x the top untempered probability; noise: a
    `GroupNoise` (else `generator`); width: pad prompts to at least this."""
    device = next(model.parameters()).device
    with eval_mode(model), autocast(device):  # in train mode, gradient checkpointing would switch the KV cache off
        base, head, cache_kw = model.base_model, model.get_output_embeddings(), _cache_kwarg(model)
        eos, pad = end_ids(tokenizer).to(device), tokenizer.pad_token_id
        ids, prompt_mask = pad_left(prompt_ids, pad, device, width)
        B, P = ids.shape
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)  # grows by slicing
        cache = DynamicCache(config=model.config)
        pos = positions(prompt_mask)
        # a group repeats its prompt: run each distinct prompt once, then copy its KV cache to every row
        keys = [tuple(p) for p in prompt_ids]
        slot = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # the distinct prompts, in order of first row
        unique = torch.tensor([keys.index(key) for key in slot], device=device)
        hidden = base(input_ids=ids[unique], attention_mask=prompt_mask[unique], position_ids=pos[unique],
                      use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
        if len(unique) < B:
            expand = torch.tensor([slot[key] for key in keys], device=device)
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
            logq = logp if memory is None else memory.calibrate(logp, hidden)  # DLC: log pi - mu log m, renormalised
            if min_p > 0:  # the temperature applies last: a hot sampler stays among the untempered plausible tokens
                implausible = logits < logits.max(-1, keepdim=True).values + math.log(min_p)
                logq = torch.log_softmax(logq.masked_fill(implausible, -math.inf), dim=-1)
            uniform = noise(logq.shape[1]) if noise else torch.rand(logq.shape, generator=generator, device=device)
            tok = (logq - torch.log(-torch.log(uniform))).argmax(dim=-1)  # Gumbel-max: an exact sample of softmax(logq)
            sample_logp[:, t] = logq.gather(1, tok[:, None]).squeeze(1)
            if with_entropy:
                ent[:, t] = -(logp.exp() * logp).sum(-1) * (~done)
            out[:, t] = torch.where(done, pad, tok)
            done = done | torch.isin(tok, eos)
            if t == max_new_tokens - 1 or bool(done.all()):  # a host sync per token: worth it
                break
            next_pos = next_pos + 1
            hidden = base(input_ids=out[:, t:t + 1], attention_mask=mask[:, :P + t + 1], position_ids=next_pos,
                          use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
    return _make_rollouts(tokenizer, ids, prompt_mask, out, ent, sample_logp)

def rollouts_from_text(tokenizer, prompt_ids, completions, device):
    """Teacher-forcing layout for given completions (EOS added)."""
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id, device)
    comp = tokenizer(completions, add_special_tokens=False)["input_ids"]
    out = torch.full((len(comp), max(len(c) for c in comp) + 1), tokenizer.pad_token_id, dtype=torch.long)
    for i, c in enumerate(comp):
        out[i, :len(c) + 1] = torch.tensor(c + [tokenizer.eos_token_id])
    return _make_rollouts(tokenizer, ids, mask, out.to(device))

def rewards_for(tasks, rollouts):
    """Verifier reward per completion; a completion that never stopped is wrong."""
    finished = rollouts.finished.tolist()
    r = [verify(task, text) if fin else 0.0 for task, text, fin in zip(tasks, rollouts.texts, finished)]
    return torch.tensor(r, dtype=torch.float32)

# -- Log-probabilities of completions
LOGIT_BUDGET = 2**24  # floats in one [rows, vocab] logit tensor (64 MB): what bounds memory for large vocabularies

def micro_batch(cfg, model, batch, tokens=None):
    """Sequences per forward/backward (tokens=1: per sampling chunk): --micro-batch, else all that fit LOGIT_BUDGET."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return min(batch, cfg.micro_batch or max(1, LOGIT_BUDGET // (vocab * (tokens or cfg.max_new_tokens))))

def completion_logprobs(model, rollouts, with_entropy=False, temperature=1.0, amp=True):
    """log pi(y_t | q, y_<t) at `temperature` [B, T], token entropy (optional), and the states predicting each
    token (the memory's inputs); amp=False: fp32."""
    P, T = rollouts.prompt_len, rollouts.completion_ids.shape[1]
    with autocast(rollouts.input_ids.device) if amp else contextlib.nullcontext():
        hidden = model.base_model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                                  position_ids=positions(rollouts.attention_mask)).last_hidden_state
        hidden = hidden[:, P - 1:P + T - 1]  # the states that predict completion tokens: logits only there
        logits = model.get_output_embeddings()(hidden)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy, hidden

@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompt_ids, completions, batch=4096, temperature=1.0):
    """Exact log pi(completion, then an end id | prompt) per pair, in fp32: the teacher-forced probability of a mode."""
    device, vocab = next(model.parameters()).device, model.get_output_embeddings().weight.shape[0]
    ends = end_ids(tokenizer).to(device)
    longest = max(map(len, tokenizer(completions, add_special_tokens=False)["input_ids"]), default=0) + 1  # EOS
    batch = max(1, min(batch, LOGIT_BUDGET // (vocab * longest)))
    out = []
    with eval_mode(model):
        for i in range(0, len(completions), batch):
            r = rollouts_from_text(tokenizer, prompt_ids[i:i + batch], completions[i:i + batch], device)
            logp, _, hidden = completion_logprobs(model, r, temperature=temperature, amp=False)
            if len(ends) > 1:  # any end id ends a mode: their probabilities add up
                rows, last = torch.arange(len(logp), device=device), r.completion_mask.sum(1) - 1
                logits = model.get_output_embeddings()(hidden[rows, last]).float() / temperature
                logp[rows, last] = torch.log_softmax(logits, -1)[:, ends].logsumexp(-1)
            out.append((logp * r.completion_mask).sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)

# -- Advantages: GRPO and the paper's inverse-success calibration (IAC)
def grpo_advantages(rewards, eps=1e-4):
    """GRPO (arXiv 2402.03300): A = (r - mean_group) / (std_group + eps), rewards [num_queries, G].

    Worked example, one group of 4 with rewards [1, 0, 0, 1]: mean 0.5, std (unbiased) 0.577, advantages
    [+0.866, -0.866, -0.866, +0.866]. A group of [1, 1, 1, 1] gives [0, 0, 0, 0]: a query always (or never)
    solved teaches nothing."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased, as TRL
    return (rewards - mean) / (std + eps)

def inverse_success_calibration(advantages, rewards, alpha=1.0):
    """IAC (arXiv 2601.15609): each group's success advantages x (G - |S+|)^alpha, the number of its failures.

    A hard query's rare success (1 of 8) is amplified x7, an easy query's (7 of 8) x1, so easy queries' dominant
    answers, whose push spreads through shared parameters, stop driving the update. G = 4, rewards [1, 0, 0, 0]:
    GRPO [1.5, -0.5, -0.5, -0.5], IAC [4.5, -0.5, -0.5, -0.5]. Project's choice: with alpha > 0 a group without
    failures gets no push at all, even when a reward shaping (unlikely, count) gave it advantages of both signs."""
    failures = rewards.shape[1] - (rewards > 0).sum(dim=1, keepdim=True)
    factor = failures.to(advantages.dtype) ** alpha
    calibrated = torch.where((advantages > 0) & (rewards > 0), advantages * factor, advantages)
    return torch.where(factor == 0, 0.0, calibrated)

# -- Distribution-level calibration (DLC): a memory of what was sampled
def dlc_calibrate(policy_logp, memory_logp, mu, min_p=0.0):
    """DLC (arXiv 2601.15609): log q of softmax(z_policy - mu * z_memory), both log-softmax [B, V]. Often-sampled
    tokens go down, rarely visited ones up, so a group reaches more correct modes. Project's choice: only plausible
    tokens (pi >= min_p * max pi) are calibrated and only their shares move; the rest keep pi (boosting what the
    memory never saw boosts junk, cutting it would be hidden min-p truncation), so a uniform memory gives q = pi.
    A memory tracking q exactly gives q ~ pi^(1/(1+mu)) on the plausible set, a temperature of 1 + mu: DLC differs
    by the memory's lag and by one memory serving every query."""
    if mu == 0:
        return policy_logp
    memory_logp = memory_logp.clamp(min=-100.0)  # a saturated memory must not turn -inf * mu into NaN
    plausible = (policy_logp >= policy_logp.max(dim=-1, keepdim=True).values + math.log(min_p) if min_p > 0
                 else torch.ones_like(policy_logp, dtype=torch.bool))
    penalty = torch.where(plausible, mu * memory_logp, -math.inf)
    penalty = torch.where(plausible, penalty - penalty.max(dim=-1, keepdim=True).values, 0.0)  # exactly 0 if uniform
    inside = torch.where(plausible, policy_logp - penalty, -math.inf)
    plausible_mass = torch.logsumexp(torch.where(plausible, policy_logp, -math.inf), -1, keepdim=True)
    shift = plausible_mass - torch.logsumexp(inside, -1, keepdim=True)  # back to the policy's own plausible mass
    return torch.where(plausible, inside + shift, policy_logp)

class Memory:
    """DLC's memory: an MLP on the policy's detached hidden state (project's choice: the decode loop has it, so DLC
    costs a small matmul per token), fitted to a FIFO window of (state, sampled token). It starts uniform."""
    def __init__(self, hidden_size, vocab_size, cfg, device):
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, cfg.mem_width), torch.nn.GELU(),
                                       torch.nn.Linear(cfg.mem_width, vocab_size)).to(device)
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.mem_lr)
        self.window: list[tuple[Tensor, Tensor]] = []
        self.window_size, self.steps, self.mu, self.min_p = cfg.mem_window, cfg.mem_steps, cfg.dlc_mu, cfg.dlc_min_p

    def __call__(self, hidden):
        return torch.log_softmax(self.net(hidden.detach().float()), dim=-1)  # normalised: mu means one thing anywhere

    def calibrate(self, policy_logp, hidden):
        return dlc_calibrate(policy_logp, self(hidden), self.mu, self.min_p)

    def update(self, hidden, tokens, mask):
        """Add a batch of rollouts to the window, then fit the window by cross-entropy."""
        keep = mask.bool()
        self.window = (self.window + [(hidden[keep].detach(), tokens[keep])])[-self.window_size:]
        h, y = torch.cat([w[0] for w in self.window]), torch.cat([w[1] for w in self.window])
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

# -- The loss: token-level PPO-clip
def ppo_clip_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0, entropy=None,
                  entropy_coef=0.0, weights=None, norm=None):
    """Token-level PPO-clip surrogate, k3 KL, entropy bonus: (loss, metrics). logp, old_logp, ref_logp, entropy,
    weights, mask: [B, T]; advantages: [B]. norm: the sums' divisor (Dr. GRPO's constant or the batch's token count).
    weights (pi/q per token) scale the sampled token's terms (surrogate, k3 KL), not the state's exact entropy."""
    mask = mask.float()
    n_tokens = mask.sum().clamp(min=1)
    denom = n_tokens if norm is None else torch.tensor(float(norm), device=mask.device)
    w = mask if weights is None else mask * weights
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -(surrogate * w).sum() / denom
    clipped = (ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)
    metrics = {"clip_frac": ((clipped.float() * mask).sum() / n_tokens).item()}
    if ref_logp is not None:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi || pi_ref), always >= 0
        loss = loss + kl_coef * (kl * w).sum() / denom
        metrics["kl"] = ((kl * w).sum() / n_tokens).item()  # reads low under a cap
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / denom
    return loss, metrics

# -- A method: an estimator joined by '+' with modifiers ('iac+dlc'); Part 2 adds the others
ESTIMATORS = {"grpo": lambda rewards, cfg: grpo_advantages(rewards)}  # (rewards [Q, G], cfg) -> advantages [Q, G]
MODIFIERS = ["iac", "dlc"]  # the paper's advantage calibration and memory-steered sampling
SHAPINGS: dict = {}  # reward shapings, before the estimator: (rewards, cfg, seq_logp, answers, outcome_counts)
SCALINGS: dict = {}  # advantage scalings, after the estimator and before IAC: (advantages, rewards, cfg)

def parse_method(method):
    """'iac+dlc' -> ('grpo', {'iac', 'dlc'}); 'rloo+entropy' -> ('rloo', {'entropy'})."""
    parts = [p.strip() for p in method.lower().split("+") if p.strip()]
    bases = [p for p in parts if p in ESTIMATORS]
    unknown = [p for p in parts if p not in ESTIMATORS and p not in MODIFIERS]
    if unknown or len(bases) > 1 or not parts or len(set(parts)) < len(parts):
        raise ValueError(f"unknown method {method!r}: at most one of {'/'.join(ESTIMATORS)} joined by '+' with any "
                         f"of {'/'.join(MODIFIERS)}, e.g. 'grpo', 'iac+dlc', 'rloo+iac'")
    return bases[0] if bases else "grpo", set(parts) - set(bases)

def compute_advantages(cfg, rewards, seq_logp, answers, outcome_counts):
    """A method's parts in order: reward shaping -> estimator -> scaling -> IAC, all [Q, G]. (count adds this batch
    to outcome_counts.)"""
    estimator, parts = parse_method(cfg.method)
    shaped = rewards
    for name in [p for p in SHAPINGS if p in parts]:
        shaped = SHAPINGS[name](shaped, cfg, seq_logp, answers, outcome_counts)
    advantages = ESTIMATORS[estimator](shaped, cfg)
    for name in [p for p in SCALINGS if p in parts]:
        advantages = SCALINGS[name](advantages, rewards, cfg)
    if "iac" in parts:  # |S+| counts verified successes, whatever the shaping did
        advantages = inverse_success_calibration(advantages, rewards, cfg.iac_alpha)
    return advantages

# -- The RL step: collect rollouts -> memory update -> policy update
@dataclass
class Batch:
    """One step's rollouts and all the update needs, computed before any weight moves."""
    rollouts: Rollouts
    spans: list[tuple[int, int]]  # micro-batches: [start, end) rows, a forward/backward each
    rewards: Tensor               # [Q, G] verifier rewards
    advantages: Tensor            # [B]
    old_logp: Tensor              # [B, T] the policy's log-probs (rollout temperature), detached
    hidden: Tensor                # [B, T, H] the policy's states there: the memory's inputs
    ref_logp: Tensor | None       # [B, T] the base's log-probs, for the KL penalty
    weights: Tensor | None        # [B, T] truncated pi/q of DLC or min-p samples
    distinct_correct: int         # distinct (query, answer) pairs among the correct rollouts
    graph: tuple | None = None    # (logp, entropy) with their graph, if one forward covered the batch

def collect_rollouts(cfg, policy, tokenizer, train_set, queries, noise_seed, base=None, memory=None,
                     outcome_counts=None):
    """Sample a group per query, verify, turn rewards into advantages; no weight moves here."""
    device = next(policy.parameters()).device
    _, parts = parse_method(cfg.method)
    G, T, B = cfg.group_size, cfg.rollout_temperature or cfg.temperature, len(queries) * cfg.group_size
    micro = micro_batch(cfg, policy, B)
    spans = [(i, min(i + micro, B)) for i in range(0, B, micro)]
    chunk = micro_batch(cfg, policy, B, tokens=1)  # sampling holds one token's logits per sequence
    # 1. a group per query (DLC: from the calibrated distribution), a chunk at a time
    tasks = [train_set.tasks[q] for q in queries for _ in range(G)]
    prompts = [train_set.prompt_ids[q] for q in queries for _ in range(G)]
    width = max(len(p) for p in prompts)
    rollouts = cat_rollouts([sample(policy, tokenizer, prompts[i:j], cfg.max_new_tokens, T, width=width,
                                    memory=memory if "dlc" in parts else None, min_p=cfg.rollout_min_p,
                                    noise=GroupNoise(noise_seed, i, j - i, G, device))
                             for i, j in [(i, min(i + chunk, B)) for i in range(0, B, chunk)]])
    mask = rollouts.completion_mask
    # 2. log-probs of what was sampled; with one micro-batch, this forward's graph serves the update
    with torch.set_grad_enabled(len(spans) == 1):
        first = [completion_logprobs(policy, rollouts.rows(i, j), with_entropy=True, temperature=T) for i, j in spans]
    old_logp = torch.cat([logp for logp, _, _ in first]).detach()
    hidden = torch.cat([h for _, _, h in first]).detach()
    # 3. verify, then turn rewards into advantages one group at a time
    rewards = rewards_for(tasks, rollouts).view(len(queries), G)
    answers = [(t["id"], extract_answer(x)) for t, x in zip(tasks, rollouts.texts)]
    seq_logp = (old_logp * mask).sum(1).cpu().view(len(queries), G)
    advantages = compute_advantages(cfg, rewards, seq_logp, answers, outcome_counts).view(-1).to(device)
    ref_logp = weights = None
    if "kl" in parts:
        with torch.no_grad():
            ref_logp = torch.cat([completion_logprobs(base, rollouts.rows(i, j), temperature=T)[0] for i, j in spans])
    if cfg.dlc_is_cap > 0 and ("dlc" in parts or cfg.rollout_min_p > 0):  # the samples came from q, not pi
        weights = torch.exp(old_logp - rollouts.sample_logp).clamp(max=cfg.dlc_is_cap)
    correct = {a for a, r in zip(answers, rewards.view(-1).tolist()) if r > 0}
    return Batch(rollouts, spans, rewards, advantages, old_logp, hidden, ref_logp, weights, len(correct),
                 graph=first[0][:2] if len(spans) == 1 else None)

def update_policy(cfg, policy, opt, batch):
    """PPO-clip update(s) on one batch, gradients accumulated over its micro-batches."""
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
                logp, batch.old_logp[i:j], batch.advantages[i:j], mask[i:j],
                ref_logp=None if batch.ref_logp is None else batch.ref_logp[i:j], kl_coef=cfg.kl_coef,
                entropy=entropy, entropy_coef=cfg.entropy_coef if "entropy" in parts else 0.0,
                weights=None if batch.weights is None else batch.weights[i:j], norm=denom)
            part_loss.backward()
            loss += part_loss.item()
            part_tokens = float(mask[i:j].sum())  # metrics are means over tokens: back to sums
            clip_frac += metrics["clip_frac"] * part_tokens
            kl += metrics.get("kl", 0.0) * part_tokens
            entropy_sum += (entropy.detach() * mask[i:j]).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # the usual PPO clip, as is eps 0.2
        if math.isfinite(loss) and torch.isfinite(grad_norm):  # never let a NaN into the weights
            opt.step()
        else:
            print(f"rlvr.py: warning: loss {loss}, gradient norm {grad_norm.item()}: update skipped", file=sys.stderr)
            opt.zero_grad(set_to_none=True)
            skipped += 1
    stats = {"loss": loss, "grad_norm": grad_norm.item(), "entropy": entropy_sum / n_tokens, "skipped_updates": skipped,
             "clip_frac": clip_frac / (n_tokens * cfg.ppo_epochs)}  # over every micro-batch of every epoch
    return stats | ({"kl": kl / (n_tokens * cfg.ppo_epochs)} if batch.ref_logp is not None else {})

def rl_step(cfg, policy, tokenizer, opt, train_set, queries, gen, base=None, memory=None, outcome_counts=None):
    """One RL step, the paper's algorithm box: sample (DLC), verify, advantages (IAC), update memory and policy."""
    noise_seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    batch = collect_rollouts(cfg, policy, tokenizer, train_set, queries, noise_seed, base, memory, outcome_counts)
    stats = {}
    if memory is not None:  # it learns states taken before the update, so the order is free
        stats["memory_loss"] = memory.update(batch.hidden, batch.rollouts.completion_ids,
                                             batch.rollouts.completion_mask)
    stats |= update_policy(cfg, policy, opt, batch)
    return {"reward": batch.rewards.mean().item(), "distinct_correct": batch.distinct_correct,
            "tokens": int(batch.rollouts.completion_mask.sum()), **stats}

# -- Evaluation: pass@k, coverage, over-sharpening, sampled and exact
def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)

def exact_pass_at_k(p_correct, k):
    """pass@k of a policy that answers correctly with probability p_correct: 1 - (1 - p)^k, exactly."""
    if not 0.0 <= p_correct <= 1.0 + 1e-6 or k < 1:
        raise ValueError(f"exact_pass_at_k needs 0 <= p <= 1 and k >= 1, got p={p_correct} k={k}")
    return -math.expm1(k * math.log1p(-min(p_correct, 1.0))) if p_correct < 1.0 else 1.0

def exact_coverage(mode_probs, n):
    """Expected share of correct modes found in n samples: the mean of 1 - (1 - pi(o))^n."""
    return float(np.mean([exact_pass_at_k(p, n) for p in mode_probs])) if mode_probs else 0.0

@torch.no_grad()
def evaluate(model, tokenizer, taskset, n, temperature, max_new_tokens, seed, base_logprobs=None, batch=2048,
             desc="eval"):
    """One split's metrics, and the exact log-probability of every correct completion."""
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
    # the exact probability of every correct mode, teacher-forced, query after query
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
        # exact: P(correct) sums the correct modes (texts outside the canonical forms: `noncanonical`)
        mode_probs = query_logprobs.double().exp().tolist()
        exact_cov.append(exact_coverage(mode_probs, n))
        for k in ks:
            pass_k[k] += pass_at_k(n, len(hits), k) / N
            exact_k[k] += exact_pass_at_k(sum(mode_probs), k) / N
        if fell is not None:  # the share of this query's correct modes now below the base
            oversharpened += fell[q].mean().item() / N
    return {"pass@1": pass_k[1], "pass@k": {str(k): v for k, v in pass_k.items()}, "coverage": float(np.mean(coverage)),
            "oversharpened": oversharpened, "entropy": ent_sum / max(ent_count, 1),
            "exact_pass@k": {str(k): v for k, v in exact_k.items()}, "exact_coverage": float(np.mean(exact_cov)),
            "noncanonical": noncanonical / max(correct, 1)}, logprobs

# -- Warm-start: the diverse base
def warm_start(cfg, train, tokenizer, device):
    """SFT on a uniformly chosen training query and one of its correct answers, uniformly chosen."""
    torch.manual_seed(cfg.base_seed)
    rng = random.Random(cfg.base_seed)
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

# ==== PART 2: THE OTHER PUBLISHED METHODS, registered under their --method names ====
def drgrpo_advantages(rewards):
    """Dr. GRPO (arXiv 2503.20783): A = r - mean_group; its constant loss normaliser is in `update_policy`."""
    return rewards - rewards.mean(dim=1, keepdim=True)

def rloo_advantages(rewards):
    """RLOO (arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j."""
    G = rewards.shape[1]
    return (rewards * G - rewards.sum(dim=1, keepdim=True)) / (G - 1)

def passk_advantages(rewards, k=4):
    """Pass@k training (arXiv 2508.10751): Rbar = 1 - C(G-c, k) / C(G, k), s = sqrt(Rbar (1 - Rbar)); correct:
    A+ = (1 - Rbar) / s; wrong: A- = (1 - Rbar - C(G-c-1, k-1) / C(G-1, k-1)) / s; groups with s = 0 get 0."""
    G = rewards.shape[1]
    k = min(k, G)
    out = torch.zeros_like(rewards)
    for q, c in enumerate((rewards > 0).sum(dim=1).tolist()):
        rbar = 1 - math.comb(G - c, k) / math.comb(G, k)
        s = math.sqrt(rbar * (1 - rbar))
        if s > 0:
            a_neg = (1 - rbar - math.comb(G - c - 1, k - 1) / math.comb(G - 1, k - 1)) / s
            out[q] = torch.where(rewards[q] > 0, (1 - rbar) / s, a_neg)
    return out

def w_reinforce_advantages(rewards, weight=0.1):
    """W-REINFORCE (arXiv 2506.01347): +weight if correct, -1 if wrong."""
    return torch.where(rewards > 0, torch.full_like(rewards, weight), torch.full_like(rewards, -1.0))

def unlikeliness_rewards(rewards, seq_logp, beta=0.25):
    """Unlikeliness reward (arXiv 2506.02355): r (1 - beta * rank / G), rank 0 for the least likely correct sample."""
    G = rewards.shape[1]
    masked = torch.where(rewards > 0, seq_logp, torch.full_like(seq_logp, -float("inf")))
    lower = (masked.unsqueeze(2) > masked.unsqueeze(1)) & (rewards > 0).unsqueeze(1)  # [Q, i, j]: j correct, below i
    rank = lower.sum(dim=2).to(rewards.dtype)
    return torch.where(rewards > 0, rewards * (1 - beta * rank / G), rewards)

def count_outcomes(counts, keys):
    """N(q, o) of each (query id, answer) pair, this batch included; `counts` is updated."""
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return torch.tensor([counts[key] for key in keys], dtype=torch.float32)

def count_bonus_rewards(rewards, counts, c_ucb=0.5):
    """Outcome-count bonus (arXiv 2509.06941): r + c min(1, 1/sqrt(N(q, o))), on correct samples only (project's
    choice: every garbage string is a new outcome)."""
    bonus = c_ucb * torch.clamp(1 / counts.clamp(min=1).sqrt(), max=1.0)
    return torch.where(rewards > 0, rewards + bonus, rewards)

def fgrpo_scale(advantages, rewards, gamma=0.5):
    """F-GRPO difficulty scaling (arXiv 2602.06717): A (1 - p_hat)^gamma, p_hat the group's success rate."""
    p_hat = (rewards > 0).float().mean(dim=1, keepdim=True)
    return advantages * (1 - p_hat) ** gamma

ESTIMATORS |= {"drgrpo": lambda r, cfg: drgrpo_advantages(r), "rloo": lambda r, cfg: rloo_advantages(r),
               "passk": lambda r, cfg: passk_advantages(r, cfg.passk_k),
               "wreinforce": lambda r, cfg: w_reinforce_advantages(r, cfg.wreinforce_weight)}
SHAPINGS |= {"unlikely": lambda r, cfg, seq_logp, answers, counts: unlikeliness_rewards(r, seq_logp, cfg.unlikely_beta),
             "count": lambda r, cfg, seq_logp, answers, counts: count_bonus_rewards(
                 r, count_outcomes(counts, answers).view(r.shape), cfg.count_c)}
SCALINGS |= {"fgrpo": lambda a, r, cfg: fgrpo_scale(a, r, cfg.fgrpo_gamma)}
MODIFIERS += ["unlikely", "count", "fgrpo", "entropy", "kl"]  # entropy and kl: terms of the loss
BINARY_ESTIMATORS = {"passk", "wreinforce"}  # they read only correctness: a reward shaping changes nothing

# ==== PART 3: RUNNING IT ====
# -- Input checks: bad input ends with one clear line
class UserError(Exception):
    """Bad input: one line on stderr and exit code 2, no traceback."""

def check_task(task, where):
    if not isinstance(task, dict):
        raise UserError(f"{where}: a task must be a JSON object, got {type(task).__name__}")
    kind = task.get("type")
    if kind not in TASK_TYPES:
        raise UserError(f"{where}: unknown task type {kind!r} (known: {', '.join(TASK_TYPES)})")
    for name, typ in {"id": str, "prompt": str, **TASK_TYPES[kind].fields}.items():
        if name not in task:
            raise UserError(f"{where}: {kind} task is missing field {name!r}")
        if not isinstance(task[name], typ) or isinstance(task[name], bool):
            raise UserError(f"{where}: field {name!r} must be {typ.__name__}, got {task[name]!r}")
    if problem := TASK_TYPES[kind].check(task) or ("empty prompt" if not task["prompt"] else None):
        raise UserError(f"{where}: {problem}")
    if not enumerate_solutions(task):
        raise UserError(f"{where}: task {task['id']!r} has no correct answer")

def load_tasks(folder, split):
    """Read and check one split; a problem names its file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"task folder {str(folder)!r} not found (python toy_tasks/make_tasks.py --out {folder})")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing (a task folder holds train, val and test.jsonl)")
    tasks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    task = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                check_task(task, f"{path}:{lineno}")
                tasks.append(task)
    if len({t["id"] for t in tasks}) < len(tasks) or not tasks:
        raise UserError(f"{path}: " + ("task ids repeat" if tasks else "no tasks in file"))
    return tasks

def validate_config(cfg):
    """Refuse impossible settings before any work (a method's knobs only if --method uses it)."""
    try:
        estimator, parts = parse_method(cfg.method)
    except ValueError as e:
        raise UserError(str(e)) from None
    rules = [  # (knob, holds, what it must be, the part of --method reading it or None)
        ("group_size", cfg.group_size >= 2, "at least 2 (a group of one has no baseline)", None),
        *[(k, getattr(cfg, k) >= 1, "at least 1", None) for k in
          ("queries_per_step", "ws_batch", "eval_n", "max_new_tokens", "ppo_epochs")],
        *[(k, getattr(cfg, k) >= 0, "at least 0", None) for k in ("steps", "ws_steps", "micro_batch", "eval_every",
                                                                  "save_every", "threads", "rollout_temperature")],
        *[(k, getattr(cfg, k) > 0, "positive", None) for k in ("lr", "ws_lr", "temperature")],
        ("rollout_min_p", 0 <= cfg.rollout_min_p < 1, "in [0, 1)", None),
        ("dlc_is_cap", cfg.dlc_is_cap == 0 or cfg.dlc_is_cap >= 1, "0 (off) or at least 1", None),
        ("eval_split", cfg.eval_split in ("val", "test", "val,test"), "val, test or val,test", None),
        ("device", cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), "auto, cpu or cuda[:N]", None),
        ("dlc_mu", 0 <= cfg.dlc_mu <= 2, "in [0, 2]", "dlc"),
        ("dlc_min_p", 0 <= cfg.dlc_min_p < 1, "in [0, 1)", "dlc"), ("mem_lr", cfg.mem_lr > 0, "positive", "dlc"),
        *[(k, getattr(cfg, k) >= 1, "at least 1", "dlc") for k in ("mem_window", "mem_steps", "mem_width")],
        ("passk_k", 1 <= cfg.passk_k < cfg.group_size, f"in 1..{cfg.group_size - 1} (k = G credits nothing)", "passk"),
        *[(k, getattr(cfg, k) >= 0, "at least 0", p) for k, p in (("iac_alpha", "iac"), ("kl_coef", "kl"),
                                                                  ("entropy_coef", "entropy"))]]
    for name, ok, must, part in rules:
        if not ok and part in (None, estimator, *parts):
            raise UserError(f"--{name.replace('_', '-')} must be {must}, got {getattr(cfg, name)!r}")
    if estimator in BINARY_ESTIMATORS and set(SHAPINGS) & parts:
        raise UserError(f"method {cfg.method!r}: {estimator} reads only whether a sample is correct, so "
                        f"{'+'.join(sorted(set(SHAPINGS) & parts))} would change nothing (use grpo, drgrpo or rloo)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available on this machine (use --device cpu)")

def question_key(task):
    """What a task asks, wording aside: its type, operators and fields (numbers as a multiset)."""
    fields = [sorted(task[k]) if isinstance(task[k], list) else task[k] for k in TASK_TYPES[task["type"]].fields]
    return json.dumps([task["type"], sorted(task.get("ops", "+-*")), *fields])

def load_splits(cfg, tokenizer):
    """The training and held-out split(s), checked; a warning for each question they share, however worded."""
    raw = {s: load_tasks(cfg.tasks, s) for s in ("train", *cfg.eval_split.split(","))}
    train = {question_key(t) for t in raw["train"]}
    for line in sorted({f"{s}: {t['prompt']!r}" for s in raw if s != "train" for t in raw[s]
                        if question_key(t) in train}):
        print(f"rlvr.py: warning: held-out query also in train.jsonl: {line}", file=sys.stderr)
    return {s: TaskSet.build(tasks, tokenizer) for s, tasks in raw.items()}

# -- Devices, models and the cache of warm-started bases
def pick_device(name):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)

def set_threads(cfg):
    torch.set_num_threads(cfg.threads or min(4, os.cpu_count() or 1))

def attention_for(cfg):  # our kernels for the built-in model, a real model's own default
    return None if cfg.model else TINY_ATTENTION

def load_tokenizer(path=None):
    """The built-in tokenizer, or a model's own: left padding, a pad token, `end_ids` (what ends a turn)."""
    if not path:
        return build_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.eos_token is None:
        raise UserError(f"{path}: the tokenizer has no EOS token")
    if tokenizer.pad_token is None:  # Llama's have none; pads are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    try:  # an int or a list (Llama-3's <|eot_id|>, Gemma's <end_of_turn>)
        ends = transformers.GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        ends = None
    tokenizer.end_ids = sorted({tokenizer.eos_token_id} | set(ends if isinstance(ends, list) else [ends]) - {None})
    return tokenizer

def load_policy(path, device, attn_implementation=None, grad_checkpointing=False):
    """Any causal LM, fp32 weights on every device, dropout off (as TRL): gradient checkpointing keeps it training."""
    kwargs = {"dtype": torch.float32} | ({"attn_implementation": attn_implementation} if attn_implementation else {})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    for module in [model.config, *model.modules()]:  # nn.Dropout's p, GPT-2's resid_pdrop, Llama's attention_dropout
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("drop" in name or name == "p" and isinstance(module, torch.nn.Dropout)):
                setattr(module, name, 0.0)
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    return model, load_tokenizer(path)

def save_policy(model, tokenizer, path, extra=None):
    """Atomically: a temporary folder, renamed into place."""
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

def get_base(cfg, train, tokenizer, device):
    """(path of the base, seconds spent warm-starting it): --model, or the cache keyed by what shapes the base."""
    if cfg.model:
        return cfg.model, 0.0
    shape = ("n_embd", "n_layer", "n_head", "ws_steps", "ws_batch", "ws_lr", "base_seed")
    blob = json.dumps([[getattr(cfg, k) for k in shape], train.tasks, TINY_ATTENTION, transformers.__version__.split(
        ".")[0]], sort_keys=True)
    path = Path(cfg.cache_dir) / f"base-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return path, 0.0
    t0 = time.perf_counter()
    save_policy(warm_start(cfg, train, tokenizer, device), tokenizer, path)
    return path, time.perf_counter() - t0

# -- Checkpoints, logs and resume
def write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)

def append_jsonl(path, record):
    with open(path, "a") as f:  # closed at once: nothing written is lost if the run dies
        f.write(json.dumps(record) + "\n")

class StopFlag:
    """Set by SIGINT/SIGTERM: the loop saves a checkpoint after this step and exits; a second signal aborts."""
    signum = 0
    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nrlvr.py: signal {signum}: saving a checkpoint after this step...", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

@dataclass
class RunState:
    """What a run carries from step to step; a checkpoint saves it beside the weights."""
    sampler: torch.Generator
    query_rng: random.Random
    base_metrics: dict
    base_logprobs: dict
    step: int = 0
    rl_s: float = 0.0
    tokens: int = 0
    skipped_updates: int = 0
    outcome_counts: dict = field(default_factory=dict)

def save_run(out, cfg, policy, tokenizer, opt, memory, state):
    """The checkpoint: policy and tokenizer (from_pretrained-ready), memory, everything to resume exactly."""
    trainer_state = {"config": dataclasses.asdict(cfg), "optimizer": opt.state_dict(),
                     "state": {k: v for k, v in vars(state).items() if k not in ("sampler", "query_rng")},
                     "rng": {"sampler": state.sampler.get_state(), "queries": state.query_rng.getstate(),
                             "torch": torch.get_rng_state()}}
    extra = {"trainer_state.pt": trainer_state}
    if memory is not None:
        extra["memory.pt"] = {"net": memory.net.state_dict(), "opt": memory.opt.state_dict(), "window": memory.window}
    save_policy(policy, tokenizer, out / "checkpoint", extra)

def load_run(out):
    """The trainer state saved in `out`, its config a Config."""
    path = Path(out) / "checkpoint" / "trainer_state.pt"
    if not path.exists():
        raise UserError(f"--resume {out}: no checkpoint there ({path} is missing)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    gone = sorted(set(saved.get("config", {})) - {f.name for f in dataclasses.fields(Config)})
    if "state" not in saved or gone:
        raise UserError(f"--resume {out}: made by an older rlvr.py ({', '.join(gone) or 'no state'}): resume it there")
    return saved | {"config": Config(**saved["config"] | {"out": str(out)})}

def restore_run(saved, cfg, device):
    """Policy, memory and RunState of a saved run, random streams as they were."""
    policy, _ = load_policy(Path(cfg.out) / "checkpoint", device, attention_for(cfg), cfg.grad_checkpointing)
    memory, path = None, Path(cfg.out) / "checkpoint" / "memory.pt"
    if path.exists():
        memory = Memory(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0], cfg, device)
        state = torch.load(path, map_location=device, weights_only=False)
        memory.net.load_state_dict(state["net"])
        memory.opt.load_state_dict(state["opt"])
        memory.window = state["window"]
    sampler = torch.Generator(device=device).set_state(saved["rng"]["sampler"])
    query_rng = random.Random()
    query_rng.setstate(saved["rng"]["queries"])
    torch.set_rng_state(saved["rng"]["torch"])
    return policy, memory, RunState(sampler, query_rng, **saved["state"])

def write_summary(out, cfg, state, final_metrics, warmstart_s, device):
    """summary.json: config, base and final metrics, timing, budget."""
    summary = {"config": dataclasses.asdict(cfg), "base": state.base_metrics, "final": final_metrics,
               "timing": {"warmstart_s": round(warmstart_s, 3), "rl_s": round(state.rl_s, 3),
                          "rl_step_s": round(state.rl_s / max(cfg.steps, 1), 4)},
               "budget": {"rollouts": cfg.steps * cfg.queries_per_step * cfg.group_size,
                          "generated_tokens": state.tokens, "skipped_updates": state.skipped_updates}}
    if device.type == "cuda":
        summary["timing"]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    write_json(out / "summary.json", summary)
    return summary

# -- The training loop
def train(cfg, resume=False, micro_batch_now=None):
    """Warm-start (or load) the base, run RL, evaluate, write summary.json. resume: continue cfg.out's run with its
    saved config; micro_batch_now may set a new --micro-batch."""
    saved = load_run(cfg.out) if resume else None
    if saved:
        cfg = saved["config"] if micro_batch_now is None else dataclasses.replace(saved["config"],
                                                                                  micro_batch=micro_batch_now)
    validate_config(cfg)
    set_threads(cfg)
    device, out = pick_device(cfg.device), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg, tokenizer)
    base_path, warmstart_s = get_base(cfg, splits["train"], tokenizer, device)
    def eval_all(model, base_lp=None, tag=""):
        res, lps = {}, {}
        for s, ts in splits.items():
            res[s], lps[s] = evaluate(model, tokenizer, ts, cfg.eval_n, cfg.temperature, cfg.max_new_tokens,
                                      seed=cfg.seed + 1, base_logprobs=None if base_lp is None else base_lp[s],
                                      batch=cfg.eval_batch, desc=f"eval {tag}{s}")
        return res, lps
    parts = parse_method(cfg.method)[1]
    if saved:
        policy, memory, state = restore_run(saved, cfg, device)
    else:
        policy, _ = load_policy(base_path, device, attention_for(cfg), cfg.grad_checkpointing)
        longest = max(len(ids) for ts in splits.values() for ids in ts.prompt_ids) + cfg.max_new_tokens
        limit = getattr(policy.config, "n_positions", None) or getattr(policy.config, "max_position_embeddings", None)
        if limit and longest > limit:  # it would fail mid-run, or silently
            raise UserError(f"longest prompt + --max-new-tokens = {longest} tokens, over the model's {limit}")
        memory = None
        if "dlc" in parts:
            torch.manual_seed(cfg.seed)  # the same memory init, cached base or not
            memory = Memory(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0], cfg, device)
        sampler = torch.Generator(device=device).manual_seed(cfg.seed)
        state = RunState(sampler, random.Random(cfg.seed), *eval_all(policy, tag="base "))
    base = load_policy(base_path, device, attention_for(cfg))[0].requires_grad_(False) if "kl" in parts else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    log = out / "metrics.jsonl"
    if saved:
        opt.load_state_dict(saved["optimizer"])
        append_jsonl(log, {"step": state.step, "resumed": True})
    elif log.exists():  # an earlier run's metrics in this folder are kept, renamed
        os.replace(log, log.with_name(f"metrics.{int(time.time())}.jsonl"))
    saved_at = state.step if saved else None  # the step of the checkpoint on disk
    with StopFlag() as stop:
        for step in progress(range(state.step + 1, cfg.steps + 1), desc=f"RL {cfg.method}",
                             initial=state.step, total=cfg.steps):
            queries = [state.query_rng.randrange(len(splits["train"])) for _ in range(cfg.queries_per_step)]
            t0 = time.perf_counter()
            try:
                stats = rl_step(cfg, policy, tokenizer, opt, splits["train"], queries, state.sampler, base, memory,
                                state.outcome_counts)
            except torch.cuda.OutOfMemoryError:
                smaller = micro_batch(cfg, policy, cfg.queries_per_step * cfg.group_size) // 2
                how = (f"continue from step {saved_at}: python rlvr.py train --resume {out} --micro-batch {smaller}"
                       if saved_at else f"no checkpoint yet: rerun with --micro-batch {smaller}") + " (same samples)"
                raise UserError(f"out of GPU memory at step {step}; " + (how if smaller else "even --micro-batch 1: "
                                "use a smaller model or --mem-window")) from None
            state.step, state.rl_s = step, state.rl_s + time.perf_counter() - t0
            state.tokens += stats["tokens"]
            state.skipped_updates += stats["skipped_updates"]
            append_jsonl(log, {"step": step, **stats})
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                append_jsonl(log, {"step": step, "eval": eval_all(policy, state.base_logprobs, tag=f"step {step} ")[0]})
            if stop.signum or (cfg.save_every and step % cfg.save_every == 0):
                save_run(out, cfg, policy, tokenizer, opt, memory, state)
                saved_at = step
            if stop.signum:
                print(f"rlvr.py: stopped at step {step}: python rlvr.py train --resume {out}", file=sys.stderr)
                sys.exit(128 + stop.signum)
    final_metrics, _ = eval_all(policy, state.base_logprobs, tag="final ")
    append_jsonl(log, {"step": cfg.steps, "eval": final_metrics})
    save_run(out, cfg, policy, tokenizer, opt, memory, state)
    return write_summary(out, cfg, state, final_metrics, warmstart_s, device)

# -- Tables, the demo and the CLI
def flat_metrics(m):
    """One split's metrics, pass@k spread into "pass@8", "exact_pass@8", ..."""
    flat = {k: v for k, v in m.items() if not isinstance(v, dict)}
    return flat | {f"{name}@{k}": v for name in ("pass", "exact_pass") for k, v in m[f"{name}@k"].items()}

# The paper's AVG@8 and PASS@8 are our pass@1 and pass@8 (estimated from n samples per query).
COLUMNS = ("pass@1", "pass@8", "exact_pass@n", "exact_coverage", "oversharpened")  # what the demo prints
HEADERS = {"pass@1": "pass@1 = AVG@8", "pass@8": "pass@8 = PASS@8"}

def results_table(rows, splits, columns=COLUMNS, cell="{:.3f}".format):
    """Markdown per split, a row per method: a run's metrics (as in summary.json), or flat ones shown by `cell`."""
    lines = []
    for split in splits:
        table = {name: flat_metrics(row[split]) if "pass@k" in row[split] else row[split] for name, row in rows.items()}
        n = max(int(k[len("pass@"):]) for k in next(iter(table.values())) if k.startswith("pass@"))
        cols = list(dict.fromkeys(c.replace("@n", f"@{n}") for c in columns))  # without pass@8 twice at n 8
        lines += [f"**{split}**", "", "| method | " + " | ".join(HEADERS.get(c, c) for c in cols) + " |",
                  "|---" * len(cols) + "|---|"]
        lines += [f"| {name} | " + " | ".join(cell(values[c]) if c in values else "-" for c in cols) + " |"
                  for name, values in table.items()]
        lines.append("")
    return "\n".join(lines)

def demo(cfg):
    """GRPO and IAC+DLC from one base, same seed and budget, side by side."""
    t0, columns, timing = time.perf_counter(), {}, {}
    for method in ("grpo", "iac+dlc"):
        summary = train(dataclasses.replace(cfg, method=method, out=str(Path(cfg.out) / method.replace("+", "-"))))
        columns.setdefault("base", summary["base"])
        columns[method], timing[method] = summary["final"], summary["timing"]
    print(f"\nbase vs grpo vs iac+dlc: {cfg.steps} RL steps of {cfg.queries_per_step} queries x "
          f"{cfg.group_size} samples, seed {cfg.seed}, metrics from n={cfg.eval_n} samples per query")
    print(results_table(columns, list(columns["base"])))
    ws = max(t["warmstart_s"] for t in timing.values())
    print(f"warm-start {ws:.1f}s (0: cached); " + "; ".join(f"{m} RL {t['rl_s']:.1f}s" for m, t in timing.items())
          + f"; total {time.perf_counter() - t0:.1f}s. Every metric: {cfg.out}/*/summary.json")

def config_parser(prog):
    """One --flag per Config knob (the lab's scripts build on it too)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    return parser

def config_from(args):
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv and not argv[0].startswith("-") else "demo"
    if cmd not in ("demo", "train"):
        sys.exit(f"rlvr.py: unknown command {cmd!r}: train, or none for the demo (the lab: toy_tasks/)")
    p = config_parser("rlvr.py" if cmd == "demo" else "rlvr.py train")
    p.set_defaults(out=f"runs/{cmd}")
    if cmd == "train":
        p.add_argument("--resume", metavar="DIR", help="continue DIR's run (its config; --micro-batch may change)")
    args = p.parse_args(argv if cmd == "demo" else argv[1:])
    cfg = config_from(args)
    if cmd == "demo":
        return demo(cfg)
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    if args.resume and (other := flags - {"--resume", "--micro-batch"}):
        raise UserError(f"--resume DIR runs DIR's saved config: {', '.join(sorted(other))} cannot change")
    summary = train(dataclasses.replace(cfg, out=args.resume or cfg.out), resume=bool(args.resume),
                    micro_batch_now=cfg.micro_batch if "--micro-batch" in flags else None)
    print(results_table({"base": summary["base"], summary["config"]["method"]: summary["final"]},
                        list(summary["base"])))

def cli(argv=None):
    """main(), a problem in the user's input reported in one line, exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"rlvr.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
