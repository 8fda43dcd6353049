"""A trained digits flow used from plain JAX: likelihoods, guided samples, a prior for inpainting.

Only the public API: ``tarflow_jax.load`` (a ``TrainedFlow``), the run's own data source and
the workdir's PNG helpers. Train the demo first (about 3 minutes on a laptop CPU)::

    python -m tarflow_jax.main --config=configs/digits.py --workdir=workdir/digits
    python examples/digits_flow.py --workdir=workdir/digits --out=workdir/digits/example

It prints the test bits/dim, the mean log-likelihood and how often the likelihood picks the
right class (``argmax_y log p(x|y)``, a classifier for free), and writes two PNGs to
``--out``: ``samples_per_class.png`` (one column per class, the run's guidance) and
``inpainting.png`` (rows: test digits, their top halves, the bottom halves filled in by MAP
under the flow).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tarflow_jax
from tarflow_jax import input_pipeline, workdir as workdirlib


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained digits run (or any class-conditional run)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--num_test", type=int, default=297, help="test images to score (297: all)")
    parser.add_argument("--per_class", type=int, default=8, help="samples per class")
    parser.add_argument("--num_inpaint", type=int, default=10, help="test digits to inpaint")
    parser.add_argument("--steps", type=int, default=300, help="MAP optimisation steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def test_images(flow, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` images (integer levels) and labels of the run's test split."""
    config = flow.config
    batches = input_pipeline.create_eval_iterator(config, batch_size=min(num, 100))
    pixels, labels = [], []
    for batch in batches:
        keep = batch["mask"]
        pixels.append(batch["image"][keep])
        labels.append(batch["label"][keep])
        if sum(map(len, pixels)) >= num:
            break
    return np.concatenate(pixels)[:num], np.concatenate(labels)[:num].astype(np.int32)


def inpaint(flow, observed: jax.Array, mask: jax.Array, y: jax.Array, steps: int) -> jax.Array:
    """MAP estimate of the pixels where ``mask`` is False: maximise ``log p(x|y)``, observed pixels fixed.

    The free pixels are ``tanh(u)`` (kept inside [-1, 1]); Adam on ``u`` in one jitted loop.
    """
    tx = optax.adam(0.05)

    def image(u):
        return jnp.where(mask, observed, jnp.tanh(u))

    def loss(u):
        return -jnp.sum(flow.log_prob(image(u), y))

    @jax.jit
    def run(u):
        def step(carry, _):
            u, state = carry
            value, grad = jax.value_and_grad(loss)(u)
            updates, state = tx.update(grad, state)
            return (optax.apply_updates(u, updates), state), value

        (u, _), losses = jax.lax.scan(step, (u, tx.init(u)), None, length=steps)
        return image(u), losses

    filled, losses = run(jnp.zeros_like(observed))
    print(f"MAP inpainting: -log p(x|y) per image {float(losses[0]) / len(y):.1f} -> "
          f"{float(losses[-1]) / len(y):.1f} nats after {steps} steps")
    return filled


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flow = tarflow_jax.load(args.workdir)                    # a TrainedFlow (EMA weights)
    print(flow)
    if not flow.num_classes:
        raise SystemExit("this example needs a class-conditional run (e.g. configs/digits.py)")
    key = jax.random.key(args.seed)
    levels = flow.num_levels

    # 1. Likelihoods of test images: bits/dim, log p(x|y), and classification by likelihood.
    pixels, labels = test_images(flow, args.num_test)
    bpd = flow.bits_per_dim(pixels, labels, key=key)
    x = (pixels.astype(np.float32) + 0.5) / levels * 2 - 1      # bin centres in [-1, 1]
    per_class = jnp.stack([flow.log_prob(x, c) for c in range(flow.num_classes)], axis=1)
    accuracy = float(jnp.mean(jnp.argmax(per_class, axis=1) == labels))
    print(f"{len(labels)} test images: {float(jnp.mean(bpd)):.3f} bits/dim, mean log p(x|y) "
          f"{float(jnp.mean(per_class[jnp.arange(len(labels)), labels])):.1f} nats, "
          f"argmax_y log p(x|y) accuracy {accuracy:.1%}")

    # 2. Guided samples, one column per class (the run's guidance and sampling options).
    classes = jnp.tile(jnp.arange(flow.num_classes), args.per_class)
    samples = flow.sample(jax.random.fold_in(key, 1), len(classes), classes)
    grid = workdirlib.image_grid(flow.to_uint8(samples), columns=flow.num_classes)
    workdirlib.write_png(out / "samples_per_class.png", grid)

    # 3. The flow as a prior: fill in the bottom half of test digits (MAP, jitted Adam loop).
    n = min(args.num_inpaint, len(labels))
    observed = jnp.asarray(x[:n])
    mask = jnp.broadcast_to(jnp.arange(observed.shape[1])[None, :, None, None] < observed.shape[1] // 2,
                            observed.shape)
    filled = inpaint(flow, observed, mask, jnp.asarray(labels[:n]), args.steps)
    rows = np.concatenate([np.asarray(observed), np.where(mask, observed, -1.0), np.asarray(filled)])
    workdirlib.write_png(out / "inpainting.png",
                         workdirlib.image_grid(flow.to_uint8(rows), columns=n))
    print(f"wrote {out / 'samples_per_class.png'} and {out / 'inpainting.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
