"""The lab's tests share rlvr's test fixtures (tiny task folders, warm-started tiny models), from any directory."""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from test_rlvr import task_dir, tiny_cfg, tokenizer, warm_model  # noqa: F401, E402
