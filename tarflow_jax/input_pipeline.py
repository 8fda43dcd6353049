"""Grain input pipelines: digits, TFDS (ArrayRecord random access) and image folders.

Every pipeline yields dicts of NumPy arrays::

    {"image": uint8 (batch, H, W, C) integer levels in 0..num_levels-1,
     "label": int32 (batch,)}                    # 0 when the dataset is unlabelled

Pixels are NOT scaled to [-1, 1]: the train step dequantizes / adds noise itself.
Eval batches also carry ``"mask": bool (batch,)`` (False on padding rows).

Sources (``config.dataset.name``):

* ``"digits"``: scikit-learn's ``load_digits()`` (8x8x1, values 0..16 = 17 levels,
  10 classes) with a FIXED split: ``np.random.RandomState(0).permutation(1797)``,
  the first 1,500 are "train", the remaining 297 "test".
* ``"tfds"``: ``config.dataset.tfds_name`` read through ``builder.as_data_source``
  (random access, needs the dataset prepared in ArrayRecord format, no TF graph).
* ``"folder"``: ``<data_dir>/<split>/<class_name>/*.png|jpg|jpeg``; classes sorted
  alphabetically give the label ids.

Per-example processing: convert to RGB or L (``config.dataset.channels``), optionally
resize the shorter side to ``image_size`` with PIL bicubic resampling (antialiased
when downscaling) then center crop, requantize the source levels L (256; 17 for digits)
to ``num_levels`` with ``x * num_levels // L`` and, in training, a seeded random flip.

Training (``create_train_iterator``), with the ``grain.MapDataset`` API: one global
stream ``source.shuffle(seed).repeat()`` (reshuffled every epoch, infinite), preprocessed,
randomly flipped with an rng derived from ``(seed, global position)``; the k-th global
batch is positions ``k·B .. (k+1)·B − 1`` and process ``p`` of ``n`` reads the ``p``-th
contiguous chunk of ``B/n`` of them. So within every epoch the processes read disjoint
records, and the global batch (all processes together) holds the same examples in the same
order whatever ``n`` is. Batches are
the same for any ``data_workers`` (workers split whole batches).

Eval (``create_eval_iterator``): process ``p`` of ``n`` reads the strided records
``p, p + n, p + 2n, ...`` exactly once, in order; all processes yield the same number of
batches (``ceil(ceil(N / n) / batch_size)``), padded with ``mask=False`` rows (copies of
record 0), so a multi-host jitted eval stays in lock step and sum(mask) over all
processes == ``num_eval_examples(config)``.

Checkpointing the train iterator (a ``grain.DatasetIterator``): ``state = it.get_state()``
(a small JSON-able dict) and ``it.set_state(state)`` on a fresh iterator built from the
same config resume with exactly the same following batches (restore with the same
``data_workers``: the state holds one entry per worker). For orbax, the installed grain
registers ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (handler
``grain.checkpoint.CheckpointHandler``, which writes one ``process_<i>-of-<n>.json`` per
JAX process), wrapped here by ``save_args`` / ``restore_args``, which the trainer hands to
``tarflow_jax.checkpointing.save`` / ``restore`` (so checkpointing itself needs no grain)::

    checkpointing.save(manager, step, state, input_pipeline.save_args(train_iter))
    state = checkpointing.restore(manager, state, input_pipeline.restore_args(train_iter))

``data_workers > 0`` starts grain worker processes (spawn), which read grain's absl
flags: run under ``absl.app.run`` or call ``absl.flags.FLAGS.mark_as_parsed()`` first.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

DIGITS_NUM_TRAIN = 1500
DIGITS_SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RESAMPLE = Image.Resampling.BICUBIC
READ_THREADS = 8  # threads computing batches per process (PIL and TFDS decoding release the GIL)


# ----------------------------------------------------------------------------- sources


class DigitsSource:
    """scikit-learn digits (8x8x1 uint8, values 0..16) with the fixed 1500/297 split."""

    def __init__(self, split: str):
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

        if split not in ("train", "test"):
            raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
        digits = load_digits()
        order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(digits.images))
        order = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
        self.split = split
        self._images = digits.images[order].astype(np.uint8)[..., None]
        self._labels = digits.target[order].astype(np.int32)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r})"


class ImageFolderSource:
    """Images under ``<root>/<split>/<class_name>/``, decoded with PIL to RGB or L."""

    def __init__(self, root: str | os.PathLike, split: str, channels: int):
        self.path = pathlib.Path(root) / split
        self.mode = "L" if channels == 1 else "RGB"
        layout = f"expected layout: {self.path}/<class_name>/*{{{','.join(IMAGE_EXTENSIONS)}}}"
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder {self.path} does not exist; {layout}")
        self.classes = sorted(p.name for p in self.path.iterdir() if p.is_dir())
        self._files = [
            (str(f), label)
            for label, name in enumerate(self.classes)
            for f in sorted((self.path / name).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self._files:
            raise FileNotFoundError(f"no images found in {self.path}; {layout}")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        with Image.open(path) as img:
            image = np.asarray(img.convert(self.mode))
        return {"image": image, "label": np.int32(label)}

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={str(self.path)!r}, mode={self.mode!r}, n={len(self)})"


def _tfds_builder(config: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    return tfds.builder(config.dataset.tfds_name, data_dir=config.dataset.get("data_dir"))


def _not_prepared_message(name: str, builder, split: str) -> str:
    root = builder.data_dir_root
    message = (
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir {str(root)!r} "
        f"(looked for {builder.data_dir}). Random access needs the ArrayRecord format; "
        f"prepare it once with:\n  tfds build {name} --data_dir={root} --file_format=array_record\n"
        "or point config.dataset.data_dir at the directory that already holds it."
    )
    if name.split("/")[0].startswith("imagenet"):
        message += (
            f"\nImageNet cannot be downloaded automatically: first place ILSVRC2012_img_train.tar "
            f"and ILSVRC2012_img_val.tar in the manual dir {root}/downloads/manual "
            "(or pass --manual_dir=<dir> to tfds build)."
        )
    return message


def tfds_source(config: ml_collections.ConfigDict, split: str):
    """A TFDS random-access data source for ``split``; never downloads."""
    name = config.dataset.tfds_name
    builder = _tfds_builder(config)
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
        if not builder.is_prepared():
            raise FileNotFoundError(_not_prepared_message(name, builder, split)) from e
        if isinstance(e, NotImplementedError):
            raise ValueError(
                f"TFDS dataset {name!r} at {builder.data_dir} is not in ArrayRecord format, "
                "which random access needs; re-prepare it with:\n  tfds build "
                f"{name} --data_dir={builder.data_dir_root} --file_format=array_record --overwrite"
            ) from e
        raise
    features = builder.info.features
    for field, key in (("image_key", _image_key(config)), ("label_key", _label_key(config))):
        if key is not None and key not in features:
            hint = " (set it to None for unlabelled data)" if field == "label_key" else ""
            raise ValueError(
                f"TFDS dataset {name!r} has no feature {key!r} for config.dataset.{field}{hint}; "
                f"its features are {sorted(features.keys())}"
            )
    return source


def _image_key(config: ml_collections.ConfigDict) -> str:
    return config.dataset.get("image_key", "image") or "image"


def _label_key(config: ml_collections.ConfigDict) -> str | None:
    return config.dataset.get("label_key", "label")


def _source_levels(config: ml_collections.ConfigDict) -> int:
    return 17 if config.dataset.name == "digits" else 256


def create_source(config: ml_collections.ConfigDict, split: str):
    """The random-access data source of ``split`` for ``config.dataset.name``."""
    name = config.dataset.name
    if name == "digits":
        return DigitsSource(split)
    if name == "tfds":
        return tfds_source(config, split)
    if name == "folder":
        if not config.dataset.get("data_dir"):
            raise ValueError("config.dataset.data_dir must be the image folder root for 'folder'")
        return ImageFolderSource(config.dataset.data_dir, split, config.dataset.channels)
    raise ValueError(f"unknown config.dataset.name {name!r}; use 'digits', 'tfds' or 'folder'")


# -------------------------------------------------------------------------- transforms


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to ``size`` (PIL bicubic) and center crops ``size x size``."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((width, height), resample=RESAMPLE)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class Preprocess(grain.transforms.Map):
    """Converts one example to ``{"image": uint8 (H,W,C) levels, "label": int32}``."""

    def __init__(self, config: ml_collections.ConfigDict):
        dataset = config.dataset
        self.image_key, self.label_key = _image_key(config), _label_key(config)
        self.image_size, self.channels = int(dataset.image_size), int(dataset.channels)
        self.resize = dataset.get("resize", None)
        self.source_levels, self.num_levels = _source_levels(config), int(dataset.num_levels)
        if self.channels not in (1, 3):
            raise ValueError(f"config.dataset.channels must be 1 or 3, got {self.channels}")
        if self.resize not in (None, "center_crop"):
            raise ValueError(f"config.dataset.resize must be 'center_crop' or None, got {self.resize!r}")
        if not 2 <= self.num_levels <= self.source_levels:
            raise ValueError(
                f"config.dataset.num_levels={self.num_levels} must be in 2..{self.source_levels} "
                f"for dataset {dataset.name!r}"
            )

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(element[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        wrong_size = image.shape[:2] != (self.image_size, self.image_size)
        if image.shape[-1] != self.channels or (wrong_size and self.resize):
            mode = "L" if self.channels == 1 else "RGB"
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image[..., :3])
            pil = pil.convert(mode)
            if self.resize == "center_crop":
                pil = resize_center_crop(pil, self.image_size)
            image = np.asarray(pil).reshape(pil.size[1], pil.size[0], self.channels)
        elif wrong_size:
            raise ValueError(
                f"image of shape {image.shape} is not {self.image_size}x{self.image_size}; "
                "set config.dataset.resize = 'center_crop' or config.dataset.image_size"
            )
        if self.num_levels != self.source_levels:
            image = image.astype(np.int32) * self.num_levels // self.source_levels
        label = element[self.label_key] if self.label_key is not None else 0
        out = {"image": np.ascontiguousarray(image, dtype=np.uint8), "label": np.int32(label)}
        if "mask" in element:
            out["mask"] = np.bool_(element["mask"])
        return out


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2, from grain's per-record seeded rng."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < 0.5:
            element = {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
        return element


class _EvalLookup(grain.transforms.Map):
    """Global record index -> record with ``mask``; indices past the end pad with record 0."""

    def __init__(self, source):
        self.source = source

    def map(self, index: int) -> dict[str, Any]:
        real = index < len(self.source)
        return {**self.source[index if real else 0], "mask": real}


# --------------------------------------------------------------------------- iterators


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    return index, count


def _to_iter_dataset(dataset: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    """Batches are computed by READ_THREADS threads in each of ``config.data_workers`` processes."""
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * READ_THREADS)
    )
    workers = int(config.get("data_workers", 0) or 0)
    if workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return dataset


def create_train_iterator(
    config: ml_collections.ConfigDict,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, seeded train batches of this process's shard (checkpointable)."""
    index, count = _process_index_and_count(process_index, process_count)
    if config.batch_size % count:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by process_count={count}"
        )
    seed = int(config.get("seed", 0))
    source = create_source(config, config.dataset.get("train_split", "train"))
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    dataset = dataset.map(Preprocess(config))
    if config.dataset.get("random_flip", False):
        dataset = dataset.random_map(RandomFlip(), seed=seed)
    # Chunks of `local` consecutive positions; process p takes chunk p of every global batch,
    # so the assembled global batch has the rows of a one-process batch, in the same order.
    local = config.batch_size // count
    dataset = dataset.batch(local, drop_remainder=True)[index::count]
    return iter(_to_iter_dataset(dataset, config))


