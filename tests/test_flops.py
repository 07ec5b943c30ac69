"""Model FLOPs of a step from its real tokens, and the chips whose peak makes an MFU."""

import dataclasses

import numpy as np
from flax import nnx

from dret import models
from dret.flops import ModelFlops, peak_flops
from dret.hf_io import read_config
from dret.models.bert import TINY


def test_model_flops_count_matmul_weights_and_attention_per_real_token(minilm_dir):
    hf = {**read_config(minilm_dir), **TINY}  # 2 layers, 64 wide, MLP 128
    flops = ModelFlops.of(nnx.eval_shape(lambda: models.build(hf, rngs=nnx.Rngs(0))), hf)
    per_layer = 4 * 64 * 64 + 2 * 64 * 128  # q, k, v, out + the MLP's two matrices; embedding tables excluded
    assert flops == ModelFlops(matmul_weights=2 * per_layer, layers=2, width=64)
    assert flops.of_texts(np.array([3, 5])) == 6 * 2 * per_layer * 8 + 12 * 2 * 64 * (9 + 25)
    batch = {"query_mask": np.array([[1, 1, 1, 0]]), "passage_mask": np.array([[1, 1, 1, 1, 1, 0], [0] * 6])}
    assert flops.of_batch(batch) == flops.of_texts(np.array([3, 5, 0]))  # padding costs nothing


@dataclasses.dataclass
class Device:
    device_kind: str


def test_peak_is_known_for_accelerators_only():
    assert peak_flops([Device("NVIDIA H200")] * 8) == 8 * 989e12
    assert peak_flops([Device("TPU v5 lite")] * 4) == 4 * 197e12
    assert peak_flops([Device("cpu")]) is None
    assert peak_flops([Device("NVIDIA H200"), Device("NVIDIA A100-SXM4-80GB")]) is None  # mixed chips
