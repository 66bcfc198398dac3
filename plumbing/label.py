"""A labelling page for a round of D3PO's human feedback (docs/human_feedback.md).

    python d3po.py --sample-only --model toy --output-dir rounds/1   # a round: each prompt's images, one x_T
    python -m plumbing.label rounds/1                                         # then open the address it prints
    python d3po.py --labels rounds/1 --output-dir rounds/1-trained   # train on what people said

The page shows each prompt's images (small ones scaled up by whole pixels, unblurred) and asks for the best and
the worst of them (by click or key); every answer is written at once to labels/<annotator>.json in the round, in
the label format that `d3po.py --labels` reads (human_feedback.py), atomically, so that a closed tab or a stopped
server loses at most the answer being given; reopening the page goes on where the annotator stopped. Several
people can label one round, one after another or at the same time, each into their own file.

The server binds to 127.0.0.1 only and serves its page's three files, the round's images (from its
trajectories.safetensors, never a path from the request) and the annotators' label files; the one request that
writes changes only that annotator's label file.
"""
import argparse
import io
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image
from safetensors.torch import load_file

from plumbing import bookkeeping
from plumbing import human_feedback
from common import UserError
from plumbing.rewards import to_uint8

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label_page")
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/label.js": ("label.js", "text/javascript"),
          "/label.css": ("label.css", "text/css")}
IMAGE = re.compile(r"/image/(\d{1,6})/(\d{1,4})\.png")
LABELS = re.compile(r"/api/labels/([^/]*)")
HEADERS = {"Content-Security-Policy": "default-src 'self'", "X-Content-Type-Options": "nosniff",
           "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


class Round:
    """A sampled round, read once: its prompts, label template and images (PNG-encoded on first request)."""

    def __init__(self, round_dir):
        human_feedback.round_config(round_dir, "label.py")  # one sentence where it is not a sampled round
        self.dir, self.lock, self.png = round_dir, threading.Lock(), {}
        try:
            with open(os.path.join(round_dir, "labels_template.json"), encoding="utf-8") as f:
                self.template = json.load(f)
            self.k = len(self.template[0]["scores"])
            images = load_file(os.path.join(round_dir, "trajectories.safetensors"))["images"]
        except Exception as e:  # a file cut short or edited by hand
            raise UserError(f"label.py {round_dir!r}: its labels_template.json or trajectories.safetensors cannot be "
                            f"read ({type(e).__name__}); sample the round again.")
        if len(images) != len(self.template) * self.k:
            raise UserError(f"label.py {round_dir!r}: trajectories.safetensors holds {len(images)} images but "
                            f"labels_template.json asks for {len(self.template)} prompts x {self.k}.")
        self.images = images

    def image_png(self, p, k):
        if not (0 <= p < len(self.template) and 0 <= k < self.k):
            return None
        if (p, k) not in self.png:
            buffer = io.BytesIO()
            Image.fromarray(to_uint8(self.images[p * self.k + k][None])[0]).save(buffer, format="PNG")
            self.png[p, k] = buffer.getvalue()
        return self.png[p, k]

    def summary(self):
        return {"path": self.dir, "size": self.images.shape[-1], "images_per_prompt": self.k,
                "prompts": [entry["prompt"] for entry in self.template]}


def make_handler(round_, port):
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    class Handler(BaseHTTPRequestHandler):
        server_version = "label.py"
        sys_version = ""

        def log_message(self, format, *args):  # quiet: the page reports its own errors
            pass

        def send(self, status, body, content_type="application/json"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def refuse(self, status, message):
            self.send(status, {"error": message})

        def checked_path(self):
            """The request's path, or None (answered) for another host (DNS rebinding) or another origin."""
            if self.headers.get("Host") not in hosts:
                self.refuse(403, "this page answers only at its own address, 127.0.0.1 or localhost")
                return None
            origin = self.headers.get("Origin")
            if origin is not None and origin.removeprefix("http://") not in hosts:
                self.refuse(403, "requests from another site are refused")
                return None
            return self.path.split("?", 1)[0]

        def do_GET(self):
            path = self.checked_path()
            if path is None:
                return
            if path in ASSETS:
                name, content_type = ASSETS[path]
                with open(os.path.join(PAGE, name), "rb") as f:
                    return self.send(200, f.read(), content_type)
            if path == "/api/round":
                return self.send(200, round_.summary())
            image = IMAGE.fullmatch(path)
            if image and (png := round_.image_png(int(image[1]), int(image[2]))) is not None:
                return self.send(200, png, "image/png")
            labels = LABELS.fullmatch(path)
            if labels:
                try:
                    with round_.lock:
                        return self.send(200, human_feedback.read_answers(round_.dir, labels[1], round_.template))
                except UserError as e:
                    return self.refuse(400, str(e))
            self.refuse(404, "not found")

        do_HEAD = do_GET

        def do_POST(self):
            path = self.checked_path()
            if path is None:
                return
            labels = LABELS.fullmatch(path)
            if not labels:
                return self.refuse(404, "not found")
            if self.headers.get_content_type() != "application/json":  # a form from another site cannot send it
                return self.refuse(415, "send the answer as application/json")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= 65536:
                    raise UserError("the answer must be a JSON object of at most 64 KiB.")
                answer = json.loads(self.rfile.read(length))
                if not isinstance(answer, dict):
                    raise UserError('the answer must be {"prompt": index, "scores": [...]}.')
                with round_.lock:  # one read-modify-write at a time (two tabs of one annotator)
                    entries = human_feedback.save_answer(round_.dir, labels[1], round_.template,
                                                         answer.get("prompt"), answer.get("scores"))
                return self.send(200, entries)
            except (UserError, ValueError, RecursionError) as e:  # a body that is not JSON, or nested too deep
                return self.refuse(400, str(e) if isinstance(e, UserError) else "the answer is not JSON.")

    return Handler


def serve(round_dir, port=8765, ready=None):
    """Serve the round's labelling page on 127.0.0.1:port until interrupted; ready(server), if given, is called
    once it listens (port 0: any free port, server.server_address[1])."""
    round_ = Round(round_dir)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), None)
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); choose another --port.")
    server.RequestHandlerClass = make_handler(round_, server.server_address[1])
    print(f"labelling {round_dir} ({len(round_.template)} prompts x {round_.k} images): open "
          f"http://127.0.0.1:{server.server_address[1]}/ in a browser on this machine; Ctrl+C stops", flush=True)
    if ready:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; the labels are in {os.path.join(round_dir, 'labels')}", flush=True)
    finally:
        server.server_close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m plumbing.label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("round", help="a round directory written by d3po.py --sample-only")
    parser.add_argument("--port", type=int, default=8765, help="the port on 127.0.0.1 (0: any free one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port: give one from 1 to 65535 (or 0 for any free one).")
    serve(args.round, args.port)


if __name__ == "__main__":
    bookkeeping.run_main(main, interrupted="the labels saved so far are kept")