def create_eval_iterator(
    config: ml_collections.ConfigDict,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Re-iterable eval batches of ``batch_size`` (per process) with ``mask``: this shard, once."""
    index, count = _process_index_and_count(process_index, process_count)
    source = create_source(config, config.dataset.get("eval_split", "test"))
    per_process = -(-len(source) // count)
    num_batches = -(-per_process // batch_size)
    indices = grain.MapDataset.range(index, index + num_batches * batch_size * count, count)
    dataset = indices.map(_EvalLookup(source)).map(Preprocess(config)).batch(batch_size)
    return _to_iter_dataset(dataset, config)


def num_eval_examples(config: ml_collections.ConfigDict) -> int:
    """Number of records in the eval split (over all processes)."""
    return len(create_source(config, config.dataset.get("eval_split", "test")))


def save_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax save args for the train iterator (``grain.checkpoint.CheckpointSave``)."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax restore args that set ``iterator``'s state in place (``CheckpointRestore``)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def make_global_batch(
    local_batch: dict[str, np.ndarray], mesh_or_sharding: jax.sharding.Mesh | jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Global jax arrays from each process's local batch, sharded along the batch axis."""
    sharding = mesh_or_sharding
    if isinstance(sharding, jax.sharding.Mesh):
        sharding = jax.sharding.NamedSharding(
            sharding, jax.sharding.PartitionSpec(sharding.axis_names)
        )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


__all__ = [
    "DigitsSource", "ImageFolderSource", "Preprocess", "RandomFlip", "create_eval_iterator",
    "create_source", "create_train_iterator", "make_global_batch", "num_eval_examples",
    "resize_center_crop", "restore_args", "save_args", "tfds_source",
]
