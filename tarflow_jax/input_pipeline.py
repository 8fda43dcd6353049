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
  alphabetically give the label ids. A missing split names the splits the folder has.
* ``"imagenet_official"``: image-net.org's box-downsampled "Imagenet64x64" (or 32x32)
  files in ``data_dir``: pickles ``train_data_batch_1`` … ``train_data_batch_10`` and
  ``val_data`` (splits ``"train"`` and ``"val"``; ``.npz`` versions of the same files work
  too). Labels 1..1000 in the files become 0..999. See :class:`ImageNetOfficialSource`.

Per-example processing: convert to RGB or L (``config.dataset.channels``), optionally
resize the shorter side to ``image_size`` with PIL bilinear resampling (antialiased
when downscaling) then center crop (torchvision's ``Resize`` + ``CenterCrop``, as the
reference), requantize the source levels L (256; 17 for digits)
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

Resuming: the train stream's position is global, the number of examples consumed from
it (``examples_seen``, ``k·B`` after ``k`` batches), not a per-process cursor.
``create_train_iterator(config, start=examples_seen)`` continues the stream from there for
any process count, batch size and ``data_workers`` (the epoch and the record inside the
epoch's permutation follow from the position). The trainer stores it with each checkpoint
(:func:`data_state`) and reads it back with :func:`resume_position`, which also reads the
per-process grain iterator states that older checkpoints hold.

``data_workers > 0`` starts grain worker processes (spawn), which read grain's absl
flags: run under ``absl.app.run`` or call ``absl.flags.FLAGS.mark_as_parsed()`` first.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

DIGITS_NUM_TRAIN = 1500
DIGITS_SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RESAMPLE = Image.Resampling.BILINEAR  # torchvision's Resize default on PIL images, as the reference
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


def _folder_splits(root: pathlib.Path) -> list[str]:
    """Sub-folders of ``root`` that look like splits (they hold class folders)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(c.is_dir() for c in p.iterdir()))


class ImageFolderSource:
    """Images under ``<root>/<split>/<class_name>/``, decoded with PIL to RGB or L.

    Raises:
      FileNotFoundError: the split folder is missing (the message lists the splits that
        ``root`` has, e.g. AFHQ's ``train`` and ``val``) or holds no images.
    """

    def __init__(self, root: str | os.PathLike, split: str, channels: int):
        self.path = pathlib.Path(root) / split
        self.mode = "L" if channels == 1 else "RGB"
        layout = f"expected layout: {self.path}/<class_name>/*{{{','.join(IMAGE_EXTENSIONS)}}}"
        if not self.path.is_dir():
            found = _folder_splits(pathlib.Path(root))
            has = (f"{root} has the splits {found}; set config.dataset.train_split / eval_split to one "
                   "of them" if found else f"{root} has no split folders")
            raise FileNotFoundError(f"image folder {self.path} (split {split!r}) does not exist: {has}; {layout}")
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
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert(self.mode))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable, truncated, not an image
            raise ValueError(f"image file {path} cannot be read ({type(e).__name__}: {e}); remove or "
                             f"replace it") from e
        return {"image": image, "label": np.int32(label)}

    def __repr__(self) -> str:
        return f"ImageFolderSource(path={str(self.path)!r}, mode={self.mode!r}, n={len(self)})"


# image-net.org's downsampled ImageNet ("Imagenet64x64", Chrabaszcz et al. 2017): file names per split.
OFFICIAL_FILES = {"train": tuple(f"train_data_batch_{i}" for i in range(1, 11)), "val": ("val_data",)}
OFFICIAL_ARCHIVES = {"train": "Imagenet64_train_part1.zip and Imagenet64_train_part2.zip (or their _npz.zip "
                              "versions)",
                     "val": "Imagenet64_val.zip (or Imagenet64_val_npz.zip)"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, numbers, strings and NumPy arrays (no arbitrary code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice"),
               ("_codecs", "encode")}  # protocol 2 writes bytes as codecs.encode(str, "latin1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of the Imagenet64x64 "
                                     "format (a dict of NumPy arrays and lists)")


def read_official_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One file of image-net.org's downsampled ImageNet: ``(images (N,S,S,3) uint8, labels (N,) int32)``.

    The file is a pickle (or ``.npz``) of a dict with ``data``: uint8 rows of ``3·S²`` values
    (the red plane, then green, then blue, each ``S×S`` in raster order) and ``labels``: the
    classes 1..1000. Returned labels are 0-based (0..999).

    Raises:
      ValueError: the file is not in that format.
    """
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            record = {k: f[k] for k in f.files}
    else:
        with path.open("rb") as f:
            record = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: also Python 2 pickles
        if isinstance(record, dict):
            record = {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}
    if not isinstance(record, dict) or "data" not in record or "labels" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path} is not an Imagenet64x64 file: expected a dict with 'data' and 'labels', got {keys}")
    data = np.asarray(record["data"])
    labels = np.asarray(record["labels"], np.int64)
    size = int(round((data.shape[1] / 3) ** 0.5)) if data.ndim == 2 else 0
    if data.ndim != 2 or data.dtype != np.uint8 or 3 * size * size != data.shape[1] or len(labels) != len(data):
        raise ValueError(f"{path}: 'data' must be uint8 rows of 3·S² values with one label each; got "
                         f"{data.dtype} {data.shape} and {labels.shape} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise ValueError(f"{path}: labels must be 1..1000 (image-net.org numbering); got {labels.min()}..{labels.max()}")
    images = data.reshape(len(data), 3, size, size).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), (labels - 1).astype(np.int32)


def find_official_files(root: str | os.PathLike, split: str) -> list[pathlib.Path]:
    """The split's files under ``root`` (or one folder below it, e.g. ``Imagenet64_train_part1/``).

    Raises:
      ValueError: an unknown split.
      FileNotFoundError: naming every missing file, where it looked, and the archives to unpack.
    """
    if split not in OFFICIAL_FILES:
        raise ValueError(f"image-net.org's downsampled ImageNet has the splits {sorted(OFFICIAL_FILES)} "
                         f"(train_data_batch_1..10 and val_data), got {split!r}; set config.dataset.train_split "
                         "/ eval_split")
    root = pathlib.Path(root)
    folders = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    found, missing = [], []
    for name in OFFICIAL_FILES[split]:
        hits = [f / n for f in folders for n in (name, f"{name}.npz") if (f / n).is_file()]
        (found.append(hits[0]) if hits else missing.append(name))
    if missing:
        raise FileNotFoundError(
            f"image-net.org downsampled ImageNet, split {split!r}: missing {', '.join(missing)} "
            f"(looked in {root} and its sub-folders, as a pickle or .npz). Download {OFFICIAL_ARCHIVES[split]} "
            f"from image-net.org (downsampled images, 64x64) and unzip them into {root}.")
    return found


class ImageNetOfficialSource:
    """image-net.org's box-downsampled ImageNet (``Imagenet64x64``; 32x32 works too), random access.

    The train split is 10 pickles of about 1.6 GB (1,281,167 images at 64x64), ``val`` one of
    50,000 labelled images. Pickles cannot be read by index, so on first use each file is
    converted once into NumPy files in ``<cache_dir>/imagenet_official/`` (default
    ``cache_dir``: ``data_dir``): ``<file>.images.npy`` (N,S,S,3 uint8; 15.7 GB in all for the
    64x64 train split) and ``<file>.labels.npy`` (int32, 0-based), beside a JSON manifest of
    the source files' sizes (a changed source is converted again). Reads memory-map them, so
    worker processes and threads share the page cache and pickling the source copies nothing.

    Args:
      root: the folder with ``train_data_batch_1..10`` and/or ``val_data`` (also one level down).
      split: ``"train"`` or ``"val"``.
      cache_dir: where the converted arrays go (a local, writable path).

    Raises:
      FileNotFoundError / ValueError: see :func:`find_official_files` and :func:`read_official_batch`.
    """

    def __init__(self, root: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None):
        self.split = split
        files = find_official_files(root, split)
        cache = pathlib.Path(cache_dir or root) / "imagenet_official"
        self._paths = [cache / f"{f.name.removesuffix('.npz')}.images.npy" for f in files]
        manifest_path = cache / f"{split}.json"
        manifest = {f.name: f.stat().st_size for f in files}
        current = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if current != manifest or not all(p.is_file() for p in self._paths):
            self._convert(files, cache, manifest_path, manifest)
        labels = [np.load(p.with_name(p.name.replace(".images.", ".labels."))) for p in self._paths]
        self._labels = np.concatenate(labels)
        self._starts = np.cumsum([0] + [len(x) for x in labels])
        self._images = None  # memory maps, opened lazily in each process (see __getstate__)

    def _convert(self, files: list[pathlib.Path], cache: pathlib.Path, manifest_path: pathlib.Path,
                 manifest: dict[str, int]) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        shape = None
        for source, images_path in zip(files, self._paths):
            images, labels = read_official_batch(source)
            if shape is not None and images.shape[1:] != shape:
                raise ValueError(f"{source}: images are {images.shape[1:]}, but {files[0]} has {shape}")
            shape = images.shape[1:]
            for path, array in ((images_path, images),
                                (images_path.with_name(images_path.name.replace(".images.", ".labels.")), labels)):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent processes: rename wins
                with tmp.open("wb") as out:
                    np.save(out, array)
                tmp.replace(path)
        manifest_path.write_text(json.dumps(manifest, indent=1))

    def _open(self) -> list[np.ndarray]:
        if self._images is None:
            self._images = [np.load(p, mmap_mode="r") for p in self._paths]
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        image = np.array(self._open()[part][index - self._starts[part]])
        return {"image": image, "label": np.int32(self._labels[index])}

    def __repr__(self) -> str:
        return f"ImageNetOfficialSource(split={self.split!r}, n={len(self)}, cache={str(self._paths[0].parent)!r})"


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
    if name == "imagenet_official":
        if not config.dataset.get("data_dir"):
            raise ValueError("config.dataset.data_dir must be the folder holding image-net.org's "
                             "train_data_batch_1..10 and val_data for 'imagenet_official'")
        return ImageNetOfficialSource(config.dataset.data_dir, split, config.dataset.get("cache_dir"))
    raise ValueError(f"unknown config.dataset.name {name!r}; use 'digits', 'tfds', 'folder' or "
                     "'imagenet_official'")


# -------------------------------------------------------------------------- transforms


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to ``size`` and center crops ``size x size``, as the reference does.

    The same pixels as torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image
    (the reference's ``utils.get_data``): PIL bilinear resampling (antialiased when
    downscaling), the longer side scaled to ``int(size·long/short)``, and the crop's top-left
    corner at ``round((dim − size)/2)`` (Python's rounding, half to even).
    """
    width, height = image.size
    if (width, height) != (size, size):
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            width, height = int(size * width / height), size
        image = image.resize((width, height), resample=RESAMPLE)
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
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
        if image.shape[:2] != (self.image_size, self.image_size):
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
    start: int = 0,
) -> grain.DatasetIterator:
    """Infinite, shuffled, seeded train batches of this process's shard, from global position ``start``.

    Args:
      config: the run's config (``dataset``, ``batch_size``, ``seed``, ``data_workers``).
      process_index, process_count: this process's shard (default: the JAX process).
      start: examples of the global stream already consumed (``examples_seen`` of a
        checkpoint, see :func:`data_state`); 0 starts at the beginning.

    Returns:
      An iterator of ``{"image": uint8 (B/n, H, W, C), "label": int32 (B/n,)}``: the
      ``process_index``-th chunk of each global batch of ``config.batch_size`` positions.

    Raises:
      ValueError: ``batch_size`` not divisible by ``process_count``; ``start < 0``; a bad
        dataset field (see :func:`create_source`, :class:`Preprocess`).
    """
    index, count = _process_index_and_count(process_index, process_count)
    if config.batch_size % count:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by process_count={count}"
        )
    if start < 0:
        raise ValueError(f"start={start} must be >= 0 (examples of the train stream consumed)")
    seed = int(config.get("seed", 0))
    source = create_source(config, config.dataset.get("train_split", "train"))
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    dataset = dataset.map(Preprocess(config))
    if config.dataset.get("random_flip", False):
        dataset = dataset.random_map(RandomFlip(), seed=seed)  # seeded by the global position
    if start:
        dataset = dataset[start:]
    # Chunks of `local` consecutive positions; process p takes chunk p of every global batch,
    # so the assembled global batch has the rows of a one-process batch, in the same order.
    local = config.batch_size // count
    dataset = dataset.batch(local, drop_remainder=True)[index::count]
    return iter(_to_iter_dataset(dataset, config))


DATA_STATE_FORMAT = "global_position/1"


def data_state(config: ml_collections.ConfigDict, examples_seen: int) -> dict[str, Any]:
    """The train stream's position as stored with a checkpoint (JSON-able, the same on every process).

    ``examples_seen`` is the number of examples of the global stream consumed (``k·B``
    after ``k`` batches of ``B``); ``batch_size`` and ``seed`` are kept for the record.
    """
    return {"format": DATA_STATE_FORMAT, "examples_seen": int(examples_seen),
            "batch_size": int(config.batch_size), "seed": int(config.get("seed", 0))}


def resume_position(stored: Any, step: int, config: ml_collections.ConfigDict) -> int:
    """Examples of the train stream consumed before ``step``, from what a checkpoint stored.

    Args:
      stored: the checkpoint's data item: a :func:`data_state` dict; for checkpoints
        written before the position became global, ``{"grain_states": [state, ...]}`` (the
        per-process grain iterator states, each ``{"next_index": batches}`` or a
        multi-worker state); ``None`` when the checkpoint has no data item (e.g. written
        by the convert tool).
      step: the checkpoint's step (one global batch of ``config.batch_size`` per step).
      config: the run's config.

    Returns:
      The global position to pass as ``create_train_iterator(..., start=...)``.

    Raises:
      ValueError: a stored state this code cannot read.
    """
    if stored is None:
        return step * int(config.batch_size)
    if stored.get("format") == DATA_STATE_FORMAT:
        if int(stored.get("seed", config.get("seed", 0))) != int(config.get("seed", 0)):
            logging.warning("the checkpoint's data order used seed %s; config.seed=%s reorders the "
                            "examples from here on", stored.get("seed"), config.get("seed", 0))
        return int(stored["examples_seen"])
    if "grain_states" in stored:  # per-process grain iterator states (older checkpoints)
        batches = {s["next_index"] for s in stored["grain_states"] if "next_index" in s}
        if len(batches) > 1:
            raise ValueError(f"the checkpoint's per-process data states disagree: {sorted(batches)} batches")
        # Each state counts this process's batches, one per global batch: the step, unless
        # the batch size changed; multi-worker states have no single counter, so use the step.
        return (batches.pop() if batches else step) * int(config.batch_size)
    raise ValueError(f"unknown data state in the checkpoint: {sorted(stored)}")


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


def num_classes(config: ml_collections.ConfigDict) -> int | None:
    """Number of classes of the dataset, or None when unlabelled / unknown."""
    name = config.dataset.name
    if _label_key(config) is None:
        return None
    if name == "digits":
        return 10
    if name == "imagenet_official":
        return 1000
    if name == "folder":
        return len(create_source(config, config.dataset.get("train_split", "train")).classes)
    feature = _tfds_builder(config).info.features[_label_key(config)]
    return getattr(feature, "num_classes", None)


def dataset_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A small dict describing the dataset, for logging."""
    dataset = config.dataset
    return {
        "name": dataset.tfds_name if dataset.name == "tfds" else dataset.name,
        "num_train": len(create_source(config, dataset.get("train_split", "train"))),
        "num_eval": num_eval_examples(config),
        "image_shape": (int(dataset.image_size), int(dataset.image_size), int(dataset.channels)),
        "num_levels": int(dataset.num_levels),
        "num_classes": num_classes(config),
    }


def check_config_against_data(config: ml_collections.ConfigDict, splits: tuple[str, ...] = ("train", "eval")
                              ) -> None:
    """Checks, before anything is compiled, that the model and the data agree.

    What the model and the data must agree on: the number of classes (a conditional model,
    ``config.model.num_classes > 0``, needs labels and exactly the dataset's classes; an
    unconditional one ignores them), the image size (each split's first record must
    preprocess to ``dataset.image_size``, or ``dataset.resize`` must be set), the channels
    (1 or 3; grey and RGB sources are converted) and the levels (``dataset.num_levels`` at
    most the source's: 17 for digits, 256 otherwise). Reads the dataset's metadata and one
    record of each split; never the whole dataset.

    Args:
      config: the run's config.
      splits: which of ``dataset.train_split`` ("train") and ``dataset.eval_split`` ("eval")
        to check.

    Raises:
      ValueError: the first disagreement, naming the config field and the value the data
        needs. FileNotFoundError: the data is missing (see :func:`create_source`).
    """
    dataset, model = config.dataset, config.get("model", {})
    preprocess = Preprocess(config)  # channels, resize and levels ranges
    wanted = int(model.get("num_classes", 0) or 0)
    name = dataset.tfds_name if dataset.name == "tfds" else dataset.name
    if wanted:
        if _label_key(config) is None:
            raise ValueError(f"config.model.num_classes={wanted} makes a class-conditional model, but "
                             f"config.dataset.label_key is None (the data has no labels): set "
                             f"config.model.num_classes=0 or config.dataset.label_key")
        have = num_classes(config)
        if have is not None and have != wanted:
            raise ValueError(f"config.model.num_classes={wanted} but the dataset {name!r} has {have} "
                             f"classes (labels 0..{have - 1}); set --config.model.num_classes={have} "
                             f"(or 0 for an unconditional model)")
    for which in splits:
        split = dataset.get(f"{which}_split", which if which == "train" else "test")
        source = create_source(config, split)
        if not len(source):
            raise ValueError(f"the {which} split {split!r} of {name!r} is empty")
        try:
            record = preprocess.map(source[0])
        except ValueError as e:
            raise ValueError(f"the {which} split {split!r} of {name!r} does not fit the config: {e}") from e
        label = int(record["label"])
        if wanted and not 0 <= label < wanted:
            raise ValueError(f"the {which} split {split!r} of {name!r} has label {label}, outside "
                             f"[0, config.model.num_classes={wanted})")


__all__ = [
    "DATA_STATE_FORMAT", "DigitsSource", "ImageFolderSource", "ImageNetOfficialSource", "Preprocess",
    "RandomFlip", "check_config_against_data", "create_eval_iterator", "create_source",
    "create_train_iterator", "data_state", "dataset_summary", "find_official_files", "make_global_batch",
    "num_classes", "num_eval_examples", "read_official_batch", "resize_center_crop", "resume_position",
    "tfds_source",
]
