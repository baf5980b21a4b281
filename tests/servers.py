"""A real `cxr-embed serve` in a subprocess on 127.0.0.1, for tests that talk to it over HTTP; and a
real DICOM listener in this process (`in_process_listener`)."""

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_listener(tmp_path, model: str = "imagenet-effnet-lite0", **settings):
    """A `service.listener.Listener` storing into tmp_path/s.h5, on a free port (`listener.port` once
    started; use it as a context manager)."""
    from service.listener import Listener, ListenerSettings
    from service.settings import ServiceSettings

    return Listener(ListenerSettings(out=tmp_path / "s.h5", service=ServiceSettings.build(model=model), port=0,
                                     **settings))


class Server:
    """`command serve --port P args` (default command: this interpreter's `-m cxr_embed`), in `cwd`,
    with `env` added to this process's environment (or in place of it, with `clean_env`)."""

    def __init__(self, tmp, args, env=None, command=None, cwd=None, clean_env=False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "cxr_embed"]), "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**({} if clean_env else os.environ), **(env or {})},
            cwd=cwd,
        )
        token = (env or {}).get("CXR_EMBED_TOKEN")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        deadline = time.time() + 120
        self.saw_503 = False
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                code = httpx.get(self.url + "/ready", headers=headers, timeout=1).status_code
                self.saw_503 |= code == 503
                if code == 200:
                    break
                time.sleep(0.1)
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
