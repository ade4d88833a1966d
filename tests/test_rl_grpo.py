"""GRPO, pure: advantages and the clipped loss against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peerd.rl.grpo import group_advantages, grpo_loss, is_degenerate

# The batch every loss test uses: behaviour log-probs 0, so ratio = exp(new) = the
# numbers below; row 0 has advantage +1 and three tokens, row 1 advantage -1 and two
# (its third token is padding, with a huge ratio that must not count anywhere).
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 10.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]


def batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    new = torch.tensor(RATIOS, dtype=torch.float64).log().to(dtype).requires_grad_(True)
    behaviour = torch.zeros(2, 3, dtype=dtype)
    return new, behaviour, torch.tensor(ADV, dtype=dtype), torch.tensor(MASK)


def test_advantages_are_normalised_by_the_group_std() -> None:
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.577350
    # -> +-0.5 / 0.577350 = +-0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0)
    assert adv.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-6)
    # [0, 1.1, 0.1]: mean 0.4, deviations -0.4 0.7 -0.3, unbiased var 0.74 / 2 = 0.37,
    # std 0.608276 -> -0.657596 1.150793 -0.493197
    adv = group_advantages(torch.tensor([0.0, 1.1, 0.1]), eps=0.0)
    assert adv.tolist() == pytest.approx([-0.657596, 1.150793, -0.493197], abs=1e-6)
    # the default eps (1e-4) only nudges: 0.5 / (0.577350 + 0.0001) = 0.865875
    adv = group_advantages(torch.tensor([1.0, 0.0]))  # std 0.707107 -> 0.5/0.707207
    assert adv.tolist() == pytest.approx([0.707007, -0.707007], abs=1e-6)


def test_dr_grpo_advantages_are_only_centred() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), scale_std=False)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    adv = group_advantages(torch.tensor([0.0, 1.1, 0.1]), scale_std=False)
    assert adv.tolist() == pytest.approx([-0.4, 0.7, -0.3], abs=1e-6)


def test_a_group_of_equal_rewards_is_degenerate_and_gets_zeros() -> None:
    for rewards in ([1.1, 1.1, 1.1, 1.1], [0.0, 0.0], [0.7]):
        r = torch.tensor(rewards)
        assert is_degenerate(r)
        assert group_advantages(r).tolist() == [0.0] * len(rewards)
        assert group_advantages(r, scale_std=False).tolist() == [0.0] * len(rewards)
    assert not is_degenerate(torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        is_degenerate(torch.zeros(0))


def test_token_level_loss_clips_and_averages_over_valid_tokens() -> None:
    new, behaviour, adv, mask = batch()
    loss, stats = grpo_loss(new, behaviour, adv, mask)
    # row 0 (A=+1): -min(r, clip(r, .8, 1.2)): r=1 -> -1; r=1.5 -> -1.2 (clipped);
    #               r=.5 -> min(.5, .8) = .5 -> -.5 (the pessimistic side, not clipped)
    # row 1 (A=-1): r=1.1 -> -min(-1.1, -1.1) = 1.1; r=.7 -> -min(-.7, -.8) = .8 (clipped)
    # sum -1 -1.2 -.5 +1.1 +.8 = -0.8 over 5 tokens = -0.16
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)
    assert stats["tokens"] == 5
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 0.7) / 5)
    assert stats["ratio_max"] == pytest.approx(1.5)  # the padding's 10 is not counted
    assert stats["kl_mean"] == 0.0
    assert stats["truncated_fraction"] == 0.0
    loss.backward()
    # d/dnew of -A r = -A r on the unclipped tokens (r = exp(new)), 0 on clipped, /5
    assert new.grad is not None
    assert torch.allclose(new.grad, torch.tensor([[-0.2, 0.0, -0.1], [0.22, 0.0, 0.0]]),
                          atol=1e-6)


def test_clip_high_widens_only_the_upper_side() -> None:
    new, behaviour, adv, mask = batch()
    loss, stats = grpo_loss(new, behaviour, adv, mask, clip_eps_high=0.28)
    # only row 0's r=1.5 changes: -1.28 instead of -1.2; (-0.8 - 0.08) / 5 = -0.176
    assert loss.item() == pytest.approx(-0.176, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)  # 1.5 > 1.28 still clipped


def test_sequence_mean_and_dr_grpo_aggregations() -> None:
    new, behaviour, adv, mask = batch()
    # seq-mean: row 0 (-1 -1.2 -.5) / 3 = -0.9; row 1 (1.1 + .8) / 2 = 0.95; mean 0.025
    loss, _ = grpo_loss(new, behaviour, adv, mask, aggregation="seq-mean")
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    # dr-grpo: sum -0.8 over B * max_len = 2 * 4 = 8 -> -0.1, whatever the lengths
    loss, _ = grpo_loss(new, behaviour, adv, mask, aggregation="dr-grpo", max_len=4)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    loss.backward()
    assert new.grad is not None  # row 0 token 0: -A r / 8 = -0.125
    assert new.grad[0, 0].item() == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(new, behaviour, adv, mask, aggregation="dr-grpo")
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(new, behaviour, adv, mask, aggregation="mean")  # type: ignore[arg-type]


def test_k3_kl_to_the_reference_is_added_per_token() -> None:
    new, behaviour, adv, mask = batch()
    ref = torch.zeros(2, 3)
    # k3 = exp(ref - new) - (ref - new) - 1 = 1/r + ln r - 1:
    # r=1: 0; 1.5: .666667 + .405465 - 1 = .072132; .5: 2 - .693147 - 1 = .306853;
    # 1.1: .909091 + .095310 - 1 = .004401; .7: 1.428571 - .356675 - 1 = .071897
    # mean over 5 = .455283 / 5 = .091057; loss -0.16 + 0.1 * .091057 = -0.150894
    loss, stats = grpo_loss(new, behaviour, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert stats["kl_mean"] == pytest.approx(0.091057, abs=1e-6)
    assert loss.item() == pytest.approx(-0.150894, abs=1e-6)
    # kl_coef 0 with a reference: the KL is reported but not in the loss
    loss, stats = grpo_loss(new, behaviour, adv, mask, ref_logp=ref)
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)
    assert stats["kl_mean"] == pytest.approx(0.091057, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(new, behaviour, adv, mask, kl_coef=0.1)


def test_truncated_importance_weight_caps_instead_of_clipping() -> None:
    new, behaviour, adv, mask = batch()
    loss, stats = grpo_loss(new, behaviour, adv, mask, is_cap=1.2)
    # weight w = min(r, 1.2) held constant; loss per token -w A:
    # row 0: -(1 + 1.2 + .5) = -2.7; row 1: 1.1 + .7 = 1.8; (-2.7 + 1.8) / 5 = -0.18
    assert loss.item() == pytest.approx(-0.18, abs=1e-6)
    assert stats["truncated_fraction"] == pytest.approx(1 / 5)  # only r = 1.5
    assert stats["clip_fraction"] == 0.0  # the trust region starts at the current policy
    loss.backward()
    # gradient -w A / 5 on every valid token: the 1.5 token still learns, capped at 1.2
    assert new.grad is not None
    assert torch.allclose(new.grad, torch.tensor([[-0.2, -0.24, -0.1], [0.22, 0.14, 0.0]]),
                          atol=1e-6)
    with pytest.raises(ValueError, match="is_cap"):
        grpo_loss(new, behaviour, adv, mask, is_cap=0.0)


def test_at_ratio_one_the_loss_gradient_is_the_policy_gradient() -> None:
    # on-policy (new == behaviour): every variant gives d loss/d new = -A / tokens
    torch.manual_seed(0)
    new = torch.randn(3, 4).requires_grad_(True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.ones(3, 4)
    for kwargs in ({}, {"is_cap": 2.0}, {"clip_eps_high": 0.3}):
        new.grad = None
        loss, stats = grpo_loss(new, new.detach().clone(), adv, mask, **kwargs)  # type: ignore[arg-type]
        loss.backward()
        assert stats["ratio_mean"] == pytest.approx(1.0)
        assert new.grad is not None
        assert torch.allclose(new.grad, (-adv / 12)[:, None].expand(3, 4), atol=1e-7)


def test_gradient_flows_to_new_logp_only() -> None:
    new, behaviour, adv, mask = batch()
    behaviour.requires_grad_(True)
    adv.requires_grad_(True)
    ref = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_loss(new, behaviour, adv, mask, ref_logp=ref, kl_coef=0.1, is_cap=2.0)
    loss.backward()
    assert new.grad is not None
    assert behaviour.grad is None and adv.grad is None and ref.grad is None


def test_no_valid_token_gives_zero_loss_with_a_gradient() -> None:
    new, behaviour, adv, _ = batch()
    for aggregation in ("token", "seq-mean"):
        loss, stats = grpo_loss(new, behaviour, adv, torch.zeros(2, 3),
                                aggregation=aggregation)  # type: ignore[arg-type]
        assert loss.item() == 0.0 and stats["tokens"] == 0 and stats["ratio_max"] == 0.0
        loss.backward()
        assert new.grad is not None and not new.grad.any()


def test_bfloat16_inputs_give_the_float32_loss_and_a_bfloat16_gradient() -> None:
    loss32, _ = grpo_loss(*batch(torch.float32))
    new, behaviour, adv, mask = batch(torch.bfloat16)
    loss16, stats = grpo_loss(new, behaviour, adv, mask)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), abs=1e-2)  # bf16 log r: ~3 digits
    loss16.backward()
    assert new.grad is not None and new.grad.dtype == torch.bfloat16
    assert math.isfinite(stats["ratio_mean"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_the_gpu_the_loss_and_gradient_match_the_cpu() -> None:
    cpu_new, behaviour, adv, mask = batch()
    cpu, _ = grpo_loss(cpu_new, behaviour, adv, mask, is_cap=1.2)
    cpu.backward()
    new = cpu_new.detach().cuda().requires_grad_(True)
    gpu, _ = grpo_loss(new, behaviour.cuda(), adv.cuda(), mask.cuda(), is_cap=1.2)
    assert gpu.device.type == "cuda"
    gpu.backward()
    assert gpu.item() == pytest.approx(cpu.item(), abs=1e-6)
    assert new.grad is not None and cpu_new.grad is not None
    assert torch.allclose(new.grad.cpu(), cpu_new.grad, atol=1e-6)


def test_shape_mismatches_are_refused() -> None:
    new, behaviour, adv, mask = batch()
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(new, behaviour[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(new, behaviour, adv[:1], mask)
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(new, behaviour, adv, mask[:, :2])


def test_padding_holding_minus_infinity_never_makes_a_nan() -> None:
    new, behaviour, adv, mask = batch()
    behaviour = behaviour.clone()
    behaviour[1, 2] = float("-inf")  # a padded position of the sampler's log-probs
    ref = torch.zeros(2, 3)
    ref[1, 2] = float("nan")
    loss, stats = grpo_loss(new, behaviour, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(-0.150894, abs=1e-6)
    loss.backward()
    assert new.grad is not None and torch.isfinite(new.grad).all()
    assert math.isfinite(stats["ratio_mean"])


def test_an_absurd_behaviour_logprob_gives_a_finite_loss_and_gradient() -> None:
    # a lying or very stale sampler: log-prob -100 on a token the policy now likes;
    # exp(100) overflows float32, so the log-ratio is clamped to 20 first
    for a, kwargs in ((1.0, {}), (-1.0, {}), (-1.0, {"is_cap": 2.0})):
        new = torch.zeros(1, 2, requires_grad=True)
        behaviour = torch.tensor([[-100.0, 0.0]])
        ref = torch.tensor([[-100.0, 0.0]])
        loss, stats = grpo_loss(new, behaviour, torch.tensor([a]), torch.ones(1, 2),
                                ref_logp=ref, kl_coef=0.1, **kwargs)  # type: ignore[arg-type]
        loss.backward()
        assert math.isfinite(loss.item()) and math.isfinite(stats["ratio_max"])
        assert new.grad is not None and torch.isfinite(new.grad).all()


def test_the_runs_loss_takes_the_batchs_reference_log_probs() -> None:
    """GrpoLoss (what the trainer hands the learner) reads the reference log-probs the
    session puts on the batch (with_reference): --kl moves the loss by kl * k3."""
    from peerd.rl.grpo import GrpoLoss
    from peerd.rl.learner import TokenBatch, with_reference

    tokens = TokenBatch.from_sequences([[1, 2], [3]], [[4, 5], [6]],
                                       [[-1.0, -1.0], [-1.0]], [1.0, -1.0])
    new = torch.tensor([[-0.5, -1.5], [-2.0, 0.0]])
    ref = with_reference(tokens, torch.zeros(2, 2))
    plain = GrpoLoss(clip_eps=0.2, kl_coef=0.0, aggregation="token", max_len=2, is_cap=None)
    kl = GrpoLoss(clip_eps=0.2, kl_coef=0.1, aggregation="token", max_len=2, is_cap=None)
    base, stats = plain(new, ref)
    assert stats["kl_mean"] > 0.0  # the reference reached the loss
    with_kl, _ = kl(new, ref)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * stats["kl_mean"], abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        kl(new, tokens)  # --kl without a reference on the batch is our bug, said so
