"""A PyTorch model with the shapes and operations of a ``TarFlow`` forward pass, for speed comparisons.

Used by ``python -m tarflow_jax.tools.benchmark --torch_compare``. Not the reference
implementation (that is the authors' ``transformer_flow.py``): an equivalent written for
timing, float32, eval mode, random weights. Torch is imported only when a function here runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

from tarflow_jax.flow import TarFlow


def torch_forward_model(model: TarFlow, seed: int = 0):
    """A PyTorch module with the shapes and operations of ``model``'s forward pass (random weights).

    Not the reference implementation: an equivalent written for timing, float32, eval mode.
    """
    import torch
    from torch import nn as tnn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    w, hd, t, d, p = model.channels, model.head_dim, model.num_tokens, model.token_dim, model.patch_size

    class Layer(tnn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = tnn.LayerNorm(w), tnn.LayerNorm(w)
            self.qkv, self.out = tnn.Linear(w, 3 * w), tnn.Linear(w, w)
            self.mlp_in, self.mlp_out = tnn.Linear(w, model.expansion * w), tnn.Linear(model.expansion * w, w)

        def forward(self, h):
            b = h.shape[0]
            q, k, v = self.qkv(self.attn_norm(h)).reshape(b, t, 3, w // hd, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + self.out(a.transpose(1, 2).reshape(b, t, w))
            return h + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(h))))

    class Block(tnn.Module):
        def __init__(self, flip):
            super().__init__()
            self.flip = flip
            self.proj_in, self.proj_out = tnn.Linear(d, w), tnn.Linear(w, 2 * d)
            self.pos = tnn.Parameter(0.01 * torch.randn(t, w))
            self.layers = tnn.ModuleList(Layer() for _ in range(model.layers_per_block))
            tnn.init.normal_(self.proj_out.weight, std=0.02)

        def forward(self, x):
            if self.flip:
                x = x.flip(1)
            h = self.proj_in(x) + self.pos
            for layer in self.layers:
                h = layer(h)
            a, b = self.proj_out(h).float().chunk(2, dim=-1)
            a = F.pad(a[:, :-1], (0, 0, 1, 0))
            b = F.pad(b[:, :-1], (0, 0, 1, 0))
            z = (x - b) * torch.exp(-a)
            return (z.flip(1) if self.flip else z), -a.sum(dim=(1, 2))

    class Flow(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = tnn.ModuleList(Block(bool(k % 2)) for k in range(model.num_blocks))

        def forward(self, x):  # x (B, H, W, C)
            b, hh, ww, c = x.shape
            x = x.reshape(b, hh // p, p, ww // p, p, c).permute(0, 1, 3, 5, 2, 4).reshape(b, t, d)
            logdet = torch.zeros(b)
            for blk in self.blocks:
                x, ld = blk(x)
                logdet = logdet + ld
            return x, logdet

    return Flow().eval()


def torch_compare(model: TarFlow, jax_call: Callable[[], Any], batch: int, steps: int, warmup: int,
                  seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Interleaved medians of the JAX forward pass and the PyTorch equivalent (same batch and shapes)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    flow = torch_forward_model(model, seed)
    x = torch.rand(batch, model.img_size, model.img_size, model.in_channels) * 2 - 1

    def torch_call():
        with torch.inference_mode():
            return flow(x)

    for _ in range(warmup):
        torch_call()
        jax.block_until_ready(jax_call())
    jax_times, torch_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(jax_call())
        t1 = time.perf_counter()
        torch_call()
        t2 = time.perf_counter()
        jax_times.append(t1 - t0)
        torch_times.append(t2 - t1)
    jm, tm = statistics.median(jax_times), statistics.median(torch_times)
    return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "jax_times_s": jax_times, "torch_times_s": torch_times,
            "jax_images_per_s": batch / jm, "torch_images_per_s": batch / tm,
            "jax_time_over_torch_time": jm / tm}
