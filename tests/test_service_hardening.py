"""The service under careless and hostile clients: slow or idle connections, odd Authorization
headers, too many images, a busy port; and what its logs say (request ids, an access log, JSON)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from servers import Server


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("strict"), ["--model", "imagenet-effnet-lite0", "--probes", "none",
                                                     "--log-format", "json"],
                 env={"CXR_EMBED_TOKEN": "s3cret", "CXR_EMBED_HEADER_TIMEOUT_S": "2", "CXR_EMBED_BODY_TIMEOUT_S": "2",
                      "CXR_EMBED_MAX_QUEUE": "3", "CXR_EMBED_MAX_FILES": "8"})
    yield srv
    srv.stop()


def _auth(**extra):
    return {"authorization": "Bearer s3cret", **extra}


def test_idle_connection_is_closed_after_the_header_timeout(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
        start = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server, nothing answered
        assert 1.5 < time.monotonic() - start < 8


def test_slow_body_gets_408(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=15) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG")
        reply = b""
        while b"body_timeout" not in reply:  # the head and the body may come in separate segments
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply


def test_authorization_scheme_in_any_case_and_one_header_only(strict, samples):
    jpg = sorted(samples.glob("*.jpg"))[0].read_bytes()
    ok = httpx.post(strict.url + "/embed", content=jpg, timeout=60,
                    headers={"content-type": "image/jpeg", "authorization": "bEaReR s3cret"})
    assert ok.status_code == 200
    assert httpx.get(strict.url + "/info", headers={"authorization": "Bearer s3cre"}).status_code == 401
    assert httpx.get(strict.url + "/info", headers={"authorization": "Basic s3cret"}).status_code == 401
    two = httpx.get(strict.url + "/info", headers=[("authorization", "Bearer s3cret"), ("authorization", "Bearer x")])
    assert two.status_code == 400 and two.json()["error"]["code"] == "ambiguous_authorization"


def test_more_images_than_the_queue_can_ever_hold_is_413(strict, samples):
    jpgs = [p.read_bytes() for p in sorted(samples.glob("*.jpg"))][:5]
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(jpgs)]
    r = httpx.post(strict.url + "/embed", files=files, headers=_auth(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    assert "CXR_EMBED_MAX_QUEUE" in r.json()["error"]["message"]


def test_request_ids_and_a_json_access_log_without_image_content(strict, dcm_dir):
    r = httpx.post(strict.url + "/embed", content=(dcm_dir / "RG1_UNCR.dcm").read_bytes(), timeout=60,
                   headers=_auth(**{"content-type": "application/dicom", "x-request-id": "trace-42"}))
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    made = httpx.get(strict.url + "/health").headers["x-request-id"]
    assert len(made) == 16 and made != "trace-42"
    time.sleep(0.5)
    lines = [json.loads(line) for line in strict.log_path.read_text().splitlines() if line.startswith("{")]
    access = [rec for rec in lines if rec.get("logger") == "cxr_embed.access" and rec.get("request_id") == "trace-42"]
    assert len(access) == 1
    rec = access[0]
    assert rec["route"] == "/embed" and rec["status"] == 200 and rec["images"] == 1
    assert rec["principal"].startswith("bearer:") and "s3cret" not in strict.log_path.read_text()


def test_a_client_that_disconnects_is_not_a_server_error(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: image/png\r\nContent-Length: 100000\r\nX-Request-ID: gone-away\r\n\r\n" + b"\x89PNG")
    time.sleep(1.0)
    log = strict.log_path.read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("request_id") == "gone-away"]
    assert mine and all(r.get("status", 499) < 500 for r in mine)
    assert "Traceback" not in log


def test_busy_port_is_reported_before_the_model_loads():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cxr_embed", "serve", "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "loading" not in proc.stdout and time.monotonic() - start < 60
