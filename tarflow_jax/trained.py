"""A trained TarFlow as one immutable object: density, sampler, encoder/decoder, denoiser.

:class:`TrainedFlow` bundles a :class:`~tarflow_jax.flow.TarFlow`, its variables and the
settings of the run that trained it (pixel levels, Gaussian noise level, sampling options),
so other JAX code can use a flow without knowing ``model.apply(..., method=...)``, the label
conventions or the noise level::

    flow = tarflow_jax.load("workdir/digits")           # or TrainedFlow.create(model, variables)
    nats = flow.log_prob(x, y)                          # (B,) log p(x|y), x in [-1, 1]
    bpd = flow.bits_per_dim(pixels, y, key=key)         # (B,) on integer images
    images = flow.sample(key, 16, y=3)                  # the run's guidance, denoised

The object is a pytree (``flax.struct.dataclass``): the variables are its leaves, the model
and settings its static part. It passes through ``jax.jit``, ``vmap``, ``grad`` and
``shard_map`` as an argument, and every method is a pure function of its inputs. Called
outside a transform, each method runs one cached ``jax.jit`` per input shape (and per
static option: solver, guided or not, ...); inside a transform it is traced into the
caller's program.

Conventions (all methods):

* images ``x`` are float ``(B, H, W, C)`` NHWC in ``[-1, 1]`` (``H = W = model.img_size``,
  ``C = model.in_channels``); integer ``pixels`` take values ``0 .. num_levels-1``;
* labels ``y``: ``None`` (no label: the mean class embedding, for conditional models), a
  Python/NumPy integer (the same label for every example), or an int array ``(B,)`` where
  ``-1`` means "no label"; an unconditional model takes ``y=None`` only;
* densities are in nats per example; ``encode`` maps data to latents (TarFlow's forward
  direction), ``decode`` latents to data.

The latent prior is the standard normal. For the volume-preserving variant
(``nvp=False``) the run's prior variance table ``var (T, D)`` is folded into ``encode``
(``z`` is divided by ``√var``, ``logdet`` gains ``−½·Σ log var``), so that ``decode``, which
multiplies by ``√var`` like :meth:`TarFlow.reverse`, is its exact inverse and ``sample``
draws from the density ``log_prob`` reports. For the usual affine variant (``nvp=True``)
``var`` is all ones and every number equals the plain ``model.apply`` one (on CPU up to
float32 rounding: the forward pass runs inside :func:`tarflow_jax.layers.forward_pass_kernels`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import configlib, distrax_compat, layers, likelihood, nnx_compat, sampling
from tarflow_jax.flow import GUIDE_WHAT, TarFlow, count_params, patchify, unpatchify

__all__ = ["TrainedFlow", "SampleOptions"]


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Default sampling settings of a :class:`TrainedFlow` (a run's ``config.sample``).

    Fields: ``guidance`` (weight ``w >= 0``; 0 = none), ``guide_what`` (``"a"``, ``"b"`` or
    ``"ab"``), ``attn_temp`` (attention temperature of the unguided branch, ``> 0``),
    ``annealed_guidance`` (weight ``w·(t+1)/(T-1)`` at token ``t``), ``solver``
    (``"cached"``, ``"jacobi"`` or ``"uncached"``), ``jacobi`` (a
    :class:`~tarflow_jax.sampling.JacobiPlan` for ``solver="jacobi"``; ``None``: defaults),
    ``denoise`` (one score step after sampling, when the run used Gaussian noise) and
    ``denoise_scale`` (multiplies that step).
    """

    guidance: float = 0.0
    guide_what: str = "ab"
    attn_temp: float = 1.0
    annealed_guidance: bool = False
    solver: str = "cached"
    jacobi: sampling.JacobiPlan | None = None
    denoise: bool = True
    denoise_scale: float = 1.0

    def __post_init__(self):
        if self.jacobi is not None:  # lists -> tuples, so the options stay hashable (jit cache keys)
            fields = {k: tuple(v) if isinstance(v, list) else v
                      for k, v in dataclasses.asdict(self.jacobi).items()}
            object.__setattr__(self, "jacobi", sampling.JacobiPlan(**fields))

    def check(self) -> None:
        """Raises a ValueError naming a bad field."""
        if self.guide_what not in GUIDE_WHAT:
            raise ValueError(f"guide_what must be one of {GUIDE_WHAT}; got {self.guide_what!r}")
        if self.solver not in sampling.SOLVERS:
            raise ValueError(f"solver must be one of {sampling.SOLVERS}; got {self.solver!r}")
        _check_number("guidance", self.guidance, lambda v: v >= 0, ">= 0")
        _check_number("attn_temp", self.attn_temp, lambda v: v > 0, "> 0")
        _check_number("denoise_scale", self.denoise_scale, lambda v: v >= 0, ">= 0")

    @classmethod
    def from_config(cls, sample_config: Mapping[str, Any] | None) -> "SampleOptions":
        """The options of a run's ``config.sample`` (missing fields keep the defaults above)."""
        sample_config = dict(sample_config or {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in sample_config.items() if k in names})


