"""The tutorial notebooks (tutorials/*.ipynb): committed without outputs, started by one set-up cell that finds the
project here and fetches it in Colab, free of second copies of the project's functions, and each runs from top to
bottom in its short mode (TUTORIALS_SHORT=1) in a fresh kernel."""
import ast
import glob
import os
import re
import subprocess
import sys
import time

import nbformat
import pytest

from conftest import ROOT
from test_docs import top_level_names

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "*.ipynb")))


def code_cells(path):
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_the_six_notebooks_are_in_the_reading_order_of_tutorials_readme():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert len(names) == 6, names
    with open(os.path.join(ROOT, "tutorials", "README.md")) as f:
        readme = f.read()
    assert sorted(names, key=readme.find) == names and all(readme.find(n) >= 0 for n in names)


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, \
                    f"{os.path.basename(path)} holds outputs: clear them before committing"


def test_every_notebook_starts_with_the_same_set_up_cell():
    first = {os.path.basename(p): code_cells(p)[0] for p in NOTEBOOKS}
    assert len(set(first.values())) == 1, "the notebooks' first code cells differ"
    assert "PROJECT_URL" in next(iter(first.values()))


def run_set_up_cell(cwd, env=None):
    source = code_cells(NOTEBOOKS[0])[0] + "\nprint('ROOT', ROOT, 'SHORT', SHORT)\n"
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_the_set_up_cell_finds_the_project_from_tutorials_or_its_root_and_fetches_nothing(tmp_path):
    for cwd in (os.path.join(ROOT, "tutorials"), ROOT):
        # a PATH without git: were the cell to try to fetch the project, it would fail
        done = run_set_up_cell(cwd, {"PATH": str(tmp_path), "TUTORIALS_SHORT": "1"})
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["ROOT", ROOT, "SHORT", "True"]


def test_the_set_up_cell_elsewhere_tries_to_fetch_the_project_and_says_so_when_it_cannot(tmp_path):
    done = run_set_up_cell(str(tmp_path), {"PROJECT_URL": str(tmp_path / "no-such-repository")})
    assert done.returncode != 0
    assert "could not fetch the project from" in done.stderr and "PROJECT_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_set_up_cell_elsewhere_without_an_address_says_what_to_set(tmp_path):
    done = run_set_up_cell(str(tmp_path), {"PROJECT_URL": ""})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "set PROJECT_URL in this cell to the project's git address" in done.stderr


def test_no_notebook_defines_a_function_the_project_already_has():
    """The math cells call the scripts' and common.py's functions; a def of the same name would be a second copy."""
    project = set()
    for path in [p for folder in ("", "tutorials", "benchmarks", "plumbing", "toy_model")
                 for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]:
        project |= {n for n in top_level_names(path) if not n.isupper()}
    for path in NOTEBOOKS:
        defined = {node.name for source in code_cells(path) for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.FunctionDef)}
        assert not defined & project, f"{os.path.basename(path)} defines {defined & project} again"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_the_notebook_runs_in_its_short_mode_in_a_fresh_kernel(path, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("TUTORIALS_SHORT", "1")
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # a cell that raises fails the test (nbclient's CellExecutionError names the cell and the error)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    seconds = time.perf_counter() - start
    assert seconds < 90, f"{os.path.basename(path)} took {seconds:.0f} s in its short mode (meant: under 60 s)"
    shown = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
             if "image/png" in o.get("data", {})]
    assert shown, "the notebook showed no picture"


def test_each_notebook_has_an_executed_copy_whose_cells_are_its_sources():
    """docs/tutorials/ holds each notebook run in full mode (python tutorials/execute.py), for reading without
    running: a dated note naming the machine, then exactly the notebook's cells, with their outputs."""
    for path in NOTEBOOKS:
        name = os.path.basename(path)
        copy = os.path.join(ROOT, "docs", "tutorials", name)
        assert os.path.exists(copy), f"no executed copy of {name}: python tutorials/execute.py {name}"
        executed = nbformat.read(copy, as_version=4)
        note, cells = executed.cells[0], executed.cells[1:]
        assert note.metadata.get("executed_copy") and re.search(r"run in full mode on \d{4}-\d{2}-\d{2}, .+ cores",
                                                                 note.source), note.source
        source = nbformat.read(path, as_version=4).cells
        assert [(c.cell_type, c.source) for c in cells] == [(c.cell_type, c.source) for c in source], \
            f"docs/tutorials/{name} is not the notebook as it is now: python tutorials/execute.py {name}"
        outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs)
        assert not any(o.get("output_type") == "error" for o in outputs)
