"""The package's layering, read from the source with `ast`: `model/` and `data/` import nothing
above them, so either can be used (and tested) without the trainer; `infer/` builds on
`model/` only (loading checkpoints is the caller's: generate.py, evaluate.py); the science
fits and plots import nothing of ours."""

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "parcae_jax"
# Leaves that data/ may use: modules importing nothing of ours (checked below).
LEAVES = {"parcae_jax.storage", "parcae_jax.cli"}
ALLOWED = {"model": {"parcae_jax.model"}, "data": {"parcae_jax.data"} | LEAVES,
           "infer": {"parcae_jax.model", "parcae_jax.infer"}}


def our_imports(path) -> list[tuple[int, str]]:
    """(line, module) of every parcae_jax import in a file, wherever it is (functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            names = [node.module] if node.module != "parcae_jax" else [f"parcae_jax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "parcae_jax" or n.startswith("parcae_jax.")]
    return found


def within(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_lower_layer_imports_nothing_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert len(files) >= 5
    upward = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in files for line, m in our_imports(p)
              if not within(m, ALLOWED[layer])]
    assert not upward, upward


def test_the_leaves_below_data_import_nothing_of_ours():
    for leaf in LEAVES:
        path = PACKAGE / (leaf.split(".", 1)[1] + ".py")
        assert our_imports(path) == [], leaf


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from parcae_jax.train import Trainer\nimport parcae_jax.model.config\n")
    assert [m for _, m in our_imports(bad) if not within(m, ALLOWED["model"])] == ["parcae_jax.train"]


def test_the_science_fits_and_plots_import_nothing_of_ours():
    """Fits and plots are pure: a sweep table or a curve from anywhere can be fitted and drawn."""
    for name in ("fits", "plots"):
        assert our_imports(PACKAGE / "science" / f"{name}.py") == [], name


def _string_constants(path) -> set[str]:
    """Every string literal of a file, f-string pieces included."""
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_no_parameter_path_is_spelled_outside_the_model_in_inference():
    """Decoding calls the model's own segments: no module name of the parameter tree (of a Parcae
    with value embeddings, prelude norm and an untied head, or of a GPT) appears in infer/ as a
    string, and no code there indexes a parameter tree by name."""
    import jax

    from parcae_jax.model import param_shapes
    from tests.helpers import tiny

    names = set()
    for cfg in (tiny(value_embeds=True, prelude_norm=True, tie_embeddings=False), tiny(arch="gpt", n_layers=2)):
        for path, _ in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
            names |= {k.key for k in path}
    assert {"prelude_0", "core", "injection", "C", "ln_f", "lm_head"} <= names
    files = sorted((PACKAGE / "infer").rglob("*.py"))
    spelled = {f"{p.relative_to(ROOT)}: {s!r}" for p in files for s in _string_constants(p)
               if s in names or s.rstrip("_0123456789{}") + "_" in {n.rstrip("0123456789") for n in names if "_" in n}}
    assert not spelled, spelled
    indexed = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in files for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "params"]
    assert not indexed, indexed