def _check_number(name: str, value: Any, ok, what: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    if not ok(float(value)):
        raise ValueError(f"{name} must be {what}; got {value}")


def _to_plain(tree: Any) -> Any:
    """Nested mappings (FrozenDict, boxed params) as plain dicts of arrays."""
    tree = nn.meta.unbox(tree)
    if isinstance(tree, Mapping):
        return {k: _to_plain(v) for k, v in tree.items()}
    return tree


@flax.struct.dataclass
class TrainedFlow:
    """A TarFlow with its variables and its run's settings; an immutable pytree.

    Build one with :func:`tarflow_jax.load` (a workdir, converted or trained),
    :meth:`create` (a model and a Flax ``variables`` dict, e.g. from
    :func:`tarflow_jax.convert.from_torch_state_dict`) or :meth:`from_config`.

    Attributes:
      model: the :class:`TarFlow` module (static).
      variables: ``{"params": ..., "prior": {"var": (T, D) float32}}`` (the pytree leaves).
      num_levels: pixel levels ``Q`` of the data (256 for 8-bit images; 17 for digits).
      noise_std: the Gaussian noise level ``σ`` the run trained with (0 for uniform
        dequantization); the default of :meth:`denoise` and of ``sample(denoise=True)``.
      options: default :class:`SampleOptions` (the run's ``config.sample``).
      config_json: the run's config as JSON text (``""`` when built without one); see
        :attr:`config`.
    """

    model: TarFlow = flax.struct.field(pytree_node=False)
    variables: dict[str, Any]
    num_levels: int = flax.struct.field(pytree_node=False, default=256)
    noise_std: float = flax.struct.field(pytree_node=False, default=0.0)
    options: SampleOptions = flax.struct.field(pytree_node=False, default=SampleOptions())
    config_json: str = flax.struct.field(pytree_node=False, default="")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, model: TarFlow, variables: Mapping[str, Any], *, num_levels: int = 256,
               noise_std: float = 0.0, options: SampleOptions | None = None,
               config: Any = None) -> "TrainedFlow":
        """A flow from a model and its Flax variables (``{"params": ...}``, optionally ``"prior"``).

        Args:
          model: the :class:`TarFlow` the variables belong to.
          variables: as returned by ``model.init``, a train state's ``variables()`` or
            :func:`~tarflow_jax.convert.from_torch_state_dict`; boxed (partitioned) params and
            NumPy arrays are accepted. A missing ``prior`` collection means ``var = 1``.
          num_levels: pixel levels ``Q >= 2`` of the data, used by :meth:`bits_per_dim`.
          noise_std: the training noise level ``σ >= 0`` (0: uniform dequantization).
          options: default sampling settings (:class:`SampleOptions`).
          config: the run's config (ConfigDict or dict), kept as JSON for :attr:`config`.

        Raises:
          ValueError: variables whose tree or shapes do not fit ``model`` (the first wrong
            path with both shapes), or a bad setting.
        """
        if not isinstance(model, TarFlow):
            raise TypeError(f"model must be a tarflow_jax.TarFlow; got {type(model).__name__}")
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables must be a Flax variables dict with a 'params' collection "
                             "(e.g. model.init(...) or convert.from_torch_state_dict(...))")
        model = model.clone(parent=None)
        variables = _to_plain(variables)
        variables = {"params": variables["params"],
                     "prior": {"var": variables.get("prior", {}).get(
                         "var", np.ones((model.num_tokens, model.token_dim), np.float32))}}
        _check_variables(model, variables)
        variables = jax.tree.map(jnp.asarray, variables)
        if int(num_levels) < 2:
            raise ValueError(f"num_levels must be >= 2; got {num_levels}")
        if not float(noise_std) >= 0:
            raise ValueError(f"noise_std must be >= 0; got {noise_std}")
        options = options or SampleOptions()
        options.check()
        if config is None:
            config_json = ""
        elif hasattr(config, "to_json_best_effort"):
            config_json = config.to_json_best_effort()
        else:
            config_json = json.dumps(config, default=str)
        return cls(model=model, variables=variables, num_levels=int(num_levels),
                   noise_std=float(noise_std), options=options, config_json=config_json)

    @classmethod
    def from_config(cls, config: Any, variables: Mapping[str, Any]) -> "TrainedFlow":
        """A flow from a run's config and its variables.

        Args:
          config: a ``ConfigDict`` or dict in the run's schema (old field names are
            upgraded, missing fields take :func:`tarflow_jax.configlib.base_config`'s values):
            the model (:func:`tarflow_jax.configlib.create_model`), ``dataset.num_levels``,
            ``noise``/``noise_std`` and ``sample`` (the default :class:`SampleOptions`).
          variables: the model's Flax variables (see :meth:`create`).

        Raises:
          ValueError: a config that makes no valid model, or variables that do not fit it.
        """
        config = configlib.upgrade(config, source="the config given to TrainedFlow.from_config")
        if config.noise not in likelihood.NOISE_KINDS:
            raise ValueError(f"config.noise must be one of {likelihood.NOISE_KINDS}; got {config.noise!r}")
        noise_std = float(config.noise_std) if config.noise == "gaussian" else 0.0
        return cls.create(configlib.create_model(config), variables,
                          num_levels=config.dataset.num_levels, noise_std=noise_std,
                          options=SampleOptions.from_config(config.sample), config=config)

    def replace_options(self, **changes: Any) -> "TrainedFlow":
        """A copy with some default sampling settings changed (same weights, no copy of them)."""
        options = dataclasses.replace(self.options, **changes)
        options.check()
        return self.replace(options=options)

    @property
    def config(self):
        """The run's config as a (fresh, mutable) ``ml_collections.ConfigDict``; None if unknown."""
        if not self.config_json:
            return None
        return configlib.upgrade(json.loads(self.config_json), source="TrainedFlow.config")

    @property
    def params(self) -> Any:
        """``variables["params"]``."""
        return self.variables["params"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        m = self.model
        return (m.img_size, m.img_size, m.in_channels)

    @property
    def num_dims(self) -> int:
        """``N = H·W·C``."""
        return self.model.num_dims

    @property
    def num_classes(self) -> int:
        """Number of classes (0: unconditional)."""
        return self.model.num_classes

    @property
    def noise(self) -> str:
        """How the run saw its data: ``"gaussian"`` (``noise_std > 0``) or ``"uniform"`` dequantization."""
        return "gaussian" if self.noise_std > 0 else "uniform"

    def to_uint8(self, x: Any) -> np.ndarray:
        """Images in ``[-1, 1]`` (e.g. from :meth:`sample`) to uint8 pixels ``0..255``, as the run does.

        :func:`tarflow_jax.likelihood.to_uint8` with this flow's levels and noise kind: back to
        the data's ``num_levels`` levels (the exact inverse of uniform dequantization, or the
        reference's truncation for Gaussian-noise runs), then scaled to 0..255; NaN → 0. Host
        NumPy (not for use under ``jit``).

        Args:
          x: float images, any shape.

        Returns:
          uint8 array of ``x``'s shape.
        """
        return likelihood.to_uint8(np.asarray(jax.device_get(x), np.float32), self.num_levels, self.noise)

    def __iter__(self):
        """Deprecated: ``model, variables, config = flow`` (what ``load`` used to return)."""
        warnings.warn("unpacking a TrainedFlow as (model, variables, config) is deprecated; use "
                      "flow.model, flow.variables and flow.config", DeprecationWarning, stacklevel=2)
        return iter((self.model, self.variables, self.config))

    def __repr__(self) -> str:
        m = self.model
        n = count_params(self.variables["params"])
        return (f"TrainedFlow({m.img_size}x{m.img_size}x{m.in_channels}, patch {m.patch_size}, "
                f"width {m.channels}, {m.num_blocks}x{m.layers_per_block} layers, "
                f"num_classes={m.num_classes}, {n / 1e6:.2f}M params, num_levels={self.num_levels}, "
                f"noise_std={self.noise_std}, {self.options})")

    # ------------------------------------------------------------------ checks
    def _images(self, x: Any, what: str = "x") -> jax.Array:
        self.model.check_images(x, what, floating=False)
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{what} must be float images in [-1, 1]; got dtype {jnp.result_type(x)} "
                             f"(integer pixels go to bits_per_dim, or scale them first)")
        self.model.check_images(x, what)
        return x

    def _labels(self, y: Any, batch: int) -> jax.Array | None:
        if y is None:
            return None
        if not self.model.num_classes:
            raise ValueError("labels y were given to an unconditional model (num_classes=0); pass y=None")
        if np.ndim(y) == 0:
            if isinstance(y, jax.core.Tracer):
                y = jnp.full((batch,), y, jnp.int32) if jnp.issubdtype(y.dtype, jnp.integer) else y
            elif isinstance(y, (bool, float)) or not np.issubdtype(np.asarray(y).dtype, np.integer):
                raise ValueError(f"labels y must be integers; got {y!r}")
            else:
                y = jnp.full((batch,), int(y), jnp.int32)
        elif not isinstance(y, jax.core.Tracer):
            y = jnp.asarray(y)
            if jnp.issubdtype(y.dtype, jnp.integer):
                y = y.astype(jnp.int32)
        self.model.check_labels(y, batch)
        if not isinstance(y, jax.core.Tracer) and np.size(y) and int(np.min(np.asarray(y))) < -1:
            raise ValueError(f"labels y must be >= -1 (-1: no label); got min {int(np.min(np.asarray(y)))}")
        return y

    # ------------------------------------------------------------------ density
    def encode(self, x: jax.Array, y: Any = None) -> tuple[jax.Array, jax.Array]:
        """Data to latents: TarFlow's forward map.

        Args:
          x: float images ``(B, H, W, C)`` in ``[-1, 1]``.
          y: labels (see the module docstring).

        Returns:
          ``z``: float32 ``(B, H, W, C)`` latents (standard normal under the model);
          ``logdet``: float32 ``(B,)``, ``log|det ∂z/∂x|`` in nats.

        Raises:
          ValueError: wrong image shape or dtype, labels that do not fit the model.
        """
        x = self._images(x)
        return _encode(self, x, self._labels(y, x.shape[0]))

    def log_prob(self, x: jax.Array, y: Any = None) -> jax.Array:
        """Exact log-density ``log p(x|y)`` of continuous images, in nats per example.

        ``log p(x) = log N(z; 0, I) + log|det ∂z/∂x|`` with ``z = encode(x)``; the density is
        over ``[-1, 1]``-scaled pixels (add ``N·log(Q/2)`` for the ``0..Q`` scale).

        Args:
          x: float images ``(B, H, W, C)`` in ``[-1, 1]``.
          y: labels (see the module docstring).

        Returns:
          float32 ``(B,)`` nats.

        Raises:
          ValueError: as :meth:`encode`.
        """
        x = self._images(x)
        return _log_prob(self, x, self._labels(y, x.shape[0]))

    def bits_per_dim(self, pixels: jax.Array, y: Any = None, *, key: jax.Array,
                     num_draws: int = 1, importance_weighted: bool = False) -> jax.Array:
        """Bits per dimension of integer images under uniform dequantization, per example.

        Each draw ``k`` takes ``x = (pixels + u_k)/Q·2 − 1`` with ``u_k ~ U[0,1)^N`` and scores
        ``−log₂ p(x) / N + log₂(Q/2)`` (the density on the ``0..Q`` scale), as
        :func:`tarflow_jax.likelihood.bits_per_dim` and the trainer's evaluation do
        (draw ``k`` uses ``jax.random.split(key, num_draws)[k]``). The mean over draws
        bounds the discrete model's bits/dim from above; with ``importance_weighted`` the
        result is ``−log₂ mean_k p(x + u_k) / N`` (tighter as ``num_draws`` grows).

        Args:
          pixels: integer ``(B, H, W, C)`` images with values in ``0 .. num_levels-1``.
          y: labels (see the module docstring).
          key: a PRNG key (typed ``jax.random.key`` or raw ``PRNGKey``).
          num_draws: dequantization draws per image, ``>= 1``.
          importance_weighted: report the importance-weighted bound instead of the mean.

        Returns:
          float32 ``(B,)`` bits per dimension.

        Raises:
          ValueError: non-integer pixels, values outside ``0 .. num_levels-1`` (checked when
            concrete), ``num_draws < 1``, or bad shapes/labels.
        """
        self.model.check_images(pixels, "pixels", floating=False)
        if not jnp.issubdtype(jnp.result_type(pixels), jnp.integer):
            raise ValueError(f"pixels must be integer images in 0..{self.num_levels - 1} (this flow's "
                             f"num_levels={self.num_levels}); got dtype {jnp.result_type(pixels)}")
        if not isinstance(pixels, jax.core.Tracer) and np.size(pixels):
            lo, hi = int(np.min(np.asarray(pixels))), int(np.max(np.asarray(pixels)))
            if lo < 0 or hi >= self.num_levels:
                raise ValueError(f"pixels must lie in 0..{self.num_levels - 1} (num_levels="
                                 f"{self.num_levels}); got values {lo}..{hi}")
        if int(num_draws) < 1:
            raise ValueError(f"num_draws must be >= 1; got {num_draws}")
        return _bits_per_dim(self, pixels, self._labels(y, pixels.shape[0]), key,
                             num_draws=int(num_draws), importance_weighted=bool(importance_weighted))

    # ------------------------------------------------------------------ inverse
    def _sampling(self, defaults: SampleOptions, guidance, guide_what, attn_temp, annealed_guidance,
                  solver, jacobi) -> tuple[SampleOptions, bool, Any, Any]:
        """Static options, whether guided, and the dynamic guidance weight and attention temperature.

        Arguments left ``None`` take ``defaults``. The static options returned carry
        ``guidance=0.0`` and ``attn_temp=1.0``: those two are passed as traced values, so that
        changing them does not recompile.
        """
        pick = lambda value, default: default if value is None else value
        weight, temp = pick(guidance, defaults.guidance), pick(attn_temp, defaults.attn_temp)
        options = dataclasses.replace(
            defaults, guidance=weight, attn_temp=temp, guide_what=pick(guide_what, defaults.guide_what),
            annealed_guidance=bool(pick(annealed_guidance, defaults.annealed_guidance)),
            solver=pick(solver, defaults.solver), jacobi=pick(jacobi, defaults.jacobi))
        options.check()
        if options.jacobi is not None:
            options.jacobi.check(self.model.num_blocks, self.model.num_tokens)
        guided = isinstance(weight, jax.core.Tracer) or float(weight) != 0
        return dataclasses.replace(options, guidance=0.0, attn_temp=1.0), guided, weight, temp

    def decode(self, z: jax.Array, y: Any = None, *, guidance: float = 0.0, guide_what: str = "ab",
               attn_temp: float = 1.0, annealed_guidance: bool = False, solver: str | None = None,
               jacobi: sampling.JacobiPlan | None = None) -> jax.Array:
        """Latents to data: the inverse of :meth:`encode` (exact with the default ``guidance=0``).

        With ``guidance > 0`` each step mixes in an unguided prediction (label dropped,
        attention logits divided by ``attn_temp``) with weight ``guidance`` (annealed over
        tokens with ``annealed_guidance``), as :meth:`TarFlow.reverse`; the result is then no
        longer ``encode``'s inverse. The guidance defaults are :meth:`TarFlow.reverse`'s (none),
        not the run's (those are :meth:`sample`'s); ``solver`` and ``jacobi`` default to the
        run's (:attr:`options`). The guidance weight and ``attn_temp`` may be traced values
        (one compile for every weight).

        Args:
          z: float latents ``(B, H, W, C)``.
          y: labels (see the module docstring).
          guidance, guide_what, attn_temp, annealed_guidance: guidance settings.
          solver: ``"cached"`` (exact, sequential), ``"jacobi"`` (parallel fixed point, see
            ``jacobi``) or ``"uncached"`` (slow test oracle).
          jacobi: a :class:`~tarflow_jax.sampling.JacobiPlan` for ``solver="jacobi"``.

        Returns:
          float32 images ``(B, H, W, C)`` (not clipped).

        Raises:
          ValueError: wrong shapes, labels, or options.
        """
        z = self._images(z, "z")
        defaults = dataclasses.replace(self.options, guidance=0.0, guide_what="ab", attn_temp=1.0,
                                       annealed_guidance=False)
        options, guided, weight, temp = self._sampling(defaults, guidance, guide_what, attn_temp,
                                                       annealed_guidance, solver, jacobi)
        return _decode(self, z, self._labels(y, z.shape[0]), weight, temp, options=options,
                       guided=guided)

    def denoise(self, x: jax.Array, y: Any = None, *, noise_std: float | None = None,
                step_scale: float | None = None) -> jax.Array:
        """One score step ``x + step_scale·σ²·∇ₓ log p(x|y)``, clipped to ``[-1, 1]`` (Tweedie).

        Removes the Gaussian noise of level ``σ`` that a model trained on noisy images puts
        into its samples (unguided score, the given labels).

        Args:
          x: float images ``(B, H, W, C)``.
          y: labels (see the module docstring).
          noise_std: ``σ``; default the run's :attr:`noise_std`.
          step_scale: multiplies the step; default ``options.denoise_scale``.

        Returns:
          float32 ``(B, H, W, C)`` in ``[-1, 1]``.

        Raises:
          ValueError: ``σ = 0`` (a flow trained with uniform dequantization has no noise to
            remove: pass ``noise_std``), or bad shapes/labels.
        """
        x = self._images(x)
        sigma = self.noise_std if noise_std is None else noise_std
        scale = self.options.denoise_scale if step_scale is None else step_scale
        if not isinstance(sigma, jax.core.Tracer) and not float(sigma) > 0:
            raise ValueError(f"noise_std is {sigma}: this flow was trained without Gaussian noise "
                             f"(uniform dequantization), so there is nothing to denoise; pass "
                             f"noise_std=... to take a score step anyway")
        return _denoise(self, x, self._labels(y, x.shape[0]), sigma, scale)

    def sample(self, key: jax.Array, num: int, y: Any = None, *, guidance: float | None = None,
               guide_what: str | None = None, attn_temp: float | None = None,
               annealed_guidance: bool | None = None, solver: str | None = None,
               jacobi: sampling.JacobiPlan | None = None, denoise: bool | None = True,
               denoise_scale: float | None = None, temperature: float = 1.0) -> jax.Array:
        """Draws ``num`` images: ``z ~ N(0, temperature²·I)``, :meth:`decode`, then :meth:`denoise`.

        Every option left ``None`` takes the training run's setting (:attr:`options`, from
        its ``config.sample``), e.g. guidance 3.4 annealed for ``configs/afhq256.py``.
        Denoising uses the run's noise level and is skipped for flows trained without noise
        (``noise_std = 0``) and with ``denoise=False``; a denoised sample that is not finite
        keeps its undenoised value. The latents are ``jax.random.normal(key, (num, H, W, C))``
        like :func:`tarflow_jax.train.sample`, so the same key gives the same images.

        Args:
          key: a PRNG key (typed or raw).
          num: number of images, ``>= 1`` (static: one compile per value).
          y: labels: ``None``, one integer for all, or int ``(num,)``.
          guidance, guide_what, attn_temp, annealed_guidance, solver, jacobi: see :meth:`decode`.
          denoise: take the score step (``None``: the run's ``options.denoise``).
          denoise_scale: multiplies the step (default ``options.denoise_scale``).
          temperature: scales the latents (1: the model's distribution).

        Returns:
          float32 images ``(num, H, W, C)``, about ``[-1, 1]`` (clipped when denoised).

        Raises:
          ValueError: ``num < 1``, bad labels or options.
        """
        if int(num) < 1:
            raise ValueError(f"num must be >= 1; got {num}")
        options, guided, weight, temp = self._sampling(self.options, guidance, guide_what, attn_temp,
                                                       annealed_guidance, solver, jacobi)
        denoise = self.options.denoise if denoise is None else bool(denoise)
        denoise = denoise and self.noise_std > 0
        scale = self.options.denoise_scale if denoise_scale is None else denoise_scale
        _check_number("temperature", temperature, lambda v: v >= 0, ">= 0")
        return _sample(self, _raw_key(key), self._labels(y, int(num)), weight, temp, scale,
                       temperature, num=int(num), options=options, guided=guided,
                       denoise=denoise)

    # ------------------------------------------------------------------ other libraries
    def as_bijector(self, y: Any = None):
        """This flow as a ``distrax.Bijector``: ``forward`` is data → latent (TarFlow's forward).

        Needs distrax (``pip install 'tarflow_jax[distrax]'``). See
        :mod:`tarflow_jax.distrax_compat` (``FlowBijector``) for shapes, labels and the
        log-det convention.

        Raises:
          ImportError: distrax is not installed.
        """
        return distrax_compat.bijector(self, y)

    def as_distribution(self, y: Any = None):
        """This flow's exact density ``p(x|y)`` as a ``distrax.Distribution`` (no guidance).

        Needs distrax. See :mod:`tarflow_jax.distrax_compat` (``FlowDistribution``).

        Raises:
          ImportError: distrax is not installed.
        """
        return distrax_compat.distribution(self, y)

    def to_nnx(self, rngs: Any = None):
        """The model holding these weights as a trainable Flax NNX module (``nnx.bridge.ToNNX``).

        See :func:`tarflow_jax.nnx_compat.to_nnx`.
        """
        return nnx_compat.to_nnx(self.model, rngs, variables=self.variables)


