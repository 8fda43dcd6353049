"""Per-pixel histogram baselines: the bits/dim a model of independent pixels gets on a config's data.

Each pixel position ``i`` gets its own categorical distribution over the data's ``Q`` levels,
fitted on the training split with add-one (Laplace) smoothing::

    p_i(k) = (count_i(k) + 1) / (N + Q)

and the test split is scored exactly (no dequantization: these are discrete models), in bits
per dimension ``−log₂ P(x) / D`` with ``D = H·W·C``, the same unit as TarFlow's bits/dim on
``Q``-level data (whose dequantization bound is an upper bound on its discrete bits/dim).
Three baselines:

* ``pixels``: one histogram per pixel, ``P(x) = Π_i p_i(x_i)`` (unconditional);
* ``pixels given class``: one histogram per pixel and class, ``P(x | y) = Π_i p_{i,y}(x_i)``
  with the true label (conditional; compare with a conditional model's bits/dim given ``y``);
* ``class mixture``: ``P(x) = Σ_c π_c P(x | c)`` with ``π_c = (n_c + 1)/(N + C)`` (unconditional).

Usage::

    python -m tarflow_jax.tools.baselines --config=configs/digits.py [--out=baselines.json]

``--fit_split`` / ``--eval_split`` default to the config's ``train_split`` / ``eval_split``.
Counts need ``pixels × levels × classes`` integers (digits: 64 × 17 × 10); a dataset too big for
the per-class tables (e.g. ImageNet's 12,288 × 256 × 1,000) gets the unconditional one only.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterator, Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from tarflow_jax import input_pipeline
from tarflow_jax.tools import cli

MAX_CLASS_TABLE = 50_000_000  # counts (int64) in the per-class table before it is skipped
CHUNK = 1024


def _examples(config, split: str, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of ``(levels (n, D) int, labels (n,) int)`` of a split after the config's preprocessing."""
    source = input_pipeline.create_source(config, split)
    preprocess = input_pipeline.Preprocess(config)
    for start in range(0, len(source), chunk):
        records = [preprocess.map(source[i]) for i in range(start, min(start + chunk, len(source)))]
        images = np.stack([r["image"] for r in records]).reshape(len(records), -1).astype(np.int64)
        yield images, np.asarray([r["label"] for r in records], np.int64)


class HistogramCounts:
    """Per-pixel level counts, overall and per class."""

    def __init__(self, num_dims: int, num_levels: int, num_classes: int):
        self.num_dims, self.num_levels, self.num_classes = num_dims, num_levels, num_classes
        self.total = np.zeros((num_dims, num_levels), np.int64)
        per_class = num_classes * num_dims * num_levels
        self.by_class = (np.zeros((num_classes, num_dims, num_levels), np.int64)
                         if num_classes and per_class <= MAX_CLASS_TABLE else None)
        self.class_counts = np.zeros(max(num_classes, 1), np.int64)
        self.count = 0

    def add(self, levels: np.ndarray, labels: np.ndarray) -> None:
        """Adds ``levels (n, D)`` in ``0..Q−1`` with their ``labels (n,)``."""
        if levels.min() < 0 or levels.max() >= self.num_levels:
            raise ValueError(f"levels must be in 0..{self.num_levels - 1}; got {levels.min()}..{levels.max()}")
        dims = np.broadcast_to(np.arange(self.num_dims), levels.shape)
        np.add.at(self.total, (dims, levels), 1)
        if self.by_class is not None:
            np.add.at(self.by_class, (np.broadcast_to(labels[:, None], levels.shape), dims, levels), 1)
            np.add.at(self.class_counts, labels, 1)
        self.count += len(levels)

    def log_probs(self) -> dict[str, np.ndarray]:
        """Add-one smoothed log-probabilities (natural log): ``total (D, Q)``, ``by_class (C, D, Q)``, ``prior (C,)``."""
        q = self.num_levels
        out = {"total": np.log(self.total + 1.0) - np.log(self.count + q)}
        if self.by_class is not None:
            out["by_class"] = np.log(self.by_class + 1.0) - np.log(self.class_counts[:, None, None] + q)
            out["prior"] = np.log(self.class_counts + 1.0) - np.log(self.count + self.num_classes)
        return out


