"""Fréchet Inception Distance: the FID InceptionV3 in Flax, two measurement protocols, statistics, distance.

The network is the TensorFlow FID InceptionV3 (graph ``inception-2015-12-05``) up to its 2048-d final
average pool. What differs between the field's implementations is how an image reaches it; two
protocols are offered, each checked against its own reference implementation
(``tests/test_fid.py``, random weights, no download):

``"torch-fidelity"`` (the default; :data:`DEFAULT_PROTOCOL`)
    torch-fidelity's ``FeatureExtractorInceptionV3`` as torchmetrics' ``FrechetInceptionDistance``
    runs it (torchmetrics 1.6.0, the version the TarFlow authors pinned, and later versions with
    ``antialias=False``): **uint8** input, TensorFlow-1.x bilinear resize to 299x299 (source
    position ``i·in/out``, no half-pixel offset, no antialiasing), then ``(x − 128)/128``. Float
    images in ``[0, 1]`` are first truncated to uint8 as torchmetrics does with ``normalize=True``
    (``(x·255).byte()``). This is how the TarFlow paper's FIDs (and the reproductions quoted in
    our configs) were measured. Weights: torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` (:data:`TORCH_FIDELITY_WEIGHTS_URL`).
``"pytorch-fid"``
    pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)``: images in
    ``[0, 1]`` (uint8 divided by 255), PyTorch bilinear resize with half-pixel centres
    (``align_corners=False``), then ``2x − 1``. Comparable with FIDs computed by pytorch-fid.
    Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_URL`).

Both weights files are conversions of the same TensorFlow graph with the same tensor names, and
:func:`load_inception_params` reads either. Statistics files record the protocol they were
computed with (:func:`save_statistics`), and :func:`load_statistics` refuses to compare across
protocols: the two give different numbers on the same images.

Images are NHWC with 3 channels: ``uint8`` in [0, 255] or floating point in [0, 1].

Typical use::

    params = load_inception_params("weights-inception-2015-12-05-6726825d.pth")
    feats = inception_features(params, real_images)                 # protocol="torch-fidelity"
    save_statistics("ref_stats.npz", *compute_statistics(feats), protocol="torch-fidelity")
    score = fid(generated_images, "ref_stats.npz", params)
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.linalg

PROTOCOLS = ("torch-fidelity", "pytorch-fid")
DEFAULT_PROTOCOL = "torch-fidelity"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                              f"{TORCH_FIDELITY_WEIGHTS_FILE}")
WEIGHTS = {  # protocol -> (file name, where to download it)
    "torch-fidelity": (TORCH_FIDELITY_WEIGHTS_FILE, TORCH_FIDELITY_WEIGHTS_URL),
    "pytorch-fid": (FID_WEIGHTS_FILE, FID_WEIGHTS_URL),
}
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def check_protocol(protocol: str) -> str:
    """Returns ``protocol`` if it is one of :data:`PROTOCOLS`.

    Raises:
      ValueError: for any other value, naming the valid ones.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; use one of {PROTOCOLS} "
                         f"({DEFAULT_PROTOCOL!r} is the one the TarFlow paper's FIDs were measured with)")
    return protocol

# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------