def _check_variables(model: TarFlow, variables: dict[str, Any]) -> None:
    """Raises a ValueError for variables that do not fit ``model`` (tree or shapes)."""
    expected = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs()))
    want = flax.traverse_util.flatten_dict(_to_plain(expected))
    got = flax.traverse_util.flatten_dict(variables)
    for path in want:
        if path not in got:
            raise ValueError(f"variables lack {'/'.join(path)}: they are not variables of this model "
                             f"({_describe(model)})")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise ValueError(f"variables {'/'.join(path)} has shape {tuple(np.shape(got[path]))}, but "
                             f"the model expects {tuple(want[path].shape)} ({_describe(model)})")
    extra = [p for p in got if p not in want]
    if extra:
        raise ValueError(f"variables hold {'/'.join(extra[0])}, which this model does not have "
                         f"({_describe(model)})")


def _describe(model: TarFlow) -> str:
    return (f"img_size={model.img_size}, in_channels={model.in_channels}, patch_size={model.patch_size}, "
            f"channels={model.channels}, num_blocks={model.num_blocks}, layers_per_block="
            f"{model.layers_per_block}, num_classes={model.num_classes}, scan_layers={model.scan_layers}")


def _raw_key(key: Any) -> jax.Array:
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


# ---------------------------------------------------------------------- the pure functions
# Module-level jitted functions: the flow is an argument (its static part keys the cache).

