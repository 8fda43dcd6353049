"""Command line for FID: samples ``.npz`` against reference statistics, and the reference statistics.

Both commands need pytorch-fid's Inception weights file ``pt_inception-2015-12-05-6726825d.pth``
(``--inception_weights``, the file or the folder holding it; see ``tarflow_jax.fid.FID_WEIGHTS_URL``)
and PyTorch to read it::

    # reference statistics (mean and covariance of the 2048-d pool features) over a data split
    python -m tarflow_jax.tools.fid --compute_ref_stats --config=configs/afhq256.py --split=train \\
        --out=afhq256_train_stats.npz --inception_weights=pt_inception-2015-12-05-6726825d.pth

    # FID of samples written by `python -m tarflow_jax.main --mode=sample`
    python -m tarflow_jax.tools.fid --samples=WORKDIR/samples/samples_00000000.npz \\
        --ref_stats=afhq256_train_stats.npz --inception_weights=pt_inception-2015-12-05-6726825d.pth

Samples are read from the ``.npz``'s ``arr_0`` (or ``images``) array, uint8 NHWC, a chunk at a
time (50,000 samples at 256×256 are 9.8 GB). ``--samples`` may also be a statistics file
(``mu``/``sigma`` and no images), e.g. one written earlier with ``--sample_stats_out``.
Reference images are the split's records after the config's preprocessing (resize/center crop
to ``config.dataset.image_size``, no flips), at full 8-bit depth; grayscale images are repeated
to three channels. Statistics accumulate in float64 without keeping the features, so a split of
any size fits in memory; ``--max_examples`` takes a seeded random subset instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags
from ml_collections import config_flags

from tarflow_jax import fid, input_pipeline
from tarflow_jax.tools import cli

CHUNK = 500  # about this many images read and featurised per step (a multiple of --batch_size)
_USAGE = """\
FID for tarflow_jax samples (Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth).

  python -m tarflow_jax.tools.fid --samples=S.npz --ref_stats=R.npz --inception_weights=W.pth
  python -m tarflow_jax.tools.fid --compute_ref_stats --config=configs/NAME.py [--split=train] \\
      [--max_examples=N] --out=R.npz --inception_weights=W.pth
"""


class RunningStatistics:
    """Mean and unbiased covariance of feature rows added in chunks (float64 sums)."""

    def __init__(self):
        self.count = 0
        self.sum = self.outer = None

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if self.sum is None:
            self.sum = np.zeros(f.shape[1], np.float64)
            self.outer = np.zeros((f.shape[1], f.shape[1]), np.float64)
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2 or self.sum is None:
            raise ValueError(f"need at least 2 images for a covariance, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def weights_path(path: str) -> str:
    """The weights file (``path`` or ``path/pt_inception-...pth``); a clear error when absent."""
    if not path:
        raise FileNotFoundError(f"--inception_weights is required: download pytorch-fid's {fid.FID_WEIGHTS_FILE} "
                                f"from {fid.FID_WEIGHTS_URL} and pass its path (or the folder holding it)")
    file = os.path.join(path, fid.FID_WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"FID Inception weights not found at {file!r}. Download pytorch-fid's "
                                f"{fid.FID_WEIGHTS_FILE} from {fid.FID_WEIGHTS_URL} and pass its path "
                                f"(or the folder holding it) with --inception_weights")
    return file


def _to_rgb_uint8(images: np.ndarray, levels: int = 256) -> np.ndarray:
    """uint8 NHWC with 3 channels: integer levels rescaled to 0..255, grayscale repeated."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if levels != 256:
        images = np.round(images.astype(np.float32) * (255.0 / (levels - 1))).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _npz_member(path: str) -> tuple[str | None, list[str]]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    for key in ("arr_0", "images"):
        if f"{key}.npy" in names:
            return key, [n.removesuffix(".npy") for n in names]
    return None, [n.removesuffix(".npy") for n in names]


