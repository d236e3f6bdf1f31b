"""Train a tiny LLaVA-style VLM on a synthetic visual question task, with planted outliers.

Part of the fidelity benchmark: no real VLM weights can be downloaded
here, so quantization methods are compared on a tiny VLM that this script trains itself, on a
visual question task that it renders itself. Before training, modality-specific outlier channels
are planted in the language model's hidden state and kept frozen, so that the trained model has to
work with them (a plainly trained tiny VLM has no activation outliers and cannot tell
quantization methods apart):

* text tokens: a few fixed embedding columns hold large, token-varying values (random sign,
  magnitude ``text_outlier_scale * U(0.25, 1)``, times the RMS of the ordinary embedding entries);
* vision tokens: a few *other* fixed channels of the projector output (``linear_2``) get a large
  frozen bias (``vision_outlier_scale``) plus a small frozen token-varying part;
* the RMSNorm weights of the language model are frozen at 1 on all planted channels, so the
  outliers reach the inputs of the q/k/v and gate/up projections in every layer.

Training (plain next-token cross-entropy at the answer positions, AdamW, cosine schedule) uses
two aids, both training-only (evaluation prompts are single questions, the model is a stock
``LlavaForConditionalGeneration``): each training sequence holds one image and several
question/answer pairs, and each image token is also trained to predict, through the LM head, the
colour and shape words of its cell ("zero" for an empty cell). Without the latter the model sat
on the question-prior plateau (about 39% accuracy) for 1500 steps; with it, it reads the image
within a few hundred steps. Questions end with the queried attribute, so that the answer
position's own token is the attention query.

Usage::

    python benchmarks/train_tiny_vlm.py --seed 0            # full model (2500 steps)
    python benchmarks/train_tiny_vlm.py --seed 0 --quick    # tiny model (~30 s), for tests
    python benchmarks/train_tiny_vlm.py --seed 0 --preset mm --threads 1   # both modalities
    python benchmarks/train_tiny_vlm.py --seed 0 --preset transient --threads 1

Measured (busy 2-core machine, --threads 1, --steps 1500): 755k parameters, 608 s of
training, FP accuracy 85.3% and RTN W4A4 52.2% on 1000 held-out questions. The vision outliers
did not survive training (see the report in meta.json); the text ones did. Rerun with the
per-layer report below (same accuracies, 1068 s of training on a busier machine): on vision
tokens the planted vision channels' max|x| is 0.26-0.34x the largest other channel's at the
q/k/v and gate/up inputs of all three layers (0.5-0.6x the median) and on top on no vision
token; 4-bit activations on the vision tokens only cost nothing (85.2%), on the text tokens
only 33 points (52.3%).

Preset ``mm`` (``outlier_guard="scale_lock"``, 1500 steps; ``--model trained-mm`` in
benchmarks/fidelity.py): the model whose vision *and* text outliers survive training. Freezing
the planted values is not enough, because training can grow the ordinary channels instead; so
every scale that sets the ordinary channels' size relative to the planted ones (projector
output, ordinary embedding columns, ordinary RMSNorm weights, each attention / MLP output) is
divided out during training and folded into the weights at the end, and the attention / MLP
outputs never write into the planted channels (:class:`ScaleLocks`). The saved model is a stock
``LlavaForConditionalGeneration``. Measured (seed 0, --threads 1, busy shared 2-core machine,
1000 held-out questions; accuracy in %, FP / RTN W4A4 / RTN W3A3):

=====================  ======================  ======================
question type          ``mm`` (755k params)    ``mm-wide`` (2.74M)
=====================  ======================  ======================
colour_of_shape        100.0 / 58.1 /  8.9     100.0 / 63.7 / 11.3
count_colour           100.0 / 44.3 / 22.7      99.5 / 51.2 / 33.5
count_shape            100.0 / 28.9 / 35.5      97.4 / 63.2 / 25.0
exists                  98.9 / 75.8 / 13.2     100.0 / 75.8 / 17.6
left_of                 38.6 / 47.4 / 12.3      47.4 / 40.4 / 14.0
shape_of_colour        100.0 / 72.9 /  0.0     100.0 / 73.6 /  0.0
side                    43.7 / 29.6 /  0.0      46.5 / 47.9 /  0.0
all                     88.3 / 51.5 / 14.2      88.9 / 61.1 / 16.0
=====================  ======================  ======================

Training took 546 s (``mm``) and 1566 s (``mm-wide``, text hidden 256; close to a 30-minute
budget on a loaded machine). The position questions are not learned: left_of 38.6% and side
43.7% in FP against 50.9% and 35.2% with every image swapped for another sample's (``mm``); the
other five types are at 99-100%. 4-bit activations on the vision tokens only (weights
unquantized) already cost ``mm`` 25 points (88.3 -> 63.3%), on the text tokens only 10 points
(77.9%): the accuracy depends on both modalities' outliers. At the q/k/v and gate/up inputs of
all three layers, on vision tokens the least planted vision channel's max|x| is 1.95-2.98x the
largest other channel's (4.3-8.2x the median) and 96-100% of the vision tokens have the planted
channels as their largest |x|; on text tokens the text channels give 2.63-6.91x (4.1-10.6x the
median), 92-100% of the tokens (``mm-wide``: vision 2.26-3.00x, 99-100%; text 1.62-6.36x,
84-100%). Per layer and site, the numbers are printed by the script and stored in
``meta.json`` (``planted_outliers``, ``accuracy``).

Preset ``transient`` (``--model trained-transient``; text hidden 256 like ``mm-wide``): outliers
of another kind. Two vision channels only (projector bias as above), and eight text channels
that come and go between tokens: each is "on" (``text_outlier_scale * U(0.5, 1)``) for a random
35% of the vocabulary and "off" (log-uniform over three decades below the ordinary RMS)
elsewhere, so its rank within a token jumps between the top and near the bottom, the case
MOCD's rank score was designed for (:func:`text_outlier_values`). Measured (seed 0, --threads 1,
busy shared 2-core machine, 1000 held-out questions): 2.74M parameters, 3186 s of training,
FP 87.6%, RTN W4A4 75.0%, RTN W3A3 27.0%; 4-bit activations on the vision tokens only 77.5%, on
the text tokens only 86.3% (a token carries one to three of the eight channels). On the vision
tokens the two channels stay the largest (2.7-3.9x the next channel, 97-100% of the tokens).

A second run with the same arguments loads the cached model from
``.cache/tiny_vlm/<hash of args>`` instead of retraining. From other scripts::

    from benchmarks.train_tiny_vlm import load_or_train, evaluate_accuracy, make_calibration_dataset
    model, task = load_or_train(seed=0)
    acc = evaluate_accuracy(model, task.eval_samples(1000))
    ds = make_calibration_dataset(task, 128)      # for llmcompressor.oneshot(dataset=ds, ...)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# Bump when the task, the architecture or the training procedure changes: it is part of the cache
# key, so stale cached models are never reused.
FORMAT_VERSION = 4

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "tiny_vlm"

# ---------------------------------------------------------------------------------------------
# Vocabulary (own integer ids, no tokenizer)
# ---------------------------------------------------------------------------------------------

PAD, BOS, IMAGE = "<pad>", "<bos>", "<image>"
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
YES_NO = ("yes", "no")
SIDES = ("left", "right")
_FUNCTION_WORDS = (
    "what",
    "colour",
    "shape",
    "is",
    "the",
    "how",
    "many",
    "objects",
    "object",
    "are",
    "there",
    "a",
    "of",
    "which",
    "side",
    "on",
    "?",
)


def _build_vocab() -> list[str]:
    words = [PAD, BOS, IMAGE, *_FUNCTION_WORDS, *COLOURS, *SHAPES, *NUMBERS, *YES_NO, *SIDES]
    assert len(set(words)) == len(words)
    return words


VOCAB: list[str] = _build_vocab()
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, IMAGE_TOKEN_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[IMAGE]
ANSWER_WORDS: tuple[str, ...] = (*COLOURS, *SHAPES, *NUMBERS, *YES_NO, *SIDES)
ANSWER_TOKEN_IDS: tuple[int, ...] = tuple(TOKEN_ID[w] for w in ANSWER_WORDS)
QUESTION_TYPES = (
    "colour_of_shape",  # what colour is the <shape>        -> colour
    "shape_of_colour",  # which shape is <colour>           -> shape
    "count_colour",  # how many objects are <colour>        -> number
    "count_shape",  # how many objects are <shape>          -> number
    "exists",  # is there a <colour> <shape>                -> yes / no
    "left_of",  # is the <shape> left of the <shape>        -> yes / no
    "side",  # which side is <colour>                       -> left / right
)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyVLMConfig:
    """Everything that determines the trained model (the cache key is a hash of it)."""

    seed: int = 0
    # synthetic images: a grid x grid board of cell x cell pixel cells; one patch per cell
    grid: int = 4
    cell: int = 8
    min_objects: int = 2
    max_objects: int = 5
    # language model (Llama)
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 384
    # vision tower (CLIP)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    # planted outliers (multiples of the RMS of the ordinary channels at planting time)
    n_text_outliers: int = 3
    n_vision_outliers: int = 3
    text_outlier_scale: float = 30.0
    vision_outlier_scale: float = 30.0
    # training
    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    train_questions: int = 4  # question/answer pairs per training sequence
    aux_cell_loss: float = 0.5  # weight of the per-image-token "what is in this cell" loss
    # how the planted outliers are protected from training: "none" (FORMAT_VERSION 4 model:
    # planted values frozen, everything else free) or "scale_lock" (see :class:`ScaleLocks`)
    outlier_guard: str = "none"
    # text outliers: "persistent" (large on every token: text_outlier_scale * U(0.25, 1)) or
    # "transient" (large on some vocabulary tokens only, see :func:`text_outlier_values`)
    text_outlier_mode: str = "persistent"

    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels."""
        return self.grid * self.cell

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens the vision tower produces (CLS dropped by the 'default' strategy)."""
        return self.grid * self.grid

    def cache_key(self) -> str:
        """Short hash of all fields plus the format version.

        Fields added after FORMAT_VERSION 4 (:data:`_KEY_OPTIONAL_DEFAULTS`) enter the hash only
        when they differ from their default, so the keys of the older models stay valid.
        """
        fields = dataclasses.asdict(self)
        for name, default in _KEY_OPTIONAL_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        payload = json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


#: Fields added without a FORMAT_VERSION bump: at these defaults the model (and its cache key)
#: is exactly the one trained before they existed.
_KEY_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "outlier_guard": "none",
    "text_outlier_mode": "persistent",
}

GUARDS = ("none", "scale_lock")
TEXT_OUTLIER_MODES = ("persistent", "transient")
#: ``transient`` text outliers: each planted channel is "on" for this fraction of the
#: vocabulary tokens (magnitude ``text_outlier_scale * U(0.5, 1)``) and "off" for the others,
#: where its magnitude is log-uniform over three decades below the ordinary RMS
TRANSIENT_ON_FRACTION = 0.35
TRANSIENT_OFF_DECADES = 3.0


QUICK_OVERRIDES: dict[str, Any] = dict(
    text_hidden=64,
    text_layers=2,
    text_heads=2,
    text_intermediate=128,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    n_text_outliers=2,
    n_vision_outliers=2,
    steps=100,
    batch_size=32,
    train_questions=2,
    lr=3e-3,
    warmup=20,
)

#: Named configurations (``--preset``). ``mm``: both modalities' outliers survive training
#: (:class:`ScaleLocks`); ``mm-wide``: the same at text hidden size 256; ``transient``: text
#: hidden 256, 2 vision outlier channels and 8 text outlier channels that come and go between
#: tokens (:func:`text_outlier_values`), the case MOCD's rank score was designed for.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "mm": dict(outlier_guard="scale_lock", steps=1500),
    "mm-wide": dict(
        outlier_guard="scale_lock",
        steps=1500,
        text_hidden=256,
        text_heads=4,
        text_intermediate=768,
    ),
    "transient": dict(
        outlier_guard="scale_lock",
        steps=1500,
        text_hidden=256,
        text_heads=4,
        text_intermediate=768,
        n_text_outliers=8,
        n_vision_outliers=2,
        text_outlier_mode="transient",
    ),
}

# ---------------------------------------------------------------------------------------------
# Synthetic task
# ---------------------------------------------------------------------------------------------


def _shape_masks(cell: int) -> np.ndarray:
    """Boolean masks [n_shapes, n_off, n_off, cell, cell] of each shape at each pixel offset."""
    size = cell - 2
    n_off = cell - size + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    square = np.ones((size, size), dtype=bool)
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2.0) ** 2 - 0.5
    triangle = np.abs(xx - c) <= (yy + 1) / 2.0  # apex at the top
    base = np.stack([square, circle, triangle])
    out = np.zeros((len(SHAPES), n_off, n_off, cell, cell), dtype=bool)
    for oy in range(n_off):
        for ox in range(n_off):
            out[:, oy, ox, oy : oy + size, ox : ox + size] = base
    return out


_RGB = np.array(
    [[1.0, 0.1, 0.1], [0.1, 0.9, 0.15], [0.15, 0.35, 1.0], [1.0, 0.9, 0.1]], dtype=np.float32
)


class SyntheticVQATask:
    """Renders boards of coloured shapes and asks single-token-answer questions about them.

    A board is ``grid x grid`` cells of ``cell`` pixels; 2-5 objects (shape x colour) sit in
    distinct cells, with pixel jitter, brightness jitter and background noise. Every question is
    about one board, needs both the image and the question to answer, and has a one-token answer
    from :data:`ANSWER_TOKEN_IDS`.

    Samples are dicts with ``input_ids`` [L] (long), ``attention_mask`` [L], ``pixel_values``
    [3, H, W] (float32, normalised to [-1, 1]), ``answer_position`` (index of the last prompt
    token, whose next-token logits are scored), ``answer_token`` (id), ``labels`` [L] (-100
    except ``labels[answer_position] = answer_token``; HF shifts labels internally, so this is
    for the loss helper here, not for the HF loss) and ``qtype`` (question type name).
    """

    def __init__(self, config: TinyVLMConfig) -> None:
        self.config = config
        self.vocab = VOCAB
        self.token_id = TOKEN_ID
        self.image_token_id = IMAGE_TOKEN_ID
        self.pad_token_id = PAD_ID
        self.answer_token_ids = ANSWER_TOKEN_IDS
        self._masks = _shape_masks(config.cell)

    # -- streams -------------------------------------------------------------------------------

    def _rng(self, split: str) -> np.random.Generator:
        salt = {"train": 0, "eval": 1, "calib": 2, "test": 3}[split]
        return np.random.default_rng([self.config.seed, 7919, salt])

    def train_stream(self, batch_size: int, n_questions: int = 1) -> Iterable[list[dict[str, Any]]]:
        """Endless, seed-deterministic stream of training batches (lists of samples).

        With ``n_questions > 1`` the samples are :meth:`train_sample` sequences.
        """
        rng = self._rng("train")
        while True:
            if n_questions == 1:
                yield [self.sample(rng) for _ in range(batch_size)]
            else:
                yield [self.train_sample(rng, n_questions) for _ in range(batch_size)]

    def eval_samples(self, n: int = 1000) -> list[dict[str, Any]]:
        """Held-out evaluation samples (own random stream, disjoint from training)."""
        rng = self._rng("eval")
        return [self.sample(rng) for _ in range(n)]

    def calibration_samples(self, n: int = 128) -> list[dict[str, Any]]:
        """Calibration samples for quantization (own stream, disjoint from train and eval)."""
        rng = self._rng("calib")
        return [self.sample(rng) for _ in range(n)]

    # -- one sample ----------------------------------------------------------------------------

    def sample_scene(self, rng: np.random.Generator) -> list[tuple[int, int, int]]:
        """A random scene: list of (shape, colour, cell index) with distinct cells."""
        cfg = self.config
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = rng.choice(cfg.grid * cfg.grid, size=n, replace=False)
        return [
            (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))), int(c)) for c in cells
        ]

    def render(self, scene: Sequence[tuple[int, int, int]], rng: np.random.Generator) -> np.ndarray:
        """Render a scene to a float32 image [3, H, W] normalised to [-1, 1]."""
        cfg = self.config
        img = rng.normal(0.0, 0.03, size=(3, cfg.image_size, cfg.image_size)).astype(np.float32)
        n_off = self._masks.shape[1]
        for shape, colour, cell in scene:
            r, c = divmod(cell, cfg.grid)
            oy, ox = rng.integers(n_off, size=2)
            mask = self._masks[shape, oy, ox]
            rgb = _RGB[colour] * rng.uniform(0.8, 1.0)
            ys, xs = r * cfg.cell, c * cfg.cell
            patch = img[:, ys : ys + cfg.cell, xs : xs + cfg.cell]
            patch[:, mask] = rgb[:, None]
        return np.clip(img, 0.0, 1.0) * 2.0 - 1.0

    def question(
        self, scene: Sequence[tuple[int, int, int]], rng: np.random.Generator
    ) -> tuple[str, list[str], str]:
        """Pick an applicable question type; return (qtype, question words, answer word)."""
        cfg = self.config
        shapes = [s for s, _, _ in scene]
        colours = [c for _, c, _ in scene]
        uniq_shapes = [s for s in range(len(SHAPES)) if shapes.count(s) == 1]
        uniq_colours = [c for c in range(len(COLOURS)) if colours.count(c) == 1]
        col_of = {s: col for s, col, _ in scene}
        pos_of_shape = {s: cell % cfg.grid for s, _, cell in scene}
        pos_of_colour = {c: cell % cfg.grid for _, c, cell in scene}
        left_pairs = [
            (a, b)
            for a in uniq_shapes
            for b in uniq_shapes
            if a != b and pos_of_shape[a] != pos_of_shape[b]
        ]
        applicable = ["count_colour", "count_shape", "exists"]
        if uniq_shapes:
            applicable.append("colour_of_shape")
        if uniq_colours:
            applicable += ["shape_of_colour", "side"]
        if left_pairs:
            applicable.append("left_of")
        applicable.sort(key=QUESTION_TYPES.index)
        qtype = applicable[int(rng.integers(len(applicable)))]

        if qtype == "colour_of_shape":
            s = uniq_shapes[int(rng.integers(len(uniq_shapes)))]
            return qtype, ["what", "colour", "is", "the", SHAPES[s]], COLOURS[col_of[s]]
        if qtype == "shape_of_colour":
            c = uniq_colours[int(rng.integers(len(uniq_colours)))]
            s = shapes[colours.index(c)]
            return qtype, ["which", "shape", "is", COLOURS[c]], SHAPES[s]
        if qtype == "count_colour":
            c = int(rng.integers(len(COLOURS)))
            words = ["how", "many", "objects", "are", COLOURS[c]]
            return qtype, words, NUMBERS[colours.count(c)]
        if qtype == "count_shape":
            s = int(rng.integers(len(SHAPES)))
            words = ["how", "many", "objects", "are", SHAPES[s]]
            return qtype, words, NUMBERS[shapes.count(s)]
        if qtype == "exists":
            present = set(zip(shapes, colours, strict=True))
            want = bool(rng.integers(2))
            pool = [
                (s, c)
                for s in range(len(SHAPES))
                for c in range(len(COLOURS))
                if ((s, c) in present) == want
            ]
            s, c = pool[int(rng.integers(len(pool)))]
            words = ["is", "there", "a", COLOURS[c], SHAPES[s]]
            return qtype, words, "yes" if (s, c) in present else "no"
        if qtype == "left_of":
            a, b = left_pairs[int(rng.integers(len(left_pairs)))]
            words = ["is", "the", SHAPES[a], "left", "of", "the", SHAPES[b]]
            return qtype, words, "yes" if pos_of_shape[a] < pos_of_shape[b] else "no"
        # side
        c = uniq_colours[int(rng.integers(len(uniq_colours)))]
        words = ["which", "side", "is", COLOURS[c]]
        return qtype, words, "left" if pos_of_colour[c] < cfg.grid // 2 else "right"

    def encode(self, words: Sequence[str]) -> list[int]:
        """Prompt token ids: <bos> <image> x num_image_tokens, then the question words."""
        return (
            [BOS_ID]
            + [IMAGE_TOKEN_ID] * self.config.num_image_tokens
            + [TOKEN_ID[w] for w in words]
        )

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """Draw one sample (scene, image, question, answer) from ``rng``."""
        scene = self.sample_scene(rng)
        image = self.render(scene, rng)
        qtype, words, answer = self.question(scene, rng)
        ids = torch.tensor(self.encode(words), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[-1] = TOKEN_ID[answer]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(image),
            "answer_position": len(ids) - 1,
            "answer_token": TOKEN_ID[answer],
            "labels": labels,
            "qtype": qtype,
        }

    def train_sample(self, rng: np.random.Generator, n_questions: int) -> dict[str, Any]:
        """A training sequence: one image, then ``n_questions`` question/answer pairs.

        ``<bos> <image>... q1 a1 q2 a2 ...`` with the loss on every answer (teacher forcing):
        several answers per image forward give the model far more grounding signal per step
        than one. Evaluation uses single-question prompts (the layout of ``q1``).
        """
        scene = self.sample_scene(rng)
        image = self.render(scene, rng)
        ids = self.encode([])
        positions, answers = [], []
        for _ in range(n_questions):
            _, words, answer = self.question(scene, rng)
            ids += [TOKEN_ID[w] for w in words]
            positions.append(len(ids) - 1)
            answers.append(TOKEN_ID[answer])
            ids.append(TOKEN_ID[answer])
        ids_t = torch.tensor(ids[:-1], dtype=torch.long)  # the last answer is never an input
        # auxiliary dense target per image token: what its cell holds (colour and shape word,
        # or "zero" for an empty cell)
        cells = torch.full((self.config.num_image_tokens, 2), TOKEN_ID["zero"], dtype=torch.long)
        for shape, colour, cell in scene:
            cells[cell] = torch.tensor([TOKEN_ID[COLOURS[colour]], TOKEN_ID[SHAPES[shape]]])
        return {
            "input_ids": ids_t,
            "attention_mask": torch.ones_like(ids_t),
            "pixel_values": torch.from_numpy(image),
            "answer_position": torch.tensor(positions),
            "answer_token": torch.tensor(answers),
            "cell_targets": cells,
        }

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids back to words (image placeholders collapsed)."""
        words = [VOCAB[int(i)] for i in ids if int(i) != IMAGE_TOKEN_ID]
        return " ".join(words)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch: input_ids, attention_mask, pixel_values, answer_*."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = s["input_ids"]
        mask[i, :n] = 1
    extra = {}
    if all("cell_targets" in s for s in samples):
        extra["cell_targets"] = torch.stack([s["cell_targets"] for s in samples])
    return {
        **extra,
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "answer_position": torch.stack([torch.as_tensor(s["answer_position"]) for s in samples]),
        "answer_token": torch.stack([torch.as_tensor(s["answer_token"]) for s in samples]),
    }


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_hf_config(cfg: TinyVLMConfig):
    """The LlavaConfig (Llama text model, CLIP vision tower) for ``cfg``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=None,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.cell,
        num_channels=3,
        projection_dim=cfg.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


@dataclasses.dataclass
class PlantedOutliers:
    """Which hidden channels of the language model carry planted outliers, and their values."""

    text_channels: list[int]
    vision_channels: list[int]
    text_values: torch.Tensor  # [vocab, n_text] frozen embedding entries
    vision_bias: torch.Tensor  # [n_vision] frozen projector linear_2 bias entries
    vision_weight: torch.Tensor  # [n_vision, hidden] frozen projector linear_2 weight rows
    # "scale_lock": also the attention / MLP output rows of all planted channels are frozen at 0
    guard: str = "none"

    @property
    def channels(self) -> list[int]:
        """All planted channels (text, then vision)."""
        return self.text_channels + self.vision_channels


def choose_planted_channels(cfg: TinyVLMConfig) -> tuple[list[int], list[int]]:
    """Seed-determined, disjoint text and vision outlier channel indices."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
    perm = torch.randperm(cfg.text_hidden, generator=g).tolist()
    text = sorted(perm[: cfg.n_text_outliers])
    vision = sorted(perm[cfg.n_text_outliers : cfg.n_text_outliers + cfg.n_vision_outliers])
    return text, vision


