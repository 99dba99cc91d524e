"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared helpers."""

import os
import pathlib
import tempfile
import sys

# The suite compiles far more than it runs: skipping LLVM's optimisations on CPU cuts compile
# time by a quarter to a half. The HLO (what our code decides) is optimised as usual.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.*` (and an uninstalled parcae_jax) import from the root
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"

# Prepared corpora (the embedded one, TFDS) go to a throw-away cache, not ~/.cache.
os.environ.setdefault("PARCAE_JAX_CACHE", tempfile.mkdtemp(prefix="parcae_jax_test_cache_"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (still run in CI)")
