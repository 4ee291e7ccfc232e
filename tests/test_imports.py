"""The shape of the package, checked from the source: no import cycles among dens's modules (imports inside
functions and under TYPE_CHECKING count), no stage importing a sibling stage, no root module importing a stage,
no module reaching for another module's underscore names, a command (cli.py) only in a stage, and no module
longer than one sitting's read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# The stage packages, one per command; every other package and module under dens is root.
STAGES = ("train", "export", "infer", "merge", "gradcam", "qc", "verdicts", "synth", "serve", "eval")
ALLOWED_SIBLING = {
    # dens-infer --gradcam runs Grad-CAM on the rows it has just flagged, through dens-gradcam's public entry
    # (imported only when the flag is given), so that the maps and the review page are dens-gradcam's own.
    ("dens.infer.cli", "dens.gradcam"),
}
MAX_LINES = 500  # a module is read in one sitting


def modules(root: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in sorted((root / "dens").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(module imported, names taken from it)`` for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "dens"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "dens":
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from dens.x import submodule`
                    found.append((f"{base}.{alias.name}", []))
                else:
                    names.append(alias.name)
            if names:
                found.append((base, names))
    # `import dens.a.b` names a module; keep only the ones that exist (a class path is not a module).
    return [(target, names) for target, names in found if target in known]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {t for t, _ in imports(name, path, known) if t != name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(known: dict[str, Path]) -> list[str]:
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph(known))]
    for name, path in known.items():
        mine = stage_of(name)
        for target, names in imports(name, path, known):
            theirs = stage_of(target)
            if theirs and theirs != mine and (name, target) not in ALLOWED_SIBLING:
                what = "a root module" if mine is None else f"stage {mine}"
                problems.append(f"{name} ({what}) imports {target} (stage {theirs})")
            private = [n for n in names if n.startswith("_")]
            if private and target != name:
                problems.append(f"{name} imports private {', '.join(private)} from {target}")
    return problems


def test_the_package_has_no_cycles_no_sibling_stage_imports_and_no_private_reaches():
    known = modules()
    assert "dens.engine" in known and "dens.exams" in known  # the walk sees the package as it is
    assert violations(known) == []


def test_every_command_is_a_stage_package_and_every_stage_has_its_command():
    commands = {path.parent.name for path in (SRC / "dens").glob("*/cli.py")}
    assert commands == set(STAGES)  # a package with a cli.py is a stage; a root package has none


def test_no_module_is_longer_than_500_lines():
    lines = {name: len(path.read_bytes().splitlines()) for name, path in modules().items()}
    assert len(lines) > 50 and max(lines.values()) > 100  # the count sees the package as it is
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"dens/a.py": "from dens import b\n", "dens/b.py": "def f():\n    from dens.a import x\n"},
            "import cycle: dens.a <-> dens.b",
        ),
        (
            {
                "dens/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dens.b import B\n",
                "dens/b.py": "import dens.a\n",
            },
            "import cycle: dens.a <-> dens.b",
        ),
        (
            {
                "dens/train/__init__.py": "",
                "dens/train/loop.py": "from dens.infer.runner import run\n",
                "dens/infer/__init__.py": "",
                "dens/infer/runner.py": "",
            },
            "dens.train.loop (stage train) imports dens.infer.runner (stage infer)",
        ),
        (
            {"dens/labels.py": "from dens.train import loop\n", "dens/train/__init__.py": "", "dens/train/loop.py": ""},
            "dens.labels (a root module) imports dens.train.loop (stage train)",
        ),
        (
            {"dens/route/dicom.py": "from .decode import _check\n", "dens/route/decode.py": "def _check(): ...\n"},
            "dens.route.dicom imports private _check from dens.route.decode",
        ),
    ],
)
def test_the_check_catches_each_kind_of_violation(tmp_path, files, expected):
    for relative, text in {"dens/__init__.py": "", **files}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    assert violations(modules(tmp_path)) == [expected]


def test_dens_infer_main_process_loads_no_decoder_and_no_torch():
    # The decoders live in the engine's workers; torch only comes with --gradcam. The main process of a run
    # on a big archive keeps its memory for the model and the batches.
    heavy = ("pydicom", "cv2", "torch", "dens.route.dicom", "dens.route.dicomio", "dens.route.preprocess")
    code = f"import sys, dens.infer.cli, dens.infer.runner\nprint(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
