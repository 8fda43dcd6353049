"""Importing the reference PyTorch TarFlow weights (``state_dict`` key names and layouts).

Python: :func:`from_torch_state_dict` turns a reference state dict (or ``.pth`` file) into Flax
variables for a given :class:`~tarflow_jax.flow.TarFlow`.

Command line: the authors' checkpoint as a workdir that ``tarflow_jax.load``,
``python -m tarflow_jax.main --mode=eval|sample`` (and ``--mode=train``, to fine-tune) use::

    python -m tarflow_jax.convert --torch_checkpoint=afhq_model_8_768_8_8_0.07.pth \
        --config=configs/afhq256.py --out=workdir/afhq_authors [--config.model.x=...]

It writes ``OUT/config.json`` and an Orbax checkpoint ``OUT/checkpoints/0/state`` holding a
whole train state (the converted weights, fresh AdamW moments, EMA copy when the config keeps
one, the prior variance ``var``). The config's model fields are checked against the tensors'
shapes first; a mismatch names the ``config.model`` field and the value the checkpoint implies.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import cli
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


# ------------------------------------------------------------------ the checkpoint vs the config
REFERENCE_HEAD_DIM = 64  # the authors' Attention always uses 64 channels per head
_MODEL_FIELDS = ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                 "layers_per_block", "num_classes", "nvp", "expansion")
# config.dataset fields that must follow config.model's (checked by train.validate_config).
_DATASET_TWIN = {"img_size": "image_size", "in_channels": "channels"}


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
    """``(field, config value, checkpoint value, evidence)`` for each ``config.model`` field the shapes contradict."""
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
    flags_ = []
    for field, _, value, _ in mismatches:
        if value is None:
            continue
        flags_.append(f"--config.model.{field}={value}")
        if field in _DATASET_TWIN:
            flags_.append(f"--config.dataset.{_DATASET_TWIN[field]}={value}")
    return " ".join(flags_)


def describe_mismatches(mismatches: Sequence[tuple[str, Any, Any, str]]) -> str:
    """Lines naming each wrong ``config.model`` field, and the flags that would fix them."""
    lines = []
    for field, ours, theirs, why in mismatches:
        if theirs is None:
            lines.append(f"  config.model.{{{field}}}={ours} cannot produce the checkpoint's tokens ({why})")
        else:
            lines.append(f"  config.model.{field}={ours}, but the checkpoint has {field}={theirs} ({why})")
    fix = _override_flags(mismatches)
    if fix:
        lines.append(f"  try: {fix}")
    return "\n".join(lines)


def check_config(state: Mapping[str, Any], model_cfg: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Raises a ValueError naming the ``config.model`` fields that contradict the state dict's shapes."""
    mismatches = config_mismatches(state, model_cfg)
    if mismatches:
        raise ValueError(f"{source} does not fit the config's model; wrong field"
                         f"{'s' if len(mismatches) > 1 else ''}:\n{describe_mismatches(mismatches)}")


# ------------------------------------------------------------------------------ workdir
def converted_state(variables: Mapping[str, Any], config) -> Any:
    """A whole ``train.TrainState`` at step 0 around converted ``variables`` (like ``train.init_state``)."""
    from tarflow_jax import train

    model = train.create_model(config)
    tx, _ = train.create_optimizer(config)
    params = variables["params"]
    if "prior" in variables:
        prior_var = jnp.asarray(variables["prior"]["var"], jnp.float32)
    else:
        prior_var = jnp.ones((model.num_tokens, model.token_dim), jnp.float32)
    _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=params if config.ema_decay > 0 else None, prior_var=prior_var, rng=train_rng,
        consecutive_skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))
    # What `checkpointing.load` and the trainer restore onto: same tree, shapes and dtypes.
    init_fn = lambda rng: train.init_state(rng, model=model, tx=tx, config=config)
    target = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    want = jax.tree_util.tree_flatten_with_path(target)[0]
    if jax.tree.structure(state) != jax.tree.structure(target):
        raise ValueError("internal: the converted train state's structure differs from train.init_state's")
    for (path, a), (_, b) in zip(got, want):
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            raise ValueError(f"internal: {jax.tree_util.keystr(path)} is {a.shape} {a.dtype}, "
                             f"train.init_state gives {b.shape} {b.dtype}")
    return state


def _check_no_checkpoints(out: str) -> None:
    from tarflow_jax import checkpointing

    directory = checkpointing.checkpoint_dir(out)
    if directory.is_dir():
        steps = sorted(p.name for p in directory.iterdir() if p.name.isdigit())
        if steps:
            raise FileExistsError(f"{directory} already holds checkpoint steps {steps}; "
                                  f"convert into an empty --out directory")


