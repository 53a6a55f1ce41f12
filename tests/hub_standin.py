"""A local stand-in for the Hugging Face Hub's download API (the Hub itself cannot be reached here).

    with HubStandin({"BAAI/bge-small-en-v1.5": folder}) as hub:   # serves folder's files as that model repo
        os.environ["HF_ENDPOINT"] = hub.endpoint                   # huggingface_hub downloads from it

It answers what `huggingface_hub.snapshot_download` asks of a public model repo: the repo's info
(`/api/models/<repo>[/revision/<rev>]`), its file tree (`/api/models/<repo>/tree/<rev>`), and each file
(`HEAD`/`GET /<repo>/resolve/<rev>/<path>`, with the commit and ETag headers the client reads).

With `uploads=<folder>` it also takes what `HfApi.create_repo` and `HfApi.upload_folder` send: repository
creation (`POST /api/repos/create`), the pre-upload question (`POST /api/models/<repo>/preupload/<rev>`,
answered "regular" for every file, so that contents travel in the commit itself) and the commit
(`POST /api/models/<repo>/commit/<rev>`, NDJSON: a header line, then one base64 file per line), whose
files land in `<uploads>/<repo>` and are served back like the others. Every request is recorded in
`requests` (with its Authorization header in `auth`). Anything else gets 404.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a served repository's commit until it takes an upload


class HubStandin:
    def __init__(self, repos: dict[str, Path] | None = None, *, uploads: Path | None = None):
        self.repos = {name: Path(folder) for name, folder in (repos or {}).items()}
        self.uploads = None if uploads is None else Path(uploads)
        self.requests: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.created: list[dict] = []
        self.commits: dict[str, str] = {}  # repo -> its last upload's commit (its contents' hash)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                standin.requests.append(("POST", path))
                standin.auth.append(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = standin._post(path, body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

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
            if path.startswith(api + "revision/") or path == api.rstrip("/"):
                siblings = [{"rfilename": name} for name in self._files(repo)]
                return self._json({"id": repo, "modelId": repo, "sha": self.commit(repo), "private": False,
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
                return data, {"X-Repo-Commit": self.commit(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                              "Content-Type": "application/octet-stream"}
        return None

    def commit(self, repo: str) -> str:
        return self.commits.get(repo, COMMIT)

    def _post(self, path: str, body: bytes) -> tuple[int, dict]:
        answer = self._post_answer(path, body)
        return (404, {"error": "not found"}) if answer is None else answer if isinstance(answer, tuple) else (200, answer)

    def _post_answer(self, path: str, body: bytes):
        if self.uploads is None:
            return None
        if path == "/api/validate-yaml":  # the model card's metadata: the Hub refuses YAML it cannot read
            import yaml

            content = json.loads(body)["content"]
            try:
                if content.startswith("---"):
                    yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": str(e)}]}
            return {"errors": [], "warnings": []}
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.created.append(request)
            self.repos.setdefault(repo, self.uploads / repo).mkdir(parents=True, exist_ok=True)
            return {"url": f"{self.endpoint}/{repo}", "name": repo, "id": repo}
        for repo in self.repos:
            api = f"/api/models/{repo}/"
            if path.startswith(api + "preupload/"):
                files = json.loads(body)["files"]
                return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for f in files]}
            if path.startswith(api + "commit/"):
                root = self.repos[repo]
                for line in body.splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        target = root / entry["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(entry["value"]["content"]))
                digest = hashlib.sha1()
                for name, file in self._files(repo).items():
                    digest.update(name.encode() + hashlib.sha1(file.read_bytes()).digest())
                self.commits[repo] = digest.hexdigest()  # new contents, new commit (as the Hub's git does)
                return {"commitUrl": f"{self.endpoint}/{repo}/commit/{self.commits[repo]}",
                        "commitOid": self.commits[repo], "success": True}
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