Pad = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """Convolution without bias, inference-mode BatchNorm (eps 1e-3), ReLU; torchvision's ``BasicConv2d``."""

    features: int
    kernel: Pad = 1
    stride: int = 1
    padding: Pad = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        x = nn.Conv(self.features, (kh, kw), strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool that averages only the non-padded inputs (TF's behaviour)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """FID variant of the 35x35 block (``FIDInceptionA``)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (torchvision ``InceptionB``, ``Mixed_6a``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    """FID variant of the 17x17 block with factorised 7x7 convolutions (``FIDInceptionC``)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        for i, (features, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
            bd = BasicConv2d(features, **shape, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (torchvision ``InceptionD``, ``Mixed_7a``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """FID variants of the 8x8 block: ``FIDInceptionE_1`` (avg pool) or ``FIDInceptionE_2`` (max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def split(y: jax.Array, prefix: str) -> jax.Array:
            a = BasicConv2d(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y)
            b = BasicConv2d(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)
            return jnp.concatenate([a, b], axis=-1)

        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = split(BasicConv2d(384, name="branch3x3_1")(x), "branch3x3_2")
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = split(BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd), "branch3x3dbl_3")
        pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of 1-D linear interpolation with half-pixel centres (``align_corners=False``)."""
    # Source positions in float32 arithmetic, as PyTorch's CPU kernel computes them for float32 images.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(f32)
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), lo), f32(1.0) - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def resize_bilinear(x: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
    """Resizes NHWC images like PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)`` (pytorch-fid).

    Args:
      x: ``(N, H, W, C)`` float images (any scale).
      size: output height and width.

    Returns:
      ``(N, size, size, C)`` float32: output pixel ``i`` samples the source at
      ``(i + 0.5)·in/out − 0.5`` (clamped at 0), without antialiasing.
    """
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", _bilinear_matrix(h, size), x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", _bilinear_matrix(w, size), x, precision=hp)


def _tf1_grid(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, frac)`` of TensorFlow 1.x bilinear resizing without ``align_corners`` or half-pixel centres.

    Source position ``i·(in/out)`` computed as torch-fidelity does: a float32 ``arange`` times the
    float32-rounded ratio; ``lo`` its integer part, ``hi = min(lo + 1, in − 1)``.
    """
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo.astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
    """Resizes NHWC images like TensorFlow 1.x ``resize_bilinear`` (torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``).

    The resize of the original TensorFlow FID code, which torch-fidelity (and torchmetrics'
    FID) reproduce: output pixel ``i`` samples the source at ``i·in/out`` (no half-pixel
    offset, no antialiasing), interpolating first along the width, then along the height,
    each as ``a + (b − a)·frac`` (the same operation order as torch-fidelity's exact path).

    Args:
      x: ``(N, H, W, C)`` float images (any scale; the torch-fidelity protocol resizes 0..255 values).
      size: output height and width.

    Returns:
      ``(N, size, size, C)`` float32.
    """
    x = x.astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    ylo, yhi, dy = _tf1_grid(h, size)
    xlo, xhi, dx = _tf1_grid(w, size)
    dx, dy = jnp.asarray(dx)[None, None, :, None], jnp.asarray(dy)[None, :, None, None]

    def along_width(rows):
        a, b = rows[:, :, xlo], rows[:, :, xhi]
        return a + (b - a) * dx

    top, bottom = along_width(x[:, ylo]), along_width(x[:, yhi])
    return top + (bottom - top) * dy


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to the 2048-d final average pool, with one protocol's input handling.

    Attributes:
      protocol: ``"torch-fidelity"`` (input: 0..255 values, e.g. uint8 cast to float; TF1 resize;
        ``(x − 128)/128``) or ``"pytorch-fid"`` (input in ``[0, 1]``; PyTorch bilinear resize;
        ``2x − 1``). See the module docstring.

    Input ``(N, H, W, 3)``; output ``(N, 2048)`` float32.
    """

    protocol: str = DEFAULT_PROTOCOL

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_protocol(self.protocol)
        x = x.astype(jnp.float32)
        if self.protocol == "torch-fidelity":
            x = resize_bilinear_tf1(x) if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE) else x
            x = (x - 128.0) / 128.0
        else:
            x = resize_bilinear(x)
            x = 2.0 * x - 1.0
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------

_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_BN_TARGETS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _missing_weights_error(path: str, protocol: str | None) -> FileNotFoundError:
    wanted = [protocol] if protocol else list(PROTOCOLS)
    options = " or ".join(f"{WEIGHTS[p][0]} ({p}: {WEIGHTS[p][1]})" for p in wanted)
    return FileNotFoundError(f"FID Inception weights not found at {path!r}. Download {options} and pass "
                             "its path (or the folder holding it).")


def weights_file(path: str | os.PathLike, protocol: str | None = None) -> str:
    """The Inception weights file at ``path``: the file itself, or in a folder the protocol's file.

    Args:
      path: a ``.pth`` file, or a folder holding ``weights-inception-2015-12-05-6726825d.pth``
        (torch-fidelity's) or ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's).
      protocol: prefer this protocol's file name in a folder (the other file is used when the
        folder holds only that one: both are the same network).

    Returns:
      The path of an existing file.

    Raises:
      FileNotFoundError: nothing usable at ``path``; the message names each file and its URL.
    """
    path = os.fspath(path)
    if protocol is not None:
        check_protocol(protocol)
    if os.path.isdir(path):
        order = [protocol] if protocol else []
        order += [p for p in PROTOCOLS if p not in order]
        for p in order:
            candidate = os.path.join(path, WEIGHTS[p][0])
            if os.path.isfile(candidate):
                return candidate
        raise _missing_weights_error(path, protocol)
    if not os.path.isfile(path):
        raise _missing_weights_error(path, protocol)
    return path


def _read_state_dict(path: str | os.PathLike, protocol: str | None = None) -> Mapping[str, Any]:
    path = weights_file(path, protocol)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"reading {path!r} needs PyTorch (pip install torch), or pass the state dict "
                          "as a mapping of numpy arrays instead of a path") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return state


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


@functools.cache
def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened ``{(collection, module..., name): shape}`` of the network's variables."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def load_inception_params(source: str | os.PathLike | Mapping[str, Any], protocol: str | None = None
                          ) -> dict[str, Any]:
    """Flax variables of the FID Inception network from a weights file, a folder, or a state dict.

    Args:
      source: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
        ``pt_inception-2015-12-05-6726825d.pth`` (same tensor names; the ``fc`` head is ignored),
        a folder holding one of them, or an already loaded mapping of name -> array.
      protocol: in a folder holding both files, read this protocol's (see :data:`WEIGHTS`).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for :class:`FIDInceptionV3` (kernels HWIO, float32).

    Raises:
      FileNotFoundError: no weights file at ``source`` (the message names the files and URLs).
      ImportError: reading a ``.pth`` file needs PyTorch.
      ValueError: the state dict does not fit the network (names the missing/unexpected entries).
    """
    state = _read_state_dict(source, protocol) if isinstance(source, (str, os.PathLike)) else source
    expected = _variable_shapes()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        *modules, layer, leaf = key.split(".")
        array = _as_numpy(value)
        if layer == "conv" and leaf == "weight" and array.ndim == 4:
            target = ("params", *modules, "conv", "kernel")
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer == "bn" and leaf in _BN_TARGETS:
            collection, name = _BN_TARGETS[leaf]
            target = (collection, *modules, "bn", name)
        else:
            unknown.append(key)
            continue
        if target not in expected:
            unknown.append(key)
        elif array.shape != expected[target]:
            raise ValueError(f"state dict entry {key!r} has shape {array.shape}, but the FID Inception network "
                             f"needs {expected[target]} there; is this {TORCH_FIDELITY_WEIGHTS_FILE} or {FID_WEIGHTS_FILE}?")
        else:
            flat[target] = array
    torch_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    missing = [".".join((*k[1:-1], torch_names[k[-1]])) for k in expected if k not in flat]
    if unknown or missing:
        raise ValueError(f"state dict does not match the FID Inception network: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]}); expected "
                         f"{TORCH_FIDELITY_WEIGHTS_FILE} ({TORCH_FIDELITY_WEIGHTS_URL}) or {FID_WEIGHTS_FILE} "
                         f"({FID_WEIGHTS_URL})")
    variables: dict[str, Any] = {}
    for path, array in flat.items():
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(array)
    return variables


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="protocol")
def _features(variables: Mapping[str, Any], images: jax.Array, protocol: str) -> jax.Array:
    return FIDInceptionV3(protocol=protocol).apply(variables, images)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}; "
                         "convert NCHW with images.transpose(0, 2, 3, 1) and grayscale with np.repeat(.., 3, -1)")
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"expected uint8 or floating point images, got dtype {images.dtype}")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale "
                         "[-1, 1] images with (x + 1) / 2 and clip samples with np.clip(x, 0, 1)")


