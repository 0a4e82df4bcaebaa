import torch

from dpo_lab.dpo import toy


def test_closed_form_is_the_rlhf_optimum():
    reward, ref = toy.make_toy(seed=3)
    for beta in (0.3, 1.0, 3.0):
        best = toy.rlhf_optimum(ref, reward, beta)
        j = toy.rlhf_objective(best, ref, reward, beta)
        # the optimum value is β·log Z(x)
        assert torch.allclose(j, beta * toy.log_partition(ref, reward, beta))
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            other = torch.log_softmax(best + 0.3 * torch.randn(best.shape, generator=g, dtype=best.dtype), -1)
            assert (toy.rlhf_objective(other, ref, reward, beta) < j).all()


def test_reward_from_policy_and_partition_cancels_in_bradley_terry():
    reward, ref = toy.make_toy(seed=1)
    beta = 0.7
    best = toy.rlhf_optimum(ref, reward, beta)
    r_back = toy.implicit_reward(best, ref, beta) + beta * toy.log_partition(ref, reward, beta)[:, None]
    assert torch.allclose(r_back, reward)
    assert torch.allclose(toy.bradley_terry(toy.implicit_reward(best, ref, beta)), toy.bradley_terry(reward))


def test_dpo_on_exact_preferences_recovers_the_optimum_and_the_reward():
    reward, ref = toy.make_toy(seed=2)
    beta = 1.0
    fit = toy.solve_dpo(ref, toy.bradley_terry(reward), beta)
    assert (fit - toy.rlhf_optimum(ref, reward, beta)).abs().max() < 1e-5
    assert toy.recovery_error(toy.implicit_reward(fit, ref, beta), reward) < 1e-5


def test_sampled_preferences_converge_as_pairs_grow():
    reward, ref = toy.make_toy(seed=0)
    errs = [toy.recovery_error(toy.implicit_reward(
        toy.solve_dpo(ref, toy.sample_preferences(reward, n, seed=0), 1.0), ref, 1.0), reward)
        for n in (100, 10000)]
    assert errs[1] < errs[0] / 3


def test_kl_is_kl_of_policy_from_reference():
    reward, ref = toy.make_toy(seed=4)
    logp = toy.rlhf_optimum(ref, reward, 0.5)
    from torch.distributions import Categorical, kl_divergence
    torch.testing.assert_close(toy.kl(logp, ref), kl_divergence(Categorical(logits=logp), Categorical(logits=ref)),
                               rtol=1e-12, atol=1e-12)


def test_sampled_pairs_never_compare_a_response_with_itself_and_follow_bradley_terry():
    reward, _ = toy.make_toy(n_prompts=2, n_responses=3, seed=5)
    counts = toy.sample_preferences(reward, 60000, seed=1)
    assert counts.sum().item() == 2 * 60000
    assert counts.diagonal(dim1=1, dim2=2).abs().sum() == 0
    pairs = counts + counts.transpose(1, 2)
    off = ~torch.eye(3, dtype=torch.bool).expand(2, 3, 3)
    win_rate = counts[off] / pairs[off]
    # 20000 draws per unordered pair: the binomial std of a frequency is below 0.004
    assert (win_rate - toy.bradley_terry(reward)[off]).abs().max() < 0.02
    assert (pairs[off] / (60000 / 3) - 1).abs().max() < 0.05  # each of the 3 pairs drawn a third of the time
