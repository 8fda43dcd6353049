"""TarFlow in JAX/Flax: Transformer autoregressive normalizing flows on image pixels.

The package root holds the model core and checkpoint reading: ``TarFlow``, ``JacobiPlan``
and ``load`` (a trained flow from a workdir). Importing it imports neither the trainer,
optax, clu, grain nor TensorFlow.
"""

from tarflow_jax.checkpointing import load
from tarflow_jax.flow import MetaBlock, TarFlow, patchify, unpatchify
from tarflow_jax.sampling import JacobiPlan
from tarflow_jax.trained import SampleOptions, TrainedFlow

__all__ = ["TarFlow", "MetaBlock", "JacobiPlan", "TrainedFlow", "SampleOptions", "load", "patchify",
           "unpatchify"]
__version__ = "0.1.0"
