"""The dependency rule, read from the source: `pipeline` sits on top; `beam_jobs`, `models` and `serving`
never import it; `models` imports no Beam; `serving` imports no Beam and no training code."""

import ast
import os

import pytest
from conftest import REPO

RULES = {
    "beam_jobs": ("pipeline",),
    "models": ("pipeline", "apache_beam", "beam_jobs", "serving"),
    "serving": ("pipeline", "apache_beam", "beam_jobs", "models.two_tower", "models.ranking.training",
                "models.preranking.training"),
}


def _imports(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from models import two_tower`
                yield node.lineno, f"{node.module}.{alias.name}"


def _modules(package):
    for root, _, files in os.walk(os.path.join(REPO, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_follow_the_dependency_rule(package):
    forbidden = RULES[package]
    found = [f"{os.path.relpath(path, REPO)}:{line} imports {name}"
             for path in _modules(package) for line, name in _imports(path)
             if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert found == []


def test_the_rule_catches_a_forbidden_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\nfrom pipeline.data import canonical\n")
    assert list(_imports(str(path)))[1:] == [(2, "pipeline.data"), (2, "pipeline.data.canonical")]
