"""Fréchet Inception Distance: the "FID Inception" network in Flax, feature statistics and the distance.

The network is the TensorFlow FID InceptionV3 as ported by ``pytorch-fid`` (``InceptionV3([3])`` with
``resize_input=True, normalize_input=True``): images are bilinearly resized to 299x299
(``align_corners=False``), mapped from [0, 1] to [-1, 1], and the 2048-d output of the final average
pool is the feature. Its weights come from pytorch-fid's file ``pt_inception-2015-12-05-6726825d.pth``
(see :data:`FID_WEIGHTS_URL`), which :func:`load_inception_params` converts to Flax variables.

Images are NHWC with 3 channels: ``uint8`` in [0, 255] or floating point in [0, 1].

Typical use::

    params = load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    save_statistics("ref_stats.npz", *compute_statistics(inception_features(params, real_images)))
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

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048

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
    """Resizes NHWC images to ``size`` x ``size`` like ``F.interpolate(mode='bilinear', align_corners=False)``."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", _bilinear_matrix(h, size), x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", _bilinear_matrix(w, size), x, precision=hp)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to the 2048-d final average pool; NHWC input in [0, 1], output (N, 2048)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = resize_bilinear(x.astype(jnp.float32))
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


def _missing_weights_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights not found at {path!r}. Download pytorch-fid's {FID_WEIGHTS_FILE} from "
        f"{FID_WEIGHTS_URL} and pass its path (or the folder holding it).")


def _read_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FID_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise _missing_weights_error(path)
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


def load_inception_params(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The FID Inception network's Flax variables from pytorch-fid's weights.

    Convolution kernels OIHW → HWIO, BatchNorm weight/bias/running stats → scale/bias/mean/var;
    the classifier (``fc``) and auxiliary head are ignored.

    Args:
      source: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the folder holding
        it; reading it needs PyTorch), or its state dict as a mapping of arrays/tensors.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (float32) for :class:`FIDInceptionV3`.

    Raises:
      FileNotFoundError: no weights file at ``source`` (the message gives the download URL).
      ImportError: a file path given without PyTorch installed.
      ValueError: the state dict does not match the network (shapes, missing or unexpected keys).
    """
    state = _read_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
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
                             f"needs {expected[target]} there; is this {FID_WEIGHTS_FILE}?")
        else:
            flat[target] = array
    torch_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    missing = [".".join((*k[1:-1], torch_names[k[-1]])) for k in expected if k not in flat]
    if unknown or missing:
        raise ValueError(f"state dict does not match the FID Inception network: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]}); "
                         f"expected pytorch-fid's {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}")
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


@jax.jit
def _features(variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    return FIDInceptionV3().apply(variables, images)


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 or [0, 1] float images as float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}; "
                         "convert NCHW with images.transpose(0, 2, 3, 1) and grayscale with np.repeat(.., 3, -1)")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"expected uint8 or floating point images, got dtype {images.dtype}")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale "
                         "[-1, 1] images with (x + 1) / 2 and clip samples with np.clip(x, 0, 1)")
    return images.astype(np.float32)


def inception_features(variables: Mapping[str, Any], images: Any, batch_size: int = 50) -> np.ndarray:
    """Inception pool features of images, computed ``batch_size`` at a time (one compilation).

    Args:
      variables: from :func:`load_inception_params`.
      images: ``(N, H, W, 3)`` uint8 in ``[0, 255]`` or float in ``[0, 1]`` (any size; resized
        to 299×299 bilinearly like pytorch-fid).
      batch_size: images per network call (the last batch is padded).

    Returns:
      float32 ``(N, 2048)`` features (the final average pool, pytorch-fid's ``dims=2048``).

    Raises:
      ValueError: not NHWC with 3 channels, float values outside ``[0, 1]``, ``batch_size < 1``.
      TypeError: neither uint8 nor floating point.
    """
    images = np.asarray(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0] if images.ndim else 0
    out = np.empty((n, FEATURE_DIM), np.float32)
    batch_size = min(batch_size, max(n, 1))
    for start in range(0, n, batch_size):
        batch = _to_unit_float(images[start:start + batch_size])
        count = batch.shape[0]
        if count < batch_size:  # pad the last batch so that every call reuses one compilation
            batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
        out[start:start + count] = np.asarray(_features(variables, batch))[:count]
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


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
    """Writes ``mu (D,)`` and ``sigma (D, D)`` as float64 to an ``.npz`` file (keys ``mu``, ``sigma``).

    Raises:
      ValueError: the shapes do not fit together.
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_statistics(mu, sigma, "statistics to save")
    with open(os.fspath(path), "wb") as f:  # an open file keeps numpy from appending ".npz"
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))`` in float64 from an ``.npz`` file with keys ``mu`` and ``sigma``.

    Raises:
      FileNotFoundError: no file at ``path``.
      KeyError: the file lacks ``mu`` or ``sigma``.
      ValueError: their shapes do not fit together.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FID statistics file at {path!r}; create one with "
                                "save_statistics(path, *compute_statistics(inception_features(params, images)))")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise KeyError(f"FID statistics file {path!r} lacks {missing} (it has {data.files}); "
                           "write it with save_statistics")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    _check_statistics(mu, sigma, repr(path))
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
        batch_size: int = 50) -> float:
    """FID of images against reference statistics.

    Args:
      images: ``(N, H, W, 3)`` uint8 or float in ``[0, 1]``; N >= 2 (50,000 for the published
        protocol).
      reference: an ``.npz`` path written by :func:`save_statistics`, or a ``(mu, sigma)`` pair.
      variables: from :func:`load_inception_params`.
      batch_size: images per network call.

    Returns:
      :func:`frechet_distance` of the images' feature statistics and the reference's.

    Raises:
      ValueError, TypeError, FileNotFoundError, KeyError: as the functions it calls.
    """
    mu_ref, sigma_ref = (load_statistics(reference) if isinstance(reference, (str, os.PathLike))
                         else tuple(np.asarray(s, np.float64) for s in reference))
    mu, sigma = compute_statistics(inception_features(variables, images, batch_size=batch_size))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


__all__ = [
    "FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "FEATURE_DIM", "INCEPTION_SIZE", "FIDInceptionV3",
    "load_inception_params", "inception_features", "resize_bilinear", "compute_statistics",
    "save_statistics", "load_statistics", "frechet_distance", "fid",
]
