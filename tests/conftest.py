import os

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("BAATT_TEST_PLATFORM", ""))
# Tests compile many small programs once each: cheap compilation beats fast code here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import pytest  # noqa: E402

from baatt import platform  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if platform.has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles its own programs; dropping them afterwards keeps the suite's memory
    flat over its ~700 tests (the executables of earlier modules are never reused)."""
    yield
    import jax

    jax.clear_caches()
