"""The installed package (`pip install -r requirements.txt` installs it editable): shipped
configs found by name from any folder, pins that satisfy the ranges. (Every console script's
--help from outside the checkout: tests/test_commands.py.)"""

import json
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


@pytest.mark.parametrize("args,params", [
    (["--config=1p3b"], 1338591744),
    (["--config=configs/gpt_140m.py"], 143141184),
    (["--config", "gpt_140m", "--config.model.n_layers=3"], 96736896),  # the override applies to it
    ([], 943872),  # the default: tiny
])
def test_a_shipped_config_is_found_by_name_from_any_folder(args, params, tmp_path):
    out = subprocess.run([str(pathlib.Path(sys.executable).parent / "parcae-train"), *args, "--mode=describe"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params_total"] == params


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    pinned = pins()
    declared = [Requirement(r) for r in PROJECT["dependencies"]]
    declared += [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
    assert len(declared) >= 20
    for req in declared:
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{req.name} is declared in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(pinned[name]), f"{req.name}=={pinned[name]} is outside {req.specifier}"
