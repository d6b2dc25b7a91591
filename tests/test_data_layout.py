"""The data package's layout (issue 27): one concern per file, imports one way, the reading side apart
from the writing side, every file and function small, and docs/data.md naming every file."""

import ast
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "s2moe_ds" / "data"
READING = {"errors", "text", "tokenizers", "store", "loader"}


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in it, function bodies included)."""
    graph = {}
    for path in DATA.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
        graph[path.stem] = found
    return graph


def test_imports_run_one_way_and_reading_never_imports_writing():
    graph = package_imports()
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(m) :] + [m])}"
        if m in done:
            return
        visiting.append(m)
        for n in graph.get(m, ()):
            visit(n)
        visiting.pop()
        done.add(m)

    for m in graph:
        if m != "__init__":  # the package's lazy exports name every module, imported on first use only
            visit(m)
    for m in READING:
        assert graph[m] <= READING, f"{m}.py imports the writing side: {sorted(graph[m] - READING)}"
    assert graph["tokenizers"] <= {"errors", "text"}


def test_reading_a_data_folder_does_not_load_the_writer():
    code = (
        "import sys, s2moe_ds.train.trainer, s2moe_ds.evaluate, s2moe_ds.checkpoint.export\n"
        "print(sorted(m for m in sys.modules if m.startswith('s2moe_ds.data.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = {m.rsplit(".", 1)[1] for m in eval(out.strip().splitlines()[-1])}
    assert loaded and loaded <= READING, sorted(loaded)


def test_every_file_and_function_is_small_and_documented():
    table = (DATA.parents[1] / "docs" / "data.md").read_text().split("## The code", 1)[1]
    for path in DATA.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{path.name}: {node.name} is {n} lines"
        if path.stem != "__init__":
            assert f"| `{path.name}` |" in table, f"docs/data.md's code table does not name {path.name}"


def test_the_public_names_import_from_the_package():
    import s2moe_ds.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None
    from s2moe_ds.data.prepare import prepare, split_of_documents  # the path meta.json's split_rule names

    assert callable(prepare) and split_of_documents(0, 3, 0.5, 0.2).shape == (3,)
