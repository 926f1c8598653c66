"""`hybrid-serve index add` reads only documents: no link out of the folder it was given (a link to
/proc/self/environ would upload the environment, secrets included), no special file; and it
sends the API key."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hybrid_serve.cluster.cli import _files, main


@pytest.fixture
def folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.md").write_text("# Guide\nHow to add documents.")
    (docs / "sub" / "notes.txt").write_text("notes")
    (docs / ".hidden.md").write_text("hidden")
    outside = tmp_path / "secret.txt"
    outside.write_text("API_KEY=sk-live-123")
    (docs / "escape.txt").symlink_to(outside)
    (docs / "environ.txt").symlink_to("/proc/self/environ")
    (docs / "alias.md").symlink_to(docs / "guide.md")  # inside: followed
    (docs / "linked").symlink_to(tmp_path, target_is_directory=True)  # a folder link: not walked
    os.mkfifo(docs / "pipe.txt")
    return docs


def test_links_out_of_the_folder_and_special_files_are_refused(folder):
    found = {p.name: problem for p, problem in _files([str(folder)])}
    assert found["guide.md"] is None and found["notes.txt"] is None
    assert found["alias.md"] is None
    assert "out of" in found["escape.txt"] and "out of" in found["environ.txt"]
    assert "regular file" in found["pipe.txt"]
    assert ".hidden.md" not in found and "secret.txt" not in found  # not through `linked`
    direct = dict((p.name, problem) for p, problem in _files([str(folder / "environ.txt")]))
    assert "regular file" in direct["environ.txt"]  # named directly, still not a document


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[dict[str, str], dict]] = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Recorder.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        out = json.dumps({"ids": [], "index_version": 3}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def test_the_key_and_collection_are_sent_and_nothing_from_outside(folder, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HYBRID_SERVE_API_KEY", "from-env")
    try:
        code = main(["index", "add", str(folder), "--url", url, "--collection", "eng"])
        assert code == 1  # the refused files are reported as failures
        main(["index", "add", str(folder / "guide.md"), "--url", url, "--api-key", "flag"])
    finally:
        server.shutdown()
    (headers, body), (flag_headers, _) = _Recorder.seen
    assert headers["authorization"] == "Bearer from-env"
    assert flag_headers["authorization"] == "Bearer flag"
    sent = json.dumps(body)
    assert "sk-live-123" not in sent and "HYBRID_SERVE_API_KEY" not in sent
    assert {d["collection"] for d in body["documents"]} == {"eng"}
    assert len(body["documents"]) == 3  # guide, alias, notes