def _gather(table: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``table[..., i, levels[n, i]]`` summed over pixels ``i``: log P per example (and per leading axis)."""
    dims = np.arange(levels.shape[1])
    return table[..., dims, levels].sum(axis=-1)


def evaluate(config, fit_split: str | None = None, eval_split: str | None = None) -> dict[str, Any]:
    """Fits the histograms on ``fit_split`` and scores ``eval_split``.

    Returns:
      ``{"baselines": {name: {"bpd", "bpd_se"}}, "num_fit", "num_eval", "num_levels", ...}``;
      ``bpd`` is the mean over evaluated images of ``−log₂ P / D`` and ``bpd_se`` its standard error.

    Raises:
      ValueError: labels outside ``0..num_classes−1`` for a class-conditional dataset.
    """
    d = config.dataset
    fit_split = fit_split or d.get("train_split", "train")
    eval_split = eval_split or d.get("eval_split", "test")
    num_dims = int(d.image_size) ** 2 * int(d.channels)
    num_levels = int(d.num_levels)
    num_classes = int(config.model.get("num_classes", 0) or 0)
    counts = HistogramCounts(num_dims, num_levels, num_classes)
    for levels, labels in _examples(config, fit_split):
        if num_classes and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels of {fit_split!r} must be in 0..{num_classes - 1}")
        counts.add(levels, labels)
    tables = counts.log_probs()
    per_example: dict[str, list[np.ndarray]] = {"pixels": []}
    if "by_class" in tables:
        per_example.update({"pixels given class": [], "class mixture": []})
    for levels, labels in _examples(config, eval_split):
        per_example["pixels"].append(_gather(tables["total"], levels))
        if "by_class" in tables:
            joint = np.stack([_gather(tables["by_class"][c], levels) for c in range(num_classes)], axis=1)
            per_example["pixels given class"].append(joint[np.arange(len(labels)), labels])
            mixed = joint + tables["prior"][None, :]
            top = mixed.max(axis=1, keepdims=True)
            per_example["class mixture"].append((top + np.log(np.exp(mixed - top).sum(axis=1, keepdims=True)))[:, 0])
    results = {}
    for name, chunks in per_example.items():
        bpd = -np.concatenate(chunks) / (num_dims * math.log(2.0))
        results[name] = {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))}
    name = d.get("tfds_name") if d.name == "tfds" else d.name
    return {"dataset": name, "fit_split": fit_split, "eval_split": eval_split, "num_fit": counts.count,
            "num_eval": int(sum(len(c) for c in per_example["pixels"])), "num_levels": num_levels,
            "num_dims": num_dims, "smoothing": "add-one", "baselines": results}


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lines = [f"Per-pixel histograms fitted on {result['dataset']} {result['fit_split']} ({result['num_fit']} "
             f"images, add-one smoothing), scored on {result['eval_split']} ({result['num_eval']} images, "
             f"{result['num_levels']} levels):", "", "| baseline | bits/dim ± s.e. |", "|---|---|"]
    for name, r in result["baselines"].items():
        lines.append(f"| {name} | {r['bpd']:.4f} ± {r['bpd_se']:.4f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    prog = "python -m tarflow_jax.tools.baselines"
    usage = f"Per-pixel histogram baselines (bits/dim).\n\n  {prog} --config=configs/digits.py [--out=F.json]\n"
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config (its dataset).", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("fit_split", None, "Split the histograms are fitted on (default: train_split).",
                        flag_values=fv)
    flags.DEFINE_string("eval_split", None, "Split that is scored (default: eval_split).", flag_values=fv)
    flags.DEFINE_string("out", None, "Also write the result to this JSON file.", flag_values=fv)
    rest = cli.parse_flags(fv, argv, prog, usage)
    if isinstance(rest, int):
        return rest
    if not fv["config"].present:
        return cli.usage_error(prog, "--config=configs/NAME.py is required", usage)
    error = cli.config_load_error(fv, "dataset")
    if error:
        return cli.usage_error(prog, error, usage)
    try:
        result = evaluate(fv.config, fv.fit_split, fv.eval_split)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(markdown(result))
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
