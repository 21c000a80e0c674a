"""Does pretraining help? Transfer against label budget, on the synthetic cervix benchmark.

The paper's ablation (Chae et al., JIPS 2021, Table 2) on data that is free: synthetic
cervix-like images (:func:`patchssl.data.make_synthetic_cervix`, lesions spread over all nine
patch positions). One jigsaw pretraining on unlabeled images, then for every label budget
(labeled training patients) and seed the four rows

* ``scratch``: from scratch, no attention;
* ``ssl``: from the jigsaw-pretrained encoder, no attention;
* ``al``: from scratch, patch attention (``--attention``, the paper's sigmoid gate by default);
* ``ssl_al``: from the pretrained encoder, patch attention (the paper's method);

each fine-tuned with :func:`patchssl.engine.finetune` (so ``--set train.encoder_lr_scale=0.1``
and the like measure the library's options) and scored on one held-out test set of patients
never seen in training. Beside them, a linear probe: logistic regression on the pooled frozen
patch features (``--probe-pool``: their mean, their maximum or their concatenation) of the jigsaw
encoder against those of a randomly initialised one. A lesion covers one or two of the nine
patches, so a mean dilutes it; the maximum keeps the strongest patch's response. With
``--lesion-probe``, each probed feature set also gets a per-patch logistic regression trained
with every pool patient's lesion boxes ("does this patch show the lesion?"): whether the
features hold the finding at all, apart from whether a few labeled images can find it.
``--transfer-set`` gives config overrides to the rows from the pretrained encoder only (a
transfer recipe such as ``train.encoder_layer_decay``), the rows from scratch keeping theirs.

Every comparison is a paired difference on the same test images with a 95% interval from a
bootstrap that resamples test patients (:func:`patchssl.metrics.bootstrap_samples` with the
same resamples for both rows); over several seeds the difference is averaged per resample. For
the attention rows, how often the top-weighted patch overlaps the lesion
(:func:`patchssl.explain.lesion_hit_rate`) is compared with "always the middle patch".

Everything expensive is cached under ``--cache`` (default ``/tmp/bench``): the dataset, the
pretraining checkpoint, each fine-tuning run's test scores. Run the same command again to
resume after an interruption, or with more seeds or budgets to extend a run.

Examples::

    python benchmarks/bench_transfer.py --quick                 # 15-30 minutes on one CPU core
    python benchmarks/bench_transfer.py                         # the full benchmark (hours)
    python benchmarks/bench_transfer.py --quick --set train.encoder_lr_scale=0.1

Writes ``transfer.md``, ``transfer.csv``, ``transfer.json`` and ``transfer.png`` into ``--out``.

References:
    Chae, Zimmermann, Kim, Kim. "Attentive Transfer Learning via Self-supervised Learning for
    Cervical Dysplasia Diagnosis." JIPS 17(3), 2021.
    Noroozi, Favaro. "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles." ECCV 2016, arXiv:1603.09246.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make benchmarks/_common importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The rows of the ablation: name -> (start from the jigsaw encoder, use attention).
ROWS: dict[str, tuple[bool, bool]] = {
    "scratch": (False, False),
    "ssl": (True, False),
    "al": (False, True),
    "ssl_al": (True, True),
}
#: The pairs compared (first minus second).
PAIRS: tuple[tuple[str, str], ...] = (
    ("ssl_al", "al"),
    ("ssl", "scratch"),
    ("al", "scratch"),
    ("ssl_al", "scratch"),
    ("ssl_al", "ssl"),
    ("al", "ssl"),
)
#: Seed of the dataset (fixed: every run of the benchmark sees the same images).
DATA_SEED = 2026


@dataclass(frozen=True)
class Settings:
    """What one benchmark run trains and tests.

    Attributes:
        image_size: Image side in pixels.
        patch_size: Patch side in pixels (3x3 grid).
        backbone: timm name of the patch encoder.
        num_unlabeled: Unlabeled images for pretraining.
        test_patients: Held-out test patients (2 images each).
        images_per_patient: Images per labeled patient.
        budgets: Label budgets (labeled training patients).
        seeds: Seeds of the budget draw and of fine-tuning.
        rows: Rows of the ablation (keys of :data:`ROWS`).
        attention: Attention of the ``al`` rows (the paper's ``sigmoid``; the library's default
            is ``softmax``).
        head: Classifier head of every row (the paper's ``concat``; the library's default is
            ``pooled``). ``--attention softmax --head pooled`` measures the library's default
            classifier.
        input_norm: How every row (and the probe) normalises patches before the encoder:
            ``per_patch`` (each patch standardised on its own, as the paper's jigsaw does),
            ``encoder`` or ``auto`` (the library's default: the checkpoint's for the SSL
            rows, ``encoder`` from scratch, so that the rows differ in their input too).
            Unless ``pretext_options`` name ``per_patch_norm``, the jigsaw pretrains with
            per-tile normalisation exactly when this is ``per_patch``.
        pretext: The pretext task of the pretraining (``patchssl pretexts`` lists them).
        pretext_options: Its options beyond the library's defaults, ``key=value`` strings
            (values read as YAML, e.g. ``crop_scale=[0.25,1.0]``).
        pretrain_epochs: Pretraining epochs.
        pretrain_lr: Peak learning rate of pretraining. ``1e-3``, the rate of every figure in
            docs/benchmarks.md, and not the library's pretraining default (``3e-3`` since
            2026-11-28), so that the documented commands train what they measured.
        pretrain_batch_size: Batch size of pretraining (0: ``batch_size``). Contrastive
            pretexts see more negatives in a larger batch.
        num_permutations: Jigsaw permutations (maximal Hamming set; jigsaw only).
        finetune_images: Images seen per fine-tuning run (epochs = this / training images,
            clipped to ``[min_epochs, max_epochs]``).
        min_epochs: Fewest fine-tuning epochs.
        max_epochs: Most fine-tuning epochs.
        batch_size: Batch size of fine-tuning, and of pretraining unless
            ``pretrain_batch_size`` is given.
        lr: Peak learning rate of fine-tuning.
        overrides: Extra config overrides for fine-tuning (``section.key=value``).
        transfer_overrides: Config overrides for the rows that start from the pretrained
            encoder only (``ssl``, ``ssl_al``), after ``overrides``: a transfer recipe such as
            ``train.encoder_layer_decay=0.7`` measured against rows from scratch that keep
            theirs (and their cached runs).
        n_boot: Bootstrap resamples.
        probe_pool: How the probe pools the nine patch features of an image
            (:func:`patchssl.probe.pool_patch_features`): ``mean``, ``max`` (per feature) or
            ``concat``.
    """

    image_size: int = 128
    patch_size: int = 32
    backbone: str = "resnet10t"
    num_unlabeled: int = 2000
    test_patients: int = 500
    images_per_patient: int = 2
    budgets: tuple[int, ...] = (8, 16, 32, 64, 128)
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = ("scratch", "ssl", "al", "ssl_al")
    attention: str = "sigmoid"
    head: str = "concat"
    input_norm: str = "per_patch"
    pretext: str = "jigsaw"
    pretext_options: tuple[str, ...] = ()
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 0
    num_permutations: int = 100
    finetune_images: int = 2000
    min_epochs: int = 10
    max_epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    overrides: tuple[str, ...] = field(default_factory=tuple)
    transfer_overrides: tuple[str, ...] = field(default_factory=tuple)
    n_boot: int = 1000
    probe_pool: str = "mean"


#: ``--quick``: one seed, two budgets, a short pretraining; 8 fine-tunings of 1,024 images each
#: (fewer left the models untrained). About 15 minutes on an idle core of a 2-core x86-64 CPU;
#: 31 minutes were measured with the machine shared and heavily loaded (docs/benchmarks.md).
QUICK = Settings(
    num_unlabeled=400,
    test_patients=100,
    budgets=(8, 32),
    seeds=(0,),
    pretrain_epochs=2,
    finetune_images=1024,
    min_epochs=8,
    max_epochs=64,
)


def _say(message: str) -> None:
    print(f"[bench_transfer] {message}", flush=True)


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _changed(config: dict[str, Any], *sections: str) -> dict[str, Any]:
    """The entries of ``config``'s ``sections`` that differ from the library's defaults.

    A cache key built from these stays the same when the library gains an option (with a
    default that changes nothing), and ignores where a run runs (device, threads).
    """
    from patchssl.engine.config import DEFAULT_LR, Config

    defaults = Config().to_dict()
    # train.lr's default became each command's own (None); keys name a rate only when it
    # differs from fine-tuning's, as they did before, so cached runs keep their keys
    defaults["train"]["lr"] = DEFAULT_LR["finetune"]
    out: dict[str, Any] = {}
    for name in sections:
        if not isinstance(config[name], dict):  # "out": where, not what
            continue
        section = {
            k: v
            for k, v in config[name].items()
            if v != defaults[name].get(k, object()) and k not in ("device", "num_threads")
        }
        out[name] = section
    return out


def _generator_fingerprint(image_size: int) -> str:
    """What the synthetic generator draws for fixed seeds: a changed generator draws new data.

    The pixels of two rendered images (one with a lesion) and the parameters of a few drawn
    patients, so that edits to the generator's comments or argument checks keep the cache.
    """
    from patchssl.data.synthetic import render_cervix, sample_cervix_params

    digest = hashlib.sha1()
    rng = np.random.default_rng(DATA_SEED)
    for lesion in (False, True):
        digest.update(render_cervix(rng, image_size, lesion=lesion).image.tobytes())
    digest.update(repr([sample_cervix_params(rng) for _ in range(4)]).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ data
@dataclass
class Data:
    """The benchmark's images: where they are, and the labeled ones in memory."""

    root: Path
    unlabeled_dir: Path
    manifest: Path
    records: list[Any]
    pool: dict[str, list[int]]  # training patient -> indices into records
    pool_labels: dict[str, int]
    test_index: np.ndarray  # indices into records
    images: np.ndarray  # uint8 (n, 3, H, W), every labeled image (records order)


