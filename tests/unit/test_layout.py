"""The package's shape holds: every folder of modules is a package (a wheel carries it), the import graph has no
cycle, dependencies point one way (spec and storage import no training, sweep or remote code), and the benchmark
reads nothing outside the package."""

from __future__ import annotations

import ast
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "ftdist"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _ftdist_imports(path: Path, mods: dict) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ftdist"):
            out |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in mods else n.module for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("ftdist")}
    return {m for m in out if m in mods}


def test_every_module_folder_is_a_package_in_the_wheel():
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    assert folders <= set(find_packages(str(REPO), include=["ftdist*"]))


def test_import_graph_has_no_cycle_and_points_one_way():
    mods = _modules()
    graph = {m: _ftdist_imports(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [d])
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    upper = ("ftdist.train", "ftdist.sweep", "ftdist.remote", "ftdist.bench", "ftdist.cli")
    for m, deps in graph.items():
        if m.startswith(("ftdist.spec", "ftdist.storage")):
            assert not [d for d in deps if d.startswith(upper)], (m, deps)


def test_bench_reads_nothing_outside_the_package():
    for p in (PKG / "bench").rglob("*.py"):
        text = p.read_text()
        assert '"jobs"' not in text and "jobs/" not in text.replace("jobs/quickstart-sweep.yaml", ""), p
        assert "dirname(os.path.dirname" not in text, p  # no walking up out of the installed package
