"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared helpers."""

import os
import pathlib
import sys
import tempfile

import pytest

# The suite compiles far more than it runs, so its programs are compiled for compile speed:
# LLVM's optimisations skipped (a quarter to a half of the compile) and fusions emitted by
# XLA:CPU's older elemental emitters rather than its MLIR fusion emitters (a third less: the
# MLIR pipeline per fusion was most of a tiny train step's compile). The HLO (what our code
# decides) is optimised as usual. Subprocesses inherit these flags.
COMPILE_FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + COMPILE_FAST).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.*` (and an uninstalled parcae_jax) import from the root
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"

# Prepared corpora (the embedded one, TFDS) go to a throw-away cache, not ~/.cache (one for the
# whole run: xdist's workers inherit the controller's environment).
os.environ.setdefault("PARCAE_JAX_CACHE", tempfile.mkdtemp(prefix="parcae_jax_test_cache_"))
# XLA's persistent compilation cache for subprocess runs on ONE device only (several CPU devices
# do not pair cached and fresh executables: parcae_jax/runtime/compile_cache.py). Never set in this
# process, which has 8 devices.
XLA_CACHE = os.path.join(os.environ["PARCAE_JAX_CACHE"], "xla")
# The environment of a subprocess whose test needs no particular device count: one CPU device
# compiles and steps faster than 8 fake ones sharing 2 cores, and may use XLA_CACHE.
ONE_DEVICE_ENV = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {COMPILE_FAST}"}


@pytest.fixture(scope="session")
def uninterrupted_30(tmp_path_factory):
    """The small config (tests/test_train.py) trained 30 steps on one device without a stop, in
    this process: (its logged losses by step, its Trainer, its Run). Runs that are stopped and
    resumed in other ways must log these losses; resumes in this process reuse the Trainer."""
    from parcae_jax.training.train import train
    from tests.test_train import losses, one_device, small_config

    config = small_config(steps=30)
    trainer, run = one_device(config)
    workdir = tmp_path_factory.mktemp("uninterrupted_30")
    train(config, str(workdir), run, trainer)
    return losses(workdir), trainer, run


def pytest_runtest_teardown(item):
    """XLA_CACHE is for one-device subprocesses: a test that turns the cache on in this
    8-device process (science.sweep.run_all does, from its config) would leave it on for the
    tests after it, where cached executables can deadlock."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", None)
        pytest.fail(f"{item.nodeid} turned XLA's compilation cache on in the test process; run it in a "
                    "one-device subprocess (tests/conftest.py ONE_DEVICE_ENV)")


def pytest_addoption(parser):
    parser.addoption("--full-compile", action="store_true",
                     help="also compile every published config in full (minutes each; off in CI)")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may use, at most 4 (each worker holds its own
    compiled programs and fake devices; beyond 4 the longest file sets the wall time anyway)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (still run in CI)")
    config.addinivalue_line("markers", "long: the longest tests (30 s to 2 min on 2 cores): dealt out first")
    config.addinivalue_line("markers", "full_compile: compiles a published config in full; needs --full-compile")


def _shared_work(item) -> list[str]:
    """The fixtures of ours that `item` uses and that outlive it (module, package or session
    scope): built once per worker, so tests sharing one belong on one worker. pytest's own
    (tmp_path_factory and the like) cost nothing and do not count."""
    keys = []
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        fixture = defs[-1] if defs else None
        if fixture is None or fixture.scope == "function" or not fixture.func.__module__.startswith("tests"):
            continue
        keys.append(name if fixture.scope == "session" else f"{item.module.__name__}.{name}")
    return sorted(keys)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook turns the markers into group names
def pytest_collection_modifyitems(config, items):
    if not config.getoption("--full-compile"):
        skip = pytest.mark.skip(reason="opt-in: pass --full-compile")
        for item in items:
            if "full_compile" in item.keywords:
                item.add_marker(skip)
    # Workers (pytest-xdist, --dist loadgroup) get tests in groups: tests that share a fixture of
    # ours that outlives a test (a trained run, a compiled model) go to one worker, which builds it
    # once; every other test is a group of its own, so that one long file does not hold one worker
    # while the other idles. Groups are dealt out in the order of this list (pyproject.toml turns
    # xdist's reordering off): those with a `long` test first, then by their number of slow tests,
    # so that no long test starts last while the other worker idles.
    groups = {item: ",".join(_shared_work(item)) for item in items}
    for item in items:
        if groups[item]:
            item.add_marker(pytest.mark.xdist_group(groups[item]))
        else:
            groups[item] = item.nodeid
    slow = {}
    for item in items:  # a long test outweighs any number of merely slow ones: started last, it is the tail
        slow[groups[item]] = slow.get(groups[item], 0) + ("slow" in item.keywords) + 100 * ("long" in item.keywords)
    first = {g: i for i, g in reversed(list(enumerate(groups[item] for item in items)))}
    items.sort(key=lambda i: (-slow[groups[i]], first[groups[i]]))


def pytest_collection_finish(session):
    """In an xdist worker: fail loudly if the groups above were not applied (pytest-xdist names
    a grouped test `nodeid@group`; pytest 9.2 broke that silently, and then every worker
    rebuilt the shared fixtures it happened to need)."""
    if getattr(session.config.option, "loadgroup", False):
        if any("@" not in item.nodeid for item in session.items if item.get_closest_marker("xdist_group")):
            raise pytest.UsageError("pytest-xdist ignored the --dist loadgroup groups: install the pytest and "
                                    "pytest-xdist versions pinned in requirements.txt")
