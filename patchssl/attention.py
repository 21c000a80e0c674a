"""Per-patch attention: the paper's sigmoid gate and Ilse et al.'s attention pooling.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." Journal of Information Processing Systems 17(3), 2021.

    Ilse, Tomczak, Welling. "Attention-based Deep Multiple Instance Learning." ICML 2018,
    arXiv:1802.04712.

    Grandvalet, Bengio. "Semi-supervised Learning by Entropy Minimization." NeurIPS 2004
    (Advances in Neural Information Processing Systems 17, 2005).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from patchssl._validation import check_int, look_up

__all__ = ["ATTENTION_MODES", "PatchAttention", "weight_entropy"]

#: The weighting rules :class:`PatchAttention` offers.
ATTENTION_MODES: tuple[str, ...] = ("sigmoid", "softmax", "gated")


def _check_temperature(value: object, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else a ``ValueError`` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a finite number > 0 (1 = the plain sigmoid/softmax, < 1 sharper "
            f"weights); got {value!r}"
        )
    return float(value)


def _check_entropy_weight(value: object, name: str) -> float:
    """``value`` as a float if it is a finite number >= 0, else a ``ValueError`` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{name} must be a finite number >= 0 (0 = no entropy penalty, e.g. 0.1 pushes the "
            f"attention towards fewer patches); got {value!r}"
        )
    return float(value)


