"""The lab's tests share rlvr's test fixtures: tiny task folders and warm-started tiny models."""
from test_rlvr import task_dir, tiny_cfg, tokenizer, warm_model  # noqa: F401