def text_outlier_values(
    cfg: TinyVLMConfig, n_tokens: int, n_channels: int, g: torch.Generator
) -> torch.Tensor:
    """Frozen embedding entries ``[n_tokens, n_channels]`` of the planted text channels.

    ``persistent``: ``text_outlier_scale * U(0.25, 1)`` with a random sign: large on every
    token. ``transient``: per (token, channel) "on" with probability
    :data:`TRANSIENT_ON_FRACTION` (``text_outlier_scale * U(0.5, 1)``), else "off":
    log-uniform over :data:`TRANSIENT_OFF_DECADES` decades below the ordinary entries' RMS, so
    the channel's rank within a token jumps between the top and anywhere below the middle.
    Both in units of the ordinary entries' RMS (1 at planting time).
    """
    if cfg.text_outlier_mode not in TEXT_OUTLIER_MODES:
        raise ValueError(f"text_outlier_mode {cfg.text_outlier_mode!r} not in {TEXT_OUTLIER_MODES}")
    shape = (n_tokens, n_channels)
    if cfg.text_outlier_mode == "persistent":  # draws kept in the order of the original models
        mag = cfg.text_outlier_scale * torch.empty(shape).uniform_(0.25, 1.0, generator=g)
    else:
        on = torch.rand(shape, generator=g) < TRANSIENT_ON_FRACTION
        big = cfg.text_outlier_scale * torch.empty(shape).uniform_(0.5, 1.0, generator=g)
        decades = torch.empty(shape).uniform_(-TRANSIENT_OFF_DECADES, 0.0, generator=g)
        mag = torch.where(on, big, 10.0**decades)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return mag * sign


