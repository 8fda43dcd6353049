"""TarFlow in JAX/Flax: Transformer autoregressive normalizing flows on image pixels."""

from tarflow_jax.flow import MetaBlock, TarFlow, patchify, unpatchify
from tarflow_jax.sampling import JacobiPlan

__all__ = ["TarFlow", "MetaBlock", "JacobiPlan", "load", "patchify", "unpatchify"]
__version__ = "0.1.0"


def load(workdir: str, use_ema: bool = True, step: int | None = None):
    """``(model, variables, config)`` of a trained flow in ``workdir`` (see ``checkpointing.load``)."""
    from tarflow_jax.checkpointing import load as load_checkpoint

    return load_checkpoint(workdir, use_ema=use_ema, step=step)
