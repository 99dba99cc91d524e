"""host_memory: when it applies, and that it removes the per-call page faults it is for."""

import json
import subprocess
import sys

import pytest

from parcae_jax.host_memory import cpu_is_the_device, reuse_freed_memory
from tests.conftest import ROOT

# A jitted step whose temp buffer (~200 MB) is larger than glibc's mmap threshold; reports
# the median of the minor page faults per call after a warm-up (the heap settles over the
# first calls, and other allocations can still split a freed block now and then).
_PROBE = """
import json, resource, sys
from parcae_jax.host_memory import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(jnp.outer(x, x)) * jnp.sin(jnp.outer(x, x))))
x = jnp.linspace(0.0, 1.0, 5000)
for _ in range(8):
    f(x).block_until_ready()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sorted(faults)[3]}))
"""


def _probe(env_extra: dict) -> dict:
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_platform_choice(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_is_the_device()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not cpu_is_the_device()
    assert not reuse_freed_memory()  # an accelerator may be the device: leave malloc alone
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PARCAE_JAX_SYSTEM_MALLOC", "1")
    assert not reuse_freed_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reused_memory_removes_the_page_faults_of_each_call():
    system = _probe({"PARCAE_JAX_SYSTEM_MALLOC": "1"})
    reused = _probe({})
    assert not system["applied"] and reused["applied"]
    assert system["faults"] > 20_000  # ~200 MB of fresh pages on every call
    assert reused["faults"] < system["faults"] / 10, (system, reused)
