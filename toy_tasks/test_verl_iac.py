"""Tests for verl_iac.py: flat IAC equals rlvr's grouped IAC, and verl's registry serves it (CI installs verl)."""
import os

import numpy as np
import pytest
import torch

import rlvr
from verl_iac import inverse_success_calibration_flat, register_verl_iac


def test_flat_iac_matches_grouped_iac():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(12, 8, generator=gen) > 0.6).float()
    adv = rlvr.grpo_advantages(rewards)
    perm = torch.randperm(96, generator=gen)
    uids = np.array([f"uid-{i // 8}" for i in range(96)])[perm.numpy()]  # groups scattered through the batch
    flat = inverse_success_calibration_flat(adv.view(-1)[perm], rewards.view(-1)[perm], uids, alpha=1.0)
    assert torch.equal(flat, rlvr.inverse_success_calibration(adv, rewards).view(-1)[perm])
    rewards, adv = rewards[:2], adv[:2]
    assert torch.equal(inverse_success_calibration_flat(adv.view(-1), rewards.view(-1), [0] * 8 + [1] * 8, alpha=0.0),
                       adv.view(-1))  # alpha 0: the identity


def test_verl_adapter_equals_rlvr_iac():
    """verl's layout (token-level rewards, response mask, uid per sample) through the registered estimator."""
    if os.environ.get("RLVR_REQUIRE_VERL") != "1":
        pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.trainer.ppo import core_algos
    fn = register_verl_iac("grpo_iac_test", alpha=1.0)
    assert core_algos.get_adv_estimator_fn("grpo_iac_test") is fn
    gen = torch.Generator().manual_seed(0)
    Q, G, T = 6, 8, 5
    rewards = (torch.rand(Q, G, generator=gen) > 0.5).float()
    rewards[0], rewards[1] = 1.0, 0.0
    lengths = torch.randint(1, T + 1, (Q * G,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    token_rewards = torch.zeros(Q * G, T)
    token_rewards[torch.arange(Q * G), lengths - 1] = rewards.view(-1)  # the reward sits on the last response token
    index = np.array([f"prompt-{i // G}" for i in range(Q * G)], dtype=object)
    adv, _ = fn(token_level_rewards=token_rewards, response_mask=mask, index=index)
    verl_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index)
    expected = rlvr.inverse_success_calibration(verl_grpo[:, 0].view(Q, G), rewards).view(-1, 1) * mask
    assert torch.allclose(adv, expected)
    # and verl's GRPO agrees with ours at verl's epsilon, so IAC on either base is the same number
    ours = rlvr.inverse_success_calibration(rlvr.grpo_advantages(rewards, eps=1e-6), rewards)
    assert torch.allclose(adv[:, 0], ours.view(-1), atol=1e-5)
