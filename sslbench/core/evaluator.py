"""The evaluator interface: frozen features in, metric rows out.

An evaluator declares which features it needs (block, token, raw/normed) as :class:`FeatureRequest`s; the runner
extracts them once (cached) and hands them over. The math lives in ``sslbench.evaluation`` (functions on tensors);
a registered evaluator is a thin wrapper that maps options and names the rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from sslbench.core.errors import UserError
from sslbench.core.options import Option

TOKENS = ("cls", "mean", "cls+mean", "mean_fc_norm")
NORMS = ("raw", "normed")
_REQUEST_PATTERN = re.compile(r"^b(-?\d+)\.(cls\+mean|cls|mean_fc_norm|mean)\.(raw|normed)$")


@dataclass(frozen=True)
class FeatureRequest:
    """Which feature to extract: the output of block ``block`` (0-based; -1 = last, negatives count from the end),
    pooled as ``token`` and taken from the ``norm`` stream.

    - ``token``: ``"cls"`` (the CLS token), ``"mean"`` (mean of the patch tokens, CLS and other prefix tokens
      excluded), ``"cls+mean"`` (both concatenated, 2·D wide — the DINOv2 linear-probe variant) or
      ``"mean_fc_norm"`` (the patch mean through a LayerNorm — data2vec 2.0's probe and fine-tuning feature: the
      backbone's ``fc_norm`` when its checkpoint has one, else a LayerNorm without parameters, eps 1e-6).
    - ``norm``: ``"raw"`` (the residual stream, as MIM-Refiner's intermediate ID heads see it) or ``"normed"``
      (passed through the backbone's final norm, as the encoder output is).
    """

    block: int = -1
    token: str = "cls"
    norm: str = "normed"

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or isinstance(self.block, bool):
            raise UserError(f"feature request: block must be an integer, got {self.block!r}")
        if self.token not in TOKENS:
            raise UserError(f"feature request: token must be one of {', '.join(TOKENS)}, got {self.token!r}")
        if self.norm not in NORMS:
            raise UserError(f"feature request: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    def __str__(self) -> str:
        return f"b{self.block}.{self.token}.{self.norm}"

    def __repr__(self) -> str:
        return f"FeatureRequest({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> "FeatureRequest":
        """Inverse of ``str()``: ``"b11.cls.normed"`` → ``FeatureRequest(11, "cls", "normed")``."""
        match = _REQUEST_PATTERN.match(text.strip())
        if match is None:
            raise UserError(f"feature request {text!r}: expected b<block>.<{'|'.join(TOKENS)}>.<raw|normed>, "
                            "e.g. b11.cls.normed or b-1.mean.raw")
        return cls(int(match.group(1)), match.group(2), match.group(3))

    def resolve(self, depth: int) -> "FeatureRequest":
        """The same request with a non-negative block index for a backbone of ``depth`` blocks."""
        if not -depth <= self.block < depth:
            raise UserError(f"feature request {self}: block must be in -{depth}..{depth - 1} "
                            f"for a backbone with {depth} blocks")
        return FeatureRequest(self.block % depth, self.token, self.norm)


#: The options that pick one feature matrix (shared by the evaluators that read a single feature).
FEATURE_OPTIONS = {
    "block": Option(-1, int, "block whose tokens are used (-1: the last)"),
    "token": Option("cls", str, "which token(s): CLS, the patch mean, both, or the patch mean through a "
                    "LayerNorm (data2vec 2.0's feature; the checkpoint's fc_norm if it has one)", choices=TOKENS),
    "norm": Option("normed", str, "after the final norm or the raw residual stream", choices=("normed", "raw")),
}


def feature_request(opts: dict[str, Any], depth: int):
    """The :class:`FeatureRequest` named by an evaluator's :data:`FEATURE_OPTIONS` values.

    A block outside ``-depth .. depth-1`` is a user error naming the key (``block``), not an index error later.
    """
    block = opts["block"]
    if not -depth <= block < depth:
        raise UserError(f"block: got {block}, expected -{depth}..{depth - 1} for a backbone with {depth} blocks")
    return FeatureRequest(block % depth, opts["token"], opts["norm"])


@dataclass(frozen=True)
class Split:
    """Features of one split: ``features[request] -> (N, D)`` and labels (N,)."""

    features: dict
    labels: torch.Tensor


@dataclass(frozen=True)
class DataSummary:
    """What an evaluator may check before training: a split's number of images and images per class."""

    num_samples: int
    class_counts: tuple[int, ...]

    @classmethod
    def of(cls, labels: torch.Tensor) -> "DataSummary":
        labels = labels[labels >= 0]
        counts = torch.bincount(labels).tolist() if labels.numel() else []
        return cls(int(labels.numel()), tuple(int(c) for c in counts))

    @property
    def num_classes(self) -> int:
        return sum(1 for c in self.class_counts if c > 0)


#: Variant fields written as ``name=value`` (the others as their value alone; a true flag as its name).
NAMED_FIELDS = ("k", "block")


def format_variant(fields: Mapping[str, Any]) -> str:
    """The one text form of a result's variant fields, in their order: ``{"k": 20, "feature": "b11.cls.normed",
    "std": True}`` → ``"k=20,b11.cls.normed,std"`` (a false flag is left out). It names leaderboard columns and the
    ``variant`` column of ``metrics.csv``; code reads the fields themselves, never this text."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif key in NAMED_FIELDS:
            parts.append(f"{key}={value}")
        else:
            parts.append(str(value))
    return ",".join(parts)


@dataclass(frozen=True)
class PerSample:
    """How one result decomposes over the test samples, so a leaderboard can draw intervals and paired tests
    (``sslbench.results.statistics``) by resampling them.

    - ``kind="mean"``: ``values`` holds one score in [0, 1] per test sample and the result is ``100 · mean(values)``
      — 0/1 correctness for an accuracy, the fraction of splits that got a sample right for a low-shot mean.
    - ``kind="partition"``: ``values`` holds the cluster id of every test sample and the result (NMI) is recomputed
      from them and the test labels.
    """

    kind: str
    values: Any

    def __post_init__(self) -> None:
        if self.kind not in ("mean", "partition"):
            raise ValueError(f"PerSample.kind must be 'mean' or 'partition', got {self.kind!r}")

    @classmethod
    def correct(cls, predictions: torch.Tensor, labels: torch.Tensor) -> "PerSample":
        """0/1 correctness of ``predictions`` against ``labels``."""
        return cls("mean", (predictions == labels).cpu().numpy())


@dataclass
class MetricValue:
    """One result: ``metric`` (e.g. ``top1``), ``value``, and the variant ``fields`` that tell it apart from the
    evaluator's other results — e.g. ``{"k": 20, "feature": "b11.cls.normed"}`` for k-NN, ``{"k": 20, "block": 3,
    "stream": "raw"}`` per block, ``{"setting": "1shot", ...}`` low-shot.

    ``selection_split`` names the data that chose any hyperparameter (``"none"`` when nothing was selected).
    ``per_sample`` (optional, a :class:`PerSample` on the test set) lets the leaderboard give the number an
    interval and test differences between runs; the evaluators that have one per test sample attach it.
    """

    metric: str
    value: float
    fields: dict[str, Any] = field(default_factory=dict)
    selection_split: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)
    per_sample: PerSample | None = field(default=None, repr=False, compare=False)

    @property
    def variant(self) -> str:
        return format_variant(self.fields)


class Evaluator:
    """Base class of evaluators. Subclasses set ``name`` and ``options`` and implement the two methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, opts: dict[str, Any]):
        # options declared with omit_default are absent from a recipe that leaves them out: their default applies
        self.opts = {**{name: option.default for name, option in self.options.items()}, **dict(opts)}

    def requests(self, depth: int) -> list:
        """The :class:`FeatureRequest`s this evaluation needs, for a backbone of ``depth`` blocks."""
        raise NotImplementedError

    def check_data(self, train: DataSummary, test: DataSummary) -> None:
        """Pre-flight: raise :class:`sslbench.core.errors.UserError` naming the option (``k: ...``) when the options
        cannot work on this data (``train`` is the evaluation training set). Called before any training, so a run
        never trains for hours to fail at its evaluation. The default checks nothing."""

    def evaluate(self, train: Split, test: Split, requests: list[FeatureRequest]) -> list[MetricValue]:
        """Score the features. ``requests`` is what :meth:`requests` returned for this backbone, so a wrapper keeps
        no state between the two calls."""
        raise NotImplementedError

    #: Headline columns that show a variant field of the chosen result instead of its value (``{"best block":
    #: "block"}``).
    headline_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def headlines(cls, results: Sequence[tuple[str, Mapping[str, Any], float]]) -> dict[str, int]:
        """Which of this evaluator's results a leaderboard shows up front, by column title: ``{"k-NN top-1": i}``
        picks ``results[i]``, a ``(metric, fields, value)`` of one leaderboard row (``value`` is the mean over
        seeds). Chosen from what the evaluator produced, so a protocol's headline follows its recipe, not a list
        of known datasets. The default shows none; every result is still in the detail tables."""
        return {}


def pick(results: Sequence[tuple[str, Mapping[str, Any], float]], metric: str, prefer=None, **fields: Any) -> int | None:
    """Index of the first result with ``metric`` whose fields include ``fields`` and that ranks highest by
    ``prefer(fields)`` (ties: first); ``None`` when there is none. The helper behind :meth:`Evaluator.headlines`."""
    candidates = [i for i, (m, f, _) in enumerate(results)
                  if m == metric and all(f.get(k) == v for k, v in fields.items())]
    if not candidates:
        return None
    if prefer is None:
        return candidates[0]
    return max(candidates, key=lambda i: prefer(results[i][1]))     # max() keeps the first of equal keys
