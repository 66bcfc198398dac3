"""The grader's plumbing: which code it grades, points per exercise, and the summary it prints and writes.

    python -m pytest tutorials/exercises                                    # the student's exercises.py and bugs.py
    EXERCISES_GRADE=solutions python -m pytest tutorials/exercises          # the reference solutions
    EXERCISES_GRADE=path/to/dir python -m pytest tutorials/exercises        # exercises.py and bugs.py in that folder
    python -m pytest tutorials/exercises --grades grades.json --student ID  # also write the points as JSON
    python -m pytest tutorials/exercises --tb=short                         # and the tracebacks of failed checks
    python -m pytest tutorials/exercises --junitxml grades.xml              # pytest's JUnit XML, for autograders
"""
import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
GRADES = []  # one entry per graded check: its exercise, points, outcome and message
STUDENT = [None]  # --student
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def graded_folder():
    grade = os.environ.get("EXERCISES_GRADE", "student")
    folder = {"student": HERE, "solutions": os.path.join(HERE, "solutions")}.get(grade, grade)
    if not os.path.isdir(folder):
        pytest.exit(f"EXERCISES_GRADE={grade}: there is no folder {folder} to grade (were the solutions withheld?)",
                    returncode=2)
    return folder


def load(path, name):
    """A module loaded from its file; a file that does not load fails the checks that need it, in one sentence."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        pytest.fail(f"{path} does not load: {type(e).__name__}: {e}", pytrace=False)
    return module


@pytest.fixture(scope="session")
def ex():
    return load(os.path.join(graded_folder(), "exercises.py"), "graded_exercises")


@pytest.fixture(scope="session")
def bugs_file():
    return os.path.join(graded_folder(), "bugs.py")


@pytest.fixture(scope="session")
def bugs(bugs_file):
    return load(bugs_file, "graded_bugs")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline saved with save_pretrained (benchmarks/tiny_pipeline.py)."""
    maker = load(os.path.join(ROOT, "benchmarks", "tiny_pipeline.py"), "tiny_pipeline")
    return maker.make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


def pytest_addoption(parser):
    parser.addoption("--grades", default=None, help="write the points per exercise to this JSON file")
    parser.addoption("--student", default=None, help="who is graded, written into the --grades file")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(exercise, n): the check is worth n points of the named exercise")
    config.addinivalue_line("markers", "slow: minutes of training on the toy model")
    config.grades = []
    STUDENT[0] = config.getoption("--student")
    # the points table says what failed, one line a check: tracebacks only when asked for (--tb=short), and no
    # second list of the failures after the table
    if config.option.tbstyle == "auto":
        config.option.tbstyle = "no"
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.reportchars = ""


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("points")
    if marker:
        item.user_properties += [("exercise", marker.args[0]), ("points", marker.args[1])]


def pytest_runtest_logreport(report):
    props = dict(report.user_properties)
    if "exercise" not in props or (report.when != "call" and not report.failed):
        return
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash else str(report.longrepr)).split("\n")[0]
    GRADES.append({"check": report.nodeid.split("::")[-1], "exercise": props["exercise"], "points": props["points"],
                   "passed": report.passed, "message": message, **{k: v for k, v in props.items()
                                                                    if k not in ("exercise", "points")}})


def summary():
    exercises = {}
    for g in sorted(GRADES, key=lambda g: g["exercise"]):
        e = exercises.setdefault(g["exercise"], {"points": 0, "out_of": 0, "checks": []})
        e["out_of"] += g["points"]
        e["points"] += g["points"] if g["passed"] else 0
        e["checks"].append({k: v for k, v in g.items() if k != "exercise"})
    return {"graded": os.environ.get("EXERCISES_GRADE", "student"), "student": STUDENT[0], "exercises": exercises,
            "points": sum(e["points"] for e in exercises.values()),
            "out_of": sum(e["out_of"] for e in exercises.values())}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not GRADES:
        return
    result = summary()
    write = terminalreporter.write_line
    write("")
    who = f", student {result['student']}" if result["student"] else ""
    write(f"points ({result['graded']}{who}):")
    for name, e in result["exercises"].items():
        write(f"  {name:<44}{e['points']:>4} / {e['out_of']}")
        for check in e["checks"]:
            if not check["passed"]:
                write(f"      {check['check']}: {check['message']}")
    write(f"  {'total':<44}{result['points']:>4} / {result['out_of']}")
    if config.option.tbstyle == "no" and result["points"] < result["out_of"]:
        write("(the tracebacks of the failed checks: add --tb=short)")
    path = config.getoption("--grades")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        write(f"points written to {path}")
