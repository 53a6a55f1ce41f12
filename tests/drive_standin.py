"""A stand-in for the Google Drive API v2 on localhost, enough for PyDrive2's upload (resumable),
metadata patch, list, download and delete; Google's servers cannot be reached from the test machines.
It keeps files in memory and computes md5Checksum and fileSize from the bytes it received, as Drive does."""
import hashlib
import itertools
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FOLDER = "application/vnd.google-apps.folder"


class DriveStandIn:
    def __init__(self):
        self.files: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}
        self.sessions: dict[str, dict] = {}
        self.ids = (f"id{n}" for n in itertools.count(1))
        self.requests: list[str] = []
        self.fail_uploads = 0  # the next n content uploads answer 500
        self.quota_bytes = 15 * 2**30  # the Drive v2 `about` resource: quotaBytesTotal (15 GiB, a free account)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def new_file(self, meta: dict) -> dict:
        fid = next(self.ids)
        record = {"kind": "drive#file", "id": fid, "title": meta.get("title", "untitled"),
                  "mimeType": meta.get("mimeType", "application/octet-stream"),
                  "parents": [{"id": p["id"]} for p in meta.get("parents", [])], "labels": {"trashed": False}}
        self.files[fid] = record
        return record

    def set_content(self, fid: str, data: bytes) -> None:
        self.content[fid] = data
        self.files[fid].update(md5Checksum=hashlib.md5(data).hexdigest(), fileSize=str(len(data)),
                               downloadUrl=f"{self.endpoint}drive/v2/files/{fid}?alt=media")

    def matches(self, record: dict, query: str) -> bool:
        for clause in (c.strip() for c in query.split(" and ")):
            if m := re.fullmatch(r"'([^']*)' in parents", clause):
                ok = any(p["id"] == m.group(1) for p in record["parents"])
            elif m := re.fullmatch(r"(title|mimeType) = '([^']*)'", clause):
                ok = record[m.group(1)] == m.group(2)
            elif clause == "trashed = false" or clause == "trashed=false":
                ok = not record["labels"]["trashed"]
            else:
                raise ValueError(f"stand-in does not understand the query clause {clause!r}")
            if not ok:
                return False
        return True

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, code: int, payload=None, headers=None, raw: bytes | None = None):
                data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urllib.parse.urlparse(self.path)
                return url.path, dict(urllib.parse.parse_qsl(url.query))

            def do_POST(self):
                path, query = self._route()
                standin.requests.append(f"POST {path}")
                body = self._body()
                with standin.lock:
                    if path.endswith("/upload/drive/v2/files") and query.get("uploadType") == "resumable":
                        session = next(standin.ids)
                        standin.sessions[session] = json.loads(body or b"{}")
                        return self._reply(200, {}, {"Location": f"{standin.endpoint}upload/session/{session}"})
                    if path.endswith("/drive/v2/files"):
                        return self._reply(200, standin.new_file(json.loads(body or b"{}")))
                self._reply(404, {"error": path})

            def do_PUT(self):
                path, _ = self._route()
                standin.requests.append(f"PUT {path}")
                body = self._body()
                with standin.lock:
                    session = path.rsplit("/", 1)[-1]
                    if session not in standin.sessions:
                        return self._reply(404, {"error": "no such upload session"})
                    if standin.fail_uploads > 0:
                        standin.fail_uploads -= 1
                        return self._reply(500, {"error": {"code": 500, "message": "stand-in failure"}})
                    record = standin.new_file(standin.sessions.pop(session))
                    standin.set_content(record["id"], body)
                    self._reply(200, record)

            def do_GET(self):
                path, query = self._route()
                standin.requests.append(f"GET {path}")
                with standin.lock:
                    if path.endswith("/drive/v2/about"):
                        used = sum(len(c) for c in standin.content.values())
                        return self._reply(200, {"kind": "drive#about", "quotaBytesTotal": str(standin.quota_bytes),
                                                 "quotaBytesUsed": str(used)})
                    if path.endswith("/drive/v2/files"):
                        items = [r for r in standin.files.values() if standin.matches(r, query.get("q", ""))]
                        return self._reply(200, {"kind": "drive#fileList", "items": items})
                    fid = path.rsplit("/", 1)[-1]
                    if fid not in standin.files:
                        return self._reply(404, {"error": {"code": 404, "message": "File not found"}})
                    if query.get("alt") == "media":
                        return self._reply(200, raw=standin.content.get(fid, b""))
                    self._reply(200, standin.files[fid])

            def do_PATCH(self):
                path, _ = self._route()
                standin.requests.append(f"PATCH {path}")
                body = json.loads(self._body() or b"{}")
                with standin.lock:
                    fid = path.rsplit("/", 1)[-1]
                    if fid not in standin.files:
                        return self._reply(404, {"error": {"code": 404, "message": "File not found"}})
                    standin.files[fid].update({k: v for k, v in body.items() if k in ("title", "mimeType")})
                    self._reply(200, standin.files[fid])

            do_PUT_metadata = do_PATCH

            def do_DELETE(self):
                path, _ = self._route()
                standin.requests.append(f"DELETE {path}")
                with standin.lock:
                    fid = path.rsplit("/", 1)[-1]
                    doomed = {fid} | {f for f, r in standin.files.items() if any(p["id"] == fid for p in r["parents"])}
                    for f in doomed:
                        standin.files.pop(f, None)
                        standin.content.pop(f, None)
                self._reply(204)

        return Handler
