"""TarFlow in JAX/Flax: Transformer autoregressive normalizing flows on image pixels."""

from tarflow_jax.flow import MetaBlock, TarFlow, patchify, unpatchify
from tarflow_jax.sampling import JacobiPlan

__all__ = ["TarFlow", "MetaBlock", "JacobiPlan", "patchify", "unpatchify"]
__version__ = "0.1.0"