def make_data(s: Settings, cache: Path) -> Data:
    """Write (or reuse) the synthetic dataset and split its patients into pool and test."""
    from PIL import Image

    from patchssl.data import make_synthetic_cervix, read_manifest

    pool_size = math.ceil(1.25 * max(s.budgets)) + 4  # room for 40% +- chance per class
    n_patients = s.test_patients + pool_size
    source = _generator_fingerprint(s.image_size)  # a changed generator draws new data
    key = _key(s.image_size, s.num_unlabeled, n_patients, s.images_per_patient, DATA_SEED, source)
    root = cache / f"data_{key}"
    done = root / "done.json"
    if not done.is_file():
        _say(f"drawing {s.num_unlabeled} unlabeled and {n_patients} x {s.images_per_patient} ")
        make_synthetic_cervix(
            root,
            num_unlabeled=s.num_unlabeled,
            num_patients=n_patients,
            images_per_patient=s.images_per_patient,
            image_size=s.image_size,
            positive_fraction=0.4,
            seed=DATA_SEED,
            progress=False,
        )
        done.write_text("{}\n")
    manifest = root / "labeled.csv"
    records = read_manifest(manifest, label_map="cervix")
    arrays = root / "labeled_uint8.npy"
    if not arrays.is_file():
        stack = np.stack(
            [np.asarray(Image.open(r.path).convert("RGB")).transpose(2, 0, 1) for r in records]
        )
        tmp = arrays.with_suffix(f".{os.getpid()}.tmp.npy")  # processes sharing the cache
        np.save(tmp, stack)
        os.replace(tmp, arrays)
    images = np.load(arrays)
    # Patients P000.. in manifest order: the first test_patients are the test set.
    patients = sorted({r.patient for r in records})
    test = set(patients[: s.test_patients])
    pool: dict[str, list[int]] = {}
    labels: dict[str, int] = {}
    test_index = []
    for i, r in enumerate(records):
        if r.patient in test:
            test_index.append(i)
        else:
            pool.setdefault(r.patient, []).append(i)
            labels[r.patient] = int(r.label)
    return Data(
        root,
        root / "unlabeled",
        manifest,
        records,
        pool,
        labels,
        np.array(test_index),
        images,
    )