def write_workdir(out: str, config, variables: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
                  ) -> str:
    """Writes ``out/config.json`` and the step-0 Orbax checkpoint of the converted weights.

    Refuses a workdir that already holds checkpoints (``load`` would pick the latest step).
    Returns the checkpoint step directory.
    """
    from tarflow_jax import checkpointing

    _check_no_checkpoints(out)
    state = converted_state(variables, config)
    checkpointing.save_config(out, config)
    manager = checkpointing.create_manager(out, config)
    try:
        checkpointing.save(manager, 0, state, None)
        manager.wait_until_finished()
    finally:
        manager.close()
    if metadata is not None and jax.process_index() == 0:
        checkpointing.write_atomic(checkpointing.workdir_path(out) / "converted_from.json",
                                   json.dumps(dict(metadata), indent=2).encode())
    return str(checkpointing.checkpoint_dir(out) / "0")


def convert_checkpoint(torch_checkpoint: str | os.PathLike | Mapping[str, Any], config, out: str
                       ) -> dict[str, Any]:
    """The reference checkpoint as a ``tarflow_jax`` workdir ``out`` for ``config`` (a ConfigDict).

    Raises a ValueError naming the wrong ``config.model`` fields (and the first mismatched
    state dict key with both shapes) when the checkpoint does not fit the config.
    Returns a summary (source, step directory, number of parameters, inferred fields).
    """
    from tarflow_jax import train

    source = os.fspath(torch_checkpoint) if isinstance(torch_checkpoint, (str, os.PathLike)) else "state dict"
    _check_no_checkpoints(out)
    state = load_state_dict(torch_checkpoint)
    mismatches = config_mismatches(state, config.model)
    if not mismatches:
        train.validate_config(config)  # e.g. config.dataset.image_size vs config.model.img_size
    variables, error = None, None
    try:
        variables = from_torch_state_dict(state, train.create_model(config))
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
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(variables["params"])))
    inferred = infer_model_fields(state)
    del state
    metadata = {"torch_checkpoint": os.path.abspath(source) if source != "state dict" else source,
                "num_params": num_params, "inferred_from_shapes": inferred}
    step_dir = write_workdir(out, config, variables, metadata)
    return {"source": source, "checkpoint": step_dir, "num_params": num_params, "inferred": inferred}


# --------------------------------------------------------------------------- command line
_USAGE = """\
Converts the authors' PyTorch TarFlow checkpoint into a tarflow_jax workdir.

  python -m tarflow_jax.convert --torch_checkpoint=FILE.pth --config=configs/afhq256.py --out=DIR \\
      [--config.model.FIELD=VALUE ...]

Then: python -m tarflow_jax.main --workdir=DIR --mode=sample  (or --mode=eval, or tarflow_jax.load(DIR)).
"""


def _define_flags(argv: Sequence[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]) "
                                    "describing the checkpoint's model; override fields with "
                                    "--config.model.FIELD=VALUE.", flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    flags.DEFINE_string("torch_checkpoint", None, "The reference .pth file (a state dict, or a dict "
                        "holding one under 'state_dict'/'model'/'ema').", flag_values=fv)
    flags.DEFINE_string("out", None, "The workdir to write (config.json, checkpoints/0).", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    argv = list(sys.argv if argv is None else argv)
    prog = "python -m tarflow_jax.convert"
    fv = _define_flags(argv)
    rest = cli.parse_flags(fv, argv, prog, _USAGE)
    if isinstance(rest, int):
        return rest
    missing = [f"--{name}" for name in ("config", "torch_checkpoint", "out") if not fv[name].present]
    if missing:
        return cli.usage_error(prog, f"missing {', '.join(missing)}", _USAGE)
    error = cli.config_load_error(fv, "model")
    if error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    config = fv.config
    try:
        summary = convert_checkpoint(fv.torch_checkpoint, config, fv.out)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    m = config.model
    print(f"converted {summary['source']} ({summary['num_params'] / 1e6:.1f}M parameters; "
          f"img_size={m.img_size}, patch_size={m.patch_size}, channels={m.channels}, "
          f"{m.num_blocks} blocks x {m.layers_per_block} layers, num_classes={m.num_classes}, nvp={m.nvp}) "
          f"-> {summary['checkpoint']}\n"
          f"next: python -m tarflow_jax.main --workdir={fv.out} --mode=sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
