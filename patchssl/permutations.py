"""Sets of tile permutations for jigsaw puzzles, chosen for large pairwise Hamming distance.

A jigsaw pretext task shuffles the N tiles of an image by one of K fixed permutations and asks
the network which one was used, a K-way classification. The permutations should be far apart
(in Hamming distance: the number of positions at which two permutations place different
tiles) so that the classes are easy to tell apart and the task cannot be solved by looking at
a few tiles only; Noroozi & Favaro (2016) found that a larger minimum distance transfers better.

Convention: a permutation is a row of 0-based tile indices and ``perm[k]`` is the index of the
source tile placed at position ``k``; tiles are numbered row-major. Applied to patches of shape
``(B, N, C, h, w)``: ``shuffled[:, k] = patches[:, perm[k]]``.

Methods of :meth:`PermutationSet.generate`:

- ``"max_min"``: greedy selection maximising the minimum distance to the chosen set (ties broken
  by the average), over all N! permutations when N <= 9, otherwise over sampled candidates.
- ``"projective"``: for 9 tiles, a permutation code from the group PΓL(2, 8) acting on the
  projective line over GF(8): every pair of its 1,512 permutations is at distance >= 6 (>= 7
  within the 504 elements of PGL(2, 8)).
- ``"auto"``: ``"projective"`` when it applies (N == 9 and K <= 1512), else ``"max_min"``.

Noroozi & Favaro's own greedy (each new permutation maximising the *average* distance; minimum
distance 2 for 1000 x 9) is a research generator, kept with the benchmarks that compare the
methods (``benchmarks/permutation_generators.py`` in the source tree).

References:
    M. Noroozi and P. Favaro, "Unsupervised Learning of Visual Representations by Solving
    Jigsaw Puzzles", ECCV 2016, arXiv:1603.09246.

    P. J. Cameron, "Permutation codes", European Journal of Combinatorics 31(2), 2010
    (sharply k-transitive groups as permutation codes; PGL(2, q) and PΓL(2, q)).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchssl._validation import atomic_write, check_int, look_up

__all__ = ["METHODS", "PermutationSet", "fingerprint_of"]

#: Names accepted by ``PermutationSet.generate(method=...)``.
METHODS: tuple[str, ...] = ("auto", "max_min", "projective")

#: Research generators kept outside the library, and where they are.
_MOVED = {
    "max_avg": (
        "Noroozi & Favaro's max-average greedy is a research generator: it lives in "
        "benchmarks/permutation_generators.py of the patchssl source tree (generate_max_avg); "
        "'max_min' and 'projective' reach larger minimum distances."
    ),
}

#: ``max_min`` enumerates every permutation when there are at most this many (N <= 9).
_EXHAUSTIVE_LIMIT = math.factorial(9)
#: Number of sampled candidates ``max_min`` uses by default when N! is above that limit.
_DEFAULT_NUM_CANDIDATES = 100_000

_DEFAULT_ASSET = "permutations_1000x9.txt"
_DEFAULT_CHECKSUM = "permutations_1000x9.sha256"
_HEADER_TAG = "patchssl-permutations"
_FORMAT_VERSION = 1

PathLike = str | os.PathLike


class PermutationSet:
    """An ordered set of K distinct permutations of N tiles, validated and hashable by content.

    Build one from rows (:class:`torch.Tensor`, :class:`numpy.ndarray` or nested lists), with
    :meth:`generate`, :meth:`default` or :meth:`load`. The set is immutable: ``permutations``
    and indexing return copies.

    Args:
        permutations: Integer rows of shape (K, N); every row a permutation of ``0..N-1``
            (0-based; ``perm[k]`` is the source tile placed at position ``k``), no row repeated,
            K >= 1, N >= 2. Floats are accepted when every value is a whole number.
        method: Optional note of how the set was made (reported by :meth:`describe`).
        seed: Optional note of the seed it was made with (reported by :meth:`describe`).

    Raises:
        TypeError: If ``permutations`` is not array-like or does not hold numbers.
        ValueError: If the shape is wrong, a row is not a 0-based permutation (a set that looks
            1-based is named as such: subtract 1), or rows repeat (their indices are named).

    Example:
        >>> ps = PermutationSet([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
        >>> len(ps), ps.num_tiles, ps.min_hamming()
        (3, 3, 3)
        >>> patches = torch.randn(2, 3, 1, 4, 4)  # (B, N, C, h, w)
        >>> shuffled = patches[:, ps[1]]  # shuffled[:, k] = patches[:, perm[k]]

    References:
        M. Noroozi and P. Favaro, "Unsupervised Learning of Visual Representations by Solving
        Jigsaw Puzzles", ECCV 2016, arXiv:1603.09246.
    """

    def __init__(
        self,
        permutations: Tensor | np.ndarray | Sequence[Sequence[int]],
        *,
        method: str | None = None,
        seed: int | None = None,
    ) -> None:
        array = _validate(_to_int64_array(permutations))
        array.flags.writeable = False
        self._array = array
        self._method = method
        self._seed = seed
        self._fingerprint: str | None = None
        self._min_hamming: int | None = None

    # ------------------------------------------------------------------ basic access

    @property
    def permutations(self) -> Tensor:
        """The rows as a new int64 CPU tensor of shape (K, N)."""
        return torch.from_numpy(self._array.copy())

    @property
    def num_permutations(self) -> int:
        """K, the number of permutations (the number of jigsaw classes)."""
        return int(self._array.shape[0])

    @property
    def num_tiles(self) -> int:
        """N, the number of tiles each permutation reorders."""
        return int(self._array.shape[1])

    @property
    def method(self) -> str | None:
        """How the set was made (``"max_avg"``, ``"projective"``, ...) when known."""
        return self._method

    @property
    def seed(self) -> int | None:
        """The seed the set was generated with, when known."""
        return self._seed

    def numpy(self) -> np.ndarray:
        """The rows as a new int64 NumPy array of shape (K, N)."""
        return self._array.copy()

    def to(self, device: torch.device | str | None = None) -> Tensor:
        """The rows as an int64 tensor of shape (K, N) on ``device`` (a new tensor).

        Args:
            device: Target device; ``None`` means CPU.

        Returns:
            Tensor of shape (K, N), dtype int64.
        """
        return self.permutations.to(device if device is not None else "cpu")

    def __len__(self) -> int:
        return self.num_permutations

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray | Tensor) -> Tensor:
        """Rows by index, as a new int64 CPU tensor.

        Args:
            index: An int (gives shape (N,)), a slice, a sequence, an integer/boolean array
                or tensor of indices (gives shape (M, N)).

        Returns:
            Tensor of shape (N,) for an int index, else (M, N).
        """
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        return torch.from_numpy(np.array(self._array[index], dtype=np.int64))

    def __iter__(self) -> Iterator[Tensor]:
        for row in self._array:
            yield torch.from_numpy(row.copy())

    def __eq__(self, other: object) -> bool:
        """Equal when both hold the same rows in the same order (metadata is ignored)."""
        if not isinstance(other, PermutationSet):
            return NotImplemented
        return self._array.shape == other._array.shape and bool(
            np.array_equal(self._array, other._array)
        )

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        extra = ""
        if self._method is not None:
            extra += f", method={self._method!r}"
        if self._seed is not None:
            extra += f", seed={self._seed}"
        return (
            f"PermutationSet(num_permutations={self.num_permutations}, "
            f"num_tiles={self.num_tiles}, fingerprint={self.fingerprint!r}{extra})"
        )

    # ------------------------------------------------------------------ statistics

    @property
    def fingerprint(self) -> str:
        """A stable content hash: 16 hex characters.

        The first 16 hex digits of the SHA-256 of the shape ``(K, N)`` as two little-endian
        int64 values followed by the rows as little-endian int64 in row-major order. It depends
        on the rows and their order only (not on ``method`` or ``seed``), is the same on every
        platform, and is what checkpoints store to catch a mismatched set.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self._array)
        return self._fingerprint

    def min_hamming(self) -> int:
        """The smallest Hamming distance between two distinct rows.

        Computed exactly over all K(K-1)/2 pairs, as a blocked product of one-hot encodings
        (a fraction of a second for K = 2000, N = 9).

        Returns:
            The minimum number of positions at which two rows differ (2..N).

        Raises:
            ValueError: If the set has a single permutation (there is no pair).
        """
        if self.num_permutations < 2:
            raise ValueError("min_hamming() needs at least 2 permutations; this set has 1")
        if self._min_hamming is None:
            self._min_hamming = self.num_tiles - _max_pairwise_agreement(self._array)
        return self._min_hamming

    def mean_hamming(self) -> float:
        """The mean Hamming distance over all K(K-1)/2 pairs of distinct rows.

        Exact, in O(K N) time: the sum over all ordered pairs of positions that agree is
        ``sum_{k, t} c[k, t]^2 - K N``, where ``c[k, t]`` counts the rows that place tile ``t``
        at position ``k``.

        Returns:
            The mean pairwise distance (a random set has about N - 1).

        Raises:
            ValueError: If the set has a single permutation (there is no pair).
        """
        k, n = self._array.shape
        if k < 2:
            raise ValueError("mean_hamming() needs at least 2 permutations; this set has 1")
        counts = _count_matrix(self._array)
        agree_ordered = int((counts.astype(np.int64) ** 2).sum()) - k * n
        return (k * (k - 1) * n - agree_ordered) / (k * (k - 1))

    def describe(self) -> dict[str, Any]:
        """Statistics of the set as a JSON-able dict.

        Returns:
            Dict with keys ``num_permutations`` (K), ``num_tiles`` (N), ``min_hamming``,
            ``mean_hamming`` (``None`` for K = 1), ``fingerprint``, ``method`` and ``seed``
            (``None`` when unknown).
        """
        several = self.num_permutations >= 2
        return {
            "num_permutations": self.num_permutations,
            "num_tiles": self.num_tiles,
            "min_hamming": self.min_hamming() if several else None,
            "mean_hamming": self.mean_hamming() if several else None,
            "fingerprint": self.fingerprint,
            "method": self._method,
            "seed": self._seed,
        }

    # ------------------------------------------------------------------ files

    def save(self, path: PathLike) -> None:
        """Write the set to ``path``, atomically (a temporary file then a rename).

        The format follows the suffix: ``.npy`` writes a NumPy int64 array of shape (K, N);
        ``.csv`` writes comma-separated rows; anything else (``.txt`` recommended) writes
        space-separated rows. Text files start with a ``#`` header line that records K, N,
        the fingerprint, the method and the seed; :meth:`load` checks it, which catches a
        truncated or edited file.

        Args:
            path: Destination file (its folder is created if needed).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array = self._array.astype("<i8")
            atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))
        else:
            atomic_write(path, self._to_text(sep="," if suffix == ".csv" else " "))

    def _to_text(self, sep: str = " ") -> str:
        header = {
            "K": self.num_permutations,
            "N": self.num_tiles,
            "fingerprint": self.fingerprint,
            "method": self._method,
            "seed": self._seed,
        }
        lines = [f"# {_HEADER_TAG} v{_FORMAT_VERSION} {json.dumps(header, sort_keys=True)}"]
        lines.extend(sep.join(str(int(v)) for v in row) for row in self._array)
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: PathLike) -> PermutationSet:
        """Read a set written by :meth:`save`, or any file of permutation rows.

        ``.npy`` files must hold one integer array of shape (K, N). Other files are read as
        text: one permutation per line, values separated by whitespace and/or commas, blank
        lines and ``#`` comments ignored. A ``patchssl-permutations`` header, when present, is
        checked against the rows (count and fingerprint).

        Args:
            path: The file to read.

        Returns:
            The validated set.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file cannot be parsed, is truncated, or its rows are not a valid
                set (1-based, repeated rows, ...); the message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"permutation file not found: {path}")
        data = path.read_bytes()
        return cls._from_bytes(data, name=str(path), npy=path.suffix.lower() == ".npy")

    @classmethod
    def _from_bytes(cls, data: bytes, *, name: str, npy: bool) -> PermutationSet:
        header: dict[str, Any] = {}
        if npy or data[:6] == b"\x93NUMPY":
            array = _parse_npy(data, name)
        else:
            array, header = _parse_text(data, name)
        try:
            ps = cls(array, method=header.get("method"), seed=header.get("seed"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from None
        if header:
            expected = header.get("K")
            if expected is not None and expected != ps.num_permutations:
                raise ValueError(
                    f"{name}: the header says {expected} permutations but the file holds "
                    f"{ps.num_permutations}; the file is truncated or was edited"
                )
            fp = header.get("fingerprint")
            if fp is not None and fp != ps.fingerprint:
                raise ValueError(
                    f"{name}: the header fingerprint is {fp} but the rows hash to "
                    f"{ps.fingerprint}; the file was modified after it was written"
                )
        return ps

    @classmethod
    def default(cls) -> PermutationSet:
        """The shipped 1000 x 9 set (the library's jigsaw default).

        Made by ``PermutationSet.generate(1000, 9, method="auto", seed=0)`` (the projective
        code: minimum pairwise distance 6, mean above 8), stored in
        ``patchssl/assets/permutations_1000x9.txt`` and verified against the SHA-256 in
        ``permutations_1000x9.sha256`` each time it is read.

        Returns:
            The set, with ``permutations`` of shape (1000, 9).

        Raises:
            RuntimeError: If the packaged file does not match its checksum.
        """
        return _load_default()

    # ------------------------------------------------------------------ generation

    @classmethod
    def generate(
        cls,
        num_permutations: int = 1000,
        num_tiles: int = 9,
        *,
        method: str = "auto",
        seed: int = 0,
        num_candidates: int | None = None,
    ) -> PermutationSet:
        """Choose ``num_permutations`` permutations of ``num_tiles`` tiles far apart.

        Every method is seeded and repeats exactly for the same arguments. The first
        permutation is a seeded random one; ties between equally good candidates are broken
        at random with the same seed, so different seeds give different sets.

        Methods (1000 x 9 figures are on the docs page ``permutations.md``; Noroozi & Favaro's
        max-average greedy, whose minimum distance is only 2 for 1000 x 9, is a research
        generator kept with the benchmarks of the source tree,
        ``benchmarks/permutation_generators.py``):

        - ``"max_min"``: greedy maximisation of the minimum distance to the chosen set (ties
          by the larger average). Scans every permutation when N! <= 362,880 (N <= 9), else
          ``num_candidates`` distinct seeded random permutations (default 100,000).
        - ``"projective"``: N = 9 only, K <= 1512. The 1,512 permutations of the projective
          line over GF(8) induced by PΓL(2, 8) (z -> (az + b) / (cz + d) composed with the
          Frobenius z -> z^2), pairwise distance >= 6; for K <= 504 only its subgroup
          PGL(2, 8) is used (pairwise distance >= 7). K of them are chosen by the max-average
          greedy within the group, and every row is relabelled as ``alpha[row[beta]]`` by two
          seeded random permutations ``alpha`` and ``beta`` (this keeps every distance).
        - ``"auto"``: ``"projective"`` when N = 9 and K <= 1512, else ``"max_min"``.

        Args:
            num_permutations: K >= 1, at most N!.
            num_tiles: N >= 2 (9 for a 3x3 grid, 16 for 4x4).
            method: One of ``"auto"``, ``"max_min"``, ``"projective"``.
            seed: Seed (>= 0) of every random choice.
            num_candidates: ``max_min`` only: how many candidate permutations to scan. ``None``
                scans all N! when N <= 9, else samples 100,000. A value >= N! scans all.

        Returns:
            A set with ``permutations`` of shape (K, N), ``method`` set to the method used
            (``"auto"`` resolved) and ``seed`` to ``seed``.

        Raises:
            ValueError: For an unknown method (with a suggestion), K > N!, a method that does
                not apply to these sizes, or too few candidates.
            TypeError: If a count or the seed is not an int.

        References:
            M. Noroozi and P. Favaro, ECCV 2016, arXiv:1603.09246 (maximal-Hamming selection;
            a larger minimum distance transfers better). P. J. Cameron, "Permutation codes",
            2010 (projective).
        """
        k = check_int(num_permutations, "num_permutations")
        n = check_int(num_tiles, "num_tiles", minimum=2)
        seed = check_int(seed, "seed", minimum=0)
        if num_candidates is not None:
            num_candidates = check_int(num_candidates, "num_candidates")
        look_up(method, METHODS, "permutation method", note=_MOVED.get(method, ""))
        if k > math.factorial(n):
            raise ValueError(
                f"cannot choose {k} distinct permutations of {n} tiles: there are only "
                f"{n}! = {math.factorial(n)}"
            )
        resolved = method
        if method == "auto":
            resolved = "projective" if n == 9 and k <= _PGAMMAL_ORDER else "max_min"
        if resolved != "max_min" and num_candidates is not None and method != "auto":
            raise ValueError(
                f"num_candidates applies to method 'max_min' only; method {method!r} "
                f"does not sample candidates (drop the argument)"
            )
        rng = np.random.default_rng(seed)
        if resolved == "max_min":
            rows = _generate_max_min(k, n, rng, num_candidates)
        else:
            rows = _generate_projective(k, n, rng)
        return cls(rows, method=resolved, seed=seed)


# ---------------------------------------------------------------------- validation


def fingerprint_of(permutations: Tensor | np.ndarray | Sequence[Sequence[int]]) -> str:
    """The 16-hex-digit content hash used by :attr:`PermutationSet.fingerprint`.

    Args:
        permutations: Integer array of shape (K, N) (not validated).

    Returns:
        ``sha256(int64_le(K, N) + int64_le(rows, row-major)).hexdigest()[:16]``.
    """
    array = _to_int64_array(permutations)
    if array.ndim != 2:
        raise ValueError(f"expected an array of shape (K, N); got shape {tuple(array.shape)}")
    digest = hashlib.sha256()
    digest.update(np.asarray(array.shape, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


def _to_int64_array(permutations: object) -> np.ndarray:
    if isinstance(permutations, PermutationSet):
        return permutations.numpy()
    if isinstance(permutations, Tensor):
        array = permutations.detach().cpu().numpy()
    elif isinstance(permutations, np.ndarray):
        array = permutations
    elif isinstance(permutations, str | bytes) or not isinstance(permutations, Sequence):
        raise TypeError(
            "permutations must be a (K, N) tensor, NumPy array or list of rows; "
            f"got {type(permutations).__name__}"
        )
    else:
        try:
            array = np.asarray(permutations)
        except ValueError as err:
            raise ValueError(f"permutations must be rows of equal length: {err}") from None
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"permutations must hold integers; got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        return np.array(array, dtype=np.int64)
    if np.issubdtype(array.dtype, np.complexfloating) or not np.all(np.isfinite(array)):
        raise ValueError("permutations must hold finite whole numbers")
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        bad = array[rounded != array].flat[0]
        raise ValueError(f"permutations must hold whole numbers; found {bad!r}")
    return rounded.astype(np.int64)


def _validate(array: np.ndarray) -> np.ndarray:
    if array.ndim != 2:
        raise ValueError(
            f"permutations must have shape (K, N): K rows of N tile indices; "
            f"got shape {tuple(array.shape)}"
        )
    k, n = array.shape
    if k < 1:
        raise ValueError("permutations must hold at least one row (K >= 1); got 0 rows")
    if n < 2:
        raise ValueError(f"permutations must reorder at least 2 tiles (N >= 2); got N = {n}")
    ordered = np.sort(array, axis=1)
    ok = (ordered == np.arange(n)).all(axis=1)
    if not ok.all():
        if (ordered == np.arange(1, n + 1)).all():
            raise ValueError(
                f"permutations look 1-based: every row holds the values 1..{n}. patchssl uses "
                f"0-based tile indices (0..{n - 1}); subtract 1 from every value (e.g. "
                f"PermutationSet(rows - 1)); nothing is shifted silently"
            )
        bad = int(np.flatnonzero(~ok)[0])
        row = array[bad]
        missing = sorted(set(range(n)) - set(row.tolist()))
        values, counts = np.unique(row, return_counts=True)
        repeated = values[counts > 1].tolist()
        outside = sorted({int(v) for v in row if v < 0 or v >= n})
        details = []
        if outside:
            details.append(f"values outside 0..{n - 1}: {outside}")
        if repeated:
            details.append(f"repeated values: {repeated}")
        if missing:
            details.append(f"missing values: {missing}")
        raise ValueError(
            f"row {bad} is not a permutation of 0..{n - 1}: {row.tolist()} "
            f"({'; '.join(details)}); {int((~ok).sum())} of {k} rows are invalid"
        )
    _, first, inverse, counts = np.unique(
        array, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    if len(first) != k:
        inverse = inverse.reshape(-1)
        groups = [np.flatnonzero(inverse == g).tolist() for g in np.flatnonzero(counts > 1)]
        groups.sort()
        shown = "; ".join(f"rows {g} are {array[g[0]].tolist()}" for g in groups[:5])
        more = f" (and {len(groups) - 5} more groups)" if len(groups) > 5 else ""
        raise ValueError(
            f"permutations must be distinct; {k - len(first)} rows repeat an earlier row: "
            f"{shown}{more}"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


# ---------------------------------------------------------------------- statistics


def _count_matrix(rows: np.ndarray) -> np.ndarray:
    """c[k, t] = number of rows that place tile t at position k; shape (N, N), int64."""
    _, n = rows.shape
    flat = (np.arange(n) * n + rows).reshape(-1)
    return np.bincount(flat, minlength=n * n).reshape(n, n)


def _max_pairwise_agreement(rows: np.ndarray) -> int:
    """Largest number of equal positions between two distinct rows of ``rows`` (K, N)."""
    k, n = rows.shape
    block = max(1, min(1024, (1 << 24) // k))  # agreement blocks of at most 64 MB
    best = 0
    if n * n <= 4096:
        # Agreements as a matrix product of one-hot encodings: (K, N*N) @ (N*N, K).
        onehot = np.zeros((k, n * n), dtype=np.float32)
        onehot[np.repeat(np.arange(k), n), (np.arange(n) * n + rows).reshape(-1)] = 1.0
        for start in range(0, k, block):
            agree = onehot[start : start + block] @ onehot.T
            idx = np.arange(start, min(start + block, k))
            agree[idx - start, idx] = -1.0
            best = max(best, int(agree.max()))
    else:
        step = max(1, (1 << 24) // max(1, k * n))
        for start in range(0, k, step):
            chunk = rows[start : start + step]
            agree = (chunk[:, None, :] == rows[None, :, :]).sum(axis=2)
            idx = np.arange(start, start + len(chunk))
            agree[idx - start, idx] = -1
            best = max(best, int(agree.max()))
    return best


# ---------------------------------------------------------------------- max_min


@lru_cache(maxsize=4)
def _all_permutations(n: int) -> np.ndarray:
    """Every permutation of 0..n-1, shape (n!, n), uint8, read-only (built by insertion)."""
    perms = np.zeros((1, 0), dtype=np.uint8)
    for m in range(n):
        rows = perms.shape[0]
        out = np.empty((rows * (m + 1), m + 1), dtype=np.uint8)
        for pos in range(m + 1):
            block = out[pos * rows : (pos + 1) * rows]
            block[:, :pos] = perms[:, :pos]
            block[:, pos] = m
            block[:, pos + 1 :] = perms[:, pos:]
        perms = out
    perms.flags.writeable = False
    return perms


def _candidates(n: int, rng: np.random.Generator, num_candidates: int | None, k: int) -> np.ndarray:
    """Distinct candidate permutations in a seeded random order; shape (M, n)."""
    total = math.factorial(n)
    if num_candidates is None:
        num_candidates = total if total <= _EXHAUSTIVE_LIMIT else _DEFAULT_NUM_CANDIDATES
    if num_candidates >= total:
        if total > 50 * _EXHAUSTIVE_LIMIT:
            raise ValueError(
                f"num_candidates={num_candidates} asks for all {n}! = {total} permutations, "
                f"too many to enumerate; pass a smaller num_candidates"
            )
        cands = _all_permutations(n)
    else:
        if num_candidates < k:
            raise ValueError(
                f"num_candidates must be >= num_permutations; got {num_candidates} < {k}"
            )
        keys = rng.random((num_candidates, n))
        cands = np.argsort(keys, axis=1, kind="stable")
        cands = np.unique(cands, axis=0)  # sorted, distinct; reshuffled below
        if len(cands) < k:
            raise ValueError(
                f"only {len(cands)} distinct candidates for {k} permutations; raise num_candidates"
            )
    dtype = np.uint8 if n <= 255 else np.uint16
    return np.ascontiguousarray(cands[rng.permutation(len(cands))], dtype=dtype)


def _generate_max_min(
    k: int, n: int, rng: np.random.Generator, num_candidates: int | None
) -> np.ndarray:
    """Greedy max-min-distance selection over candidates (ties by max average); (k, n)."""
    cands_t = np.ascontiguousarray(_candidates(n, rng, num_candidates, k).T)  # (n, M)
    m = cands_t.shape[1]
    acc = np.uint8 if n <= 255 else np.uint16
    max_agree = np.zeros(m, dtype=acc)  # agreements with the nearest chosen permutation
    sum_agree = np.zeros(m, dtype=np.int64 if k * n >= 2**31 else np.int32)
    eq = np.empty(m, dtype=acc)
    tmp = np.empty(m, dtype=bool)
    chosen = np.empty((k, n), dtype=np.int64)
    pick = 0  # candidates come shuffled: the first one is a seeded random permutation
    for i in range(k):
        p = cands_t[:, pick].copy()
        chosen[i] = p
        eq.fill(0)
        for pos in range(n):
            np.equal(cands_t[pos], p[pos], out=tmp)
            eq += tmp
        np.maximum(max_agree, eq, out=max_agree)
        sum_agree += eq
        if i + 1 == k:
            break
        # Largest min-distance = smallest max-agreement; ties by largest average distance
        # (= smallest agreement sum), then by the (seeded, shuffled) candidate order.
        best = max_agree.min()
        ties = np.flatnonzero(max_agree == best)
        pick = int(ties[np.argmin(sum_agree[ties])])
    return chosen


# ---------------------------------------------------------------------- projective

_PGL_ORDER = 504  # |PGL(2, 8)| = 9 * 8 * 7
_PGAMMAL_ORDER = 1512  # |PΓL(2, 8)| = 3 * 504
_INF = 8  # index of the point at infinity of the projective line over GF(8)


def _gf8_tables() -> tuple[np.ndarray, np.ndarray]:
    """Multiplication table (8, 8) and inverses (8,) of GF(8) = GF(2)[x] / (x^3 + x + 1).

    Elements are 3-bit integers (bit i = coefficient of x^i); addition is XOR.
    """
    mul = np.zeros((8, 8), dtype=np.int64)
    for a in range(8):
        for b in range(8):
            product = 0
            for bit in range(3):  # carry-less product
                if (b >> bit) & 1:
                    product ^= a << bit
            for bit in (4, 3):  # reduce modulo x^3 + x + 1 (0b1011)
                if (product >> bit) & 1:
                    product ^= 0b1011 << (bit - 3)
            mul[a, b] = product
    inv = np.zeros(8, dtype=np.int64)
    for a in range(1, 8):
        inv[a] = int(np.flatnonzero(mul[a] == 1)[0])
    return mul, inv


@lru_cache(maxsize=2)
def _projective_group(semilinear: bool = True) -> np.ndarray:
    """Permutations of the 9 points of PG(1, 8) by PΓL(2, 8) (or PGL(2, 8)).

    Points 0..7 are the elements of GF(8) and 8 is infinity. Each Möbius map
    z -> (a z + b) / (c z + d) with ad - bc != 0 is composed with the Frobenius powers
    z -> z, z^2, z^4 (semilinear only). Row ``r`` of the result maps point ``z`` to ``r[z]``.

    Returns:
        Read-only int64 array of shape (1512, 9) (or (504, 9)), rows distinct and sorted.
    """
    mul, inv = _gf8_tables()
    a, b, c, d = (x.reshape(-1) for x in np.meshgrid(*[np.arange(8)] * 4, indexing="ij"))
    keep = (mul[a, d] ^ mul[b, c]) != 0
    a, b, c, d = a[keep], b[keep], c[keep], d[keep]
    z = np.arange(8)
    num = mul[a[:, None], z[None, :]] ^ b[:, None]
    den = mul[c[:, None], z[None, :]] ^ d[:, None]
    finite = np.where(den == 0, _INF, mul[num, inv[den]])
    at_inf = np.where(c == 0, _INF, mul[a, inv[c]])
    mobius = np.concatenate([finite, at_inf[:, None]], axis=1)  # (3528, 9)
    maps = [mobius]
    if semilinear:
        square = np.append(mul[z, z], _INF)  # Frobenius z -> z^2 on the 9 points
        frob = np.arange(9)
        for _ in range(2):
            frob = square[frob]
            maps.append(mobius[:, frob])  # z -> g(frob(z))
    group = np.unique(np.concatenate(maps), axis=0)
    group.flags.writeable = False
    return group


def _generate_projective(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """K rows of the PΓL(2, 8) code (PGL(2, 8) for K <= 504), seeded; shape (k, 9)."""
    if n != 9:
        raise ValueError(
            f"method 'projective' builds permutations of 9 tiles (the projective line over "
            f"GF(8)); got num_tiles={n}. Use method='max_min' for other sizes"
        )
    if k > _PGAMMAL_ORDER:
        raise ValueError(
            f"method 'projective' has {_PGAMMAL_ORDER} permutations of 9 tiles; got "
            f"num_permutations={k}. Use method='max_min' for larger sets"
        )
    group = _projective_group(semilinear=k > _PGL_ORDER)
    # A seeded relabelling alpha[row[beta]] keeps all distances; the candidate order is
    # shuffled so that ties in the greedy fall at random.
    alpha, beta = rng.permutation(9), rng.permutation(9)
    cands = alpha[group[:, beta]][rng.permutation(len(group))]
    m = len(cands)
    # Agreements with a row, for every candidate at once: one-hot rows (m, 81) times its one-hot.
    onehot = np.zeros((m, 81), dtype=np.float32)
    onehot[np.repeat(np.arange(m), 9), (np.arange(9) * 9 + cands).reshape(-1)] = 1.0
    sum_agree = np.zeros(m, dtype=np.float32)  # exact: sums stay far below 2**24
    chosen = np.empty((k, 9), dtype=np.int64)
    pick = 0
    for i in range(k):
        chosen[i] = cands[pick]
        sum_agree += onehot @ onehot[pick]
        sum_agree[pick] = np.inf  # never again
        pick = int(np.argmin(sum_agree))  # largest average distance; first in seeded order
    return chosen


# ---------------------------------------------------------------------- files


def _parse_npy(data: bytes, name: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # truncated header/data, pickles, garbage
        raise ValueError(
            f"{name}: not a readable .npy file of permutations ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected one array of shape (K, N) in the .npy file")
    return array


_HEADER_RE = re.compile(r"^#\s*" + _HEADER_TAG + r"\s+v(\d+)\s+(\{.*\})\s*$")
_SPLIT_RE = re.compile(r"[\s,;]+")


def _parse_text(data: bytes, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"{name}: not a text file of permutations (it is not UTF-8 text); expected one "
            f"permutation per line, or a .npy file"
        ) from None
    header: dict[str, Any] = {}
    rows: list[list[int]] = []
    row_lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        match = _HEADER_RE.match(stripped)
        if match:
            try:
                header = json.loads(match.group(2))
            except json.JSONDecodeError as err:
                raise ValueError(f"{name}:{lineno}: unreadable header ({err})") from None
            continue
        body = stripped.split("#", 1)[0].strip().strip(",;")
        if not body:
            continue
        row = []
        for token in _SPLIT_RE.split(body):
            try:
                value = float(token)
            except ValueError:
                raise ValueError(
                    f"{name}:{lineno}: {token!r} is not a number; expected one permutation "
                    f"per line, values separated by spaces or commas"
                ) from None
            if not value.is_integer():
                raise ValueError(f"{name}:{lineno}: {token!r} is not a whole number")
            row.append(int(value))
        if rows and len(row) != len(rows[0]):
            raise ValueError(
                f"{name}:{lineno}: this row has {len(row)} values but line {row_lines[0]} has "
                f"{len(rows[0])}; the file is truncated or malformed"
            )
        rows.append(row)
        row_lines.append(lineno)
    if not rows:
        raise ValueError(f"{name}: no permutation rows found (the file is empty)")
    return np.asarray(rows, dtype=np.int64), header


@lru_cache(maxsize=1)
def _load_default() -> PermutationSet:
    assets = importlib.resources.files("patchssl") / "assets"
    data = (assets / _DEFAULT_ASSET).read_bytes()
    expected = (assets / _DEFAULT_CHECKSUM).read_text().split()[0].strip().lower()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise RuntimeError(
            f"the shipped permutation set patchssl/assets/{_DEFAULT_ASSET} is corrupted: its "
            f"SHA-256 is {actual} but {_DEFAULT_CHECKSUM} says {expected}. Reinstall patchssl"
        )
    return PermutationSet._from_bytes(data, name=f"patchssl/assets/{_DEFAULT_ASSET}", npy=False)


def _write_default_asset(directory: PathLike | None = None) -> Path:
    """Regenerate the shipped default set and its checksum file (for maintainers).

    Args:
        directory: Where to write; defaults to the package's ``assets`` folder.

    Returns:
        The path of the written set.
    """
    folder = Path(directory) if directory is not None else Path(__file__).parent / "assets"
    path = folder / _DEFAULT_ASSET
    PermutationSet.generate(1000, 9, method="auto", seed=0).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / _DEFAULT_CHECKSUM).write_text(f"{digest}  {_DEFAULT_ASSET}\n")
    _load_default.cache_clear()
    return path