def iter_npz_images(path: str, key: str, chunk: int = CHUNK, limit: int | None = None
                    ) -> Iterator[np.ndarray]:
    """Chunks of the array ``key`` of an ``.npz``, read from the archive without loading it whole."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject or not shape:
            with np.load(path) as data:  # unusual layouts: load whole
                array = data[key]
            total = array.shape[0] if limit is None else min(limit, array.shape[0])
            for start in range(0, total, chunk):
                yield array[start:min(start + chunk, total)]
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        total = shape[0] if limit is None else min(limit, shape[0])
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            buffer = f.read(count * row)
            if len(buffer) != count * row:
                raise ValueError(f"{path!r}: {key} ends early (truncated file?)")
            yield np.frombuffer(buffer, dtype).reshape((count, *shape[1:]))


def npz_image_count(path: str, key: str) -> int:
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        return read_header(f)[0][0]


def statistics_of_chunks(chunks: Iterator[np.ndarray], variables: Any, batch_size: int, levels: int = 256,
                         total: int | None = None, what: str = "images") -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, count)`` of the Inception features of uint8 image chunks."""
    stats, start = RunningStatistics(), time.time()
    for images in chunks:
        stats.add(fid.inception_features(variables, _to_rgb_uint8(np.asarray(images), levels), batch_size))
        rate = stats.count / max(time.time() - start, 1e-9)
        print(f"  {what}: {stats.count}{f'/{total}' if total else ''} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    mu, sigma = stats.result()
    return mu, sigma, stats.count


def _chunk(batch_size: int) -> int:
    return batch_size * max(1, CHUNK // batch_size)  # no padded Inception batches inside a chunk


def sample_statistics(path: str, variables_fn, batch_size: int, max_samples: int | None
                      ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Statistics of a samples ``.npz`` (images, or a statistics file with ``mu``/``sigma``)."""
    key, members = _npz_member(path)
    if key is None:
        if {"mu", "sigma"} <= set(members):
            mu, sigma = fid.load_statistics(path)
            return mu, sigma, None
        raise KeyError(f"{path!r} has neither images ('arr_0' or 'images') nor statistics ('mu', 'sigma'); "
                       f"it has {members}")
    total = npz_image_count(path, key)
    total = total if max_samples is None else min(total, max_samples)
    return statistics_of_chunks(iter_npz_images(path, key, _chunk(batch_size), total), variables_fn(), batch_size,
                                total=total, what="samples")


def reference_chunks(config, split: str, max_examples: int | None, seed: int = 0, chunk: int = CHUNK
                     ) -> tuple[Iterator[np.ndarray], int, int]:
    """Chunks of the split's preprocessed uint8 images (full bit depth), their number, their levels."""
    levels = 17 if config.dataset.name == "digits" else 256  # the source's own levels
    config = config.copy_and_resolve_references()
    config.dataset.num_levels = levels
    source = input_pipeline.create_source(config, split)
    n = len(source)
    if n < 2:
        raise ValueError(f"split {split!r} of {config.dataset.name!r} has {n} images; need at least 2")
    indices = np.arange(n)
    if max_examples is not None and max_examples < n:
        indices = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))

    class Lookup(grain.transforms.Map):
        def map(self, index):
            return source[int(index)]

    dataset = (grain.MapDataset.source(indices).map(Lookup()).map(input_pipeline.Preprocess(config))
               .batch(chunk, drop_remainder=False))
    threads = input_pipeline.READ_THREADS
    iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    return (batch["image"] for batch in iterator), len(indices), levels


# --------------------------------------------------------------------------- command line
def define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """This tool's flags, on a fresh ``FlagValues``."""
    fv = flags.FlagValues()
    flags.DEFINE_string("samples", None, "Samples .npz (uint8 NHWC 'arr_0'/'images', as written by "
                        "tarflow_jax.main --mode=sample), or a statistics .npz.", flag_values=fv)
    flags.DEFINE_string("ref_stats", None, "Reference statistics .npz (mu, sigma).", flag_values=fv)
    flags.DEFINE_string("inception_weights", None, f"pytorch-fid's {fid.FID_WEIGHTS_FILE}, or its folder.",
                        flag_values=fv)
    flags.DEFINE_bool("compute_ref_stats", False, "Compute reference statistics over --split of --config's "
                      "dataset and write them to --out.", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "Experiment config (its dataset) for --compute_ref_stats.",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("split", None, "Split for --compute_ref_stats (default: config.dataset.train_split).",
                        flag_values=fv)
    flags.DEFINE_integer("max_examples", None, "Use a seeded random subset of this many reference images.",
                         flag_values=fv)
    flags.DEFINE_integer("max_samples", None, "Use only the first N samples.", flag_values=fv)
    flags.DEFINE_string("out", None, "Where --compute_ref_stats writes the statistics .npz.", flag_values=fv)
    flags.DEFINE_string("sample_stats_out", None, "Also write the samples' statistics to this .npz.",
                        flag_values=fv)
    flags.DEFINE_string("results_json", None, "Also write the FID and its inputs to this JSON file.",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", 50, "Images per Inception call.", flag_values=fv)
    return fv


def _require_file(path: str | None, flag: str, hint: str) -> str:
    if not path:
        raise FileNotFoundError(f"--{flag} is required: {hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{flag}: no file at {path!r} ({hint})")
    return path


def run(fv) -> str:
    """Runs the command the parsed flags describe; returns the line to print."""
    weights = weights_path(fv.inception_weights)  # first: before reading any data
    load_weights = lambda: fid.load_inception_params(weights)
    if fv.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {fv.batch_size}")
    if fv.compute_ref_stats:
        if not fv["config"].present:
            raise ValueError("--compute_ref_stats needs --config=configs/NAME.py (its dataset and image size)")
        if not fv.out:
            raise ValueError("--compute_ref_stats needs --out=STATS.npz")
        config = fv.config
        split = fv.split or config.dataset.get("train_split", "train")
        chunks, total, levels = reference_chunks(config, split, fv.max_examples, chunk=_chunk(fv.batch_size))
        mu, sigma, count = statistics_of_chunks(chunks, load_weights(), fv.batch_size, levels, total,
                                                what=f"{split} images")
        fid.save_statistics(fv.out, mu, sigma)
        name = config.dataset.get("tfds_name") if config.dataset.name == "tfds" else config.dataset.name
        return f"reference statistics of {count} {name} {split} images " \
               f"({config.dataset.image_size}x{config.dataset.image_size}) -> {fv.out}"
    samples = _require_file(fv.samples, "samples", "the .npz written by python -m tarflow_jax.main --mode=sample")
    ref = _require_file(fv.ref_stats, "ref_stats", "write one with --compute_ref_stats")
    mu_ref, sigma_ref = fid.load_statistics(ref)
    mu, sigma, count = sample_statistics(samples, load_weights, fv.batch_size, fv.max_samples)
    if fv.sample_stats_out:
        fid.save_statistics(fv.sample_stats_out, mu, sigma)
    score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if fv.results_json:
        record = {"fid": score, "samples": os.path.abspath(samples), "num_samples": count,
                  "ref_stats": os.path.abspath(ref)}
        with open(fv.results_json, "w") as f:
            json.dump(record, f, indent=2)
    return f"FID {score:.4f} ({count if count is not None else 'precomputed'} samples from {samples} vs {ref})"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 error, 2 usage error)."""
    argv = list(sys.argv if argv is None else argv)
    prog = "python -m tarflow_jax.tools.fid"
    fv = define_flags(argv)
    rest = cli.parse_flags(fv, argv, prog, _USAGE)
    if isinstance(rest, int):
        return rest
    error = cli.config_load_error(fv, "dataset") if fv["config"].present else None
    if error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        print(run(fv))
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
