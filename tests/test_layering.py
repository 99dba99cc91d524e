"""The package's layering, read from the source with `ast`: every module sits in one layer, and
imports only from layers below it or from its own package (never two sibling packages of one
layer, e.g. model/ and data/), with no cycle anywhere. Commands (flags, `main`, the error
boundary) live only in the top layer: library modules define no flag and no `main`."""

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "parcae_jax"
# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = [
    ["parcae_jax.errors"],  # the base of every user error: imports nothing of ours
    ["parcae_jax.storage", "parcae_jax.native_cache"],  # local or gs:// paths; where native builds are cached
    ["parcae_jax.model", "parcae_jax.data"],  # usable and testable without the trainer
    ["parcae_jax.runtime", "parcae_jax.infer"],  # checkpoints, metrics, processes; decoding and scoring
    ["parcae_jax.training"],  # the train step and loop, configs, sharding
    ["parcae_jax.interop"],  # the official format, in and out
    ["parcae_jax.bench", "parcae_jax.science"],  # measurements and experiments built on training
    ["parcae_jax.commands", "parcae_jax.main"],  # flags, `main`, the error boundary
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
COMMANDS = {"parcae_jax.commands", "parcae_jax.main"}


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def group_of(module: str) -> str | None:
    group = max((g for g in RANK if module == g or module.startswith(g + ".")), key=len, default=None)
    return "commands" if group in COMMANDS else group


def rank_of(group: str) -> int:
    return RANK["parcae_jax.commands"] if group == "commands" else RANK[group]


def our_imports(path) -> list[tuple[int, str]]:
    """(line, module) of every parcae_jax import in a file, wherever it is (functions too); an
    imported name that is itself a module (`from parcae_jax.data import corpus`) counts as that
    module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module is None or not node.module.startswith("parcae_jax"):
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("parcae_jax")]
    return found


def upward(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Each import that goes to a higher layer or to a sibling package of the same layer."""
    bad = []
    for module, found in imports.items():
        mine = group_of(module)
        for line, target in found:
            theirs = group_of(target)
            if mine is None or theirs is None:
                bad.append(f"{module}:{line} -> {target}: not in any layer (add it to LAYERS)")
            elif theirs != mine and not rank_of(theirs) < rank_of(mine):
                bad.append(f"{module}:{line} -> {target}")
    return bad


def cycles(imports: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """The import cycles among modules: strongly connected components of more than one module
    (Tarjan), or a module importing itself."""
    graph = {m: sorted({t for _, t in found if t in imports}) for m, found in imports.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def imports() -> dict[str, list[tuple[int, str]]]:
    return {m: our_imports(p) for m, p in MODULES.items()}


def test_every_module_sits_in_a_layer_and_imports_only_below_it(imports):
    assert len(imports) > 80 and {group_of(m) for m in imports} >= set(RANK) - COMMANDS | {"commands"}
    assert upward(imports) == []


def test_the_import_graph_has_no_cycle(imports):
    assert cycles(imports) == []


def test_the_checks_see_a_planted_upward_import_and_a_planted_cycle(imports):
    planted = dict(imports)
    planted["parcae_jax.model.layers"] = [*imports["parcae_jax.model.layers"], (1, "parcae_jax.training.train")]
    planted["parcae_jax.data.corpus"] = [*imports["parcae_jax.data.corpus"], (1, "parcae_jax.model.config")]
    assert upward(planted) == ["parcae_jax.model.layers:1 -> parcae_jax.training.train",
                               "parcae_jax.data.corpus:1 -> parcae_jax.model.config"]
    planted["parcae_jax.data.prepare"] = [*imports["parcae_jax.data.prepare"], (1, "parcae_jax.data.corpus")]
    assert ["parcae_jax.data.corpus", "parcae_jax.data.prepare"] in cycles(planted)


def test_the_parser_sees_imports_inside_functions(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from parcae_jax.training import train\nimport parcae_jax.model.config\n")
    assert sorted(m for _, m in our_imports(bad)) == ["parcae_jax.model.config", "parcae_jax.training.train"]


def _says_moved(node: ast.If) -> bool:
    """`if __name__ == "__main__":` whose only effect is errors.moved(...): a library module
    that an old command line still names says where its command went (exit 2)."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    return len(calls) == 1 and ast.unparse(calls[0].func) == "moved"


def command_code(source: str) -> list[str]:
    """What in a module's source belongs to the command layer: flags, a `main`, a `__main__`
    block (other than one that only says where the command moved)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "main" and node in tree.body:
            found.append("def main")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("DEFINE"):
            found.append(f"{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Name) and node.id.startswith("DEFINE"):
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and not _says_moved(node):
            found.append(f"{node.lineno}: __main__")
    return found


def test_only_commands_define_flags_or_a_main():
    """Flags, `main` and `__main__` live in the command layer: a library module can be imported by
    any command without adding flags to its --help."""
    found = [f"{m}: {what}" for m, p in MODULES.items() if group_of(m) != "commands"
             for what in command_code(p.read_text())]
    assert found == []
    planted = 'from absl.flags import DEFINE_string\nX = DEFINE_string("x", None, "")\n'
    assert command_code(planted) == ["2: DEFINE_string"]
    assert command_code('if __name__ == "__main__":\n    run()\n') == ["1: __main__"]
    assert command_code('if __name__ == "__main__":\n    from parcae_jax.errors import moved\n\n    moved("c")\n') == []


def test_the_science_fits_and_plots_import_nothing_of_ours():
    """Fits and plots are pure (but for the error base): a sweep table or a curve from anywhere
    can be fitted and drawn."""
    for name in ("fits", "plots"):
        assert {m for _, m in our_imports(PACKAGE / "science" / f"{name}.py")} <= {"parcae_jax.errors"}, name


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
