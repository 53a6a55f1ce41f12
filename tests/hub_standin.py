"""A local stand-in for the Hugging Face Hub's download API (the Hub itself cannot be reached here).

    with HubStandin({"BAAI/bge-small-en-v1.5": folder}) as hub:   # serves folder's files as that model repo
        os.environ["HF_ENDPOINT"] = hub.endpoint                   # huggingface_hub downloads from it

It answers what `huggingface_hub.snapshot_download` asks of a public model repo: the repo's info
(`/api/models/<repo>/revision/<rev>`), its file tree (`/api/models/<repo>/tree/<rev>`), and each file
(`HEAD`/`GET /<repo>/resolve/<rev>/<path>`, with the commit and ETag headers the client reads). Every
request is recorded in `requests`. Anything else gets 404.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandin:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                path = unquote(urlparse(self.path).path)
                standin.requests.append((self.command, path))
                found = standin._route(path)
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("X-Error-Code", "RepoNotFound")
                    payload = b'{"error": "not found"}'
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if body:
                        self.wfile.write(payload)
                    return
                payload, headers = found
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _route(self, path: str):
        for repo in self.repos:
            api = f"/api/models/{repo}/"
            if path.startswith(api + "revision/"):
                siblings = [{"rfilename": name} for name in self._files(repo)]
                return self._json({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                   "siblings": siblings}), {}
            if path.startswith(api + "tree/"):
                tree = []
                for name, file in self._files(repo).items():
                    data = file.read_bytes()
                    tree.append({"type": "file", "path": name, "size": len(data),
                                 "oid": hashlib.sha1(data).hexdigest()})
                return self._json(tree), {}
            resolve = f"/{repo}/resolve/"
            if path.startswith(resolve):
                name = path[len(resolve):].split("/", 1)[1]
                file = self._files(repo).get(name)
                if file is None:
                    return None
                data = file.read_bytes()
                return data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                              "Content-Type": "application/octet-stream"}
        return None

    @staticmethod
    def _json(value) -> bytes:
        return json.dumps(value).encode()

    def __enter__(self) -> "HubStandin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
