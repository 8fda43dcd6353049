"""Importing the reference PyTorch TarFlow weights (``state_dict`` key names and layouts)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        state[key] = _to_numpy(value)
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
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_channels), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if model.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, y)
    return nn.meta.unbox(shapes)


def from_torch_state_dict(state_dict: str | os.PathLike | Mapping[str, Any], model: TarFlow
                          ) -> dict[str, Any]:
    """Reference weights (a state dict of numpy arrays/torch tensors, or a ``.pth`` path) as Flax variables.

    Raises a ValueError naming the first key whose shape does not fit ``model`` (with both
    shapes), an unknown key, or the variables the state dict leaves unset.
    """
    state = load_state_dict(state_dict)
    expected = flax.traverse_util.flatten_dict(abstract_variables(model))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    layers_seen: dict[tuple[str, ...], set[int]] = {}
    for key, array in state.items():
        if key.split(".")[-1] in _IGNORED_SUFFIXES:
            continue
        try:
            path, value, layer = _target(key, array, model)
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"state dict key {key!r} (shape {array.shape}) has no place in this "
                             f"model ({_describe(model)})") from None
        if layer is not None:
            if layer >= model.layers_per_block:
                raise ValueError(f"state dict key {key!r} names layer {layer}, but the model has "
                                 f"layers_per_block={model.layers_per_block}")
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
