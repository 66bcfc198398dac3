"""The implementation details name the code they are about as `file.py::name`: every such name must exist; and CI
runs the test command the README gives."""
import ast
import os
import re
import subprocess

from conftest import ROOT

DOCS = [os.path.join(ROOT, "tutorials", "implementation_details.md")]


def top_level_names(path):
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def references(text):
    return re.findall(r"`([\w/]+\.py)::(\w+)`", text)


def test_every_file_and_name_the_implementation_details_cite_exists():
    for doc in DOCS:
        with open(doc) as f:
            cited = references(f.read())
        assert len(cited) >= 20, doc  # it cites the code item by item
        for path, name in cited:
            full = os.path.join(ROOT, path)
            assert os.path.isfile(full), f"{os.path.basename(doc)}: {path} does not exist"
            assert name in top_level_names(full), f"{os.path.basename(doc)}: {path}::{name} does not exist"


def test_the_check_finds_a_name_that_is_gone(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def kept():\n    pass\n\nPRESETS = {}\n")
    assert references("see `m.py::kept` and `m.py::gone`") == [("m.py", "kept"), ("m.py", "gone")]
    assert top_level_names(str(module)) == {"kept", "PRESETS"}


def test_ci_runs_exactly_the_readmes_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Test\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.+)\n```", section).group(1)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        last = [line for line in f.read().splitlines() if line.strip()][-1]
    assert command.startswith("python -m pytest") and last == command


def test_the_readme_fits_one_screen_and_gives_the_side_by_side_with_trl():
    """Issue 32: at most 200 lines; issue 36: a performance section with the ratio to TRL's epoch, its machine and date."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    section = text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    assert "TRL 0.23.1" in section and re.search(r"\b0\.\d\d of TRL's time", section), section
    assert re.search(r"\w+ cores of an? [A-Z]", section) and re.search(r"20\d\d-\d\d-\d\d", section), section


def test_every_relative_link_of_the_readmes_and_docs_resolves():
    pages = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tutorials", "README.md")] + [
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]
    checked = 0
    for page in pages:
        with open(page) as f:
            links = re.findall(r"\]\(([^)\s]+)\)", f.read())
        for link in links:
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue  # a web address, or a place in the same page
            target = os.path.normpath(os.path.join(os.path.dirname(page), link.split("#")[0]))
            assert os.path.exists(target), f"{os.path.relpath(page, ROOT)} links to {link}, which does not exist"
            checked += 1
    assert checked >= 10


def test_no_file_cites_a_path_outside_the_repository():
    """A clone has only what is committed: the papers' notes are docs/papers.md, and every `.md` path that a file
    names as `docs/...`, `tutorials/...` or `benchmarks/...` exists."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".py", ".md", ".ipynb", ".txt", ".sh", ".js", ".html")) or p == ".ci/run"]
    assert "docs/papers.md" in tracked and len(texts) > 50
    for path in texts:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        assert not re.search(r"\.\./shared|PAPERS\.md", text), f"{path} cites a file outside the repository"
        for cited in re.findall(r"\b((?:docs|tutorials|benchmarks)/[\w/.-]+\.md)\b", text):
            assert cited in tracked, f"{path} cites {cited}, which is not in the repository"


def test_the_readmes_table_of_losses_points_at_the_lines_that_compute_them():
    with open(os.path.join(ROOT, "README.md")) as f:
        cited = re.findall(r"\b(ddpo|d3po|prdp)\.py:(\d+)-(\d+)\b", f.read())
    assert sorted(name for name, _, _ in cited) == ["d3po", "ddpo", "prdp"]
    for name, first, last in cited:
        lines = open(os.path.join(ROOT, f"{name}.py")).read().splitlines()[int(first) - 1:int(last)]
        assert lines and all(re.match(r"\s+(\w*loss\w*|logits|target) = ", line) for line in lines), (name, lines)
        assert re.match(r"\s+loss = ", lines[-1]), name  # the range ends where the loss is