def budget_patients(data: Data, budget: int, seed: int) -> list[str]:
    """``budget`` training patients, 40% positive (at least one of each), nested in budget.

    The first ``k`` positives and negatives of one seeded order, so a larger budget of the same
    seed holds every patient of a smaller one.
    """
    rng = np.random.default_rng([DATA_SEED, 7, seed])
    pos = sorted(p for p, y in data.pool_labels.items() if y == 1)
    neg = sorted(p for p, y in data.pool_labels.items() if y == 0)
    pos = [pos[i] for i in rng.permutation(len(pos))]
    neg = [neg[i] for i in rng.permutation(len(neg))]
    n_pos = min(max(1, round(0.4 * budget)), budget - 1, len(pos))
    if budget - n_pos > len(neg):
        raise ValueError(f"budget {budget} needs more negative patients than the pool holds")
    return pos[:n_pos] + neg[: budget - n_pos]


# ---------------------------------------------------------------------------------- config
def base_config(s: Settings, data: Data, threads: int) -> Any:
    """The engine configuration shared by pretraining and fine-tuning."""
    from patchssl.engine.config import Config, apply_overrides

    c = Config()
    c.data.unlabeled = str(data.unlabeled_dir)
    c.data.manifest = str(data.manifest)
    c.data.label_map = "cervix"
    c.data.image_size = s.image_size
    c.data.workers = 0 if threads else None  # on a GPU: the engine's loader workers
    c.model.backbone = s.backbone
    c.model.patch_size = s.patch_size
    c.model.input_norm = s.input_norm
    c.model.head = s.head
    c.pretext.name = s.pretext
    c.pretext.options = {"num_permutations": s.num_permutations} if s.pretext == "jigsaw" else {}
    if s.pretext_options:
        c = apply_overrides(c, [f"pretext.options.{o}" for o in s.pretext_options])
    options = c.pretext.options
    nested = options.get("defences") if isinstance(options.get("defences"), dict) else {}
    if s.pretext == "jigsaw" and "per_patch_norm" not in {**options, **nested}:
        # Stated, not left to the library's default (which changed in 0.2), so that a
        # pretraining's cache key names it: per-tile normalisation exactly when the rows take
        # per-patch input (the pretraining's input must match the classifier's).
        options["per_patch_norm"] = s.input_norm == "per_patch"
    c.train.batch_size = s.batch_size
    c.train.patience = 0
    c.train.progress = False
    c.train.tensorboard = "false"
    c.train.num_threads = threads
    c.train.device = "cpu" if threads else "auto"
    c.eval.n_boot = s.n_boot
    return c


#: ``model`` options that only the classifier reads: they do not key the pretraining.
CLASSIFIER_ONLY = (
    "attention",
    "attention_temperature",
    "attention_entropy",
    "head",
    "dropout",
    "num_classes",
    "init",
    "input_norm",
)


def pretrain_checkpoint(s: Settings, data: Data, cache: Path, threads: int) -> Path:
    """Pretrain the pretext task once per setting (cached; an interrupted run resumes)."""
    from patchssl.engine import pretrain

    c = base_config(s, data, threads)
    c.train.epochs = s.pretrain_epochs
    c.train.lr = s.pretrain_lr
    batch = s.pretrain_batch_size or s.batch_size
    c.train.batch_size = batch
    c.train.class_weights = "none"
    c.train.seed = 0
    changed = _changed(c.to_dict(), "model", "pretext")
    for name in CLASSIFIER_ONLY:  # options the pretraining does not read
        changed.get("model", {}).pop(name, None)
    rate = [] if s.pretrain_lr == 1e-3 else [s.pretrain_lr]  # 1e-3: every cached pretraining
    sized = [] if batch == s.batch_size else [f"batch{batch}"]  # the rows' batch: as cached
    key = _key(changed, str(data.root), s.pretrain_epochs, *rate, *sized)
    out = cache / f"pretrain_{key}"
    done = out / "done.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["checkpoint"])
    c.out = str(out)
    c.train.resume = (out / "last.pt").is_file()
    _say(f"pretraining {s.pretext} ({s.pretrain_epochs} epochs on {s.num_unlabeled} images): {out}")
    t = time.perf_counter()
    result = pretrain(c)
    info = {"checkpoint": str(result.best_checkpoint), "seconds": time.perf_counter() - t}
    done.write_text(json.dumps(info) + "\n")
    return Path(result.best_checkpoint)


# ------------------------------------------------------------------------------- the runs
def _epochs(s: Settings, n_images: int) -> int:
    return int(min(s.max_epochs, max(s.min_epochs, math.ceil(s.finetune_images / n_images))))


