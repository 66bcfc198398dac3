"""Run the six notebooks in full mode, each in a fresh kernel, and keep the executed copies, with their figures and
numbers, under docs/tutorials/ for reading without running (on GitHub, for example):

    python tutorials/execute.py                      # all five, about a quarter of an hour on two CPU cores
    python tutorials/execute.py 02_ddpo.ipynb        # one

Each copy starts with a note of when and on what machine it ran; its cells are the notebook's own, unchanged
(tests/test_tutorials.py checks that they still equal the sources). The sources in tutorials/ stay without outputs.
"""
import argparse
import datetime
import glob
import os
import platform
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "docs", "tutorials")


def machine():
    """The CPU's model name and core count, as a reader would compare machines."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def execute(name):
    import torch
    source = os.path.join(HERE, name)
    notebook = nbformat.read(source, as_version=4)
    env = {key: os.environ.pop(key) for key in ("TUTORIALS_SHORT",) if key in os.environ}  # full mode
    start = time.perf_counter()
    try:
        NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    finally:
        os.environ.update(env)
    minutes = (time.perf_counter() - start) / 60
    note = nbformat.v4.new_markdown_cell(
        f"*Executed copy of [`tutorials/{name}`](../../tutorials/{name}), for reading: run in full mode on "
        f"{datetime.date.today().isoformat()}, {machine()}, torch {torch.__version__}, {minutes:.1f} minutes, by "
        f"`python tutorials/execute.py`. To run it yourself, open the source (tutorials/README.md).*")
    note.metadata["executed_copy"] = True
    notebook.cells.insert(0, note)
    os.makedirs(OUT, exist_ok=True)
    nbformat.write(notebook, os.path.join(OUT, name))
    print(f"{name}: {minutes:.1f} minutes -> docs/tutorials/{name}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="names in tutorials/ (default: all six)")
    names = parser.parse_args(argv).notebooks
    names = names or sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "0*.ipynb")))
    for name in names:
        execute(name)


if __name__ == "__main__":
    main()