def _encode_impl(flow: TrainedFlow, x: jax.Array, y: jax.Array | None):
    model = flow.model
    # On CPU the forward pass's faster kernels (values equal up to float32 rounding; 1.22x for
    # `small` at batch 32, docs/performance.md); elsewhere nothing changes.
    with layers.forward_pass_kernels():
        z, logdet = model.apply(flow.variables, x, y)
    var = flow.variables["prior"]["var"].astype(jnp.float32)
    tokens = patchify(z, model.patch_size) / jnp.sqrt(var)  # exact for var = 1
    z = unpatchify(tokens, model.img_size, model.patch_size, model.in_channels)
    return z, logdet - 0.5 * jnp.sum(jnp.log(var))


def _log_prob_impl(flow: TrainedFlow, x: jax.Array, y: jax.Array | None) -> jax.Array:
    z, logdet = _encode_impl(flow, x, y)
    n = flow.model.num_dims
    return -0.5 * jnp.sum(jnp.square(z), axis=(1, 2, 3)) - n * likelihood.HALF_LOG_2PI + logdet


def _denoise_impl(flow: TrainedFlow, x, y, sigma, scale) -> jax.Array:
    score = jax.grad(lambda u: jnp.sum(_log_prob_impl(flow, u, y)))(x.astype(jnp.float32))
    return jnp.clip(x + scale * jnp.square(sigma) * score, -1.0, 1.0)


