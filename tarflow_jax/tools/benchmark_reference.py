"""Side by side with the authors' PyTorch code: train step, forward pass and sampling.

``python -m tarflow_jax.tools.benchmark --size=small --reference=PATH`` runs this. ``PATH`` is the
folder holding the authors' ``transformer_flow.py`` (from the public apple/ml-tarflow
repository; it is imported from there, never copied into this project), or that file itself.

What happens, in one process:

1. The authors' ``transformer_flow.Model`` is built with the shapes of the chosen size
   (seeded with ``--seed``); its zero-initialised output heads are redrawn from
   ``N(0, head_std²)`` so that every block really transforms. Its ``state_dict`` goes
   through :func:`tarflow_jax.convert.from_torch_state_dict` into our ``TarFlow``, so both
   programs compute the same function; the largest differences of ``z``, log-det and the
   samples are reported (``agreement``).
2. Three pieces of work, each on the same inputs for both programs:

   * ``train``: one optimiser step on a batch of ``--reference_train_batch`` (default 32)
     images in ``[-1, 1]`` plus Gaussian noise of std ``--noise_std`` (default 0.05): their
     ``Model.forward``, ``get_loss``, ``backward`` and ``torch.optim.AdamW`` (lr 1e-4,
     betas 0.9/0.95, weight decay 1e-4, eps 1e-8: the settings of their ``train.py``)
     against our jitted ``train.train_step`` with the same AdamW settings, Gaussian noise,
     no EMA, parameters and optimiser state donated;
   * ``forward``: the likelihood pass on the same batch (theirs under ``torch.no_grad``);
   * ``sample``: ``reverse`` of ``--reference_sample_batch`` (default 16) latents, theirs
     ``Model.reverse`` (their per-layer key/value lists) against our ``TarFlow.reverse``
     (cached inverse), the same latents for both.

3. Timing: our function is compiled first (not timed); then each piece runs
   ``--warmup`` untimed rounds and ``--steps`` timed rounds, each round timing ours and then
   theirs back to back (``jax.block_until_ready`` on ours; PyTorch on CPU is synchronous).
   The reported figures are medians; ``ratio`` is their median time divided by ours
   (above 1: ours is faster).

Torch is imported only here. Its thread count is its own default unless
``--torch_threads`` is given (reported either way).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import layers, train, train_state, xla_cpu
from tarflow_jax.convert import from_torch_state_dict
from tarflow_jax.flow import TarFlow, patchify, unpatchify

REFERENCE_FILE = "transformer_flow.py"
REFERENCE_WHAT = ("train", "forward", "sample")
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8)


def check_reference_path(path: str) -> str:
    """The path of the authors' ``transformer_flow.py`` given its folder or the file itself.

    Raises:
      FileNotFoundError: no ``transformer_flow.py`` at ``path``.
    """
    file = path if path.endswith(".py") else os.path.join(path, REFERENCE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"--reference={path!r}: no {REFERENCE_FILE} there. Pass the folder holding the authors' "
            f"{REFERENCE_FILE} (a clone of https://github.com/apple/ml-tarflow) or the file itself.")
    return file


def load_reference_module(path: str):
    """The authors' ``transformer_flow`` module from ``path`` (its folder or the file itself).

    Raises:
      FileNotFoundError: no ``transformer_flow.py`` at ``path``.
      ImportError: PyTorch is not installed.
    """
    file = check_reference_path(path)
    # torch/torchvision import triton when present; beside TensorFlow (which the trainer
    # loads) its native library segfaults on CPU-only machines, and nothing here needs it.
    sys.modules.setdefault("triton", None)
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("--reference needs PyTorch: pip install 'tarflow_jax[test]'") from e
    spec = importlib.util.spec_from_file_location("_authors_transformer_flow", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Model"):
        raise ImportError(f"{file} has no class Model; is it the authors' transformer_flow.py?")
    return module


def build_reference(module: Any, model: TarFlow, seed: int, head_std: float):
    """The authors' ``Model`` with ``model``'s shapes, output heads drawn from N(0, head_std²)."""
    import torch

    if model.head_dim != 64 or model.expansion != 4:
        raise ValueError("the authors' Model fixes head_dim=64 and expansion=4; "
                         f"this size has head_dim={model.head_dim}, expansion={model.expansion}")
    torch.manual_seed(seed)
    ref = module.Model(in_channels=model.in_channels, img_size=model.img_size, patch_size=model.patch_size,
                       channels=model.channels, num_blocks=model.num_blocks,
                       layers_per_block=model.layers_per_block, nvp=model.nvp, num_classes=model.num_classes)
    with torch.no_grad():
        for block in ref.blocks:
            block.proj_out.weight.normal_(0.0, head_std)
    return ref.float()


def _median(times: list[float]) -> float:
    return statistics.median(times)


def alternate(ours: Callable[[], Any], theirs: Callable[[], Any], steps: int, warmup: int
              ) -> tuple[list[float], list[float]]:
    """Wall seconds of ``steps`` rounds of ours-then-theirs, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        jax.block_until_ready(ours())
        theirs()
    ours_t, theirs_t = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(ours())
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        ours_t.append(t1 - t0)
        theirs_t.append(t2 - t1)
    return ours_t, theirs_t


