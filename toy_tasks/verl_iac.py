"""IAC in verl (multi-GPU RLVR): the paper's inverse-success calibration as a verl advantage estimator.

  import sys; sys.path.insert(0, "toy_tasks")                    # from the repository root
  from verl_iac import register_verl_iac
  register_verl_iac("grpo_iac")                                  # then verl.trainer.main_ppo.main() with
                                                                 # algorithm.adv_estimator=grpo_iac (verl 0.9.1)
"""
import torch


def inverse_success_calibration_flat(advantages, rewards, group_ids, alpha=1.0):
    """IAC on flat [N] tensors, a group label per sample (verl's and TRL's layout); equals rlvr.py's grouped
    inverse_success_calibration (a test checks it)."""
    labels = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)  # ints, strings, uids
    dense: dict = {}
    ids = torch.tensor([dense.setdefault(x, len(dense)) for x in labels], dtype=torch.long, device=advantages.device)
    size = torch.bincount(ids).to(advantages.dtype)
    correct = torch.bincount(ids, weights=(rewards > 0).to(advantages.dtype))
    factor = (size - correct)[ids] ** alpha
    calibrated = torch.where((advantages > 0) & (rewards > 0), advantages * factor, advantages)
    return torch.where(factor == 0, 0.0, calibrated)


def register_verl_iac(name="grpo_iac", alpha=1.0):
    """IAC over verl's GRPO estimator as algorithm.adv_estimator=`name` (needs verl): verl broadcasts one advantage
    per sequence over its tokens; IAC scales that value."""
    from verl.trainer.ppo import core_algos

    def compute_grpo_iac_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None, **kwargs):
        advantages, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                                                  norm_adv_by_std_in_grpo, config)
        per_sequence = (advantages * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
        calibrated = inverse_success_calibration_flat(per_sequence, token_level_rewards.sum(-1), index, alpha)
        advantages = calibrated.unsqueeze(-1) * response_mask
        return advantages, advantages

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is None:
        core_algos.register_adv_est(name)(compute_grpo_iac_advantage)
    return core_algos.get_adv_estimator_fn(name)
