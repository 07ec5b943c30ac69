"""Model FLOPs of a training step from its real tokens, and MFU against the chip's dense bf16 peak.

Model FLOPs count the work the model needs, not what the hardware did: 6 x (matmul weights) per real token
(forward 2, backward 4) plus attention's scores and values, 12 x layers x width x length^2 per text; padding,
recomputation (`recompute`) and the loss are not counted. MFU is that per second over the devices' peak.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from dret import models

# Dense bf16 peak FLOP/s per chip, matched by a substring of jax's `device_kind` (first match wins).
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("TPU v6", 918e12),
             ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12))


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """What a step's model FLOPs depend on besides its tokens."""

    matmul_weights: int  # weights of the dense matmuls (embedding tables excluded: they are looked up)
    layers: int
    width: int  # the attention width, heads x head size

    @classmethod
    def of(cls, model: nnx.Module, hf_config: dict) -> "ModelFlops":
        kernels = [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                   if len(v.shape) == 2 and path[-1] not in ("embedding", "added_embeddings")
                   and not isinstance(v, nnx.LoRAParam)]
        text = models.text_config(hf_config)
        return cls(sum(int(np.prod(v.shape)) for v in kernels), text["num_hidden_layers"], text["hidden_size"])

    def of_texts(self, lengths: np.ndarray) -> float:
        """Model FLOPs of one training step (forward and backward) over texts of these real lengths."""
        lengths = lengths.astype(np.float64)
        return 6 * self.matmul_weights * lengths.sum() + 12 * self.layers * self.width * (lengths ** 2).sum()

    def of_batch(self, batch: dict) -> float:
        """Of a training batch's queries and passages (token counts from their masks)."""
        return self.of_texts(np.concatenate([batch["query_mask"].sum(1), batch["passage_mask"].sum(1)]))


def peak_flops(devices) -> float | None:
    """The devices' summed dense bf16 peak FLOP/s; None for a chip not in PEAK_BF16 (CPUs among them)."""
    kinds = {d.device_kind for d in devices}
    peaks = [next((p for name, p in PEAK_BF16 if name in kind), None) for kind in kinds]
    if len(peaks) != 1 or peaks[0] is None:
        return None
    return peaks[0] * len(devices)


def mfu_metrics(model_flops: float, seconds: float, devices=None) -> dict[str, float]:
    """{model_tflops_per_s, and mfu where the chip's peak is known} for `model_flops` done in `seconds`."""
    rate = model_flops / seconds
    peak = peak_flops(jax.devices() if devices is None else devices)
    return {"model_tflops_per_s": rate / 1e12, **({"mfu": rate / peak} if peak else {})}