def _scores(model: Any, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Positive-class probabilities (n,) and attention weights (n, N) of a classifier."""
    import torch

    forward = getattr(model, "forward_with_attention", model)
    probs, weights = [], []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            out = forward(torch.from_numpy(images[lo : lo + batch]))
            probs.append(torch.softmax(out.logits.float(), -1)[:, 1].numpy())
            weights.append(out.weights.float().numpy())
    return np.concatenate(probs), np.concatenate(weights)


def row_config(
    s: Settings,
    data: Data,
    row: str,
    budget: int,
    seed: int,
    checkpoint: Path | None,
    threads: int,
) -> tuple[Any, list[str], str]:
    """The fine-tuning of one row: its config, its training images and its cache key."""
    from patchssl.engine.config import apply_overrides

    ssl, attention = ROWS[row]
    c = base_config(s, data, threads)
    c.model.attention = s.attention if attention else "none"
    c.model.init = str(checkpoint) if ssl else None
    c.train.seed = seed
    c.train.lr = s.lr
    c = apply_overrides(c, list(s.overrides) + (list(s.transfer_overrides) if ssl else []))
    patients = budget_patients(data, budget, seed)
    train = [data.records[i].path for p in patients for i in data.pool[p]]
    c.train.epochs = _epochs(s, len(train))
    config = c.to_dict()
    if not ssl:  # the pretext never reaches a row without pretraining: one run serves them all
        plain = replace(s, pretext="jigsaw", pretext_options=(), num_permutations=100)
        config["pretext"] = base_config(plain, data, threads).to_dict()["pretext"]
    return c, train, _key(_changed(config, *config), budget, sorted(patients))


def run_row(
    s: Settings,
    data: Data,
    row: str,
    budget: int,
    seed: int,
    checkpoint: Path | None,
    cache: Path,
    threads: int,
) -> dict[str, Any]:
    """Fine-tune one row on one budget and seed, score the test set (cached)."""
    c, train, key = row_config(s, data, row, budget, seed, checkpoint, threads)
    out = cache / "runs" / f"{row}_b{budget}_s{seed}_{key}"
    result_file = out / "test_scores.npz"
    if result_file.is_file():
        saved = np.load(result_file)
        return {"probs": saved["probs"], "weights": saved["weights"], "seconds": 0.0}
    test = [data.records[i].path for i in data.test_index]
    t = time.perf_counter()
    model = _finetuned(c, out, {"train": train, "val": [], "test": test})
    probs, weights = _scores(model, data.images[data.test_index])
    seconds = time.perf_counter() - t
    np.savez(out / ".test_scores.tmp.npz", probs=probs, weights=weights)
    os.replace(out / ".test_scores.tmp.npz", result_file)
    _drop_weights(out)  # the scores are what the benchmark keeps
    return {"probs": probs, "weights": weights, "seconds": seconds}


def _finetuned(c: Any, out: Path, split: dict[str, list[str]]) -> Any:
    """Fine-tune ``c`` on ``split`` in ``out`` (a run cut off before goes on); the model, on CPU."""
    from patchssl.data import save_split
    from patchssl.engine import finetune
    from patchssl.engine.evaluation import load_classifier

    out.mkdir(parents=True, exist_ok=True)
    c.train.resume = (out / "last.pt").is_file()
    c.data.split = str(save_split(out / "split_in.json", split))
    c.out = str(out)
    trained = finetune(c)
    model, _ = load_classifier(trained.last_checkpoint, device=_device(c))
    return model.cpu()


def _drop_weights(out: Path) -> None:
    """Delete a finished run's checkpoints once what the benchmark keeps is written."""
    for name in ("last.pt", "best.pt"):
        (out / name).unlink(missing_ok=True)


def _device(config: Any) -> Any:
    from patchssl.engine.loop import resolve_device

    return resolve_device(config.train.device)


def probe_features(
    s: Settings, data: Data, checkpoint: Path | None, cache: Path, threads: int
) -> np.ndarray:
    """Frozen patch features of every labeled image (cached); pool them for the probe.

    Returns:
        ``(n, N, D)``: the features of each image's ``N`` patches.
    """
    import torch

    from patchssl.engine.finetuning import build_classifier

    c = base_config(s, data, threads)
    c.model.init = str(checkpoint) if checkpoint is not None else None
    c.model.attention = "none"
    c.train.seed = 0
    key = _key(_changed(c.to_dict(), "model"), str(checkpoint), data.images.shape)
    path = cache / f"patch_features_{s.pretext if checkpoint else 'random'}_{key}.npy"
    if path.is_file():
        return np.load(path)
    model, _, _ = build_classifier(c, torch.device("cpu"))
    out = patch_features(model, data.images)
    np.save(path, out)
    return out


def patch_features(model: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Frozen features ``(n, N, D)`` of every patch of ``images`` by a classifier's encoder.

    The encoder sees its patches as the classifier feeds them (per-patch standardised when the
    classifier's ``input_norm`` is ``per_patch``).
    """
    import torch

    from patchssl.pretext.base import standardize_patches

    model.eval()
    feats = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            patches = model.tiler(torch.from_numpy(images[lo : lo + batch])).patches
            if model.input_norm == "per_patch":  # the encoder's input, as the classifier has it
                encoded = model.encoder(
                    standardize_patches(patches.float() / 255.0), normalized=True
                )
            else:
                encoded = model.encoder(patches)
            feats.append(encoded.float().numpy())
    return np.concatenate(feats)


def reference_features(s: Settings, data: Data, cache: Path, threads: int) -> np.ndarray:
    """Pooled features of an encoder trained with labels: how far a probe can go (cached).

    The ``al`` row's classifier fine-tuned from scratch on the largest budget (seed 0); its
    encoder's frozen features are probed like the others. Features that know the lesion tell
    whether a budget is too small for any frozen feature or only for those of the
    pretraining: the probe's ceiling, not a row (its encoder has seen the labels of every
    smaller budget's patients, never those of the test patients).

    Returns:
        ``(n, N, D)``: the features of each image's ``N`` patches.
    """
    budget = max(s.budgets)
    c, train, key = row_config(s, data, "al", budget, 0, None, threads)
    key = _key(key, data.images.shape)
    path = cache / f"patch_features_supervised_{key}.npy"
    if not path.is_file():
        out = cache / "runs" / f"reference_b{budget}_{key}"
        _say(f"the probe's reference: the al classifier on {budget} patients' labels")
        model = _finetuned(c, out, {"train": train, "val": []})
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, patch_features(model, data.images))
        os.replace(tmp, path)
        _drop_weights(out)
    return np.load(path)


def linear_probe(feats: np.ndarray, data: Data, budget: int, seed: int) -> np.ndarray:
    """Test-set scores (n_test,) of a logistic regression on the budget's frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    idx = [i for p in budget_patients(data, budget, seed) for i in data.pool[p]]
    y = np.array([data.records[i].label for i in idx])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    clf.fit(feats[idx], y)
    return clf.predict_proba(feats[data.test_index])[:, 1]


def patch_lesion_labels(
    data: Data, boxes: np.ndarray, min_share: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Which patch of every labeled image shows the lesion.

    Args:
        data: The benchmark data (lesion boxes of the positive images).
        boxes: Patch boxes ``(N, 4)``, ``x0, y0, x1, y1`` in pixels.
        min_share: Share of a patch's area the lesion box must cover for a positive patch.

    Returns:
        ``(labels, kept)``, both ``(n, N)``: 1 where the lesion box covers at least
        ``min_share`` of the patch; ``kept`` is False for the patches it covers less but not
        at all (neither clearly with nor clearly without the lesion).
    """
    lesions = np.array(
        [
            [float(r.extra.get(f"lesion_{k}") or "nan") for k in ("x0", "y0", "x1", "y1")]
            for r in data.records
        ]
    )[:, None, :]  # (n, 1, 4)
    b = boxes[None].astype(np.float64)  # (1, N, 4)
    wide = np.minimum(b[..., 2], lesions[..., 2]) - np.maximum(b[..., 0], lesions[..., 0])
    high = np.minimum(b[..., 3], lesions[..., 3]) - np.maximum(b[..., 1], lesions[..., 1])
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    share = np.nan_to_num(np.clip(wide, 0, None) * np.clip(high, 0, None) / area)  # NaN: none
    return (share >= min_share).astype(np.int64), (share == 0) | (share >= min_share)


def lesion_probe(
    feats: dict[str, np.ndarray],
    data: Data,
    boxes: np.ndarray,
    pairs: Sequence[tuple[str, str]],
    n_boot: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Can each set of frozen patch features tell a lesion patch from the others?

    With every pool patient's lesion boxes (far more labels than any budget), a logistic
    regression on single patch features learns "this patch shows the lesion" and is scored
    on the test patients' patches (AUC, patient bootstrap, pairs on the same resamples). Where
    the image-level probe asks whether a few labeled images suffice, this asks whether the
    features hold the finding at all.

    Args:
        feats: ``name -> (n, N, D)`` patch features of every labeled image.
        data: The benchmark data.
        boxes: Patch boxes ``(N, 4)``.
        pairs: ``(a, b)`` pairs of ``feats`` names, difference ``a - b``.
        n_boot: Bootstrap resamples.

    Returns:
        ``(auc_rows, diff_rows)`` as :func:`paired_table`'s, with ``budget`` the number of
        pool patients whose patches trained the regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels, kept = patch_lesion_labels(data, boxes)
    train = np.zeros(len(data.records), dtype=bool)
    train[[i for idx in data.pool.values() for i in idx]] = True
    test = np.zeros_like(train)
    test[data.test_index] = True
    fit, score = kept & train[:, None], kept & test[:, None]
    if len(np.unique(labels[fit])) < 2 or len(np.unique(labels[score])) < 2:
        _say("lesion probe skipped: the pool or the test set has no lesion patch")
        return [], []
    patients = np.array([r.patient for r in data.records])
    groups = np.broadcast_to(patients[:, None], labels.shape)[score]
    budget = len(data.pool)
    scores = {}
    for name, f in feats.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        clf.fit(f[fit], labels[fit])
        scores[(name, budget, 0)] = clf.predict_proba(f[score])[:, 1]
    return paired_table(scores, labels[score], groups, list(feats), pairs, [budget], [0], n_boot)


# -------------------------------------------------------------------------------- analysis
def paired_table(
    scores: dict[tuple[str, int, int], np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    names: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    budgets: Sequence[int],
    seeds: Sequence[int],
    n_boot: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """AUC per row and paired AUC differences per pair, per budget, averaged over seeds.

    Every score vector is bootstrapped with the same patient resamples (one seed for all), so
    a difference of two rows on a resample is paired; over seeds the AUCs and differences are
    averaged per resample. The interval is the 2.5-97.5 percentile of that average: it covers
    the test set's sampling for these trained models, not the seed-to-seed spread (given
    separately as the range of the per-seed values).

    Args:
        scores: ``(row, budget, seed) -> (n_test,)`` positive-class scores.
        labels: Test labels (n_test,).
        groups: Test patient ids (n_test,).
        names: Rows.
        pairs: ``(a, b)`` pairs, difference ``a - b``.
        budgets: Label budgets.
        seeds: Seeds.
        n_boot: Bootstrap resamples.

    Returns:
        ``(auc_rows, diff_rows)``: lists of dicts for the tables.
    """
    from patchssl.metrics import binary_metrics, bootstrap_samples

    def boot(v: np.ndarray) -> np.ndarray:
        kw = dict(threshold=0.5, groups=groups, n_boot=n_boot, seed=12345, metrics=("auc",))
        return bootstrap_samples(labels, v, **kw)["auc"]

    aucs, diffs = [], []
    for b in budgets:
        cache: dict[str, tuple[np.ndarray, list[float]]] = {}
        for name in names:
            have = [k for k in seeds if (name, b, k) in scores]
            if not have:
                continue
            samples = np.mean([boot(scores[(name, b, k)]) for k in have], axis=0)
            point = [float(binary_metrics(labels, scores[(name, b, k)])["auc"]) for k in have]
            cache[name] = (samples, point)
            lo, hi = np.nanpercentile(samples, [2.5, 97.5])
            aucs.append(
                {
                    "budget": b,
                    "row": name,
                    "seeds": len(have),
                    "auc": float(np.mean(point)),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "seed_min": min(point),
                    "seed_max": max(point),
                }
            )
        for a, c in pairs:
            if a not in cache or c not in cache:
                continue
            d = cache[a][0] - cache[c][0]
            per_seed = [x - y for x, y in zip(cache[a][1], cache[c][1], strict=True)]
            lo, hi = np.nanpercentile(d, [2.5, 97.5])
            diffs.append(
                {
                    "budget": b,
                    "pair": f"{a} - {c}",
                    "diff": float(np.mean(per_seed)),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "seed_min": min(per_seed),
                    "seed_max": max(per_seed),
                    "ci_above_0": bool(lo > 0),
                }
            )
    return aucs, diffs


def top_patch_hits(weights: np.ndarray, data: Data, boxes: np.ndarray) -> dict[str, Any]:
    """:func:`patchssl.explain.lesion_hit_rate` of one run on the test images, per image.

    Args:
        weights: ``(n_test, N)`` attention weights.
        data: The benchmark data (lesion boxes, labels and patients of the test images).
        boxes: Patch boxes (N, 4).

    Returns:
        ``lesion_hit_rate``'s dict without intervals, with ``per_image`` (the top and the
        middle patch's hit on each positive test image with a lesion box) and ``patients``
        (the patient of each of those images).
    """
    from patchssl.explain import lesion_hit_rate

    recs = [data.records[i] for i in data.test_index]
    lesions = np.array(
        [
            [float(r.extra.get(f"lesion_{k}") or "nan") for k in ("x0", "y0", "x1", "y1")]
            for r in recs
        ]
    )
    labels = np.array([r.label for r in recs])
    res = lesion_hit_rate(boxes, weights, lesions, labels, n_boot=0, per_image=True)
    res["patients"] = np.array([r.patient for r in recs])[res["per_image"]["counted"]]
    return res


def patient_multiplicities(patients: np.ndarray, n_boot: int, seed: int = 54321) -> np.ndarray:
    """How often each image is drawn in each of ``n_boot`` patient resamples: ``(n_boot, m)``.

    Every comparison that uses the same ``seed`` resamples the same patients, so differences
    of means taken with these weights are paired.
    """
    uniq, inv = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    return np.stack([np.bincount(d, minlength=len(uniq)) for d in draws])[:, inv]


def localisation(
    weights: dict[tuple[str, int, int], np.ndarray],
    data: Data,
    boxes: np.ndarray,
    n_boot: int,
) -> list[dict[str, Any]]:
    """Top-patch lesion hits of the attention rows against the middle patch, with a CI.

    Args:
        weights: ``(row, budget, seed) -> (n_test, N)`` attention weights.
        data: The benchmark data (lesion boxes and labels of the test images).
        boxes: Patch boxes (N, 4).
        n_boot: Patient resamples of the paired difference (top minus middle).

    Returns:
        One dict per (row, budget): hit rates averaged over seeds and the interval of the
        difference to the middle-patch prior.
    """
    mult = None
    out = []
    keys = sorted({(r, b) for r, b, _ in weights})
    for row, b in keys:
        per_seed, diffs = [], []
        for (r2, b2, _k), w in sorted(weights.items()):
            if (r2, b2) != (row, b):
                continue
            res = top_patch_hits(w, data, boxes)
            hit, mid_hit = res["per_image"]["hit"], res["per_image"]["centre_patch"]
            if mult is None:
                mult = patient_multiplicities(res["patients"], n_boot)
            diffs.append((mult @ (hit - mid_hit)) / mult.sum(axis=1))
            spread = res["selectivity"]["weight_range"]
            per_seed.append((res["hit_rate"], res["chance"], spread, res["centre_patch_rate"]))
        boot = np.mean(diffs, axis=0)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        middle = per_seed[0][3]
        out.append(
            {
                "row": row,
                "budget": b,
                "seeds": len(per_seed),
                "top_patch_hit": float(np.mean([p[0] for p in per_seed])),
                "middle_patch_hit": middle,
                "chance": float(np.mean([p[1] for p in per_seed])),
                "diff_vs_middle": float(np.mean([p[0] for p in per_seed]) - middle),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "weight_spread": float(np.mean([p[2] for p in per_seed])),
                "positives": len(mid_hit),
            }
        )
    return out


# --------------------------------------------------------------------------------- outputs
def _f(x: float, d: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def _pretext_text(s: dict[str, Any]) -> str:
    """``jigsaw (100 permutations)``, ``rotation (crop_scale=[0.25,1])``: the pretraining."""
    name = s.get("pretext", "jigsaw")
    options = list(s.get("pretext_options", ()))
    if name == "jigsaw":
        options.insert(0, f"{s['num_permutations']} permutations")
    return f"{name} ({', '.join(options)})" if options else name


def _probe_lines(
    title: str, aucs: list[dict[str, Any]], diffs: list[dict[str, Any]], *, per_budget: bool
) -> list[str]:
    """Markdown of a probe: its AUC table and its paired differences.

    ``per_budget``: the image-level probe (a row per budget, with the seeds' range); else the
    lesion probe (one regression on the pool's patches, no seeds).
    """
    if per_budget:
        header = ["| budget | features | AUC | 95% CI | seeds min-max |", "|---:|---|---:|---|---|"]
    else:
        header = ["| pool patients | features | AUC | 95% CI |", "|---:|---|---:|---|"]
    lines = ["", title, "", *header]
    for r in aucs:
        seeds = f" {_f(r['seed_min'])}-{_f(r['seed_max'])} |" if per_budget else ""
        lines.append(
            f"| {r['budget']} | {r['row']} | {_f(r['auc'])} | [{_f(r['ci_low'])}, "
            f"{_f(r['ci_high'])}] |{seeds}"
        )
    for r in diffs:
        name = f"Probe, budget {r['budget']}" if per_budget else "Lesion probe"
        lines.append(
            f"\n{name}: {r['pair']} = {_f(r['diff'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]"
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: settings, AUC table, paired differences, probe, localisation."""
    s = payload["settings"]
    lines = [
        "# Transfer against label budget (synthetic cervix benchmark)",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{s['image_size']} px images, 3x3 patches of {s['patch_size']} px, {s['backbone']}; "
        f"classifier: {s.get('attention', 'sigmoid')} attention (the al rows), "
        f"{s.get('head', 'concat')} head, {s['input_norm']} input; "
        f"{_pretext_text(s)} pretraining {s['pretrain_epochs']} epochs on "
        f"{s['num_unlabeled']} unlabeled images; test set "
        f"{payload['test_images']} images of {s['test_patients']} patients never seen in "
        f"training ({payload['test_positives']} positive); seeds {list(s['seeds'])}; overrides "
        f"{list(s['overrides']) or 'none'}; of the pretrained rows "
        f"{list(s.get('transfer_overrides', ())) or 'none'}. {payload['machine']}; "
        f"{payload['seconds'] / 60:.1f} min of wall time (cached parts not counted again).",
        "",
        "AUC (mean over seeds; 95% CI: patient bootstrap of the seed-averaged AUC; "
        "min-max over seeds):",
        "",
        "| budget (patients) | row | AUC | 95% CI | seeds min-max |",
        "|---:|---|---:|---|---|",
    ]
    for r in payload["auc"]:
        lines.append(
            f"| {r['budget']} | {r['row']} | {_f(r['auc'])} | [{_f(r['ci_low'])}, "
            f"{_f(r['ci_high'])}] | {_f(r['seed_min'])}-{_f(r['seed_max'])} |"
        )
    lines += [
        "",
        "Paired AUC differences on the same test images (first row minus second):",
        "",
        "| budget | pair | diff | 95% CI | seeds min-max | CI above 0 |",
        "|---:|---|---:|---|---|---|",
    ]
    for r in payload["diffs"]:
        lines.append(
            f"| {r['budget']} | {r['pair']} | {_f(r['diff'])} | [{_f(r['ci_low'])}, "
            f"{_f(r['ci_high'])}] | {_f(r['seed_min'])} to {_f(r['seed_max'])} | "
            f"{'yes' if r['ci_above_0'] else 'no'} |"
        )
    if payload.get("probe_auc"):
        lines += _probe_lines(
            "Linear probe (logistic regression on frozen patch features pooled by "
            f"{payload['settings'].get('probe_pool', 'mean')}; AUC):",
            payload["probe_auc"],
            payload["probe_diffs"],
            per_budget=True,
        )
    if payload.get("lesion_probe_auc"):
        lines += _probe_lines(
            "Lesion probe (logistic regression on single frozen patch features, trained with "
            "the lesion boxes of every pool patient; AUC of 'this patch shows the lesion' on "
            "the test patches):",
            payload["lesion_probe_auc"],
            payload["lesion_probe_diffs"],
            per_budget=False,
        )
    if payload.get("localisation"):
        lines += [
            "",
            "Localisation on positive test images: the top-weighted patch overlaps the lesion "
            "box (`lesion_hit_rate`), against always the middle patch (paired patient "
            "bootstrap of the difference) and a uniformly random patch (chance); weight "
            "spread = mean of max - min weight per image:",
            "",
            "| budget | row | top patch | middle patch | chance | top - middle | 95% CI | "
            "weight spread |",
            "|---:|---|---:|---:|---:|---:|---|---:|",
        ]
        for r in payload["localisation"]:
            lines.append(
                f"| {r['budget']} | {r['row']} | {_f(r['top_patch_hit'])} | "
                f"{_f(r['middle_patch_hit'])} | {_f(r['chance'])} | {_f(r['diff_vs_middle'])} | "
                f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}] | {_f(r['weight_spread'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """AUC against label budget with the CIs: fine-tuned rows, then the linear probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fine-tuned", payload["auc"])] if payload["auc"] else []
    if payload.get("probe_auc"):
        panels.append(("linear probe", payload["probe_auc"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        for k, name in enumerate(dict.fromkeys(r["row"] for r in rows)):
            pts = sorted((r["budget"], r) for r in rows if r["row"] == name)
            x = np.array([b for b, _ in pts], dtype=float) * (1.0 + 0.03 * (k - 1.5))
            y = np.array([r["auc"] for _, r in pts])
            lo = y - np.array([r["ci_low"] for _, r in pts])
            hi = np.array([r["ci_high"] for _, r in pts]) - y
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labeled training patients")
        ax.set_ylabel("test AUC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_clean(value.item())
    return value


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """Command-line options (every field of :class:`Settings`, and where to write)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="the small setting (15-30 minutes on one core)"
    )
    p.add_argument("--out", default="benchmarks/results/transfer", help="output folder")
    p.add_argument("--cache", default="/tmp/bench", help="cache of data, checkpoints and runs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = GPU if any)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument(
        "--probe-reference",
        action="store_true",
        help="also probe the features of an encoder trained with the largest budget's labels "
        "(the probe's ceiling; one more fine-tuning)",
    )
    p.add_argument(
        "--lesion-probe",
        action="store_true",
        help="also ask whether each set of probed features tells a lesion patch from the others "
        "(a per-patch logistic regression trained with every pool patient's lesion boxes)",
    )
    p.add_argument("--tag", default="", help="suffix of the output files, e.g. _gated")
    for f in Settings.__dataclass_fields__.values():
        name = "--" + f.name.replace("_", "-")
        if f.name in ("overrides", "transfer_overrides"):
            continue  # --set, --transfer-set
        if f.name in ("budgets", "seeds", "rows", "pretext_options"):
            kind = int if f.name in ("budgets", "seeds") else str
            # --rows with no name: the probe alone
            p.add_argument(name, nargs="*" if f.name == "rows" else "+", type=kind, default=None)
        elif f.name == "probe_pool":
            p.add_argument(name, choices=("mean", "max", "concat"), default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(name, type=kind, default=None)
    p.add_argument("--set", dest="overrides", nargs="+", default=None, help="config overrides")
    p.add_argument(
        "--transfer-set",
        dest="transfer_overrides",
        nargs="+",
        default=None,
        help="config overrides of the rows from the pretrained encoder only (ssl, ssl_al)",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """:class:`Settings` from the parsed arguments (``--quick`` first, then each flag)."""
    s = QUICK if args.quick else Settings()
    changes = {}
    for name in Settings.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    s = replace(s, **changes)
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    return s


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload also written to ``transfer.json``."""
    import torch
    from _common import describe_machine

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    s = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_data(s, cache)
    # Pretrain only for what uses it: the rows from the pretrained encoder, or the probe.
    needs_pretraining = not args.no_probe or any(ROWS[row][0] for row in s.rows)
    checkpoint = pretrain_checkpoint(s, data, cache, args.threads) if needs_pretraining else None

    scores: dict[tuple[str, int, int], np.ndarray] = {}
    weights: dict[tuple[str, int, int], np.ndarray] = {}
    seconds: dict[str, float] = {}
    for seed in s.seeds:
        for budget in s.budgets:
            for row in s.rows:
                _say(f"row {row}, budget {budget} patients, seed {seed}")
                res = run_row(s, data, row, budget, seed, checkpoint, cache, args.threads)
                scores[(row, budget, seed)] = res["probs"]
                if ROWS[row][1]:
                    weights[(row, budget, seed)] = res["weights"]
                seconds[f"{row}_b{budget}_s{seed}"] = round(res["seconds"], 1)

    recs = [data.records[i] for i in data.test_index]
    labels = np.array([r.label for r in recs])
    groups = np.array([r.patient for r in recs])
    aucs, diffs = paired_table(scores, labels, groups, s.rows, PAIRS, s.budgets, s.seeds, s.n_boot)
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_transfer.py "
        + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "settings": asdict(s),
        "machine": describe_machine(),
        "test_images": len(recs),
        "test_positives": int(labels.sum()),
        "pretrain_checkpoint": None if checkpoint is None else str(checkpoint),
        "auc": aucs,
        "diffs": diffs,
    }
    from patchssl.engine.common import build_tiler

    boxes = build_tiler(base_config(s, data, args.threads)).centre_boxes().numpy()
    boxes = boxes.reshape(-1, 4)
    if not args.no_probe:
        from patchssl.probe import pool_patch_features

        feats = {
            s.pretext: probe_features(s, data, checkpoint, cache, args.threads),
            "random": probe_features(s, data, None, cache, args.threads),
        }
        pairs = [(s.pretext, "random")]
        if args.probe_reference:
            feats["supervised"] = reference_features(s, data, cache, args.threads)
            pairs.append(("supervised", s.pretext))
        pooled = {name: pool_patch_features(f, s.probe_pool) for name, f in feats.items()}
        probe = {
            (name, b, k): linear_probe(f, data, b, k)
            for name, f in pooled.items()
            for b in s.budgets
            for k in s.seeds
        }
        payload["probe_auc"], payload["probe_diffs"] = paired_table(
            probe, labels, groups, list(feats), pairs, s.budgets, s.seeds, s.n_boot
        )
        if args.lesion_probe:
            payload["lesion_probe_auc"], payload["lesion_probe_diffs"] = lesion_probe(
                feats, data, boxes, pairs, s.n_boot
            )
    if weights:
        payload["localisation"] = localisation(weights, data, boxes, s.n_boot)
    payload["seconds"] = time.perf_counter() - start
    payload["run_seconds"] = seconds
    tag = args.tag
    (out / f"transfer{tag}.md").write_text(markdown(payload), encoding="utf-8")
    with open(out / f"transfer{tag}.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(
            fh,
            fieldnames=[
                "kind",
                "budget",
                "name",
                "value",
                "ci_low",
                "ci_high",
                "seed_min",
                "seed_max",
            ],
        )
        writer.writeheader()
        for kind, rows, name_key, value_key in (
            ("auc", payload["auc"], "row", "auc"),
            ("diff", payload["diffs"], "pair", "diff"),
            ("probe_auc", payload.get("probe_auc", []), "row", "auc"),
            ("probe_diff", payload.get("probe_diffs", []), "pair", "diff"),
            ("lesion_probe_auc", payload.get("lesion_probe_auc", []), "row", "auc"),
            ("lesion_probe_diff", payload.get("lesion_probe_diffs", []), "pair", "diff"),
        ):
            for r in rows:
                writer.writerow(
                    {
                        "kind": kind,
                        "budget": r["budget"],
                        "name": r[name_key],
                        "value": round(r[value_key], 4),
                        "ci_low": round(r["ci_low"], 4),
                        "ci_high": round(r["ci_high"], 4),
                        "seed_min": round(r["seed_min"], 4),
                        "seed_max": round(r["seed_max"], 4),
                    }
                )
    (out / f"transfer{tag}.json").write_text(
        json.dumps(_json_clean(payload), indent=1) + "\n", encoding="utf-8"
    )
    plot(payload, out / f"transfer{tag}.png")
    print(markdown(payload), flush=True)
    _say(f"done in {payload['seconds'] / 60:.1f} min; results in {out}")
    return payload


if __name__ == "__main__":
    main()
