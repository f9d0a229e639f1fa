"""A loopback stand-in for the Hugging Face Hub HTTP API, driven by the real ``huggingface_hub`` client.

Why: push-to-hub paths (``HfApi.upload_folder``, ``Trainer.push_to_hub``) must be testable offline, with the real
client building the real requests, so that a test can assert which files arrive and where the token travels.

Only the routes those paths use are served. At preupload a Parquet file is answered upload mode ``"lfs"`` (as the
Hub's default .gitattributes makes it; ``Dataset.push_to_hub`` uploads its shards before the commit and deletes its
temporary files, so it needs this), every other file ``"regular"``, so the client sends it inline (base64 in the
NDJSON commit). LFS objects go through the basic batch + single PUT protocol; Xet is never started. Routes
that are not served answer 404 and are recorded in ``FakeHub.unknown``.

Usage::

    def test_push(monkeypatch, tmp_path):
        with FakeHub() as hub:
            hub.patch_endpoint(monkeypatch)  # HF_ENDPOINT + the client's cached copies of it; blocks remote sockets
            HfApi(token="hf_fake").upload_folder(repo_id="tester/x", folder_path=tmp_path)  # after create_repo
            assert hub.repos["tester/x"]["README.md"] == b"..."
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import socket
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".parquet",)  # what the stand-in stores through the LFS protocol
MAX_BODY_BYTES = 64 * 1024 * 1024  # a bound on any one request body; the tiny models in tests are far below it
_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # (method, pattern on the raw URL path, handler name); first match wins
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("POST", rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", "_commit"),
    ("POST", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "_lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "_lfs_upload"),
    ("GET", rf"/api/{_REPO}/refs", "_refs"),
    ("GET", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_tree"),
    ("GET", rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "_repo_info"),
    ("GET", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    ("HEAD", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
]


class Request(NamedTuple):
    """One request as received: header names are lower-cased so tests can look up ``"authorization"``."""

    method: str
    path: str
    headers: dict[str, str]


class Commit(NamedTuple):
    """One commit on ``main``: what it was called and which paths it touched."""

    repo_id: str
    oid: str
    summary: str
    description: str
    added: tuple[str, ...]
    deleted: tuple[str, ...]


class _Reply(Exception):
    """An HTTP answer other than 200, raised from a route; ``code`` mirrors the Hub's ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(data: bytes) -> str:
    """The git SHA-1 the Hub reports for a regular file, which the client compares to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) holding repos in memory; see the module docstring.

    ``token``: when set, write routes and whoami demand exactly ``Authorization: Bearer <token>``; otherwise any bearer
    token is accepted (but one is still required, as on the Hub).
    """

    def __init__(self, user: str = "tester", token: str | None = None):
        self.user, self.token = user, token
        self.repos: dict[str, dict[str, bytes]] = {}  # repo_id -> path -> bytes, latest state of main
        self.repo_types: dict[str, str] = {}
        self.commits: list[Commit] = []  # every commit, all repos, in order (create_repo makes an empty one)
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []  # request bodies, aligned with `requests`
        self.unknown: list[str] = []  # "METHOD path" that matched no route (answered 404)
        self.blocked: list[Any] = []  # non-loopback addresses refused by the socket guard of `patch_endpoint`
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> contents uploaded through the LFS protocol
        self._heads: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # idle keep-alive connections from the client's pool must not block stop()
        self._thread = threading.Thread(target=self._server.serve_forever, name="FakeHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pointing the client here ----------------------------------------------------------------------------------

    def patch_endpoint(self, monkeypatch, block_remote: bool = True) -> None:
        """Point ``huggingface_hub`` (and transformers' cached ``HfApi``) at this server for one test.

        ``HF_ENDPOINT`` is read once at import into ``huggingface_hub.constants``, and copies of it live on: the
        module-level ``huggingface_hub.hf_api.api`` (behind ``huggingface_hub.upload_folder`` etc.), the resolve URL
        template, the trusted-host set, ``transformers.utils.hub._hf_api`` (built on first use) and
        ``datasets.config``'s endpoint (``Dataset.push_to_hub``). All are patched, Xet and telemetry are switched
        off, and with ``block_remote`` any non-loopback socket connect is refused and recorded in ``self.blocked``,
        so a missed copy fails fast instead of reaching huggingface.co.
        """
        from huggingface_hub import constants, hf_api

        url = self.url
        for name, value in (("HF_ENDPOINT", url), ("HF_HUB_DISABLE_XET", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_api.api, "endpoint", url)
        # `make test` exports HF_HUB_OFFLINE=1 so nothing reaches the real Hub; this loopback Hub must stay reachable.
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        try:  # imported here even if unused so far: a cache built during the test must not outlive it
            import transformers.utils.hub as transformers_hub
        except ImportError:
            transformers_hub = None
        if hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt lazily from the patched constants
        try:  # datasets keeps its own copies (Dataset.push_to_hub builds HfApi(endpoint=datasets.config.HF_ENDPOINT))
            import datasets.config as datasets_config
        except ImportError:
            datasets_config = None
        if datasets_config is not None:
            monkeypatch.setattr(datasets_config, "HF_ENDPOINT", url)
            monkeypatch.setattr(
                datasets_config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}"
            )
            monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        if block_remote:
            self._block_remote_sockets(monkeypatch)

    def _block_remote_sockets(self, monkeypatch) -> None:
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

        def check(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    loopback = ipaddress.ip_address(address[0]).is_loopback
                except ValueError:
                    loopback = False
                if not loopback:
                    self.blocked.append(address)
                    raise ConnectionRefusedError(f"FakeHub test guard: refusing non-loopback connect to {address!r}")

        def connect(sock, address):
            check(sock, address)
            return real_connect(sock, address)

        def connect_ex(sock, address):
            check(sock, address)
            return real_connect_ex(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)

    # -- state -----------------------------------------------------------------------------------------------------

    def _new_commit(self, repo_id: str, summary: str, description: str, files: dict[str, bytes], added, deleted):
        parent = self._heads.get(repo_id, "")
        digest = hashlib.sha1(f"{parent}\n{len(self.commits)}\n{summary}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
        commit = Commit(repo_id, digest.hexdigest(), summary, description, tuple(added), tuple(deleted))
        self.repos[repo_id], self._heads[repo_id] = files, commit.oid
        self.commits.append(commit)
        return commit

    def _get_repo(self, match: dict[str, str | None], rev: str | None = None) -> str:
        repo_id = match["repo"]
        if repo_id not in self.repos or self.repo_types[repo_id] != (match.get("type") or "model"):
            raise _Reply(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if rev is not None and rev not in ("main", "refs/heads/main", self._heads[repo_id]):
            raise _Reply(404, f"Invalid rev id: {rev} (FakeHub serves only main)", "RevisionNotFound")
        return repo_id

    # -- routes: (unquoted match groups, query, raw body) -> JSON-able reply, or (status, headers, bytes) ------------

    def _whoami(self, m, query, body):
        return {
            "type": "user",
            "id": "0",
            "name": self.user,
            "fullname": "Fake Hub Tester",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
        }

    def _create_repo(self, m, query, body):
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        reply = {"url": f"{self.url}/{prefix}{repo_id}", "name": repo_id}
        if repo_id in self.repos:
            raise _Conflict(reply)
        self.repo_types[repo_id] = repo_type
        self._new_commit(repo_id, "initial commit", "", {}, (), ())
        return reply

    def _validate_yaml(self, m, query, body):
        return {"errors": [], "warnings": []}

    def _preupload(self, m, query, body):
        repo_id = self._get_repo(m, m["rev"])
        files = self.repos[repo_id]
        answer = []
        for item in json.loads(body)["files"]:
            path = item["path"]
            oid = git_blob_oid(files[path]) if path in files else None
            mode = "lfs" if path.endswith(LFS_SUFFIXES) else "regular"
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answer, "commitOid": self._heads[repo_id]}

    def _commit(self, m, query, body):
        repo_id = self._get_repo(m, m["rev"])
        if query.get("create_pr"):
            raise _Reply(400, "FakeHub does not support create_pr", "BadRequest")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise _Reply(400, "commit payload has no header line", "BadRequest")
        parent = header.get("parentCommit")
        if parent is not None and parent != self._heads[repo_id]:
            raise _Reply(412, f"parentCommit {parent} is not the head of main", "PreconditionFailed")
        files, added, deleted = dict(self.repos[repo_id]), [], []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = value["content"]
                encoding = value.get("encoding", "utf-8")
                files[value["path"]] = base64.b64decode(content) if encoding == "base64" else content.encode()
                added.append(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise _Reply(400, f"LFS object {value['oid']} was never uploaded", "BadRequest")
                files[value["path"]] = self.lfs[value["oid"]]
                added.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _Reply(404, "A file with this name doesn't exist", "EntryNotFound")
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                gone = [path for path in files if path.startswith(prefix)]
                for path in gone:
                    del files[path]
                deleted.extend(gone)
            elif key != "header":
                raise _Reply(400, f"FakeHub does not support commit operation {key!r}", "BadRequest")
        commit = self._new_commit(repo_id, header["summary"], header.get("description", ""), files, added, deleted)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}

    def _lfs_batch(self, m, query, body):
        """The LFS batch API: every object not stored yet gets a single-PUT upload action on this server."""
        self._get_repo(m)
        objects = []
        for item in json.loads(body)["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, m, query, body):
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            raise _Reply(400, "LFS upload does not match its sha256", "BadRequest")
        self.lfs[m["oid"]] = body
        return {}

    def _refs(self, m, query, body):
        repo_id = self._get_repo(m)
        branch = {"name": "main", "ref": "refs/heads/main", "targetCommit": self._heads[repo_id]}
        return {"branches": [branch], "converts": [], "tags": [], "pullRequests": []}

    def _tree(self, m, query, body):
        repo_id = self._get_repo(m, m["rev"])
        files = self.repos[repo_id]
        base = (m["path"] or "").strip("/")
        prefix = base + "/" if base else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        under = sorted(path for path in files if path.startswith(prefix))
        if base and not under:
            raise _Reply(404, f"{base} does not exist on main", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path in under:
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # directories on the way down
                folder = prefix + "/".join(parts[:i])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            if recursive or len(parts) == 1:
                data = files[path]
                entries[path] = {"type": "file", "path": path, "oid": git_blob_oid(data), "size": len(data)}
        return sorted(entries.values(), key=lambda entry: entry["path"])

    def _repo_info(self, m, query, body):
        repo_id = self._get_repo(m, m.get("rev"))
        files = self.repos[repo_id]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        siblings = [{"rfilename": p, "size": len(files[p]), "blobId": git_blob_oid(files[p])} for p in sorted(files)]
        return {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": self._heads[repo_id],
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": now,
            "createdAt": now,
        }

    def _resolve(self, m, query, body):
        repo_id = self._get_repo(m, m["rev"])
        path = m["path"]
        if path not in self.repos[repo_id]:
            raise _Reply(404, f"Entry not found: {path}", "EntryNotFound")
        data = self.repos[repo_id][path]
        headers = {
            "X-Repo-Commit": self._heads[repo_id],
            "ETag": f'"{git_blob_oid(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, data


class _Conflict(_Reply):
    """409 for an existing repo; the client with ``exist_ok=True`` still reads ``url`` from this body."""

    def __init__(self, reply: dict):
        super().__init__(409, "You already created this repo", None)
        self.reply = reply


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to a FakeHub method and records it; HTTP/1.1 keep-alive with a socket timeout."""

    fake: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle pooled client connection frees its thread after this long
    _write_routes = {"_create_repo", "_preupload", "_commit", "_whoami", "_lfs_batch"}

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by BaseHTTPRequestHandler
        pass  # keep pytest output quiet; `FakeHub.requests` is the log

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _Reply(413, "request body too large for FakeHub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _Reply(413, "request body too large for FakeHub")
        return self.rfile.read(length) if length else b""

    def _dispatch(self):
        fake = self.fake
        split = urlsplit(self.path)
        path = split.path  # still quoted: a revision like refs%2Fpr%2F1 stays one segment; groups are unquoted later
        query = parse_qs(split.query)
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            body = self._read_body()
        except _Reply as err:
            self.close_connection = True
            self._send(err.status, {"X-Error-Message": err.message}, json.dumps({"error": err.message}).encode())
            return
        with fake._lock:
            fake.requests.append(Request(self.command, self.path, headers))
            fake.bodies.append(body)
            try:
                status, extra, payload = self._route(path, query, body, headers)
            except _Conflict as err:
                status, extra, payload = 409, {"X-Error-Message": err.message}, err.reply
            except _Reply as err:
                extra = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
                status, payload = err.status, {"error": err.message}
            except Exception as err:  # a malformed request from a changed client: surface it, don't hang it
                status, extra, payload = 500, {"X-Error-Message": repr(err)}, {"error": repr(err)}
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            extra.setdefault("Content-Type", "application/json")
        self._send(status, extra, payload)

    def _route(self, path: str, query: dict, body: bytes, headers: dict[str, str]):
        fake = self.fake
        for method, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method != self.command or match is None:
                continue
            if name in self._write_routes:
                auth = headers.get("authorization", "")
                if not auth.startswith("Bearer ") or (fake.token is not None and auth != f"Bearer {fake.token}"):
                    raise _Reply(401, "Invalid username or password.", None)
            groups = {key: unquote(value) if value else value for key, value in match.groupdict().items()}
            result = getattr(fake, name)(groups, query, body)
            return result if isinstance(result, tuple) else (200, {}, result)
        fake.unknown.append(f"{self.command} {self.path}")
        print(f"FakeHub: no route for {self.command} {self.path}", file=sys.stderr)
        raise _Reply(404, f"FakeHub has no route for {self.command} {path}", None)

    def _send(self, status: int, headers: dict[str, str], payload: bytes):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


TOKEN = "hf_fake"  # the token the Hub tests use


def assert_token_only_in_authorization(hub: FakeHub) -> None:
    """The token may travel only as ``Authorization: Bearer``: never in a URL, another header, or a request body."""
    assert hub.requests, "no request reached the fake hub"
    for request, body in zip(hub.requests, hub.bodies, strict=True):
        assert TOKEN not in request.path
        for name, value in request.headers.items():
            if TOKEN in value:
                assert (name, value) == ("authorization", f"Bearer {TOKEN}"), request
        assert TOKEN.encode() not in body, request
    writes = [request for request in hub.requests if request.method == "POST"]
    assert writes and all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in writes)
