"""PatchAttention: shapes, weight ranges, slow references for every mode, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from patchssl.attention import ATTENTION_MODES, PatchAttention

B, N, D = 3, 9, 16


def _features(device: torch.device) -> torch.Tensor:
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(0)).to(device)


def _reference_weights(att: PatchAttention, feats: torch.Tensor) -> torch.Tensor:
    """The equations of the docstring, one image and one patch at a time."""
    out = torch.empty(feats.shape[:2])
    for b in range(feats.shape[0]):
        scores = []
        for n in range(feats.shape[1]):
            h = feats[b, n]
            if att.mode == "sigmoid":
                s = float(att.score.weight[0] @ h + att.score.bias[0])
            else:
                v = torch.tanh(att.V.weight @ h + att.V.bias)
                if att.mode == "gated":
                    v = v * torch.sigmoid(att.U.weight @ h + att.U.bias)
                s = float(att.score.weight[0] @ v)
            if att.pos_bias is not None:
                s += float(att.pos_bias[n])
            scores.append(s)
        if att.mode == "sigmoid":
            out[b] = torch.tensor([1 / (1 + math.exp(-s)) for s in scores])
        else:
            exps = [math.exp(s - max(scores)) for s in scores]
            out[b] = torch.tensor([e / sum(exps) for e in exps])
    return out


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_matches_slow_reference(mode, device):
    torch.manual_seed(1)
    att = PatchAttention(D, N, mode=mode, hidden_dim=8).to(device)
    if att.pos_bias is not None:
        with torch.no_grad():
            att.pos_bias.copy_(torch.linspace(-1, 1, N))
    feats = _features(device)
    reweighted, weights = att(feats)
    assert reweighted.shape == (B, N, D) and weights.shape == (B, N)
    with torch.no_grad():
        ref = _reference_weights(att.cpu(), feats.cpu())
    torch.testing.assert_close(weights.cpu(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reweighted.cpu(), feats.cpu() * ref[..., None], rtol=1e-4, atol=1e-6)


def test_weight_ranges():
    feats = _features(torch.device("cpu")) * 10
    _, w = PatchAttention(D, N, "sigmoid")(feats)
    assert ((w > 0) & (w < 1)).all()
    for mode in ("softmax", "gated"):
        _, w = PatchAttention(D, N, mode)(feats)
        torch.testing.assert_close(w.sum(1), torch.ones(B))
        assert (w >= 0).all()


def test_position_bias_shifts_only_its_patch():
    att = PatchAttention(D, N, "sigmoid")
    feats = _features(torch.device("cpu"))
    _, before = att(feats)
    with torch.no_grad():
        att.pos_bias[4] = 3.0
    _, after = att(feats)
    changed = (after - before).abs() > 1e-7
    assert changed[:, 4].all() and not changed[:, [0, 1, 2, 3, 5, 6, 7, 8]].any()
    assert (after[:, 4] > before[:, 4]).all()


def test_softmax_modes_have_no_position_bias_by_default():
    assert PatchAttention(D, N, "softmax").pos_bias is None
    assert PatchAttention(D, N, "gated", position_bias=True).pos_bias.shape == (N,)
    # Without it, the softmax modes are permutation equivariant.
    att = PatchAttention(D, N, "gated")
    feats = _features(torch.device("cpu"))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    _, w = att(feats)
    _, w_perm = att(feats[:, perm])
    torch.testing.assert_close(w_perm, w[:, perm])


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_gradients_reach_every_parameter(mode):
    att = PatchAttention(D, N, mode, position_bias=True)
    feats = _features(torch.device("cpu")).requires_grad_(True)
    reweighted, weights = att(feats)
    # A loss that depends on the weights unevenly, so that softmax gradients are not zero.
    (reweighted.sum() + (weights * torch.arange(N)).sum()).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_errors_are_explained():
    with pytest.raises(ValueError, match="num_patches=9 but got 4 patches"):
        PatchAttention(D, 9)(torch.randn(2, 4, D))
    with pytest.raises(ValueError, match=r"\(B, N, 16\); got \(2, 9\)"):
        PatchAttention(D, 9)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="Did you mean 'gated'"):
        PatchAttention(D, 9, mode="gate")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        PatchAttention(0, 9)


def test_config_round_trip():
    att = PatchAttention(D, N, "gated", hidden_dim=4)
    again = PatchAttention(**att.config)
    again.load_state_dict(att.state_dict())
    feats = _features(torch.device("cpu"))
    torch.testing.assert_close(again(feats)[1], att(feats)[1])


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_temperature_divides_the_scores(mode):
    feats = _features(torch.device("cpu"))
    att = PatchAttention(D, N, mode, hidden_dim=8, position_bias=True)
    with torch.no_grad():
        att.pos_bias.copy_(torch.linspace(-1.0, 1.0, N))
    sharp = PatchAttention(**{**att.config, "temperature": 0.25})
    sharp.load_state_dict(att.state_dict())
    reweighted, weights = sharp(feats)
    assert reweighted.shape == (B, N, D) and weights.shape == (B, N)
    scores = att.logits(feats)
    expected = torch.sigmoid(scores / 0.25) if mode == "sigmoid" else (scores / 0.25).softmax(1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(reweighted, feats * expected.unsqueeze(-1))
    # the order of the weights within an image is kept, their spread grows
    plain = att(feats)[1]
    assert torch.equal(weights.argsort(dim=1), plain.argsort(dim=1))
    spread = (weights.amax(1) - weights.amin(1)).mean()
    assert spread > (plain.amax(1) - plain.amin(1)).mean()
    if mode != "sigmoid":
        torch.testing.assert_close(weights.sum(1), torch.ones(B))
        assert (weights.amax(1) > plain.amax(1)).all()


def test_temperature_one_is_the_default_rule_and_round_trips():
    feats = _features(torch.device("cpu"))
    att = PatchAttention(D, N, "softmax", hidden_dim=4, temperature=1.0)
    torch.testing.assert_close(att(feats)[1], _reference_weights(att, feats))
    hot = PatchAttention(D, N, "softmax", hidden_dim=4, temperature=3.0)
    again = PatchAttention(**hot.config)
    again.load_state_dict(hot.state_dict())
    assert again.temperature == 3.0 and "temperature=3.0" in repr(again)
    torch.testing.assert_close(again(feats)[1], hot(feats)[1])


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "0.5"])
def test_bad_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        PatchAttention(D, N, temperature=bad)
