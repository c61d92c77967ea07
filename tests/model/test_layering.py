"""The model runtime imports nothing above it (ARCHITECTURE.md: imports point down only).

Every import statement under `ovis_batch/model/`, at module level or inside a function, is read from the
source with `ast`, so that a lazy import inside a function body cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ovis_batch

MODEL_DIR = Path(ovis_batch.__file__).parent / "model"
# Layers that sit above the model runtime (or beside it and know it): the runtime must not know them.
FORBIDDEN = ("checkpoints", "pipeline", "train", "index", "eval", "cli", "commands", "workflows")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; relative imports resolved to absolute."""
    package = "ovis_batch.model"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from ovis_batch import checkpoints` names the layer in the alias, not the module.
            if module == "ovis_batch":
                found += [(node.lineno, f"ovis_batch.{alias.name}") for alias in node.names]
    return found


def upward_imports(path: Path) -> list[str]:
    return [
        f"{path.name}:{line} imports {module}"
        for line, module in imported_modules(path)
        if any(
            module == f"ovis_batch.{layer}" or module.startswith(f"ovis_batch.{layer}.")
            for layer in FORBIDDEN
        )
    ]


def test_the_scan_sees_module_level_lazy_and_aliased_imports(tmp_path):
    """The checker itself: each way of importing a layer above is caught, imports below are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import ovis_batch.pipeline.job\n"
        "from ovis_batch import checkpoints\n"
        "from ovis_batch.model.checkpoint import read_config\n"
        "from ovis_batch.errors import UsageError\n"
        "def load():\n"
        "    from ovis_batch.checkpoints.consolidate import resolve_model_dir\n"
        "    from ..train import job\n"
    )
    assert upward_imports(sample) == [
        "sample.py:1 imports ovis_batch.pipeline.job",
        "sample.py:2 imports ovis_batch.checkpoints",
        "sample.py:6 imports ovis_batch.checkpoints.consolidate",
        "sample.py:7 imports ovis_batch.train",
    ]


def test_model_layer_imports_nothing_above_it():
    files = sorted(MODEL_DIR.rglob("*.py"))
    assert len(files) > 5  # the scan looks at the real package
    violations = [v for path in files for v in upward_imports(path)]
    assert violations == [], "the model runtime must not import the layers above it:\n" + "\n".join(
        violations
    )
