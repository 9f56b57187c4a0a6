"""The house plan (docs/architecture.md) as checks: no import cycles among the project's
modules, light seams that load no engine, no module too long to read in one sitting, and the
registries every part reads names from."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mars", "catalog", "ingestion", "indexing", "query", "critic", "training", "evaluation", "migrations", "workers")

#: Packages whose import must stay out of the seams, the funnel and the app factory.
HEAVY = ("torch", "faiss", "transformers", "sentence_transformers", "qdrant_edge", "tantivy")

#: The seams (protocol modules), the funnel, fusion and the app factory's module.
LIGHT = ("indexing.vector_store", "indexing.lexical_index", "indexing.encoders", "critic.protocol",
         "workers.job_queue", "query.retriever", "query.funnel", "query.fusion", "query.app")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (typing only: never imported at run time)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(t for a in node.names if (t := resolve(a.name)))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(t for a in node.names if (t := resolve(f"{node.module}.{a.name}")))
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_module_and_function_level_imports_but_not_type_checking_ones(tmp_path):
    a = "import b\n"
    b = "def f():\n    from c import x\n"
    c = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
    files = {}
    for name, text in (("a", a), ("b", b), ("c", c)):
        files[name] = tmp_path / f"{name}.py"
        files[name].write_text(text)
    graph = import_graph(files)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": set()} and cycles(graph) == []
    files["c"].write_text("import a\n")
    assert cycles(import_graph(files)) == [["a", "b", "c"]]


def test_no_import_cycles_among_the_project_modules():
    modules = project_modules()
    assert len(modules) > 100
    assert cycles(import_graph(modules)) == []


def test_seams_funnel_and_app_factory_load_no_engine():
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(LIGHT)!r}: importlib.import_module(name)\n"
        "from query.app import create_app\n"
        f"print(json.dumps(sorted(h for h in {list(HEAVY)!r} if h in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_module_outside_tests_is_over_600_lines():
    long = {name: n for name, path in project_modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}


def test_settings_validate_backend_names_against_the_registry():
    import pytest
    from pydantic import ValidationError

    from mars import registry
    from mars.settings import Settings

    for name in registry.VECTOR_BACKENDS:
        assert Settings(vector_backend=name).vector_backend == name
    with pytest.raises(ValidationError, match="unknown vector_backend 'milvus'; use one of: qdrant-edge, faiss, qdrant"):
        Settings(vector_backend="milvus")
    with pytest.raises(ValidationError, match="unknown lexical_backend"):
        Settings(lexical_backend="solr")
    with pytest.raises(ValidationError, match="unknown critic"):
        Settings(critic="gpt")


def test_retriever_names_are_read_from_one_registry():
    from evaluation.ablation import VECTOR_LISTS
    from evaluation.tune import ANCHOR_PREFERENCE
    from query.retriever import MODE_KINDS, Retriever
    from query.retrievers import RETRIEVER_NAMES, RETRIEVERS

    assert RETRIEVER_NAMES == ("bm25", "text", "aligned", "image", "prior")
    assert set(VECTOR_LISTS) == {n for n, cls in RETRIEVERS.items() if cls.kind == "vector"}
    assert sorted(ANCHOR_PREFERENCE) == sorted(RETRIEVER_NAMES)
    for name, cls in RETRIEVERS.items():
        assert cls.name == name and cls.label and cls.kind in MODE_KINDS["hybrid"] and cls.needs in ("text", "image", "room")
        assert all(callable(getattr(cls, method)) for method in ("applies", "cache_key", "run"))
    assert Retriever  # the protocol the classes implement
