"""Latency and throughput of the real service against in-process embedding, in the same run.

Latency: p50/p95 of POST /embed with RG1_UNCR.dcm (raw application/dicom body) vs
Embedder.embed_one on the same bytes in this process. Target: p50 within 1.3x. Three servers run
side by side, one per chest-check policy (never: tags only; auto, the default: tags when they say
CR/DX chest AP/PA, else the image too; always: the image too, every time), and the four ways of
embedding take turns in blocks of 5 requests, round after round, so that drift of a shared machine
hits all alike; the first request of each block (caches cold after another process ran) is dropped.
Throughput: POST /embed of real CXR JPEGs (no tags: the image check runs) with 1, 4 and 16
concurrent clients against the default server, also in interleaved rounds; medians over rounds.
Target: 16 clients >= 1.5x the 1-client rate (dynamic batching).

The clients run on the same machine as the server, so they should cost it as little CPU as
possible: by default each is a keep-alive `http.client` connection (about 0.4 ms of CPU per request,
JSON reply parsed). `--client httpx` uses httpx instead, as this benchmark did before: with 16
threads it took about 15 ms of CPU per request, a third of a 2-core machine (BENCHMARKS.md).

    python bench/service_latency.py [--model NAME] [--requests 40] [--rounds 5] [--client stdlib|httpx]
                                    [--variant NAME:VAR=VALUE[,VAR=VALUE]]...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

from cxr_embed import Embedder, configure_process

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def start(model, image_check: str, env: dict | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "cxr_embed", "serve", "--port", str(port), "--log-level", "warning",
           "--image-check", image_check]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return proc, url


POLICIES = ("never", "auto", "always")


class Poster:
    """One keep-alive client connection: POST a body, return the status (the JSON reply is parsed)."""

    def __init__(self, url: str, kind: str = "stdlib"):
        self.url, self.kind = url, kind
        if kind == "httpx":
            self.client = httpx.Client(timeout=120)
        else:
            host, port = url.split("//", 1)[1].split(":")
            self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def post(self, path: str, body: bytes, content_type: str) -> int:
        if self.kind == "httpx":
            r = self.client.post(self.url + path, content=body, headers={"content-type": content_type})
            r.json()
            return r.status_code
        self.conn.request("POST", path, body=body, headers={"content-type": content_type})
        r = self.conn.getresponse()
        reply = r.read()
        json.loads(reply)
        return r.status


def main() -> None:
    try:
        import data_store
    except ImportError:  # only needed without --dicom
        data_store = None

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=40, help="latency samples per way of embedding")
    ap.add_argument("--images", type=int, default=96, help="JPEG requests per throughput level and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved throughput rounds")
    ap.add_argument("--dicom", help="RG1_UNCR.dcm elsewhere than pydicom-data (e.g. on a GPU host)")
    ap.add_argument("--client", choices=("stdlib", "httpx"), default="stdlib",
                    help="HTTP client of the load generator (see the docstring)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="also measure throughput of the default server started with these environment "
                         "variables, in the same rounds (e.g. one-team:CXR_EMBED_CPU_WORKERS=1)")
    args = ap.parse_args()
    configure_process()  # as `cxr-embed embed` and `serve` do (cxr_embed/process.py)
    variants = {}
    for v in args.variant:
        name, _, assignments = v.partition(":")
        try:
            variants[name] = dict(a.split("=", 1) for a in assignments.split(",") if a)
        except ValueError:
            ap.error(f"--variant {v!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    dcm = Path(args.dicom).read_bytes() if args.dicom else (Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm").read_bytes()
    jpgs = [p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "nih").glob("*.jpg"))]

    emb = Embedder(args.model, batch_size=16)
    print(f"client {args.client}; device {emb.device}" + (f" ({__import__('torch').cuda.get_device_name()})" if emb.device.type == "cuda" else ""))
    servers = {policy: start(args.model, policy) for policy in POLICIES}
    try:
        clients = {policy: Poster(servers[policy][1], args.client) for policy in POLICIES}

        def remote(policy):
            def call():
                status = clients[policy].post("/embed?encoding=base64", dcm, "application/dicom")
                assert status == 200, status
            return call

        ways = {"in-process": lambda: emb.embed_one(dcm), **{p: remote(p) for p in POLICIES}}
        for call in ways.values():  # warm-up
            call()
            call()
        times = {name: [] for name in ways}
        names = list(ways)
        block = 5  # requests in a row to one way: the first warms its caches and is not counted
        for i in range(-(-args.requests // (block - 1))):
            for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
                for j in range(block):
                    t = time.perf_counter()
                    ways[name]()
                    if j:
                        times[name].append(1000 * (time.perf_counter() - t))
        base = statistics.median(times["in-process"])
        print(f"RG1_UNCR.dcm latency   in-process p50 {base:6.1f} ms  p95 {pct(times['in-process'], .95):6.1f} ms")
        labels = {"never": "tags-only check", "auto": "auto check (default)", "always": "image check always"}
        for policy in POLICIES:
            t = times[policy]
            print(f"  POST /embed, {labels[policy]:<22} p50 {statistics.median(t):6.1f} ms  p95 {pct(t, .95):6.1f} ms"
                  f"  ratio p50 {statistics.median(t) / base:.2f} (target <= 1.30)")
        for policy in ("never", "always"):  # throughput runs on the default server (and variants) only
            proc = servers.pop(policy)[0]
            proc.terminate()
            proc.wait(10)
        targets = {"default": servers["auto"][1]}
        for name, env in variants.items():  # --variant: the default server with other settings, same rounds
            servers[name] = start(args.model, "auto", env)
            targets[name] = servers[name][1]

        thread_clients = threading.local()

        def one(url, i):
            if getattr(thread_clients, "url", None) != url:  # one keep-alive connection per client thread
                thread_clients.c, thread_clients.url = Poster(url, args.client), url
            return thread_clients.c.post("/embed?encoding=base64", jpgs[i % len(jpgs)], "image/jpeg")

        levels = (1, 4, 16)
        rates = {"in-process": []} | {(name, n): [] for name in targets for n in levels}
        client_cpu = {n: [] for n in levels}  # CPU time of this process (the clients) per request
        for _ in range(args.rounds):
            t = time.perf_counter()
            for i in range(args.images):
                emb.embed_one(jpgs[i % len(jpgs)])
            rates["in-process"].append(args.images / (time.perf_counter() - t))
            for name, url in targets.items():
                for n in levels:
                    t, cpu = time.perf_counter(), time.process_time()
                    with ThreadPoolExecutor(n) as pool:
                        codes = list(pool.map(partial(one, url), range(args.images)))
                    assert codes.count(200) == len(codes), f"{name}, {n} clients: {sorted(set(codes))}"
                    rates[name, n].append(args.images / (time.perf_counter() - t))
                    if name == "default":
                        client_cpu[n].append(1000 * (time.process_time() - cpu) / args.images)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"JPEG throughput ({args.rounds} rounds of {args.images} images, median img/s; rounds in brackets)")
        print(f"  in-process sequential {med['in-process']:6.1f}  [{', '.join(f'{v:.1f}' for v in rates['in-process'])}]")
        for name in targets:
            label = "" if name == "default" else f"{name}: "
            for n in levels:
                print(f"  {label}{n:2d} client(s)          {med[name, n]:6.1f}  [{', '.join(f'{v:.1f}' for v in rates[name, n])}]")
            if name == "default":
                print("  client CPU per request (ms, this process): "
                      + ", ".join(f"{n} client(s) {statistics.median(client_cpu[n]):.2f}" for n in levels))
            per_round = [a / b for a, b in zip(rates[name, 16], rates[name, 1])]
            print(f"  {label}16 clients / 1 client: {med[name, 16] / med[name, 1]:.2f} (target >= 1.5); per round "
                  f"{', '.join(f'{r:.2f}' for r in per_round)}")
        metrics = httpx.get(targets["default"] + "/metrics").text
        batches = [l for l in metrics.splitlines() if l.startswith(("cxr_embed_batches_total", "cxr_embed_images_embedded_total"))]
        print("  default server: " + ", ".join(batches))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