def build_model(cfg: TinyVLMConfig) -> tuple[nn.Module, PlantedOutliers]:
    """Random-init LlavaForConditionalGeneration with the planted outliers (deterministic)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    hf_cfg = build_hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(hf_cfg)
    model.eval()

    text_ch, vision_ch = choose_planted_channels(cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 29)
    d = cfg.text_hidden
    with torch.no_grad():
        # data-dependent projector scale: image tokens enter the language model at unit RMS, like
        # the text embeddings below (the default init gives ~0.03, which the planted outliers
        # would drown, and training then never learns to read the image)
        task = SyntheticVQATask(cfg)
        rng = np.random.default_rng([cfg.seed, 7919, 99])
        images = torch.stack(
            [torch.from_numpy(task.render(task.sample_scene(rng), rng)) for _ in range(64)]
        )
        feats = model.model.get_image_features(pixel_values=images).pooler_output
        rms = torch.cat(list(feats)).pow(2).mean().sqrt()
        lin2 = model.model.multi_modal_projector.linear_2
        lin2.weight.div_(rms)
        lin2.bias.div_(rms)
        # ordinary embedding entries at unit scale, so the outlier scales are relative to them
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        # text outliers: token-varying magnitude and sign on a few fixed embedding columns
        text_values = text_outlier_values(cfg, emb.shape[0], len(text_ch), g)
        emb[:, text_ch] = text_values
        # vision outliers: large fixed bias (random sign) on a few projector output channels,
        # plus a small frozen token-varying part through the weight rows
        vsign = torch.randint(0, 2, (len(vision_ch),), generator=g) * 2 - 1
        vision_bias = cfg.vision_outlier_scale * vsign.float()
        vision_weight = torch.randn(len(vision_ch), d, generator=g) * (
            0.1 * cfg.vision_outlier_scale / math.sqrt(d)
        )
        lin2.bias[vision_ch] = vision_bias
        lin2.weight[vision_ch] = vision_weight
    if cfg.outlier_guard not in GUARDS:
        raise ValueError(f"outlier_guard {cfg.outlier_guard!r} not in {GUARDS}")
    planted = PlantedOutliers(
        text_channels=text_ch,
        vision_channels=vision_ch,
        text_values=text_values.clone(),
        vision_bias=vision_bias.clone(),
        vision_weight=vision_weight.clone(),
        guard=cfg.outlier_guard,
    )
    if planted.guard == "scale_lock":
        restore_planted(model, planted)
    return model, planted


def _lm_norms(model: nn.Module) -> list[nn.Module]:
    lm = model.model.language_model
    norms = [lm.norm]
    for layer in lm.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return norms


@torch.no_grad()
def restore_planted(model: nn.Module, planted: PlantedOutliers) -> None:
    """Write the frozen planted values back (called after every optimizer step)."""
    emb = model.get_input_embeddings().weight
    emb[:, planted.text_channels] = planted.text_values
    lin2 = model.model.multi_modal_projector.linear_2
    lin2.bias[planted.vision_channels] = planted.vision_bias
    lin2.weight[planted.vision_channels] = planted.vision_weight
    ch = planted.text_channels + planted.vision_channels
    for norm in _lm_norms(model):
        norm.weight[ch] = 1.0
    if planted.guard == "scale_lock":
        for w in _residual_writers(model):
            w[ch] = 0.0


def _residual_writers(model: nn.Module) -> list[torch.Tensor]:
    """Weights of the Linears that write into the residual stream (o_proj, down_proj)."""
    out = []
    for layer in model.model.language_model.layers:
        out += [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
    return out


def _zero_planted_grads(model: nn.Module, planted: PlantedOutliers) -> None:
    emb = model.get_input_embeddings().weight
    if emb.grad is not None:
        emb.grad[:, planted.text_channels] = 0
    lin2 = model.model.multi_modal_projector.linear_2
    for p in (lin2.weight, lin2.bias):
        if p.grad is not None:
            p.grad[planted.vision_channels] = 0
    ch = planted.text_channels + planted.vision_channels
    for norm in _lm_norms(model):
        if norm.weight.grad is not None:
            norm.weight.grad[ch] = 0
    if planted.guard == "scale_lock":
        for w in _residual_writers(model):
            if w.grad is not None:
                w.grad[ch] = 0


class ScaleLocks:
    """Training-time scale locks of the ``scale_lock`` guard (parameter-free, folded at the end).

    Why: with the planted values merely frozen, training is free to scale the *ordinary*
    channels up until the planted ones are no longer outliers; the projector did exactly that to
    the vision channels of the FORMAT_VERSION 4 model, and the attention / MLP outputs do it to
    both modalities in the deeper layers (measured with the first three locks below only: the
    ordinary vision-token residual reached RMS 19 at the input of layer 2, against planted
    values of about 30, and only 13% of the vision tokens there had the planted channels on
    top). Here every scale that sets an ordinary channel's size relative to a planted one is
    divided out in the forward pass, so the loss does not depend on it and training cannot move
    it:

    * projector output (``linear_2``): the channels other than the vision-planted ones are
      divided by their RMS over the batch's vision tokens (unit RMS, like the text embeddings),
      and the token-varying part ``W_p x`` of each planted vision channel by its own RMS times
      ``1 / (0.1 * scale)``: a planted vision channel is ``+-scale`` plus a token-varying part
      of RMS ``0.1 * scale``;
    * input embedding: the columns other than the text-planted ones are divided by their RMS
      over the table;
    * every RMSNorm of the language model: the ordinary weights are divided by their RMS (the
      planted weights stay frozen at 1);
    * every residual write (``o_proj``, ``down_proj``): the output is divided by its RMS over
      the batch's tokens, so each of them adds unit RMS to the residual stream.

    With the planted channels' o_proj / down_proj rows frozen at 0 (:func:`restore_planted`), the
    planted values reach the q/k/v and gate/up inputs of every layer unchanged. The data-dependent
    divisors (projector, residual writes) are batch statistics in training mode and running
    averages of them in eval mode, as in batch normalisation; :meth:`fold` writes the running
    and the static divisors into the weights and removes the hooks, so the saved model is a stock
    ``LlavaForConditionalGeneration``.
    """

    momentum = 0.95  # of the running divisors

    def __init__(self, model: nn.Module, planted: PlantedOutliers, vision_scale: float) -> None:
        self.model = model
        self.planted = planted
        self.vision_scale = vision_scale
        d = model.config.text_config.hidden_size
        # the channels each site may scale: on vision tokens everything but the vision-planted
        # channels, on text tokens everything but the text-planted ones; the norms' planted
        # weights are frozen for both modalities
        self.vision_mask = torch.zeros(d, dtype=torch.bool)
        self.vision_mask[planted.vision_channels] = True
        text_mask = torch.zeros(d, dtype=torch.bool)
        text_mask[planted.text_channels] = True
        self.embedding_ordinary = ~text_mask
        self.norm_ordinary = ~(text_mask | self.vision_mask)
        self.running: dict[nn.Module, torch.Tensor] = {}
        lm = model.model.language_model
        self.projector = model.model.multi_modal_projector.linear_2
        self.writers = [
            m for layer in lm.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
        ]
        self.handles = [
            self.projector.register_forward_hook(self._projector_hook),
            lm.embed_tokens.register_forward_hook(self._divider(self.embedding_ordinary)),
        ]
        divide_norm = self._divider(self.norm_ordinary)
        self.handles += [n.register_forward_hook(divide_norm) for n in _lm_norms(model)]
        self.handles += [w.register_forward_hook(self._writer_hook) for w in self.writers]

    @staticmethod
    def _rms(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """RMS of the entries of ``weight`` (last dim = hidden channels) in channels ``mask``."""
        return weight[..., mask].pow(2).mean().sqrt()

    def _divider(self, mask: torch.Tensor):
        """Forward hook dividing the output channels ``mask`` by the RMS of the weight there."""

        def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            r = self._rms(module.weight, mask)
            return out * torch.where(mask, 1.0 / r, torch.ones_like(r))

        return hook

    def _divisor(self, module: nn.Module, batch_divisor: torch.Tensor) -> torch.Tensor:
        """Batch divisor in training mode (updating the running one), else the running one."""
        running = self.running.get(module)
        if module.training or running is None:
            d = batch_divisor.detach()
            m = self.momentum
            self.running[module] = d if running is None else m * running + (1 - m) * d
            return batch_divisor
        return running

    def projector_divisor(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-channel batch divisor of ``linear_2``'s output ``y`` (without the planted bias)."""
        z = (y - torch.where(self.vision_mask, bias, 0.0)).flatten(0, -2)
        r_ord = z[:, ~self.vision_mask].pow(2).mean().sqrt()
        r_vis = z.pow(2).mean(0).sqrt() / (0.1 * self.vision_scale)
        return torch.where(self.vision_mask, r_vis, r_ord).clamp(min=1e-6)

    def _projector_hook(self, module: nn.Module, _args: tuple, y: torch.Tensor) -> torch.Tensor:
        c = torch.where(self.vision_mask, module.bias.detach(), 0.0)
        return (y - c) / self._divisor(module, self.projector_divisor(y, module.bias.detach())) + c

    def _writer_hook(self, module: nn.Module, _args: tuple, y: torch.Tensor) -> torch.Tensor:
        return y / self._divisor(module, y.pow(2).mean().sqrt().clamp(min=1e-6))

    @torch.no_grad()
    def fold(self) -> None:
        """Write the locked scales into the weights, remove the hooks, update ``planted``."""
        for h in self.handles:
            h.remove()
        self.handles = []
        lin2 = self.projector
        scale = self.running[lin2]
        lin2.weight.div_(scale[:, None])
        lin2.bias[~self.vision_mask] /= scale[~self.vision_mask]
        self.planted.vision_weight = lin2.weight[self.planted.vision_channels].clone()
        for w in self.writers:
            w.weight.div_(self.running[w])
        emb = self.model.get_input_embeddings().weight
        emb[:, self.embedding_ordinary] /= self._rms(emb, self.embedding_ordinary)
        for norm in _lm_norms(self.model):
            norm.weight[self.norm_ordinary] /= self._rms(norm.weight, self.norm_ordinary)


