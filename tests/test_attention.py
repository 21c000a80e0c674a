"""PatchAttention: shapes, weight ranges, slow references for every mode, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from patchssl.attention import ATTENTION_MODES, PatchAttention, weight_entropy

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


# ---------------------------------------------------------------- entropy penalty


def _hand_entropy(row: list[float]) -> float:
    """Normalised entropy of one image's weights divided by their sum, written out."""
    total = sum(row)
    p = [a / total for a in row]
    return -sum(q * math.log(q) for q in p if q > 0) / math.log(len(row))


def test_weight_entropy_matches_a_hand_computation():
    rows = [
        [0.9, 0.1, 0.5, 0.5],
        [0.25, 0.25, 0.25, 0.25],
        [1.0, 0.0, 0.0, 0.0],
        [0.7, 0.2, 0.0, 0.1],
    ]
    got = weight_entropy(torch.tensor(rows, dtype=torch.float64))
    torch.testing.assert_close(
        got, torch.tensor([_hand_entropy(r) for r in rows], dtype=torch.float64)
    )
    assert got[1] == pytest.approx(1.0) and got[2] == 0.0
    # all-zero weights count as uniform, one patch has no entropy, and negatives are clipped
    assert weight_entropy(torch.zeros(1, 4)).item() == pytest.approx(1.0)
    assert weight_entropy(torch.ones(2, 1)).tolist() == [0.0, 0.0]
    torch.testing.assert_close(
        weight_entropy(torch.tensor([[-1.0, 2.0, 2.0]])),
        weight_entropy(torch.tensor([[0.0, 1.0, 1.0]])),
    )
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        weight_entropy(torch.ones(9))


def test_weight_entropy_has_finite_gradients_at_zero_weights():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    weight_entropy(w).sum().backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_entropy_penalty_is_lambda_times_the_mean_entropy(mode):
    feats = _features(torch.device("cpu"))
    att = PatchAttention(D, N, mode, hidden_dim=4, entropy_weight=0.3).train()
    _, weights = att(feats)
    rows = weights.detach().double().tolist()
    expected = 0.3 * sum(_hand_entropy(r) for r in rows) / len(rows)
    assert att.aux_loss is not None and att.aux_loss.ndim == 0
    assert att.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    # it is differentiable in the attention's parameters: minimising it sharpens the weights
    att.aux_loss.backward()
    assert att.score.weight.grad is not None and att.score.weight.grad.abs().sum() > 0


def test_entropy_penalty_is_none_when_off_or_in_eval():
    feats = _features(torch.device("cpu"))
    off = PatchAttention(D, N, entropy_weight=0.0).train()
    off(feats)
    assert off.aux_loss is None
    on = PatchAttention(D, N, entropy_weight=1.0).train()
    on(feats)
    assert on.aux_loss is not None
    on.eval()
    with torch.no_grad():
        on(feats)
    assert on.aux_loss is None  # evaluation clears the term of the last training forward


def test_entropy_penalty_survives_torch_compile():
    feats = _features(torch.device("cpu"))
    att = PatchAttention(D, N, "softmax", hidden_dim=4, entropy_weight=0.5).train()
    att(feats)
    eager = att.aux_loss.detach().clone()
    att.aux_loss = None
    compiled = torch.compile(att, backend="eager", fullgraph=False)
    compiled(feats)
    assert att.aux_loss is not None
    torch.testing.assert_close(att.aux_loss.detach(), eager)


def test_entropy_weight_round_trips_and_bad_values_are_refused():
    att = PatchAttention(D, N, entropy_weight=0.25)
    again = PatchAttention(**att.config)
    assert again.entropy_weight == 0.25 and "entropy_weight=0.25" in repr(again)
    assert PatchAttention(D, N).entropy_weight == 0.0
    for bad in (-0.1, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="entropy_weight must be a finite number >= 0"):
            PatchAttention(D, N, entropy_weight=bad)
