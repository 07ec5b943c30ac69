"""dret: dense-retrieval embedding training and evaluation in JAX / Flax NNX."""

from flax import nnx

# State is born sharded through jit(out_shardings=) (see dret.sharding), never eagerly at creation.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