def reference_images(cfg: TinyVLMConfig, n: int = 256) -> torch.Tensor:
    """Fixed images from their own random stream (to check the folded projector's scale)."""
    task = SyntheticVQATask(cfg)
    rng = np.random.default_rng([cfg.seed, 7919, 98])
    return torch.stack(
        [torch.from_numpy(task.render(task.sample_scene(rng), rng)) for _ in range(n)]
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits [B, vocab] at each sample's answer position."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    idx = batch["answer_position"]
    rows = torch.arange(len(idx))
    if idx.ndim == 2:  # several answers per sequence (training sequences)
        rows = rows[:, None].expand_as(idx)
    return out.logits[rows, idx]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    samples: Sequence[dict[str, Any]],
    batch_size: int = 128,
    restrict_to_answers: bool = True,
    per_type: bool = False,
) -> float | tuple[float, dict[str, float]]:
    """Answer accuracy: argmax of the next-token logits at the answer position.

    With ``restrict_to_answers`` the argmax is taken over the answer vocabulary only
    (:data:`ANSWER_TOKEN_IDS`), otherwise over the full vocabulary. With ``per_type`` also
    returns a dict of accuracy per question type.
    """
    was_training = model.training
    model.eval()
    answer_ids = torch.tensor(ANSWER_TOKEN_IDS)
    correct: list[bool] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = collate(chunk)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = answer_logits(model, batch).float().cpu()
        if restrict_to_answers:
            pred = answer_ids[logits[:, answer_ids].argmax(-1)]
        else:
            pred = logits.argmax(-1)
        correct += (pred == batch["answer_token"].cpu()).tolist()
    model.train(was_training)
    acc = float(np.mean(correct)) if correct else float("nan")
    if not per_type:
        return acc
    by_type: dict[str, list[bool]] = {}
    for s, c in zip(samples, correct, strict=True):
        by_type.setdefault(s.get("qtype", "all"), []).append(c)
    return acc, {k: float(np.mean(v)) for k, v in sorted(by_type.items())}