def weight_entropy(weights: Tensor) -> Tensor:
    r"""Normalised entropy of each image's patch weights, in [0, 1].

    The weights are clipped at 0 and divided by their sum, ``p_n = a_n / sum_m a_m`` (sigmoid
    weights do not sum to 1), and

        H = -sum_n p_n log p_n / log N,

    with ``0 log 0 = 0``: 1 when all ``N`` weights are equal, 0 when one patch holds all the
    weight. An image whose weights are all 0 counts as uniform (``H = 1``); with ``N = 1``
    ``H = 0``. Differentiable (the entropy penalty of :class:`PatchAttention` minimises it);
    :func:`patchssl.explain.lesion_hit_rate` reports its mean as ``weight_entropy``.

    Args:
        weights: ``(B, N)`` attention weights (any non-negative values).

    Returns:
        ``(B,)`` normalised entropies, in the dtype of ``weights``.

    Example:
        >>> weight_entropy(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
        tensor([1., 0.])
    """
    if weights.ndim != 2:
        raise ValueError(f"expected weights of shape (B, N); got {tuple(weights.shape)}")
    n = weights.shape[1]
    if n <= 1:
        return weights.new_zeros(weights.shape[0])
    a = weights.clamp_min(0)
    total = a.sum(dim=1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    p = torch.where(total > 0, a / total.clamp_min(tiny), torch.full_like(a, 1.0 / n))
    # p * log(p) with 0 log 0 = 0 and a finite gradient at p = 0.
    entropy = -(p * p.clamp_min(tiny).log()).sum(dim=1)
    return entropy / math.log(n)


class PatchAttention(nn.Module):
    r"""One weight per patch, and the features reweighted by it.

    For the features ``h_n`` (n = 1..N) of one image's patches, each mode computes a weight
    ``a_n`` and returns ``h_n' = a_n * h_n`` together with the weights:

    * ``"sigmoid"`` (the paper's gate, Chae et al. 2021): each weight is independent,

          a_n = sigmoid(w^T h_n + b + c_n),   0 < a_n < 1,

      where ``h_n`` is the patch's globally average pooled feature (the encoder's output),
      ``w`` and ``b`` are shared by all patches and ``c_n`` is a learned bias per grid position
      (a spatial prior: the centre patches of a cervix image hold the transformation zone more
      often). ``c`` starts at zero.
    * ``"softmax"`` (attention pooling, Ilse et al. 2018, eq. 8): the weights compete,

          a_n = exp(w^T tanh(V h_n)) / sum_m exp(w^T tanh(V h_m)),   sum_n a_n = 1.

    * ``"gated"`` (gated attention pooling, Ilse et al. 2018, eq. 9):

          a_n = softmax_n(w^T (tanh(V h_n) ⊙ sigmoid(U h_n))),

      with ``V, U`` of shape ``(hidden_dim, dim)`` and ``w`` of shape ``(hidden_dim,)``.

    Summing the reweighted features over ``n`` (the classifier's ``head="pooled"``) gives Ilse's
    bag embedding ``z = sum_n a_n h_n``. The per-position bias ``c_n`` is on by default for
    ``"sigmoid"`` only (``position_bias``); the softmax modes are permutation invariant without
    it, as in multiple-instance learning.

    ``temperature`` ``T`` divides the scores before the sigmoid or softmax (``a_n =
    sigmoid(s_n / T)``, ``a_n = softmax_n(s_n / T)``; the softmax temperature of Hinton,
    Vinyals & Dean 2015, arXiv:1503.02531). ``T < 1`` sharpens the weights (a softmax
    concentrates on the top-scoring patches, a sigmoid moves towards a 0/1 gate), ``T > 1``
    flattens them; ``T = 1`` (the default) is the paper's and Ilse's rule. It changes which
    patches win only through training (the order of the weights of one image is the order of
    its scores for any ``T``).

    ``entropy_weight`` ``lambda >= 0`` adds an entropy penalty for training (entropy
    minimisation, Grandvalet & Bengio 2005): every forward in training mode stores

        aux_loss = lambda * mean_b H(a_b),

    ``H`` the normalised entropy of :func:`weight_entropy` (the weights divided by their sum),
    in :attr:`aux_loss`, which the training loop adds to the loss. Minimising it pushes the
    weight onto fewer patches. :attr:`aux_loss` is ``None`` with ``lambda = 0`` (the default)
    and in evaluation mode. Being computed inside ``forward``, it works unchanged under
    ``DistributedDataParallel`` and ``torch.compile``.

    Args:
        dim: feature width ``D``.
        num_patches: patches per image ``N`` (the grid's cells); checked at every forward.
        mode: ``"sigmoid"``, ``"softmax"`` or ``"gated"``.
        hidden_dim: width of ``V`` (and ``U``) in the softmax modes; unused by ``"sigmoid"``.
        position_bias: learn ``c_n``; default ``True`` for ``"sigmoid"``, ``False`` otherwise.
        temperature: ``T > 0`` dividing the scores (1 = no change).
        entropy_weight: ``lambda >= 0`` of the entropy penalty (0 = off).

    Attributes:
        aux_loss: The penalty ``lambda * mean_b H(a_b)`` (a scalar tensor) of the last forward
            in training mode; ``None`` when ``entropy_weight`` is 0 or after a forward in
            evaluation mode.

    Shape:
        - Input: ``(B, N, D)``.
        - Output: reweighted features ``(B, N, D)`` and weights ``(B, N)``.

    References:
        Chae et al., "Attentive Transfer Learning via Self-supervised Learning for Cervical
        Dysplasia Diagnosis", JIPS 2021. Ilse, Tomczak & Welling, "Attention-based Deep
        Multiple Instance Learning", ICML 2018. Hinton, Vinyals & Dean, "Distilling the
        Knowledge in a Neural Network", arXiv:1503.02531, 2015 (the temperature). Grandvalet
        & Bengio, "Semi-supervised Learning by Entropy Minimization", NeurIPS 2004 (published
        2005; the entropy penalty).

    Example:
        >>> att = PatchAttention(512, 9, mode="softmax")
        >>> feats, weights = att(torch.randn(2, 9, 512))
        >>> feats.shape, weights.shape
        (torch.Size([2, 9, 512]), torch.Size([2, 9]))
    """

    def __init__(
        self,
        dim: int,
        num_patches: int,
        mode: str = "sigmoid",
        hidden_dim: int = 128,
        *,
        position_bias: bool | None = None,
        temperature: float = 1.0,
        entropy_weight: float = 0.0,
    ) -> None:
        super().__init__()
        for what, value in (("dim", dim), ("num_patches", num_patches), ("hidden_dim", hidden_dim)):
            check_int(value, what)
        look_up(mode, ATTENTION_MODES, "attention mode")
        _check_temperature(temperature, "temperature")
        self.dim = dim
        self.num_patches = num_patches
        self.mode = mode
        self.hidden_dim = hidden_dim
        self.temperature = float(temperature)
        self.entropy_weight = _check_entropy_weight(entropy_weight, "entropy_weight")
        self.aux_loss: Tensor | None = None
        self.position_bias = mode == "sigmoid" if position_bias is None else bool(position_bias)
        if mode == "sigmoid":
            self.score = nn.Linear(dim, 1)
        else:
            self.V = nn.Linear(dim, hidden_dim)
            self.U = nn.Linear(dim, hidden_dim) if mode == "gated" else None
            self.score = nn.Linear(hidden_dim, 1, bias=False)
        if self.position_bias:
            self.pos_bias = nn.Parameter(torch.zeros(num_patches))
        else:
            self.register_parameter("pos_bias", None)

    def logits(self, features: Tensor) -> Tensor:
        """Unnormalised scores before the sigmoid or softmax (and before ``temperature``).

        Args:
            features: ``(B, N, D)``.

        Returns:
            Scores of shape ``(B, N)``.
        """
        if features.ndim != 3 or features.shape[2] != self.dim:
            raise ValueError(
                f"expected features of shape (B, N, {self.dim}); got {tuple(features.shape)}"
            )
        if features.shape[1] != self.num_patches:
            raise ValueError(
                f"PatchAttention was built for num_patches={self.num_patches} but got "
                f"{features.shape[1]} patches per image; build it with "
                f"num_patches={features.shape[1]} (the tiler's grid rows * cols)"
            )
        if self.mode == "sigmoid":
            scores = self.score(features)
        else:
            hidden = torch.tanh(self.V(features))
            if self.U is not None:
                hidden = hidden * torch.sigmoid(self.U(features))
            scores = self.score(hidden)
        scores = scores.squeeze(-1)
        if self.pos_bias is not None:
            scores = scores + self.pos_bias
        return scores

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Weight every patch.

        Args:
            features: ``(B, N, D)`` per-patch features.

        Returns:
            ``(reweighted, weights)``: ``(B, N, D)`` features ``a_n * h_n`` and ``(B, N)``
            weights (in (0, 1) for ``"sigmoid"``; summing to 1 over N for the softmax modes).
            In training mode with ``entropy_weight > 0`` it also sets :attr:`aux_loss`.
        """
        scores = self.logits(features)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        weights = torch.sigmoid(scores) if self.mode == "sigmoid" else scores.softmax(dim=1)
        if self.training and self.entropy_weight > 0:
            self.aux_loss = self.entropy_weight * weight_entropy(weights.float()).mean()
        else:
            self.aux_loss = None
        return features * weights.unsqueeze(-1), weights

    @property
    def config(self) -> dict[str, object]:
        """JSON-able arguments that rebuild this block (``PatchAttention(**config)``)."""
        return {
            "dim": self.dim,
            "num_patches": self.num_patches,
            "mode": self.mode,
            "hidden_dim": self.hidden_dim,
            "position_bias": self.position_bias,
            "temperature": self.temperature,
            "entropy_weight": self.entropy_weight,
        }

    def extra_repr(self) -> str:
        """Mode, width, patch count and whether the position bias is learned."""
        return (
            f"mode={self.mode!r}, dim={self.dim}, num_patches={self.num_patches}, "
            f"position_bias={self.position_bias}, temperature={self.temperature}, "
            f"entropy_weight={self.entropy_weight}"
        )
