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


# ----------------------------------------------------------------------------- child processes started early
# Some checks run in child Pythons (8 host devices must be set before JAX starts). They take about a minute
# each while the test process waits; started as soon as collection is done, they run beside the other tests
# (on a second core), and their test only collects the outcome. One child at a time: at most two processes
# compete for the CPU.

_BACKGROUND = None  # concurrent.futures.ThreadPoolExecutor with one worker, created on first use
_JOBS: dict = {}


def in_background(key, fn):
    """A future of ``fn()``, which runs once per session (per ``key``) in the background worker."""
    global _BACKGROUND
    if key not in _JOBS:
        if _BACKGROUND is None:
            from concurrent.futures import ThreadPoolExecutor

            _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tests-background")
        _JOBS[key] = _BACKGROUND.submit(fn)
    return _JOBS[key]


def pytest_collection_finish(session):
    """Each test module with a ``start_in_background(items)`` hook starts its children for its selected items."""
    if session.config.option.collectonly:
        return
    if hasattr(session.config, "workerinput"):
        # a pytest-xdist worker collects every test but runs only those it is sent: its children start
        # when its first test asks for them (``in_background`` submits on first use), not for all
        return
    by_module: dict = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None:
            by_module.setdefault(module, []).append(item)
    for module, items in by_module.items():
        start = getattr(module, "start_in_background", None)
        if start is not None:
            start(items)


def pytest_sessionfinish(session, exitstatus):
    if _BACKGROUND is not None:
        for future in _JOBS.values():
            future.cancel()  # the ones not started; a running child finishes (the tests that wanted it ran)
        _BACKGROUND.shutdown(wait=True, cancel_futures=True)
