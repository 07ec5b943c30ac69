"""bf16 / fp16 compute with float32 master weights; non-finite steps are skipped, counted, and abort the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dret.errors import DretError
from dret.trainer import train_and_evaluate
from tests.test_train import flat, steps
from tests.train_util import new_run, tiny_config


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_half_precision_trains_with_float32_masters(flag, tmp_path):
    run = new_run(tiny_config(tmp_path, **{flag: True}))
    state, metrics = steps(run, 3)
    assert all(v.dtype == np.float32 for v in flat(state.params).values())
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0
    # fp16 starts at 2**15 and halves on each overflowing (skipped) step; bf16 never scales.
    assert float(metrics["loss_scale"]) in ((2.0 ** 15, 2.0 ** 14, 2.0 ** 13) if flag == "fp16" else (1.0,))
    model = nnx.merge(run.step_config.graphdef, state.params, state.frozen)
    assert model.dtype == (jnp.bfloat16 if flag == "bf16" else jnp.float16)


def test_overflowing_step_is_skipped_and_fp16_scale_halves(tmp_path):
    run = new_run(tiny_config(tmp_path, fp16=True))
    run.state = run.state.replace(loss_scale=jnp.float32(3e38))  # the scaled loss overflows to inf
    before = flat(run.state.params)
    state, metrics = steps(run, 1)
    assert metrics["skipped"] == 1 and int(state.nonfinite_run) == 1
    assert float(state.loss_scale) == pytest.approx(1.5e38)
    after = flat(state.params)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    assert int(state.step) == 1


def test_run_aborts_after_max_nonfinite_steps(tmp_path):
    config = tiny_config(tmp_path, learning_rate=1e30, max_nonfinite_steps=1, max_steps=6, max_grad_norm=0.0)
    with pytest.raises(DretError, match="non-finite steps in a row"):
        train_and_evaluate(config)


def test_o0_keeps_float32_compute(tmp_path):
    run = new_run(tiny_config(tmp_path, fp16=True, fp16_opt_level="O0"))
    assert not run.step_config.fp16
    assert jax.tree.leaves(run.state.params)[0].dtype == np.float32
