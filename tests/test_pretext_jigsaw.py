"""The jigsaw's lift-off mechanisms: the permutation curriculum and the heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from patchssl.permutations import PermutationSet
from patchssl.pretext import (
    JigsawPretext,
    PatchConcatHead,
    PermutationAssignmentHead,
    PermutationRelationHead,
)
from patchssl.pretext.heads import sized_from_width
from patchssl.pretext.testing import tiny_encoder
from patchssl.tiling import PatchTiler


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- curriculum
def test_curriculum_schedule_grows_geometrically_to_all() -> None:
    size = JigsawPretext.curriculum_size
    sizes = [size(step, 10, 100, 1000) for step in range(0, 130)]
    assert sizes[0] == 10 and sizes[100:] == [1000] * 30
    assert sizes[50] == 100  # halfway in log scale: sqrt(10 * 1000)
    assert sizes == sorted(sizes)
    assert size(0, None, 100, 1000) == 1000  # no curriculum
    assert size(0, 10, 0, 1000) == 1000
    assert size(5, 2000, 100, 1000) == 1000  # a start above K is no curriculum


def test_training_draws_from_the_active_prefix_and_eval_from_all() -> None:
    perms = PermutationSet.generate(100, 9, seed=0)
    task = JigsawPretext(
        tiny_encoder(16), perms, hidden_dim=8, concat_dim=8, curriculum=4, curriculum_steps=10
    )
    images = torch.randint(0, 256, (64, 3, *task.tiler.image_size), dtype=torch.uint8)
    task.train()
    actives, targets = [], []
    for step in range(12):
        assert int(task.steps_taken) == step
        actives.append(task.active_permutations)
        out = task(images, generator=g(step))
        targets.append(out.targets)
        assert int(out.targets.max()) < actives[-1]
        # The loss is a softmax over the prefix: the other permutations get no probability.
        assert torch.isinf(out.logits[:, actives[-1] :]).all()
        assert math.isfinite(float(out.loss.detach()))
    assert actives[0] == 4 and actives[-1] == 100 and actives == sorted(actives)
    assert set(targets[0].tolist()) == {0, 1, 2, 3}
    task.eval()
    assert task.active_permutations == 100
    out = task(images, generator=g(0))
    assert torch.isfinite(out.logits).all() and int(out.targets.max()) >= 50
    assert int(task.steps_taken) == 12  # eval steps do not count
    # The step count is saved, so that a resumed run continues the schedule.
    fresh = JigsawPretext(
        tiny_encoder(16), perms, hidden_dim=8, concat_dim=8, curriculum=4, curriculum_steps=10
    )
    fresh.load_state_dict(task.state_dict())
    assert int(fresh.steps_taken) == 12 and fresh.config["curriculum"] == 4


def test_a_training_step_reads_no_tensor_value_on_the_host(monkeypatch) -> None:
    """No ``int(tensor)``/``.item()`` in the step: on a GPU each would stop the host until the
    device caught up (the curriculum's step count is a Python int, its buffer only mirrors it).
    """
    perms = PermutationSet.generate(100, 9, seed=0)
    task = JigsawPretext(
        tiny_encoder(16), perms, hidden_dim=8, concat_dim=8, curriculum=4, curriculum_steps=10
    ).train()
    images = torch.randint(0, 256, (4, 3, *task.tiler.image_size), dtype=torch.uint8)
    task(images, generator=g(0)).loss.backward()  # warm-up outside the guard

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor's value was read on the host during the step")

    for name in ("item", "tolist", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for step in range(3):
        task(images, generator=g(step)).loss.backward()
    monkeypatch.undo()
    assert task.active_permutations == JigsawPretext.curriculum_size(4, 4, 10, 100)
    assert int(task.steps_taken) == 4  # the buffer mirrors the count


def test_the_curriculum_does_not_recompile_a_compiled_task_every_step() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    task = JigsawPretext(
        tiny_encoder(16),
        PermutationSet.generate(100, 9, seed=0),
        hidden_dim=8,
        concat_dim=8,
        curriculum=4,
        curriculum_steps=10,
    ).train()
    task.compile(backend="eager")  # dynamo's graph capture and guards, no code generation
    images = torch.randint(0, 256, (4, 3, *task.tiler.image_size), dtype=torch.uint8)
    graphs = []
    for step in range(14):  # through the curriculum's growth and past it
        task(images, generator=g(step)).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[-1] == graphs[2], f"graphs captured after each step: {graphs}"


def test_curriculum_validation() -> None:
    with pytest.raises(ValueError, match=r"curriculum \(None: off; .*\) must be a positive int"):
        JigsawPretext(tiny_encoder(16), curriculum=0)
    with pytest.raises(TypeError, match="curriculum .* must be a positive int; got float 1.5"):
        JigsawPretext(tiny_encoder(16), curriculum=1.5)
    with pytest.raises(ValueError, match="curriculum_steps must be an int >= 0; got -1"):
        JigsawPretext(tiny_encoder(16), curriculum_steps=-1)
    with pytest.raises(ValueError, match="unknown head 'pooled'"):
        JigsawPretext(tiny_encoder(16), head="pooled")


# --------------------------------------------------------------------------- heads
def test_assignment_head_scores_each_permutation_as_a_sum() -> None:
    perms = PermutationSet.generate(50, 9, seed=1).permutations
    head = PermutationAssignmentHead(9, 12, perms, hidden_dim=8, concat_dim=16)
    features = torch.randn(5, 9, 12)
    logits = head(features)
    scores = head.scores(features)
    assert logits.shape == (5, 50) and scores.shape == (5, 9, 9)
    for t in range(50):
        reference = sum(scores[:, k, perms[t, k]] for k in range(9))
        torch.testing.assert_close(logits[:, t], reference)
    with pytest.raises(ValueError, match=r"\(B, 9, D\)"):
        head(torch.randn(5, 4, 12))
    with pytest.raises(ValueError, match=r"shape \(K, 9\)"):
        PermutationAssignmentHead(9, 12, perms[:, :4])


def test_head_sizes_follow_the_width_and_not_k() -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def assignment(width: int, k: int) -> int:
        perms = PermutationSet.generate(k, 9, seed=0).permutations
        return count(PermutationAssignmentHead(9, width, perms))

    for width in (64, 512, 2048):
        hidden, concat = sized_from_width(width)
        assert (hidden, concat) == (max(64, width // 4), 2 * max(64, width // 4))
        expected = (width + 1) * hidden + (9 * hidden + 1) * concat + (concat + 1) * 81
        assert assignment(width, 10) == assignment(width, 100) == expected
    # The old concat head grows with K; the default head is smaller for a ResNet18 width.
    old = count(PatchConcatHead(9, 512, 1000, hidden_dim=512, concat_dim=1024))
    assert old > 5_000_000 and assignment(512, 100) < old / 10


def _offset_index(a: int, b: int, cols: int, rows: int) -> int:
    """Class of the offset from source tile ``a`` to source tile ``b`` (zero offset left out)."""
    dy, dx = b // cols - a // cols, b % cols - a % cols
    flat = (dy + rows - 1) * (2 * cols - 1) + (dx + cols - 1)
    return flat - 1 if flat > (rows - 1) * (2 * cols - 1) + cols - 1 else flat


@pytest.mark.parametrize("grid", [(3, 3), (2, 3)])
def test_relation_head_scores_each_permutation_by_the_offsets_of_its_pairs(grid) -> None:
    rows, cols = grid
    n = rows * cols
    perms = PermutationSet.generate(30, n, seed=2).permutations
    head = PermutationRelationHead(n, 12, perms, grid, hidden_dim=8, pair_dim=16)
    features = torch.randn(4, n, 12)
    logits, scores = head(features), head.scores(features)
    assert head.num_offsets == (2 * rows - 1) * (2 * cols - 1) - 1
    assert logits.shape == (4, 30) and scores.shape == (4, n, n, head.num_offsets)
    for t in range(30):
        p = perms[t].tolist()
        reference = sum(
            scores[:, k, m, _offset_index(p[k], p[m], cols, rows)]
            for k in range(n)
            for m in range(n)
            if k != m
        )
        torch.testing.assert_close(logits[:, t], reference)


def test_relation_head_cannot_tell_where_tiles_were_shown() -> None:
    # The score of the true arrangement is the same whichever permutation shuffled the tiles:
    # the head sees what pairs of tiles show, never the places they were shown at. The
    # assignment head scores tile-to-place and does tell them apart.
    torch.manual_seed(0)
    perms = PermutationSet.generate(40, 9, seed=0).permutations
    tiles = torch.randn(1, 9, 12)  # in their true (row-major) order
    shown = torch.stack([tiles[0, perms[t]] for t in range(40)])  # shown[t, k] = tile perms[t, k]
    relation = PermutationRelationHead(9, 12, perms, (3, 3), hidden_dim=8, pair_dim=16)
    true_scores = relation(shown)[torch.arange(40), torch.arange(40)]
    torch.testing.assert_close(true_scores, true_scores[:1].expand(40))
    assignment = PermutationAssignmentHead(9, 12, perms, hidden_dim=8, concat_dim=16)
    assert assignment(shown)[torch.arange(40), torch.arange(40)].std() > 1e-3


def test_relation_head_sums_its_72_scores_in_float32_under_autocast() -> None:
    perms = PermutationSet.generate(30, 9, seed=0).permutations
    head = PermutationRelationHead(9, 12, perms, (3, 3), hidden_dim=8, pair_dim=16)
    features = torch.randn(4, 9, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
        scores = head.scores(features)
    assert scores.dtype == torch.bfloat16 and logits.dtype == torch.float32
    # exactly the float32 sum of the bfloat16 scores
    torch.testing.assert_close(logits, scores.flatten(1).float() @ head.codes.t())


def test_relation_head_validation_and_size() -> None:
    perms = PermutationSet.generate(10, 9, seed=0).permutations
    with pytest.raises(ValueError, match=r"grid 2x4 has 8 cells.*tiler\.grid"):
        PermutationRelationHead(9, 12, perms, (2, 4))
    assert PermutationRelationHead(9, 12, perms, 3).grid == (3, 3)
    with pytest.raises(ValueError, match=r"shape \(K, 9\)"):
        PermutationRelationHead(9, 12, perms[:, :4], (3, 3))
    head = PermutationRelationHead(9, 12, perms, (3, 3))
    with pytest.raises(ValueError, match=r"\(B, 9, D\)"):
        head(torch.randn(2, 4, 12))

    def count(k: int, width: int) -> int:
        set_k = PermutationSet.generate(k, 9, seed=0).permutations
        module = PermutationRelationHead(9, width, set_k, (3, 3))
        return sum(p.numel() for p in module.parameters())

    for width in (64, 512, 2048):
        hidden, pair = sized_from_width(width)
        expected = (width + 1) * hidden + (hidden + 1) * pair + hidden * pair + (pair + 1) * 24
        assert count(10, width) == count(100, width) == expected


def test_jigsaw_builds_every_head() -> None:
    perms = PermutationSet.generate(20, 9, seed=0)
    task = JigsawPretext(tiny_encoder(16), perms)
    assert isinstance(task.head, PermutationRelationHead) and task.config["head"] == "relation"
    concat = JigsawPretext(tiny_encoder(16), perms, head="concat", hidden_dim=8, concat_dim=8)
    assert isinstance(concat.head, PatchConcatHead)
    assignment = JigsawPretext(tiny_encoder(16), perms, head="assignment")
    assert isinstance(assignment.head, PermutationAssignmentHead)
    images = torch.randint(0, 256, (4, 3, *task.tiler.image_size), dtype=torch.uint8)
    for t in (task.eval(), concat.eval(), assignment.eval()):
        assert t(images, generator=g(0)).logits.shape == (4, 20)


# --------------------------------------------------------------------------- learning
def disc_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A bright disc of random radius and colour near the centre, on a noisy background.

    The arc each tile shows tells where the tile sits, and turning or mirroring the image
    keeps that true: a puzzle the task must learn, whatever the image-level defences do.
    """
    r = torch.rand(5, batch, 1, 1, generator=generator)
    coords = torch.arange(size) + 0.5
    cy = size / 2 + (r[0] - 0.5) * size * 0.1
    cx = size / 2 + (r[1] - 0.5) * size * 0.1
    radius = size * (0.3 + 0.15 * r[2])
    dist = ((coords[None, :, None] - cy) ** 2 + (coords[None, None, :] - cx) ** 2).sqrt()
    disc = (dist < radius).float()
    noise = torch.rand(batch, size, size, generator=generator) * 0.2
    image = 0.2 + (0.4 + 0.4 * r[3]) * disc + noise
    colour = torch.stack([torch.ones_like(r[4]), 0.5 + 0.5 * r[4], 1 - 0.5 * r[4]], dim=1)
    return (image[:, None] * colour[..., 0, 0, None, None] * 255).clamp(0, 255).byte()


def test_jigsaw_defaults_learn_a_tiny_structured_puzzle() -> None:
    torch.manual_seed(0)
    tiler = PatchTiler(grid=3, patch_size=8, image_size=30, gap=2)
    perms = PermutationSet.generate(100, 9, seed=0)
    # The library's defaults otherwise: assignment head, curriculum, turns and flips,
    # per-tile normalisation, random grayscale.
    task = JigsawPretext(tiny_encoder(8), perms, tiler, curriculum=8, curriculum_steps=30)
    held_out = disc_images(256, 30, g(99))
    before = task.eval().accuracy(held_out, generator=g(1))
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    generator = g(0)
    task.train()
    for _ in range(60):
        loss = task(disc_images(32, 30, generator), generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = task.eval().accuracy(held_out, generator=g(1))
    chance = 1 / 100
    assert before < 3 * chance
    assert after > 5 * chance, f"held-out accuracy {after:.3f} after 60 steps (chance 0.01)"
