"""A fake Kubernetes API server over real HTTP (127.0.0.1) for the RayJob custom resource: bearer-token auth,
list by label selector, create with strict field validation against the real KubeRay CRD schema (422 with causes),
409 on an existing name, and a scripted status progression on GET (what KubeRay would write)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/ray.io/v1/namespaces/"
SUCCESS = [("Initializing", None), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]


def _status(code: int, reason: str, message: str, causes: list | None = None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code}
    if causes:
        out["details"] = {"causes": causes}
    return out


@dataclass
class FakeKube:
    token: str
    objects: dict = field(default_factory=dict)  # (ns, name) -> object
    script: list = field(default_factory=lambda: list(SUCCESS))
    requests: list = field(default_factory=list)  # (method, path, query)
    polls: dict = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: str, token: str | None = None) -> str:
        import yaml

        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "u", "user": {"token": token or self.token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        return path

    def handle(self, method: str, url: str, headers: dict, body: bytes) -> tuple[int, dict]:
        u = urlparse(url)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.requests.append((method, u.path, q))
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, _status(401, "Unauthorized", "Unauthorized")
        if not u.path.startswith(PREFIX):
            return 404, _status(404, "NotFound", f"{u.path} not found")
        parts = u.path[len(PREFIX):].split("/")
        ns, plural, name = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else None
        if plural != "rayjobs":
            return 404, _status(404, "NotFound", f"{plural} not found")
        if method == "GET" and name is None:
            want = dict(kv.split("=", 1) for kv in q.get("labelSelector", "").split(",") if kv)
            items = [o for (n, _), o in sorted(self.objects.items()) if n == ns
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
            return 200, {"apiVersion": "ray.io/v1", "kind": "RayJobList", "metadata": {}, "items": items}
        if method == "GET":
            obj = self.objects.get((ns, name))
            if obj is None:
                return 404, _status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')
            i = self.polls[(ns, name)] = min(self.polls.get((ns, name), -1) + 1, len(self.script) - 1)
            dep, job = self.script[i]
            obj["status"] = {"jobDeploymentStatus": dep, **({"jobStatus": job} if job else {})}
            return 200, obj
        if method == "POST":
            from tests.support.k8sschema import crd_errors

            obj = json.loads(body)
            errs = crd_errors(obj) if q.get("fieldValidation") == "Strict" else []
            if errs:
                causes = [{"reason": "FieldValueInvalid", "field": e.split(": ", 1)[0].replace("/", "."),
                           "message": e.split(": ", 1)[1]} for e in errs]
                return 422, _status(422, "Invalid", f"RayJob.ray.io is invalid: {errs[0]}", causes)
            key = (ns, obj["metadata"]["name"])
            if key in self.objects:
                return 409, _status(409, "AlreadyExists", f'rayjobs.ray.io "{key[1]}" already exists')
            obj["metadata"].update(namespace=ns, uid=f"uid-{len(self.objects)}", resourceVersion="1")
            self.objects[key] = obj
            return 201, obj
        return 405, _status(405, "MethodNotAllowed", method)

    def start(self) -> "FakeKube":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _do(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                code, payload = fake.handle(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                            self.rfile.read(n) if n else b"")
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _do

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
