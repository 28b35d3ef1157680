import numpy as np
import pytest
import torch

from distill.losses import (
    TapProjections,
    gather_tokens,
    masked_mse,
    pair_losses,
    token_mse,
    weighted_loss,
)
from distill.schedule import DLD_MODES, dld_weights
from teachers.preprocess import valid_mask
from teachers.reduction import take_tokens, token_positions

PROGRESS = np.linspace(0, 1, 101)


@pytest.mark.parametrize("mode", DLD_MODES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_weights_sum_to_one_and_are_nonnegative(mode, k):
    for p in PROGRESS:
        w = dld_weights(float(p), k, mode)
        assert len(w) == k
        assert abs(sum(w) - 1) < 1e-9
        assert min(w) >= 0


@pytest.mark.parametrize("mode", ["progressive", "stepwise"])
def test_final_embedding_floor_and_monotone_progress(mode):
    finals, depths = [], []
    for p in PROGRESS:
        w = dld_weights(float(p), 5, mode, floor=0.25)
        assert w[-1] >= 0.25 - 1e-12
        finals.append(w[-1])
        depths.append(sum(i * wi for i, wi in enumerate(w)))
    assert all(b >= a - 1e-12 for a, b in zip(finals, finals[1:]))
    assert all(b >= a - 1e-12 for a, b in zip(depths, depths[1:]))
    assert depths[0] < 1.5 and depths[-1] > 3.99  # starts shallow, ends on the final embedding


def test_progressive_moves_smoothly_from_shallow_to_final():
    start, mid, end = (dld_weights(p, 5, "progressive") for p in (0.0, 0.4, 1.0))
    assert np.argmax(start[:-1]) == 0 and start[-1] == pytest.approx(0.2)
    assert np.argmax(mid) in (2, 3)
    assert end[-1] > 0.99
    # smooth: no jump larger than 0.1 between 1%-of-training steps
    w = np.array([dld_weights(float(p), 5, "progressive") for p in PROGRESS])
    assert np.abs(np.diff(w, axis=0)).max() < 0.1


def test_stepwise_advances_one_pair_per_period():
    assert dld_weights(0.0, 4, "stepwise", floor=0.1) == pytest.approx([0.9, 0, 0, 0.1])
    assert dld_weights(0.3, 4, "stepwise", floor=0.1) == pytest.approx([0, 0.9, 0, 0.1])
    assert dld_weights(0.99, 4, "stepwise", floor=0.1) == pytest.approx([0, 0, 0, 1])
    assert dld_weights(0.5, 4, "stepwise", every=0.1) == pytest.approx([0, 0, 0, 1])


def test_baseline_modes_and_bad_arguments():
    assert dld_weights(0.5, 4, "final_only") == [0, 0, 0, 1]
    assert dld_weights(0.5, 4, "uniform") == [0.25] * 4
    with pytest.raises(ValueError, match="unknown DLD mode 'fancy'"):
        dld_weights(0.5, 3, "fancy")
    with pytest.raises(ValueError, match="floor must be in"):
        dld_weights(0.5, 3, floor=1.5)


def test_masked_mse_ignores_padding():
    t = torch.zeros(2, 4, 3, 3)
    s = torch.zeros(2, 4, 3, 3)
    s[:, :, 2, :] = 100.0  # only on padded row
    s[1, :, 0, 0] = 2.0  # one valid cell of image 1
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[:, 2, :] = False
    # image 0: 0; image 1: one of 6 valid cells has squared error 4 -> 4/6
    assert masked_mse(s, t, valid, channels_last=False).item() == pytest.approx((0 + 4 / 6) / 2)
    assert masked_mse(
        s.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1), valid, True
    ).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="differ"):
        masked_mse(s, t[:, :2], valid, False)


def test_pair_losses_and_weighting_with_projections():
    torch.manual_seed(0)
    proj = TapProjections(8, 16, 2)
    taps = proj([torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)])
    assert taps[0].shape == (1, 4, 4, 16)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    losses = pair_losses(
        torch.randn(1, 256, 4, 4),
        taps,
        torch.zeros(1, 256, 4, 4),
        [torch.zeros(1, 4, 4, 16)] * 2,
        valid,
    )
    assert len(losses) == 3
    total = weighted_loss(losses, [0.0, 0.5, 0.5])
    assert total.item() == pytest.approx(0.5 * losses[1].item() + 0.5 * losses[2].item())
    total.backward()
    assert (
        proj.proj[0].weight.grad is None and proj.proj[1].weight.grad is not None
    )  # weight 0 left out


def _reduced_pair(hw=(256, 160), k=40, seed=0):
    """A student/teacher tap pair [2, 16, 16, 8], the valid mask of `hw` at 256 px and each
    image's token positions."""
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 16, 16, 8, generator=gen), torch.randn(2, 16, 16, 8, generator=gen)
    valid = valid_mask(hw, 256)[None].expand(2, -1, -1)
    tokens = torch.stack([token_positions(f"img{i}", hw, 256, k) for i in range(2)])
    return s, t, valid, tokens


def test_token_loss_equals_the_masked_loss_over_the_same_tokens():
    s, t, valid, tokens = _reduced_pair()
    assert all(len(row.unique()) == 40 for row in tokens)  # distinct: 160 valid cells >= K
    on_tokens = torch.zeros(2, 256, dtype=torch.bool)
    on_tokens[torch.arange(2)[:, None], tokens] = True
    reference = masked_mse(s, t, on_tokens.view(2, 16, 16), channels_last=True)
    teacher_stored = torch.stack([take_tokens(t[i], tokens[i]) for i in range(2)])  # as cached
    loss = token_mse(gather_tokens(s, tokens), teacher_stored)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    # pair_losses gathers a whole student tap itself, or takes one gathered before projection
    embed = torch.randn(2, 4, 16, 16)
    whole = pair_losses(embed, [s], embed, [teacher_stored], valid, tokens)
    gathered = pair_losses(
        embed, [gather_tokens(s, tokens)], embed, [teacher_stored], valid, tokens
    )
    torch.testing.assert_close(whole[0], reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(gathered[0], reference, rtol=1e-6, atol=0)
    assert whole[1] == 0  # the final embedding stays whole and masked as before


def test_token_loss_is_an_unbiased_estimate_of_the_full_masked_loss():
    s, t, valid, _ = _reduced_pair()
    full = masked_mse(s, t, valid, channels_last=True)
    estimates = []
    for i in range(3000):
        tokens = torch.stack([token_positions(f"{i}:{j}", (256, 160), 256, 40) for j in range(2)])
        teacher_stored = torch.stack([take_tokens(t[j], tokens[j]) for j in range(2)])
        estimates.append(float(token_mse(gather_tokens(s, tokens), teacher_stored)))
    mean, se = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - float(full)) < 4 * se  # measured within 1 se
    assert np.std(estimates) > 0.01 * float(full)  # the positions really vary
    # all valid cells (K = n): the estimate is the full loss itself
    tokens = torch.stack([token_positions(f"all{j}", (256, 160), 256, 160) for j in range(2)])
    teacher_stored = torch.stack([take_tokens(t[j], tokens[j]) for j in range(2)])
    torch.testing.assert_close(token_mse(gather_tokens(s, tokens), teacher_stored), full)
