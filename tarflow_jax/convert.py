"""Importing the reference PyTorch TarFlow weights (``state_dict`` key names and layouts).

:func:`from_torch_state_dict` turns a reference state dict (or ``.pth`` file) into Flax
variables for a given :class:`~tarflow_jax.flow.TarFlow`; :func:`infer_model_fields` and
:func:`config_mismatches` read the model's sizes from the tensors' shapes and name the
config fields that contradict them. The command line that writes a converted workdir is
``python -m tarflow_jax.tools.convert`` (:mod:`tarflow_jax.tools.convert`).
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import warnings
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import configlib
from tarflow_jax.flow import TarFlow

# Reference sub-module name inside one Transformer layer -> our module name.
_LAYER_MODULES = {
    "attention.norm": "attn_norm",
    "attention.qkv": "qkv",
    "attention.proj": "attn_out",
    "mlp.norm": "mlp_norm",
    "mlp.main.0": "mlp_in",
    "mlp.main.2": "mlp_out",
}
_IGNORED_SUFFIXES = ("attn_mask",)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A reference state dict as float32 numpy arrays, from a mapping or a ``.pth`` file."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint file at {path!r}")
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("reading a .pth file needs PyTorch: pip install 'tarflow_jax[test]' "
                              "(torch)") from e
        source = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "ema"):
            if isinstance(source, Mapping) and wrapper in source and isinstance(source[wrapper], Mapping):
                source = source[wrapper]
                break
    state = {}
    for key, value in source.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be strings; got key {key!r}")
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        try:
            array = _to_numpy(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"state dict key {key!r} does not hold a numeric tensor ({type(value).__name__}): "
                            f"{e}") from None
        state[key] = array
    return state


def _target(key: str, array: np.ndarray, model: TarFlow) -> tuple[tuple[str, ...], np.ndarray, int | None]:
    """Maps one reference key to ``(variable path, array in our layout, layer index or None)``."""
    w, hd = model.channels, model.head_dim
    if key == "var":
        return ("prior", "var"), array, None
    parts = key.split(".")
    if parts[0] != "blocks" or len(parts) < 3:
        raise KeyError(key)
    block = ("params", f"blocks_{int(parts[1])}")
    rest = ".".join(parts[2:])
    if rest == "pos_embed":
        return block + ("pos_embed",), array, None
    if rest == "class_embed":
        return block + ("class_embed",), array.reshape(array.shape[0], -1), None
    for name in ("proj_in", "proj_out"):
        if rest == f"{name}.weight":
            return block + (name, "kernel"), array.T, None
        if rest == f"{name}.bias":
            return block + (name, "bias"), array, None
    if parts[2] == "attn_blocks":
        layer = int(parts[3])
        module, leaf = ".".join(parts[4:-1]), parts[-1]
        ours = _LAYER_MODULES.get(module)
        if ours is None:
            raise KeyError(key)
        if ours.endswith("norm"):
            return block + ("transformer", ours, {"weight": "scale", "bias": "bias"}[leaf]), array, layer
        if ours == "qkv":
            heads = w // hd
            array = array.T.reshape(w, 3, heads, hd) if leaf == "weight" else array.reshape(3, heads, hd)
        elif ours == "attn_out" and leaf == "weight":
            array = array.T.reshape(w // hd, hd, w)
        elif leaf == "weight":
            array = array.T
        return block + ("transformer", ours, {"weight": "kernel", "bias": "bias"}[leaf]), array, layer
    raise KeyError(key)


def abstract_variables(model: TarFlow) -> dict[str, Any]:
    """Shapes and dtypes of the model's (unboxed) variables, without allocating them."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs()))


