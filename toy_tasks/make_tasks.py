"""Writes the toy task files: python toy_tasks/make_tasks.py [--out toy_tasks] [--seed 0].

digit_sum and countdown queries (split by target and by query) in train/val/test.jsonl, and word problems for
real language models (--model) in word_problems/. Deterministic: the committed files are its output for seed 0.
"""
import argparse
import itertools
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlvr import enumerate_countdown, enumerate_digit_sum  # noqa: E402

WORD_TEMPLATES = [  # (story, the answer's value from the numbers a, b, c)
    ("{name} has {a} bags with {b} {item} in each bag and finds {c} more {item}.", lambda a, b, c: a * b + c),
    ("{name} buys {a} packs of {b} {item} and gives {c} {item} away.", lambda a, b, c: a * b - c),
    ("{name} has {a} {item}, gets {b} more, and later {c} more.", lambda a, b, c: a + b + c),
    ("{a} friends each bring {b} {item} to {name}'s party, and {c} {item} get lost.", lambda a, b, c: a * b - c),
    ("{name} collects {b} {item} a day for {a} days, then {c} more on the last evening.", lambda a, b, c: a * b + c),
]


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies"]


def make_word_problems(rng: random.Random, n: int) -> list[dict]:
    """Stories whose answer is an expression over their three numbers: several orders are correct, all enumerable.
    No two ask the same arithmetic (numbers and target), however worded, so the splits share no question."""
    tasks, seen = [], set()
    while len(tasks) < n:
        story, value = rng.choice(WORD_TEMPLATES)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        text = story.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b, c=c)
        if (key := (tuple(sorted((a, b, c))), value(a, b, c))) in seen:
            continue
        seen.add(key)
        prompt = (f"{text} Write one arithmetic expression that uses each of the numbers {a}, {b} and {c} exactly "
                  f"once, with only +, - and * and no brackets, whose value is how many there are at the end. "
                  f"Put the expression alone on the last line.")
        task = {"id": f"wp-{len(tasks)}", "type": "word_problem", "prompt": prompt, "numbers": [a, b, c],
                "target": value(a, b, c), "ops": "+-*"}
        task["num_solutions"] = len(enumerate_countdown(task))
        tasks.append(task)
    return tasks


def make_small_lm_tasks(rng: random.Random, n: int) -> list[dict]:
    """Countdown questions a 135M-parameter instruct model solves now and then: two or three numbers 2-9, + and *,
    asked in words, the answer alone on the last line. Each has at least two correct expressions with + and *."""
    tasks, seen = [], set()
    while len(tasks) < n:
        nums = [rng.randint(2, 9) for _ in range(rng.choice((2, 3)))]
        expr = str(nums[0]) + "".join(rng.choice("+*") + str(x) for x in nums[1:])
        target = sum(math.prod(map(int, term.split("*"))) for term in expr.split("+"))
        key = (tuple(sorted(nums)), target)
        names = " and ".join(map(str, nums)) if len(nums) == 2 else f"{nums[0]}, {nums[1]} and {nums[2]}"
        prompt = (f"Use the numbers {names} once each, with + or *, to make {target}. "
                  "Write the expression alone on the last line.")
        task = {"id": f"lm-{len(tasks)}", "type": "countdown", "prompt": prompt, "numbers": nums, "target": target,
                "ops": "+*"}
        task["num_solutions"] = len(enumerate_countdown(task))
        if key not in seen and target < 100 and task["num_solutions"] >= 2:
            seen.add(key)
            tasks.append(task)
    return tasks


def make_tasks(out: str | Path, seed: int = 0, countdown: tuple[int, int, int] = (48, 160, 48)) -> dict[str, int]:
    """Deterministically write train/val/test.jsonl: digit sums (split by target) and countdown (split by query)."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    # digit_sum, 3 terms: targets 4..26 all have >= 3 ordered solutions (15 has 73); held-out targets interleave
    test_t, val_t = {6, 11, 16, 21, 26}, {8, 13, 19, 24}
    for t in range(4, 27):
        task = {"id": f"sum3-{t}", "type": "digit_sum", "prompt": f"sum3={t}:", "terms": 3, "target": t}
        task["num_solutions"] = len(enumerate_digit_sum(task))
        splits["test" if t in test_t else "val" if t in val_t else "train"].append(task)
    # countdown with three digits 1-9: every query reachable in >= 4 distinct ways
    pool = []
    for nums in itertools.combinations_with_replacement(range(1, 10), 3):
        for target in range(1, 100):
            task = {"id": f"cd-{''.join(map(str, nums))}-{target}", "type": "countdown",
                    "prompt": f"{','.join(map(str, nums))}->{target}:", "numbers": list(nums), "target": target}
            n = len(enumerate_countdown(task))
            if n >= 4:
                task["num_solutions"] = n
                pool.append(task)
    rng.shuffle(pool)
    # validation: up to 40 queries between train and test, any further ones after the test block, so that
    # the size of the validation split (which only tunes settings) never moves a train or test query
    n_train, n_val, n_test = countdown
    first_val = min(n_val, 40)
    test_start = n_train + 40
    splits["train"] += pool[:n_train]
    after_test = test_start + n_test
    splits["val"] += pool[n_train:n_train + first_val] + pool[after_test:after_test + n_val - first_val]
    splits["test"] += pool[test_start:test_start + n_test]
    # word problems for real language models (--model), in their own folder: toy_tasks/word_problems
    words = make_word_problems(rng, 100)
    word_splits = {"train": words[:60], "val": words[60:80], "test": words[80:]}
    # short questions for small instruct models (SmolLM2-135M-Instruct): toy_tasks/small_lm
    small = make_small_lm_tasks(rng, 64)
    small_splits = {"train": small[:24], "val": small[24:40], "test": small[40:]}
    out = Path(out)
    for folder, split_tasks in ((out, splits), (out / "word_problems", word_splits), (out / "small_lm", small_splits)):
        folder.mkdir(parents=True, exist_ok=True)
        for name, tasks in split_tasks.items():
            with open(folder / f"{name}.jsonl", "w") as f:
                for task in tasks:
                    f.write(json.dumps(task) + "\n")
    counts = {name: len(tasks) for name, tasks in splits.items()}
    more = {"word_problems": word_splits, "small_lm": small_splits}
    return counts | {f"{folder}/{k}": len(v) for folder, parts in more.items() for k, v in parts.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="make_tasks.py")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder to write the splits into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args()
    print(make_tasks(args.out, args.seed))