def _entry(ours_t: list[float], theirs_t: list[float], **extra: Any) -> dict[str, Any]:
    om, tm = _median(ours_t), _median(theirs_t)
    return {"ours_times_s": ours_t, "theirs_times_s": theirs_t, "ours_median_s": om,
            "theirs_median_s": tm, "ratio": tm / om, **extra}


def _torch_images(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def forward_pass(model: TarFlow) -> Callable[[Any, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]:
    """``(variables, x, y) -> (z, logdet)`` traced as the library's eval step traces its forward
    pass (inside ``layers.forward_pass_kernels``); jit it with ``xla_cpu.compiler_options("forward")``."""
    def forward(variables, x, y):
        with layers.forward_pass_kernels():
            return model.apply(variables, x, y)
    return forward


def compare(model: TarFlow, what: list[str], *, steps: int, warmup: int, seed: int, head_std: float,
            path: str, train_config: Any = None, train_batch: int = 32, sample_batch: int = 16,
            noise_std: float = 0.05, torch_threads: int | None = None) -> dict[str, Any]:
    """Times ``what`` (of :data:`REFERENCE_WHAT`) for ``model`` and the authors' ``Model`` side by side.

    Args:
      model: our flow (its fields give the shapes; ``scan_layers``/``remat``/``dtype`` as set).
      what: the pieces to time, a subset of ``("train", "forward", "sample")``.
      steps, warmup: timed and untimed rounds (each round runs ours then theirs).
      seed: seeds the authors' initialisation (and so ours) and the inputs.
      head_std: standard deviation of the redrawn output-head weights.
      path: folder of the authors' ``transformer_flow.py`` (or the file).
      train_config: the trainer config for ``model`` (``benchmark.train_config``); its
        noise, optimiser and EMA fields are overridden as described above. Needed for "train".
      train_batch, sample_batch: examples per train/forward step and per ``reverse`` call.
      noise_std: Gaussian noise added to the training images (both programs).
      torch_threads: ``torch.set_num_threads`` (None: torch's default).

    Returns:
      ``{"torch_version", "torch_threads", "model": our scan_layers/remat/dtype, "agreement": {...},
      "train"/"forward"/"sample":
      {ours/theirs times and medians in seconds, "ratio" = theirs ÷ ours}}``.

    Raises:
      ValueError: a size the authors' model cannot express, or an unknown piece in ``what``.
    """
    if "train" in what and train_config is None:
        raise ValueError("compare(what=['train', ...]) needs train_config (benchmark.train_config(model, batch))")
    bad = [w for w in what if w not in REFERENCE_WHAT]
    if bad:
        raise ValueError(f"--what for --reference: unknown {bad}; choose from {REFERENCE_WHAT}")
    module = load_reference_module(path)
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    ref = build_reference(module, model, seed, head_std)
    variables = from_torch_state_dict(ref.state_dict(), model)
    out: dict[str, Any] = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "reference_file": os.path.abspath(module.__file__),
                           "train_batch": train_batch, "sample_batch": sample_batch, "noise_std": noise_std,
                           "model": {"scan_layers": model.scan_layers, "remat": model.remat,
                                     "dtype": jnp.dtype(model.dtype).name},
                           "xla_cpu": xla_cpu.settings()}

    rng = np.random.default_rng(seed)
    shape = (train_batch, model.img_size, model.img_size, model.in_channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    x_np = (pixels.astype(np.float32) / 255.0 * 2.0 - 1.0)
    labels = (rng.integers(0, model.num_classes, (train_batch,)).astype(np.int32)
              if model.num_classes else None)
    y_t = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    x_t = _torch_images(x_np)

    # ---- agreement: the same function on the same input
    fwd = jax.jit(forward_pass(model), compiler_options=xla_cpu.compiler_options("forward"))
    y_j = None if labels is None else jnp.asarray(labels)
    z_ours, logdet_ours = fwd(variables, jnp.asarray(x_np), y_j)
    with torch.no_grad():
        z_theirs, _, logdet_theirs = ref(x_t, y_t)
    z_ours_tokens = np.asarray(patchify(z_ours, model.patch_size))
    agreement = {
        "forward_z_max_abs_diff": float(np.max(np.abs(z_ours_tokens - z_theirs.numpy()))),
        # theirs: log-det summed over blocks as a mean over the N dimensions; ours: total nats
        "forward_logdet_per_dim_max_abs_diff": float(np.max(np.abs(
            np.asarray(logdet_ours) / model.num_dims - logdet_theirs.numpy()))),
    }
    out["agreement"] = agreement

    if "train" in what:
        out["train"] = _compare_train(model, train_config, ref, variables, pixels, labels, x_t, y_t, steps,
                                      warmup, seed, noise_std)
    if "forward" in what:
        x_j = jnp.asarray(x_np)
        compiled = fwd.lower(variables, x_j, y_j).compile()

        def theirs_fwd():
            with torch.no_grad():
                return ref(x_t, y_t)

        ours_t, theirs_t = alternate(lambda: compiled(variables, x_j, y_j), theirs_fwd, steps, warmup)
        out["forward"] = _entry(ours_t, theirs_t, batch=train_batch)
    if "sample" in what:
        z_tokens = rng.standard_normal((sample_batch, model.num_tokens, model.token_dim)).astype(np.float32)
        z_j = unpatchify(jnp.asarray(z_tokens), model.img_size, model.patch_size, model.in_channels)
        ys = None if labels is None else labels[:sample_batch] if sample_batch <= train_batch else (
            np.arange(sample_batch) % model.num_classes).astype(np.int32)
        ys_j = None if ys is None else jnp.asarray(ys)
        ys_t = None if ys is None else torch.from_numpy(ys.astype(np.int64))
        rev = jax.jit(lambda v, z, y: model.apply(v, z, y, method=TarFlow.reverse),
                      compiler_options=xla_cpu.compiler_options("sample"))
        compiled = rev.lower(variables, z_j, ys_j).compile()
        z_t = torch.from_numpy(z_tokens)

        def theirs_rev():
            with torch.no_grad():
                return ref.reverse(z_t.clone(), ys_t)

        x_ours = np.asarray(compiled(variables, z_j, ys_j))
        x_theirs = np.transpose(theirs_rev().numpy(), (0, 2, 3, 1))
        agreement["sample_x_max_abs_diff"] = float(np.max(np.abs(x_ours - x_theirs)))
        agreement["sample_x_max_abs"] = float(np.max(np.abs(x_theirs)))
        ours_t, theirs_t = alternate(lambda: compiled(variables, z_j, ys_j), theirs_rev, steps, warmup)
        token_steps = model.num_blocks * (model.num_tokens - 1)
        out["sample"] = _entry(ours_t, theirs_t, batch=sample_batch, token_steps=token_steps,
                               ours_ms_per_token_step=1e3 * _median(ours_t) / token_steps,
                               theirs_ms_per_token_step=1e3 * _median(theirs_t) / token_steps)
    return out


def _compare_train(model: TarFlow, config: Any, ref: Any, variables: Any, pixels: np.ndarray,
                   labels: np.ndarray | None, x_t: Any, y_t: Any, steps: int, warmup: int, seed: int,
                   noise_std: float) -> dict[str, Any]:
    """One AdamW step of each program on the same images (see the module docstring)."""
    import torch

    config = copy.deepcopy(config)
    config.noise, config.noise_std = "gaussian", noise_std
    config.label_drop = 0.0
    config.ema_decay = 0.0
    config.learning_rate = config.min_learning_rate = ADAMW["lr"]
    config.b1, config.b2 = ADAMW["betas"]
    config.weight_decay = ADAMW["weight_decay"]
    tx, schedule = train_state.create_optimizer(config)
    step_fn = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config)

    def init(params):
        return train_state.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None,
            prior_var=jnp.ones((model.num_tokens, model.token_dim), jnp.float32),
            rng=jax.random.PRNGKey(seed), consecutive_skips=jnp.zeros((), jnp.int32),
            total_skips=jnp.zeros((), jnp.int32))

    state = jax.jit(init)(nn.meta.unbox(variables["params"]))
    batch = {"image": jnp.asarray(pixels)}
    if labels is not None:
        batch["label"] = jnp.asarray(labels)
    compiled = jax.jit(step_fn, donate_argnums=(0,), compiler_options=xla_cpu.compiler_options("train")
                       ).lower(state, batch).compile()
    holder = {"state": state}

    def ours():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    ref = copy.deepcopy(ref)  # the optimiser changes the weights; the caller's copy stays as built
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    losses = []

    def theirs():
        opt.zero_grad()
        x = x_t + noise_std * torch.randn_like(x_t)
        z, _, logdets = ref(x, y_t)
        loss = ref.get_loss(z, logdets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    first_ours = float(ours())
    theirs()
    ours_t, theirs_t = alternate(ours, theirs, steps, warmup)
    return _entry(ours_t, theirs_t, batch=int(pixels.shape[0]), ours_first_loss=first_ours,
                  theirs_first_loss=losses[0])


def format_reference(result: dict[str, Any]) -> str:
    """A Markdown table of a side-by-side run."""
    model = result.get("model", {})
    ours = ", ".join(f"{k}={model[k]}" for k in ("scan_layers", "remat", "dtype") if k in model)
    if "xla_cpu" in result:
        ours += f", {xla_cpu.describe(result['xla_cpu'])}"
    lines = [f"authors' PyTorch {result['torch_version']} ({result['torch_threads']} threads) vs tarflow_jax"
             f"{f' ({ours})' if ours else ''}, alternating, medians", "",
             "| work | authors' PyTorch s | tarflow_jax s | ratio (their time ÷ ours) | notes |",
             "|---|---|---|---|---|"]
    names = {"train": f"train step, batch {result['train_batch']} (forward, backward, AdamW)",
             "forward": f"forward, batch {result['train_batch']}",
             "sample": f"sample {result['sample_batch']} images (`reverse`)"}
    for key in REFERENCE_WHAT:
        e = result.get(key)
        if not e:
            continue
        notes = ""
        if key == "sample":
            notes = (f"{e['ours_ms_per_token_step']:.3f} vs {e['theirs_ms_per_token_step']:.3f} "
                     "ms per token step (ours vs theirs)")
        lines.append(f"| {names[key]} | {e['theirs_median_s']:.4f} | {e['ours_median_s']:.4f} | "
                     f"**{e['ratio']:.2f}×** | {notes} |")
    agr = result.get("agreement", {})
    if agr:
        lines += ["", "agreement: " + ", ".join(f"{k}={v:.2e}" for k, v in agr.items())]
    return "\n".join(lines)
