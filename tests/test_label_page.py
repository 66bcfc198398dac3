"""The labelling page (label.py, issue 22) without a browser: it answers on 127.0.0.1 only, serves nothing outside
its page, the round's images and the label files, writes only the annotator's label file, in the format
`d3po.py --labels` reads, and atomically; a folder that is not a round is refused in one sentence."""
import http.client
import json
import os
import socket
import threading

import numpy as np
import pytest
from safetensors.numpy import save_file

from plumbing import bookkeeping
from plumbing import human_feedback
from plumbing import label

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
K = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_round(path):
    """A round as d3po.py --sample-only writes one (tests/test_d3po_e2e.py samples real ones), with 8 px images."""
    path.mkdir()
    rng = np.random.default_rng(0)
    (path / "config.json").write_text(json.dumps({"model": "toy", "images_per_prompt": K}))
    (path / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    template = [{"prompt": p, "sheet": f"sheets/{i:04d}.png", "scores": [None] * K} for i, p in enumerate(PROMPTS)]
    (path / "labels_template.json").write_text(json.dumps(template))
    save_file({"images": rng.random((len(PROMPTS) * K, 3, 8, 8), dtype=np.float32)},
              str(path / "trajectories.safetensors"))
    return path


@pytest.fixture
def served(tmp_path):
    """(round directory, server) with the server listening on a free port of 127.0.0.1, in a thread."""
    (tmp_path / "secret.txt").write_text("SECRET beside the round")
    round_dir = make_round(tmp_path / "round")
    (round_dir / "notes.txt").write_text("SECRET inside the round")
    ready = threading.Event()
    holder = {}
    thread = threading.Thread(target=label.serve, args=(str(round_dir), 0),
                              kwargs={"ready": lambda s: (holder.setdefault("server", s), ready.set())}, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield round_dir, holder["server"]
    holder["server"].shutdown()
    thread.join(10)


def request(server, method, path, body=None, headers=None):
    """(status, body) of one request sent as written: the path is not normalised on the way, as curl would."""
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    if body is not None and not isinstance(body, bytes):
        body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for key, value in headers.items():
        connection.putheader(key, value)
    if body is not None:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    out = response.status, response.read()
    connection.close()
    return out


def files(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(directory) for f in names}


def test_the_server_listens_on_127_0_0_1_only(served):
    _, server = served
    assert server.server_address[0] == "127.0.0.1"
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for address in addresses - {"127.0.0.1"}:  # this machine's other addresses do not answer
        with pytest.raises(OSError):
            socket.create_connection((address, server.server_address[1]), timeout=2).close()
    status, _ = request(server, "GET", "/", headers={"Host": "example.com"})  # DNS rebinding: another host name
    assert status == 403


def test_it_serves_its_page_the_images_and_the_round(served):
    round_dir, server = served
    for path in ("/", "/label.js", "/label.css"):
        status, body = request(server, "GET", path)
        assert status == 200 and body == open(os.path.join(ROOT, "plumbing", "label_page", label.ASSETS[path][0]), "rb").read()
    status, body = request(server, "GET", "/api/round")
    assert status == 200 and json.loads(body)["prompts"] == PROMPTS and json.loads(body)["images_per_prompt"] == K
    status, body = request(server, "GET", "/image/2/1.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    assert request(server, "GET", "/image/3/0.png")[0] == 404 and request(server, "GET", f"/image/0/{K}.png")[0] == 404


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/../round/notes.txt", "/notes.txt", "/config.json", "/labels_template.json",
    "/image/../../secret.txt", "/image/0/../../notes.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
    "/label.js/../../secret.txt", "/label_page/../label.py", "/../label.py", "/label.py", "//etc/passwd", "/etc/passwd",
    "http://127.0.0.1/etc/passwd", "/api/labels/..%2f..%2fsecret", "/api/labels/../../secret.txt",
    "/api/labels/%2fetc%2fpasswd", "/api/labels/.hidden"])
def test_paths_outside_what_it_serves_are_refused(served, path):
    _, server = served
    status, body = request(server, "GET", path)
    assert status in (400, 404) and b"SECRET" not in body and b"root:" not in body


def test_answers_are_written_in_the_format_that_d3po_reads(served):
    round_dir, server = served
    before = files(round_dir)
    status, body = request(server, "GET", "/api/labels/alice")  # no file yet: the template, nothing written
    assert status == 200 and [e["scores"] for e in json.loads(body)] == [[None] * K] * 3 and files(round_dir) == before
    for p, scores in enumerate([[1, 0, -1], [0, -1, 1], [0, 0, 0]]):
        status, body = request(server, "POST", "/api/labels/alice", {"prompt": p, "scores": scores})
        assert status == 200 and json.loads(body)[p]["scores"] == scores
    after = files(round_dir)
    assert set(after) - set(before) == {"labels/alice.json"} and all(after[f] == before[f] for f in before)
    written = json.loads(after["labels/alice.json"])
    assert [e["prompt"] for e in written] == PROMPTS
    means = human_feedback.read_labels(str(round_dir), PROMPTS, K)  # what d3po.py --labels reads
    np.testing.assert_array_equal(means, [[1, 0, -1], [0, -1, 1], [0, 0, 0]])
    # a second annotator, at the same time, into a file of their own; the mean of the two is trained on
    assert request(server, "POST", "/api/labels/bob-2", {"prompt": 0, "scores": [-1, 0, 1]})[0] == 200
    assert json.loads(files(round_dir)["labels/alice.json"]) == written
    with pytest.raises(human_feedback.UserError, match="bob-2.json, prompt 1 .* is not labelled yet"):
        human_feedback.read_labels(str(round_dir), PROMPTS, K)
    # taking an answer back (null scores) makes the prompt unlabelled again
    assert request(server, "POST", "/api/labels/alice", {"prompt": 2, "scores": [None] * K})[0] == 200
    assert json.loads(files(round_dir)["labels/alice.json"])[2]["scores"] == [None] * K


@pytest.mark.parametrize("name", ["..", "../alice", ".alice", "a/b", "a%2fb", "", "x" * 65, "al%20ice", "%2e%2e",
                                  "alice.json"])
def test_a_name_that_is_not_a_safe_file_name_is_refused_and_nothing_is_written(served, name):
    round_dir, server = served
    before = files(os.path.dirname(round_dir))
    status, body = request(server, "POST", f"/api/labels/{name}", {"prompt": 0, "scores": [1, 0, -1]})
    assert status in (400, 404) and files(os.path.dirname(round_dir)) == before
    if status == 400:
        assert "cannot name a file" in json.loads(body)["error"]


@pytest.mark.parametrize("answer, error", [
    ({"prompt": 3, "scores": [1, 0, -1]}, "not one of the round's 3 prompts"),
    ({"prompt": "0", "scores": [1, 0, -1]}, "not one of the round's 3 prompts"),
    ({"prompt": 0, "scores": [1, 0]}, "2 scores for 3 images"),
    ({"prompt": 0, "scores": [1, "x", 0]}, "is not a number"),
    ({"prompt": 0, "scores": [1, 10 ** 400, 0]}, "is not a number (or too large for one)"),  # not a dropped line
    ({"prompt": 0, "scores": None}, "no \"scores\" list"),
    ([0, [1, 0, -1]], "must be"),
    (b"{not json", "not JSON")])
def test_a_malformed_answer_is_refused_with_its_reason_and_changes_nothing(served, answer, error):
    round_dir, server = served
    before = files(round_dir)
    status, body = request(server, "POST", "/api/labels/carol", answer,
                           headers={"Content-Type": "application/json"} if isinstance(answer, bytes) else None)
    assert status == 400 and error in json.loads(body)["error"] and files(round_dir) == before


@pytest.mark.parametrize("content, error", [
    (b"[{broken", "is not valid JSON (line 1)"),
    (b"\xff\xfe[{", "is not UTF-8 text"),
    (json.dumps([{"prompt": PROMPTS[0], "scores": [1, 0, -1]}]).encode(), "has 1 prompts but the round has 3"),
    (json.dumps([{"prompt": p, "scores": [1, 0]} for p in PROMPTS]).encode(), "2 scores for 3 images")])
def test_a_label_file_that_does_not_match_the_round_is_refused_and_kept(served, content, error):
    """Read on the page or answered to, a damaged label file gets its reason, and is not written over."""
    round_dir, server = served
    (round_dir / "labels").mkdir()
    (round_dir / "labels" / "fay.json").write_bytes(content)
    before = files(round_dir)
    for method, body in (("GET", None), ("POST", {"prompt": 0, "scores": [1, 0, -1]})):
        status, answer = request(server, method, "/api/labels/fay", body)
        assert status == 400 and "fay.json" in json.loads(answer)["error"], method
        assert error in json.loads(answer)["error"] and files(round_dir) == before, method


def test_requests_that_could_come_from_another_site_are_refused(served):
    round_dir, server = served
    before = files(round_dir)
    body = json.dumps({"prompt": 0, "scores": [1, 0, -1]}).encode()
    assert request(server, "POST", "/api/labels/dave", body, {"Content-Type": "text/plain"})[0] == 415  # a form
    assert request(server, "POST", "/api/labels/dave", {"prompt": 0, "scores": [1, 0, -1]},
                   {"Origin": "http://example.com"})[0] == 403
    assert request(server, "POST", "/", {"prompt": 0, "scores": [1, 0, -1]})[0] == 404
    assert request(server, "PUT", "/api/labels/dave", {"prompt": 0, "scores": [1, 0, -1]})[0] == 501
    assert files(round_dir) == before


def label_files(directory):  # what d3po.py --labels reads (a .tmp left by a killed write is not one)
    return sorted(f for f in os.listdir(directory) if f.endswith(".json"))


class Interrupted(BaseException):
    """What a kill or Ctrl+C is to the code it interrupts."""


def test_a_write_interrupted_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    round_dir = make_round(tmp_path / "round")
    template = json.loads((round_dir / "labels_template.json").read_text())
    human_feedback.save_answer(str(round_dir), "erin", template, 0, [1, 0, -1])
    path = round_dir / "labels" / "erin.json"
    previous = path.read_bytes()

    class HalfWritten:  # a file that takes half of what it is given, and then the process is stopped
        def __init__(self, name, *args, **kwargs):
            self.f = open(name, *args, **kwargs)

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise Interrupted

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(bookkeeping, "open", HalfWritten, raising=False)
    with pytest.raises(Interrupted):
        human_feedback.save_answer(str(round_dir), "erin", template, 1, [0, 1, -1])
    assert path.read_bytes() == previous and label_files(path.parent) == ["erin.json"]
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Interrupted))  # stopped before the rename
    with pytest.raises(Interrupted):
        human_feedback.save_answer(str(round_dir), "erin", template, 1, [0, 1, -1])
    assert path.read_bytes() == previous and label_files(path.parent) == ["erin.json"]