# ---------------------------------------------------------------------------------------------
# RTN W4A4 fake quantization (self-contained check; not the project's quantizer)
# ---------------------------------------------------------------------------------------------


def fake_quant_sym(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization with an absmax scale along ``dim``."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-8) / qmax
    return (x / scale).round().clamp(-qmax - 1, qmax) * scale


def rtn_fake_quant(
    model: nn.Module, w_bits: int = 4, a_bits: int = 4, tokens: str = "all"
) -> nn.Module:
    """Copy of ``model`` with RTN fake quantization on every Linear of the language model.

    Weights: per-output-channel symmetric ``w_bits``. Activations: per-token symmetric
    ``a_bits`` on each Linear input (forward-pre hook, dynamic absmax). The vision tower,
    projector and lm_head stay in full precision. ``tokens`` ("all", "vision", "text") limits
    the activation quantization to the image-token or the other positions (a diagnostic: which
    modality's activations the accuracy loss comes from); the copy must then be called with
    ``input_ids``.
    """
    if tokens not in ("all", "vision", "text"):
        raise ValueError(f"tokens must be 'all', 'vision' or 'text', not {tokens!r}")
    qmodel = copy.deepcopy(model)
    state: dict[str, torch.Tensor] = {}

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q = fake_quant_sym(x, a_bits, dim=-1)
        if tokens != "all":
            q = torch.where(state["mask"][..., None], q, x)
        return (q, *args[1:])

    if tokens != "all":

        def remember_tokens(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            image = ids == IMAGE_TOKEN_ID
            state["mask"] = image if tokens == "vision" else ~image

        qmodel.register_forward_pre_hook(remember_tokens, with_kwargs=True)

    for module in qmodel.model.language_model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(fake_quant_sym(module.weight, w_bits, dim=1))
            module.register_forward_pre_hook(pre_hook)
    return qmodel


@torch.no_grad()
def channel_absmax_at_linear_inputs(
    model: nn.Module, samples: Sequence[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Per-channel max |x| at the input of every language-model Linear, over ``samples``.

    Also returns the key ``"hidden_states/<i>"`` for each residual-stream hidden state.
    """
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().flatten(0, -2).amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        return hook

    for name, module in model.model.language_model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        batch = collate(samples)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=True,
        )
        m = batch["attention_mask"].bool()
        for i, h in enumerate(out.hidden_states):
            stats[f"hidden_states/{i}"] = h[m].abs().amax(0)
    finally:
        for h in handles:
            h.remove()
    return stats


def outlier_ratio(absmax: torch.Tensor, channels: Sequence[int]) -> float:
    """min over ``channels`` of max|x|, divided by the median channel's max|x|."""
    return float(absmax[list(channels)].min() / absmax.median().clamp(min=1e-12))


@torch.no_grad()
def planted_outlier_report(
    model: nn.Module,
    samples: Sequence[dict[str, Any]],
    text_channels: Sequence[int],
    vision_channels: Sequence[int],
) -> dict[str, dict[str, dict[str, float]]]:
    """Are the planted channels still outliers, on their own modality, at every layer?

    At the input of ``q_proj`` (= that of k/v_proj) and of ``gate_proj`` (= that of up_proj) of
    every language-model layer, on the vision tokens for the vision-planted channels and on the
    text tokens (every non-image position, BOS included) for the text-planted ones:

    * ``ratio_to_rest``: min over the planted channels of the channel's max|x| over the tokens,
      divided by the largest max|x| of any other channel (> 1: the planted channels are the
      largest);
    * ``ratio_to_median``: the same numerator over the median channel's max|x|
      (:func:`outlier_ratio`);
    * ``tokens_planted_top``: fraction of the tokens whose ``len(planted)`` largest |x| are
      exactly the planted channels.

    Returns ``{site: {"vision": {...}, "text": {...}}}``, sites named
    ``layers.<i>.self_attn.q_proj`` / ``layers.<i>.mlp.gate_proj``.
    """
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    lm = model.model.language_model
    sites = {}
    for i, layer in enumerate(lm.layers):
        sites[f"layers.{i}.self_attn.q_proj"] = layer.self_attn.q_proj
        sites[f"layers.{i}.mlp.gate_proj"] = layer.mlp.gate_proj

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            inputs[name] = args[0].detach().float()

        return hook

    for name, module in sites.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        batch = collate(samples)
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
    finally:
        for h in handles:
            h.remove()
    valid = batch["attention_mask"].bool()
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    masks = {"vision": image & valid, "text": ~image & valid}
    planted = {"vision": list(vision_channels), "text": list(text_channels)}
    report: dict[str, dict[str, dict[str, float]]] = {}
    for name, x in inputs.items():
        report[name] = {}
        for modality, mask in masks.items():
            a = x[mask].abs()  # [tokens, hidden]
            ch = planted[modality]
            rest = torch.ones(a.shape[-1], dtype=torch.bool)
            rest[ch] = False
            absmax = a.amax(0)
            top = a.topk(len(ch), dim=-1).indices.sort(-1).values
            report[name][modality] = {
                "ratio_to_rest": float(absmax[ch].min() / absmax[rest].max().clamp(min=1e-12)),
                "ratio_to_median": outlier_ratio(absmax, ch),
                "tokens_planted_top": float(
                    (top == torch.tensor(sorted(ch))).all(-1).float().mean()
                ),
            }
    return report


def shuffled_images(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples with each image replaced by the next sample's (an image-blind reference)."""
    n = len(samples)
    return [
        dict(s, pixel_values=samples[(i + 1) % n]["pixel_values"]) for i, s in enumerate(samples)
    ]


def accuracy_report(
    model: nn.Module, samples: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Accuracy overall and per question type: FP, RTN at W4A4 / W3A3, and diagnostics.

    Keys: ``fp``, ``rtn_w4a4``, ``rtn_w3a3``, ``rtn_w16a4_vision_tokens`` / ``_text_tokens``
    (4-bit activations on one modality's positions only, weights unquantized: which modality's
    outliers the loss comes from) and ``fp_shuffled_images`` (FP model, every image swapped for
    another sample's: what the questions alone give). Each value is
    ``{"all": accuracy, "by_type": {question type: accuracy}}``.
    """
    variants: dict[str, tuple[nn.Module, Sequence[dict[str, Any]]]] = {
        "fp": (model, samples),
        "rtn_w4a4": (rtn_fake_quant(model, 4, 4), samples),
        "rtn_w3a3": (rtn_fake_quant(model, 3, 3), samples),
        "rtn_w16a4_vision_tokens": (rtn_fake_quant(model, 16, 4, tokens="vision"), samples),
        "rtn_w16a4_text_tokens": (rtn_fake_quant(model, 16, 4, tokens="text"), samples),
        "fp_shuffled_images": (model, shuffled_images(samples)),
    }
    out = {}
    for name, (m, s) in variants.items():
        acc, by_type = evaluate_accuracy(m, s, per_type=True)
        out[name] = {"all": acc, "by_type": by_type}
    return out


def format_report(accuracy: dict[str, dict[str, Any]], outliers: dict[str, Any]) -> str:
    """The accuracy and outlier reports as plain-text tables."""
    names = list(accuracy)
    short = {
        "fp": "FP",
        "rtn_w4a4": "W4A4",
        "rtn_w3a3": "W3A3",
        "rtn_w16a4_vision_tokens": "A4 vis",
        "rtn_w16a4_text_tokens": "A4 txt",
        "fp_shuffled_images": "FP shuf",
    }
    lines = [
        "accuracy (RTN fake quant; 'A4 vis/txt': 4-bit activations on that modality's "
        "tokens only, W16; 'FP shuf': FP with mismatched images)"
    ]
    lines.append(f"  {'question type':16s}" + "".join(f"{short.get(n, n):>9s}" for n in names))
    types = list(accuracy["fp"]["by_type"])
    for t in [*types, "all"]:
        vals = [accuracy[n]["all"] if t == "all" else accuracy[n]["by_type"][t] for n in names]
        lines.append(f"  {t:16s}" + "".join(f"{v:9.3f}" for v in vals))
    lines.append(
        "planted outliers at the linear inputs (per modality, on that modality's tokens): "
        "min planted max|x| / max other max|x|, / median max|x|, fraction of tokens with the "
        "planted channels on top"
    )
    for site, by_mod in outliers.items():
        cells = "  ".join(
            f"{m} {r['ratio_to_rest']:6.2f} {r['ratio_to_median']:7.1f} "
            f"{r['tokens_planted_top']:5.3f}"
            for m, r in by_mod.items()
        )
        lines.append(f"  {site:26s} {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training and cache
# ---------------------------------------------------------------------------------------------


def train(
    cfg: TinyVLMConfig, progress: bool = True, log_every: int = 125
) -> tuple[nn.Module, PlantedOutliers, SyntheticVQATask]:
    """Build and train the model on the synthetic task (CPU, deterministic for ``cfg.seed``)."""
    task = SyntheticVQATask(cfg)
    model, planted = build_model(cfg)
    locks = None
    if planted.guard == "scale_lock":
        locks = ScaleLocks(model, planted, cfg.vision_outlier_scale)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    stream = iter(task.train_stream(cfg.batch_size, cfg.train_questions))
    eval_small = task.eval_samples(256)
    bar = tqdm(range(cfg.steps), desc="train tiny VLM", disable=not progress)
    ema = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = collate(next(stream))
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
        pos = batch["answer_position"]
        logits = out.logits[torch.arange(len(pos))[:, None].expand_as(pos), pos]
        loss = F.cross_entropy(logits.float().flatten(0, -2), batch["answer_token"].flatten())
        if cfg.aux_cell_loss > 0 and "cell_targets" in batch:
            # dense grounding signal: each image token predicts its cell's colour and shape word
            img_logits = out.logits[:, 1 : 1 + cfg.num_image_tokens].float()
            target = torch.zeros_like(img_logits)
            half = torch.full_like(img_logits[..., :2], 0.5)
            target.scatter_add_(-1, batch["cell_targets"], half)
            aux = F.cross_entropy(img_logits.flatten(0, 1), target.flatten(0, 1))
            loss = loss + cfg.aux_cell_loss * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _zero_planted_grads(model, planted)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        restore_planted(model, planted)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if log_every and (step + 1) % log_every == 0 and step + 1 < cfg.steps:
            acc = evaluate_accuracy(model, eval_small)
            model.train()
            tqdm.write(f"step {step + 1}: loss {ema:.3f}, eval acc (256) {acc:.3f}")
    model.eval()
    if locks is not None:
        locks.fold()
        restore_planted(model, planted)  # no-op: the folded values are the frozen ones
    return model, planted, task


def _cfg_from_args(
    seed: int, quick: bool, overrides: dict[str, Any] | None, preset: str = "default"
) -> TinyVLMConfig:
    """Config from a preset, then the quick-mode sizes (if ``quick``), then ``overrides``."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} not in {sorted(PRESETS)}")
    kw: dict[str, Any] = dict(PRESETS[preset])
    if quick:
        kw.update(QUICK_OVERRIDES)
    kw.update(overrides or {})
    return TinyVLMConfig(seed=seed, **kw)


def cache_path(cfg: TinyVLMConfig, cache_dir: str | Path | None = None) -> Path:
    """Folder of the cached model for ``cfg`` (default root: ``.cache/tiny_vlm``)."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_ROOT
    return root / cfg.cache_key()


def load_or_train(
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    n_eval: int = 1000,
    progress: bool = True,
    force: bool = False,
    threads: int = 2,
    preset: str = "default",
) -> tuple[nn.Module, SyntheticVQATask]:
    """Load the trained tiny VLM from the cache, or train and cache it.

    Args:
        seed: seed of the model init, the planted channels, and the data streams.
        quick: tiny config and few steps (about half a minute), for tests.
        cache_dir: cache root; the model lives in ``<cache_dir>/<hash of config>``.
        overrides: TinyVLMConfig fields to change (part of the cache key).
        n_eval: held-out samples for the accuracies stored in ``meta.json``.
        progress: show tqdm bars and messages.
        force: retrain even if a cached model exists.
        threads: ``torch.set_num_threads`` value (results are bitwise reproducible for a fixed
            thread count; on a busy machine 1 thread can be several times faster than 2).
        preset: a :data:`PRESETS` name; ``"mm"`` is the model whose vision *and* text outliers
            survive training (applied before ``quick`` and ``overrides``).

    Returns:
        ``(model, task)``: an eval-mode ``LlavaForConditionalGeneration`` loaded from its cache
        folder (so ``model.config.name_or_path`` is a real folder, as llm-compressor's
        ``oneshot`` requires), and the :class:`SyntheticVQATask`; ``task.meta`` holds the
        metadata (planted channels, accuracies, ...), ``task.model_dir`` the folder.
    """
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    cfg = _cfg_from_args(seed, quick, overrides, preset)
    out = cache_path(cfg, cache_dir)
    meta_file = out / "meta.json"
    if force or not meta_file.exists():
        t0 = time.time()
        model, planted, task = train(cfg, progress=progress)
        train_s = time.time() - t0
        samples = task.eval_samples(n_eval)
        fp_acc, fp_types = evaluate_accuracy(model, samples, per_type=True)
        rtn_acc, rtn_types = evaluate_accuracy(rtn_fake_quant(model, 4, 4), samples, per_type=True)
        stats = channel_absmax_at_linear_inputs(model, task.calibration_samples(64))
        q_in = stats["layers.0.self_attn.q_proj"]
        accuracy = accuracy_report(model, samples)
        outliers = planted_outlier_report(
            model, task.calibration_samples(64), planted.text_channels, planted.vision_channels
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "config_hash": cfg.cache_key(),
            "config": dataclasses.asdict(cfg),
            "seed": seed,
            "planted_text_channels": planted.text_channels,
            "planted_vision_channels": planted.vision_channels,
            "vocab": VOCAB,
            "image_token_id": IMAGE_TOKEN_ID,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "answer_token_ids": list(ANSWER_TOKEN_IDS),
            "num_image_tokens": cfg.num_image_tokens,
            "question_types": list(QUESTION_TYPES),
            "n_eval": n_eval,
            "fp_accuracy": fp_acc,
            "fp_accuracy_by_type": fp_types,
            "rtn_w4a4_accuracy": rtn_acc,
            "rtn_w4a4_accuracy_by_type": rtn_types,
            "q_proj0_input_outlier_ratio_text": outlier_ratio(q_in, planted.text_channels),
            "q_proj0_input_outlier_ratio_vision": outlier_ratio(q_in, planted.vision_channels),
            "train_seconds": train_s,
            "train_threads": threads,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "preset": preset,
            # per question type: FP, RTN W4A4 / W3A3, modality-restricted A4, shuffled images
            "accuracy": accuracy,
            # per layer and modality, on 64 calibration samples (see planted_outlier_report)
            "planted_outliers": outliers,
        }
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        meta_file.write_text(json.dumps(meta, indent=2))
        if progress:
            tqdm.write(f"saved to {out}")
    meta = json.loads(meta_file.read_text())
    model = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="sdpa")
    model.eval()
    task = SyntheticVQATask(cfg)
    task.meta = meta
    task.model_dir = out
    return model, task


def make_calibration_dataset(task: SyntheticVQATask, n: int = 128):
    """A ``datasets.Dataset`` of ``n`` calibration samples for ``llmcompressor.oneshot``.

    Each row is exactly a model input dict (``input_ids``, ``attention_mask``,
    ``pixel_values`` [3, H, W]) without padding, as lists; llm-compressor's default collator
    at batch size 1 turns a row into tensors with a batch dimension. :func:`calibration_collator`
    does the same explicitly and can be passed as ``data_collator``.
    """
    from datasets import Dataset

    rows = task.calibration_samples(n)
    return Dataset.from_dict(
        {
            "input_ids": [r["input_ids"].tolist() for r in rows],
            "attention_mask": [r["attention_mask"].tolist() for r in rows],
            "pixel_values": [r["pixel_values"].tolist() for r in rows],
        }
    )


def calibration_collator(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch-size-1 collator for :func:`make_calibration_dataset` rows."""
    assert len(batch) == 1, "the tiny-VLM calibration rows are meant for batch size 1"
    row = batch[0]
    return {
        "input_ids": torch.as_tensor(row["input_ids"], dtype=torch.long)[None],
        "attention_mask": torch.as_tensor(row["attention_mask"], dtype=torch.long)[None],
        "pixel_values": torch.as_tensor(row["pixel_values"], dtype=torch.float32)[None],
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=list(PRESETS), default="default")
    p.add_argument("--quick", action="store_true", help="tiny config, ~30 s (tests)")
    p.add_argument("--cache-dir", type=str, default=None)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--text-outlier-scale", type=float, default=None)
    p.add_argument("--vision-outlier-scale", type=float, default=None)
    p.add_argument("--outlier-guard", choices=GUARDS, default=None)
    p.add_argument("--rtn-bits", type=str, default="4,4", help="extra check: 'w,a' bits")
    args = p.parse_args(argv)
    overrides = {
        k: v
        for k, v in dict(
            steps=args.steps,
            text_outlier_scale=args.text_outlier_scale,
            vision_outlier_scale=args.vision_outlier_scale,
            outlier_guard=args.outlier_guard,
        ).items()
        if v is not None
    }
    t0 = time.time()
    model, task = load_or_train(
        seed=args.seed,
        quick=args.quick,
        cache_dir=args.cache_dir,
        overrides=overrides,
        n_eval=args.n_eval,
        force=args.force,
        threads=args.threads,
        preset=args.preset,
    )
    meta = task.meta
    print(f"model dir: {task.model_dir} ({time.time() - t0:.1f} s incl. training/loading)")
    print(
        f"parameters: {meta['num_parameters']:,}; training time {meta['train_seconds']:.0f} s "
        f"({meta.get('train_threads', '?')} thread(s), {meta['config']['steps']} steps); "
        f"outlier guard {meta['config'].get('outlier_guard', 'none')}"
    )
    print(
        f"planted text channels {meta['planted_text_channels']}, "
        f"vision channels {meta['planted_vision_channels']}"
    )
    samples = task.eval_samples(args.n_eval)
    print(f"eval samples: {len(samples)} (held-out split)")
    accuracy = accuracy_report(model, samples)
    outliers = planted_outlier_report(
        model,
        task.calibration_samples(64),
        meta["planted_text_channels"],
        meta["planted_vision_channels"],
    )
    print(format_report(accuracy, outliers))
    fp_acc = accuracy["fp"]["all"]
    w_bits, a_bits = (int(b) for b in args.rtn_bits.split(","))
    rtn_acc = evaluate_accuracy(rtn_fake_quant(model, w_bits, a_bits), samples)
    w_acc = evaluate_accuracy(rtn_fake_quant(model, w_bits, 16), samples)
    print(f"RTN W{w_bits}A{a_bits} accuracy:   {rtn_acc:.4f} ({rtn_acc / fp_acc:.1%} of FP)")
    print(f"RTN W{w_bits}A16 accuracy:  {w_acc:.4f}")
    stats = channel_absmax_at_linear_inputs(model, task.calibration_samples(64))
    for name in ("layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"):
        a = stats[name]
        print(
            f"  {name}: max|x| median {a.median():.2f}, text-planted "
            f"{[round(float(a[c]), 1) for c in meta['planted_text_channels']]}, vision-planted "
            f"{[round(float(a[c]), 1) for c in meta['planted_vision_channels']]}"
        )


if __name__ == "__main__":
    main()
