"""dret: dense-retrieval embedding training and evaluation in JAX / Flax NNX."""

import os

# transformers' notice that PyTorch is absent: dret needs only its tokenizers and configs.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from flax import nnx  # noqa: E402

# State is born sharded through jit(out_shardings=) (see dret.sharding), never eagerly at creation.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