def run_label(capsys, *args):
    """label.py's command line as `python -m plumbing.label ...` runs it (bookkeeping.run_main): (exit status, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        bookkeeping.run_main(lambda: label.main(list(args)))
    return stopped.value.code, capsys.readouterr().err


def test_a_folder_that_is_not_a_sampled_round_is_refused_in_one_sentence(tmp_path, capsys):
    status, err = run_label(capsys, str(tmp_path))
    assert status == 2 and err == (
        f"error: label.py {str(tmp_path)!r}: no config.json or prompts.txt or trajectories.safetensors or "
        f"labels_template.json there, so it is not a round written by d3po.py --sample-only.\n")


def test_a_port_out_of_range_is_refused_in_one_sentence(tmp_path, capsys):
    round_dir = make_round(tmp_path / "round")
    for port in ("65536", "-1"):
        status, err = run_label(capsys, str(round_dir), "--port", port)
        assert status == 2 and err == (f"error: --port {port} is not a port: give one from 1 to 65535 (or 0 for any "
                                       f"free one).\n")


def test_a_port_in_use_is_refused_in_one_sentence(tmp_path, capsys):
    round_dir = make_round(tmp_path / "round")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, err = run_label(capsys, str(round_dir), "--port", str(taken.getsockname()[1]))
    assert status == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    assert err.endswith("choose another --port.\n")