def network_input(images: Any, protocol: str = DEFAULT_PROTOCOL) -> np.ndarray:
    """The float32 array the protocol's network receives for NHWC ``images`` (before resizing).

    Args:
      images: ``(N, H, W, 3)`` uint8 in 0..255, or float in ``[0, 1]``.
      protocol: ``"torch-fidelity"``: uint8 values as float (0..255); float images are first
        truncated to uint8 like torchmetrics' ``normalize=True`` (``(x·255).byte()``, in
        float32, clipped to ``[0, 1]`` first). ``"pytorch-fid"``: values in ``[0, 1]`` (uint8 / 255).

    Returns:
      ``(N, H, W, 3)`` float32.

    Raises:
      ValueError: wrong shape, float values outside ``[0, 1]``, or an unknown protocol.
      TypeError: a dtype other than uint8 or floating point.
    """
    check_protocol(protocol)
    images = np.asarray(images)
    _check_images(images)
    if protocol == "torch-fidelity":
        if images.dtype != np.uint8:
            scaled = np.clip(images.astype(np.float32), 0.0, 1.0) * np.float32(255.0)
            images = scaled.astype(np.uint8)  # truncation toward zero, as torch's .byte()
        return images.astype(np.float32)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32)


def inception_features(variables: Mapping[str, Any], images: Any, batch_size: int = 50,
                       protocol: str = DEFAULT_PROTOCOL) -> np.ndarray:
    """Pool features of NHWC images under one FID protocol, ``batch_size`` images per network call.

    Args:
      variables: from :func:`load_inception_params`.
      images: ``(N, H, W, 3)`` uint8 (0..255) or float in ``[0, 1]``; any ``H, W`` (resized to 299).
      batch_size: images per call (the last batch is padded, so one compilation serves all).
      protocol: ``"torch-fidelity"`` (default, as the TarFlow paper measured) or ``"pytorch-fid"``.

    Returns:
      ``(N, 2048)`` float32.

    Raises:
      ValueError / TypeError: as :func:`network_input`; ``batch_size < 1``.
    """
    check_protocol(protocol)
    images = np.asarray(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0] if images.ndim else 0
    out = np.empty((n, FEATURE_DIM), np.float32)
    batch_size = min(batch_size, max(n, 1))
    for start in range(0, n, batch_size):
        batch = network_input(images[start:start + batch_size], protocol)
        count = batch.shape[0]
        if count < batch_size:  # pad the last batch so that every call reuses one compilation
            batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
        out[start:start + count] = np.asarray(_features(variables, batch, protocol))[:count]
    return out