def from_torch_state_dict(state_dict: str | os.PathLike | Mapping[str, Any], model: TarFlow
                          ) -> dict[str, Any]:
    """The authors' PyTorch weights as Flax variables for ``model``.

    Maps the reference ``transformer_flow.Model`` key names onto this package's modules:
    ``nn.Linear`` weights ``(out, in)`` are transposed to kernels ``(in, out)``, the qkv and
    attention-output kernels reshaped to ``(W, 3, heads, 64)`` / ``(heads, 64, W)``, the
    class tables ``(classes, 1, W)`` flattened, and per-layer tensors stacked on a leading
    layer axis when ``model.scan_layers``. ``module.`` / ``_orig_mod.`` prefixes and the
    reference's ``attn_mask`` buffers are ignored.

    Args:
      state_dict: a mapping of reference key → array (NumPy arrays or torch tensors, any
        float dtype), or the path of a ``.pth`` file holding one (also inside a
        ``"state_dict"``, ``"model"`` or ``"ema"`` entry; reading a file needs PyTorch).
      model: the ``TarFlow`` the weights are for; its fields must match the checkpoint's
        (see :func:`config_mismatches` to find which do not).

    Returns:
      ``{"params": ..., "prior": {"var": (T, D)}}`` (``prior`` only when the state dict has
      ``var``) as float32 ``jax.Array`` s in ``model.param_dtype``, unboxed.

    Raises:
      FileNotFoundError: ``state_dict`` is a path that does not exist.
      ImportError: reading a ``.pth`` file without PyTorch installed.
      ValueError: a key has no place in ``model``, a tensor's shape does not fit (both
        shapes named), a tensor holds NaN or inf, or the state dict leaves variables unset.
      TypeError: a key is not a string or its value is not a numeric tensor.
    """
    state = load_state_dict(state_dict)
    expected = flax.traverse_util.flatten_dict(abstract_variables(model))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    layers_seen: dict[tuple[str, ...], set[int]] = {}
    for key, array in state.items():
        if key.split(".")[-1] in _IGNORED_SUFFIXES:
            continue
        if array.size and not np.isfinite(array).all():
            raise ValueError(f"state dict key {key!r} holds NaN or inf values "
                             f"({int(array.size - np.isfinite(array).sum())} of {array.size})")
        try:
            path, value, layer = _target(key, array, model)
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"state dict key {key!r} (shape {array.shape}) has no place in this "
                             f"model ({_describe(model)})") from None
        if layer is not None:
            if not 0 <= layer < model.layers_per_block:
                raise ValueError(f"state dict key {key!r} names layer {layer}, but the model has "
                                 f"layers 0..{model.layers_per_block - 1} (layers_per_block="
                                 f"{model.layers_per_block})")
            if model.scan_layers:
                path = path[:3] + ("layers",) + path[3:]
            else:
                path = path[:3] + (f"layers_{layer}",) + path[3:]
        if path not in expected:
            raise ValueError(f"state dict key {key!r} (shape {array.shape}) has no place in this "
                             f"model ({_describe(model)}): no variable {'/'.join(path)}")
        want = expected[path].shape
        got = value.shape if layer is None or not model.scan_layers else (model.layers_per_block,) + value.shape
        if got != want:
            raise ValueError(f"state dict key {key!r} has shape {array.shape} (as {'/'.join(path)}: "
                             f"{value.shape}), but the model expects {want} ({_describe(model)})")
        if layer is not None and model.scan_layers:
            stacked = filled.setdefault(path, np.zeros(want, np.float32))
            stacked[layer] = value
            layers_seen.setdefault(path, set()).add(layer)
        else:
            filled[path] = value
    missing = [p for p in expected if p not in filled
               or (p in layers_seen and len(layers_seen[p]) < model.layers_per_block)]
    if missing:
        raise ValueError(f"state dict leaves {len(missing)} variables unset, first "
                         f"{'/'.join(missing[0])}; is it a checkpoint of this model ({_describe(model)})?")
    return flax.traverse_util.unflatten_dict(
        {p: jnp.asarray(v, expected[p].dtype) for p, v in filled.items()})


def _describe(model: TarFlow) -> str:
    return (f"img_size={model.img_size}, in_channels={model.in_channels}, patch_size={model.patch_size}, "
            f"channels={model.channels}, num_blocks={model.num_blocks}, "
            f"layers_per_block={model.layers_per_block}, num_classes={model.num_classes}, nvp={model.nvp}")