def _decode_impl(flow: TrainedFlow, z, y, weight, temp, options: SampleOptions, guided: bool
                 ) -> jax.Array:
    return flow.model.apply(
        flow.variables, z, y, guidance=weight if guided else 0.0,
        guide_what=options.guide_what, attn_temp=temp, annealed_guidance=options.annealed_guidance,
        solver=options.solver, jacobi=options.jacobi, method=TarFlow.reverse)


_encode = jax.jit(_encode_impl)
_log_prob = jax.jit(_log_prob_impl)
_denoise = jax.jit(_denoise_impl)
_decode = jax.jit(_decode_impl, static_argnames=("options", "guided"))


@functools.partial(jax.jit, static_argnames=("num_draws", "importance_weighted"))
def _bits_per_dim(flow: TrainedFlow, pixels, y, key, *, num_draws: int, importance_weighted: bool):
    levels = flow.num_levels
    n = flow.model.num_dims

    def one_draw(k):
        x = likelihood.dequantize(k, pixels, levels)
        z, logdet = _encode_impl(flow, x, y)
        return likelihood.bits_per_dim(z, logdet, levels)

    bpd = jax.lax.map(one_draw, jax.random.split(_raw_key(key), num_draws))  # (K, B)
    if not importance_weighted:
        return jnp.mean(bpd, axis=0)
    nats = bpd * (n * math.log(2.0))
    return -(jax.nn.logsumexp(-nats, axis=0) - math.log(num_draws)) / (n * math.log(2.0))


@functools.partial(jax.jit, static_argnames=("num", "options", "guided", "denoise"))
def _sample(flow: TrainedFlow, key, y, weight, temp, scale, temperature, *, num: int,
            options: SampleOptions, guided: bool, denoise: bool) -> jax.Array:
    z = jax.random.normal(key, (num, *((flow.model.img_size,) * 2), flow.model.in_channels))
    x = _decode_impl(flow, z * temperature, y, weight, temp, options, guided)
    if denoise:
        clean = _denoise_impl(flow, x, y, flow.noise_std, scale)
        x = jnp.where(jnp.isfinite(clean), clean, x)
    return x