# ----------------------------------------------------------------------------------------------------
# Statistics and distance
# ----------------------------------------------------------------------------------------------------


def compute_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, float64 (``np.cov``, like pytorch-fid).

    Raises:
      ValueError: not 2-D or fewer than 2 rows.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 to estimate a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any, protocol: str | None = None) -> None:
    """Writes ``mu`` and ``sigma`` (float64) to an ``.npz`` file, with the FID protocol that produced them.

    Args:
      path: the file to write (no ``.npz`` is appended).
      mu: ``(D,)`` feature mean.
      sigma: ``(D, D)`` feature covariance.
      protocol: the protocol of the features (:data:`PROTOCOLS`), stored as ``protocol`` so that
        :func:`load_statistics` can refuse a comparison across protocols. ``None`` stores none.

    Raises:
      ValueError: ``mu``/``sigma`` shapes disagree, or an unknown protocol.
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_statistics(mu, sigma, "statistics to save")
    arrays = {"mu": mu, "sigma": sigma}
    if protocol is not None:
        arrays["protocol"] = np.asarray(check_protocol(protocol))
    with open(os.fspath(path), "wb") as f:  # an open file keeps numpy from appending ".npz"
        np.savez(f, **arrays)


def statistics_protocol(path: str | os.PathLike) -> str | None:
    """The FID protocol recorded in a statistics file, or ``None`` if it records none."""
    with np.load(os.fspath(path)) as data:
        return str(data["protocol"]) if "protocol" in data.files else None


def load_statistics(path: str | os.PathLike, protocol: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` in float64 from an ``.npz`` file with keys ``mu`` and ``sigma``.

    Args:
      path: a file written by :func:`save_statistics` (or any ``.npz`` with ``mu`` and ``sigma``).
      protocol: the protocol the caller's features use. If the file records another one, the
        statistics are not comparable and a ValueError is raised; a file without a recorded
        protocol is accepted with a warning.

    Raises:
      FileNotFoundError: no file at ``path``.
      KeyError: ``mu`` or ``sigma`` missing.
      ValueError: bad shapes, or a protocol mismatch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FID statistics file at {path!r}; create one with "
                                "save_statistics(path, *compute_statistics(inception_features(params, images)), "
                                "protocol=...)")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise KeyError(f"FID statistics file {path!r} lacks {missing} (it has {data.files}); "
                           "write it with save_statistics")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        stored = str(data["protocol"]) if "protocol" in data.files else None
    _check_statistics(mu, sigma, repr(path))
    if protocol is not None:
        check_protocol(protocol)
        if stored is None:
            warnings.warn(f"FID statistics file {path!r} does not record its protocol; assuming {protocol!r}. "
                          "Statistics from another protocol give a different FID.", stacklevel=2)
        elif stored != protocol:
            raise ValueError(f"FID statistics file {path!r} was computed with protocol {stored!r}, but these "
                             f"features use {protocol!r}; the two give different numbers on the same images. "
                             f"Recompute the statistics with protocol={protocol!r} or use protocol={stored!r}.")
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Matrix square root, quietly: the caller checks the result for non-finite or complex values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        if tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16):
            return scipy.linalg.sqrtm(a, disp=False)[0]  # older SciPy prints a warning unless disp=False
        return scipy.linalg.sqrtm(a)  # `disp` is deprecated from SciPy 1.16


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d² = |mu1 − mu2|² + Tr(sigma1 + sigma2 − 2·(sigma1·sigma2)^½)`` (Heusel et al. 2017,
    "GANs trained by a two time-scale update rule..."; as pytorch-fid's
    ``calculate_frechet_distance``: when the matrix square root is not finite, ``eps·I`` is
    added to both covariances; a small imaginary part is dropped).

    Args:
      mu1, sigma1, mu2, sigma2: means ``(D,)`` and covariances ``(D, D)``.
      eps: the regulariser for a near-singular product.

    Returns:
      The FID (a squared distance in feature units; lower is better).

    Raises:
      ValueError: shapes that do not fit; a square root that stays non-finite; an imaginary
        part above 1e-3 on its diagonal (covariances not positive semi-definite).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_statistics(mu1, sigma1, "first statistics")
    _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):  # near-singular product: regularise both covariances
        offset = eps * np.eye(sigma1.shape[0])
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite even with eps={eps} added; try a larger eps")
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part on its diagonal ({imag:.3g}); "
                             "the covariances are probably not positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(images: Any, reference: str | os.PathLike | tuple[Any, Any], variables: Mapping[str, Any],
        batch_size: int = 50, protocol: str = DEFAULT_PROTOCOL) -> float:
    """FID of NHWC images against reference statistics.

    Args:
      images: ``(N, H, W, 3)`` uint8, or float in ``[0, 1]`` (see :func:`network_input`), ``N >= 2``.
      reference: an ``.npz`` path (checked to record the same protocol, if it records one) or a
        ``(mu, sigma)`` pair computed with the same protocol.
      variables: from :func:`load_inception_params`.
      batch_size: images per network call.
      protocol: ``"torch-fidelity"`` (default) or ``"pytorch-fid"``.

    Returns:
      The Fréchet distance (float64 arithmetic).

    Raises:
      ValueError: protocol mismatch with the reference file, bad images or statistics.
    """
    mu_ref, sigma_ref = (load_statistics(reference, protocol) if isinstance(reference, (str, os.PathLike))
                         else tuple(np.asarray(s, np.float64) for s in reference))
    mu, sigma = compute_statistics(inception_features(variables, images, batch_size=batch_size, protocol=protocol))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


__all__ = [
    "PROTOCOLS", "DEFAULT_PROTOCOL", "WEIGHTS", "FID_WEIGHTS_FILE", "FID_WEIGHTS_URL",
    "TORCH_FIDELITY_WEIGHTS_FILE", "TORCH_FIDELITY_WEIGHTS_URL", "FEATURE_DIM", "INCEPTION_SIZE",
    "FIDInceptionV3", "check_protocol", "weights_file", "load_inception_params", "network_input",
    "inception_features", "resize_bilinear", "resize_bilinear_tf1", "compute_statistics",
    "save_statistics", "statistics_protocol", "load_statistics", "frechet_distance",
    "fid",
]