# ------------------------------------------------------------------ the checkpoint vs the config
REFERENCE_HEAD_DIM = 64  # the authors' Attention always uses 64 channels per head
# The TarFlow fields the shapes can contradict.
_MODEL_FIELDS = ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                 "layers_per_block", "num_classes", "nvp", "expansion")


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def infer_model_fields(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a reference state dict says about its model, from the tensors' shapes.

    Returns ``num_blocks``, ``layers_per_block``, ``channels``, ``num_classes``, ``nvp``,
    ``expansion``, ``num_tokens`` (T = (img_size/patch_size)²) and ``token_dim``
    (D = patch_size²·in_channels), each only when the state dict determines it; ``img_size``,
    ``patch_size`` and ``in_channels`` are not separable from T and D alone (see
    :func:`config_mismatches`). The head dim cannot be read from the shapes (qkv is (3W, W)).
    """
    blocks: dict[int, set[int]] = {}
    for key in state:
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            layers = blocks.setdefault(int(parts[1]), set())
            if len(parts) > 3 and parts[2] == "attn_blocks" and parts[3].isdigit():
                layers.add(int(parts[3]))
    if not blocks:
        sample = sorted(state)[:5]
        raise ValueError(f"this is not a TarFlow state dict: no 'blocks.<k>.*' entries (keys start "
                         f"{sample}{' ...' if len(state) > 5 else ''})")
    out: dict[str, Any] = {"num_blocks": max(blocks) + 1}
    if blocks.get(0):
        out["layers_per_block"] = max(blocks[0]) + 1
    pos = _shape(state, "blocks.0.pos_embed")
    proj_in = _shape(state, "blocks.0.proj_in.weight")  # (W, D)
    proj_out = _shape(state, "blocks.0.proj_out.weight")  # (2D or D, W)
    if pos is not None and len(pos) == 2:
        out["num_tokens"], out["channels"] = pos
    if proj_in is not None and len(proj_in) == 2:
        out.setdefault("channels", proj_in[0])
        out["token_dim"] = proj_in[1]
    elif _shape(state, "var") is not None and len(state["var"].shape) == 2:
        out.setdefault("num_tokens", state["var"].shape[0])
        out["token_dim"] = state["var"].shape[1]
    if proj_out is not None and "token_dim" in out and proj_out[0] in (out["token_dim"], 2 * out["token_dim"]):
        out["nvp"] = proj_out[0] == 2 * out["token_dim"]
    embed = _shape(state, "blocks.0.class_embed")
    out["num_classes"] = embed[0] if embed else 0
    mlp = _shape(state, "blocks.0.attn_blocks.0.mlp.main.0.weight")  # (E·W, W)
    if mlp is not None and len(mlp) == 2 and mlp[1] and mlp[0] % mlp[1] == 0:
        out["expansion"] = mlp[0] // mlp[1]
    return out


def _geometry(num_tokens: int, token_dim: int, model_cfg: Mapping[str, Any]) -> dict[str, int] | None:
    """The ``(img_size, patch_size, in_channels)`` nearest the config's that give T tokens of D values."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        return None
    best, best_cost = None, None
    channel_choices = sorted({int(model_cfg["in_channels"]), 1, 3, 4})
    for channels in channel_choices:
        if token_dim % channels:
            continue
        patch = math.isqrt(token_dim // channels)
        if patch * patch * channels != token_dim:
            continue
        cand = {"img_size": side * patch, "patch_size": patch, "in_channels": channels}
        cost = sum(cand[k] != model_cfg[k] for k in cand) + 0.5 * (channels != model_cfg["in_channels"])
        if best_cost is None or cost < best_cost:
            best, best_cost = cand, cost
    return best


def config_mismatches(state: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """The model fields a reference state dict's shapes contradict.

    Args:
      state: a reference state dict (arrays or anything with ``.shape``).
      model_cfg: ``TarFlow`` field values (``img_size, in_channels, patch_size, channels,
        num_blocks, ...``), e.g. ``configlib.model_kwargs(config)``.

    Returns:
      ``(field, configured value, checkpoint value or None, evidence)`` per contradicted
      ``TarFlow`` field; ``[]`` when the shapes fit. :func:`describe_mismatches` names the
      config fields and the flags that fix them.
    """
    found = infer_model_fields(state)
    cfg = {k: model_cfg.get(k) for k in _MODEL_FIELDS}
    cfg["expansion"] = model_cfg.get("expansion", 4)
    cfg["nvp"] = bool(model_cfg.get("nvp", True))
    evidence = {
        "channels": "the width of blocks.0.pos_embed/proj_in",
        "num_blocks": "the number of blocks.<k> entries",
        "layers_per_block": "the number of blocks.0.attn_blocks.<l> entries",
        "num_classes": ("the rows of blocks.0.class_embed" if "blocks.0.class_embed" in state
                        else "there is no blocks.0.class_embed: an unconditional model"),
        "nvp": "blocks.0.proj_out gives " + ("2·D outputs (affine)" if found.get("nvp") else
                                             "D outputs (volume preserving)"),
        "expansion": "blocks.0.attn_blocks.0.mlp.main.0 is (expansion·W, W)",
    }
    out = []
    for field in ("channels", "num_blocks", "layers_per_block", "num_classes", "nvp", "expansion"):
        if field in found and found[field] != cfg[field]:
            out.append((field, cfg[field], found[field], evidence[field]))
    head_dim = model_cfg.get("head_dim", REFERENCE_HEAD_DIM)
    if head_dim != REFERENCE_HEAD_DIM:  # invisible in the shapes, but it changes the attention
        out.append(("head_dim", head_dim, REFERENCE_HEAD_DIM, "the reference implementation's head dim; "
                    "the shapes cannot tell it, and another value would split the heads differently"))
    if "num_tokens" in found and "token_dim" in found and None not in (
            cfg["img_size"], cfg["patch_size"], cfg["in_channels"]):
        t, d = found["num_tokens"], found["token_dim"]
        want_t = (cfg["img_size"] // cfg["patch_size"]) ** 2 if cfg["patch_size"] else None
        want_d = cfg["patch_size"] ** 2 * cfg["in_channels"]
        if (t, d) != (want_t, want_d):
            why = (f"from T={t} tokens in blocks.0.pos_embed and D={d} values per token in "
                   f"blocks.0.proj_in, where T = (img_size/patch_size)², D = patch_size²·in_channels; "
                   f"the config gives T={want_t}, D={want_d}")
            geometry = _geometry(t, d, cfg)
            if geometry is None:
                out.append(("img_size/patch_size/in_channels", (cfg["img_size"], cfg["patch_size"],
                                                                cfg["in_channels"]), None, why))
            else:
                for field, value in geometry.items():
                    if value != cfg[field]:
                        out.append((field, cfg[field], value, why))
    return out


def _override_flags(mismatches: Sequence[tuple[str, Any, Any, str]]) -> str:
    return " ".join(f"--config.{configlib.config_path(field)}={value}"
                    for field, _, value, _ in mismatches if value is not None)


def describe_mismatches(mismatches: Sequence[tuple[str, Any, Any, str]]) -> str:
    """Lines naming each contradicted config field (``config.model.width``, ...) and the flags that fix them."""
    lines = []
    for field, ours, theirs, why in mismatches:
        path = configlib.config_path(field)
        if theirs is None:
            paths = ", ".join(f"config.{configlib.config_path(f)}" for f in field.split("/"))
            lines.append(f"  {paths}={ours} cannot produce the checkpoint's tokens ({why})")
        else:
            lines.append(f"  config.{path}={ours}, but the checkpoint has {path.split('.')[-1]}={theirs} ({why})")
    fix = _override_flags(mismatches)
    if fix:
        lines.append(f"  try: {fix}")
    return "\n".join(lines)


def convert_for_config(torch_checkpoint: str | os.PathLike | Mapping[str, Any], config: Any,
                       source: str | None = None) -> dict[str, Any]:
    """Reference weights checked against a run config's model and converted to Flax variables.

    Args:
      torch_checkpoint: a ``.pth`` path or a reference state dict (see :func:`load_state_dict`).
      config: a ``ConfigDict`` in today's schema (``config.model``, ``config.dataset``).
      source: how to name the checkpoint in errors (default: its path, or "state dict").

    Returns:
      Flax variables ``{"params": ..., "prior": {"var": ...}}`` for
      ``configlib.create_model(config)``.

    Raises:
      ValueError: the checkpoint does not fit the config: names the wrong config fields and the
        flags that fix them (from the tensors' shapes, :func:`config_mismatches`), then the
        first mismatched state dict key with both shapes.
      FileNotFoundError, ImportError: see :func:`load_state_dict`.
    """
    if source is None:
        source = (os.fspath(torch_checkpoint) if isinstance(torch_checkpoint, (str, os.PathLike))
                  else "state dict")
    state = load_state_dict(torch_checkpoint)
    mismatches = config_mismatches(state, configlib.model_kwargs(config))
    variables, error = None, None
    try:
        variables = from_torch_state_dict(state, configlib.create_model(config))
    except ValueError as e:  # a wrong shape or key, or a config TarFlow itself rejects
        error = e
    if mismatches or error is not None:
        lines = [f"checkpoint {source!r} does not fit the config's model"]
        if mismatches:
            lines[0] += f"; wrong field{'s' if len(mismatches) > 1 else ''}:"
            lines.append(describe_mismatches(mismatches))
        if error is not None:
            lines.append(f"  {'first mismatch: ' if mismatches else ''}{error}")
        raise ValueError("\n".join(lines))
    return variables


if __name__ == "__main__":
    warnings.warn("python -m tarflow_jax.convert is deprecated; use python -m tarflow_jax.tools.convert",
                  FutureWarning, stacklevel=1)
    sys.argv[0] = "tarflow_jax.tools.convert"
    runpy.run_module("tarflow_jax.tools.convert", run_name="__main__", alter_sys=True)
