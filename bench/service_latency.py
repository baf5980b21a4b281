"""Latency and throughput of the real service against in-process embedding, in the same run.

Latency: p50/p95 of POST /embed with RG1_UNCR.dcm (raw application/dicom body) vs
Embedder.embed_one on the same bytes in this process. Target: p50 within 1.3x.
Throughput: POST /embed of real CXR JPEGs with 1, 4 and 16 concurrent clients vs sequential
in-process embedding. Target: 16 clients >= 1.5x the 1-client rate (dynamic batching).

    python bench/service_latency.py [--model NAME] [--requests 30]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from cxr_embed import Embedder

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def start(model, image_check: str):
    port = free_port()
    cmd = [sys.executable, "-m", "cxr_embed", "serve", "--port", str(port), "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "CXR_EMBED_IMAGE_CHECK": image_check}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return proc, url


def main() -> None:
    try:
        import data_store
    except ImportError:  # only needed without --dicom
        data_store = None

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--images", type=int, default=96, help="JPEG requests per throughput level")
    ap.add_argument("--dicom", help="RG1_UNCR.dcm elsewhere than pydicom-data (e.g. on a GPU host)")
    args = ap.parse_args()
    dcm = Path(args.dicom).read_bytes() if args.dicom else (Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm").read_bytes()
    jpgs = [p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "nih").glob("*.jpg"))]

    emb = Embedder(args.model, batch_size=16)
    print(f"device {emb.device}" + (f" ({__import__('torch').cuda.get_device_name()})" if emb.device.type == "cuda" else ""))
    emb.embed_one(dcm)
    local = []
    for _ in range(args.requests):
        t = time.perf_counter()
        emb.embed_one(dcm)
        local.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter()
    for i in range(args.images):
        emb.embed_one(jpgs[i % len(jpgs)])
    local_rate = args.images / (time.perf_counter() - t)
    del emb

    remote_by_mode = {}
    for image_check in ("0", "1"):  # tags-only chest check, then the default image check
        proc, url = start(args.model, image_check)
        try:
            client = httpx.Client(timeout=120)
            client.post(url + "/embed?encoding=base64", content=dcm, headers={"content-type": "application/dicom"})
            remote = []
            for _ in range(args.requests):
                t = time.perf_counter()
                r = client.post(url + "/embed?encoding=base64", content=dcm, headers={"content-type": "application/dicom"})
                remote.append(1000 * (time.perf_counter() - t))
                assert r.status_code == 200, r.text
            remote_by_mode[image_check] = remote
        finally:
            if image_check == "0":
                proc.terminate()
                proc.wait(10)
    try:
        print(f"RG1_UNCR.dcm latency   in-process p50 {statistics.median(local):6.1f} ms  p95 {pct(local, .95):6.1f} ms")
        for mode, label in (("0", "tags-only check"), ("1", "image check (default)")):
            remote = remote_by_mode[mode]
            print(f"  POST /embed, {label:<22} p50 {statistics.median(remote):6.1f} ms  p95 {pct(remote, .95):6.1f} ms"
                  f"  ratio p50 {statistics.median(remote) / statistics.median(local):.2f} (target <= 1.30)")
        print(f"JPEG throughput        in-process sequential {local_rate:6.1f} img/s")
        rates = {}
        for clients in (1, 4, 16):
            local_clients = threading.local()

            def one(i):
                if not hasattr(local_clients, "c"):  # one keep-alive connection per client thread
                    local_clients.c = httpx.Client(timeout=120)
                return local_clients.c.post(url + "/embed?encoding=base64", content=jpgs[i % len(jpgs)],
                                            headers={"content-type": "image/jpeg"}).status_code
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(one, range(args.images)))
            rates[clients] = codes.count(200) / (time.perf_counter() - t)
            print(f"                       {clients:2d} client(s): {rates[clients]:6.1f} img/s "
                  f"({codes.count(200)} ok, {codes.count(429)} x 429)")
        print(f"                       16 clients / 1 client: {rates[16] / rates[1]:.2f} (target >= 1.5)")
        metrics = client.get(url + "/metrics").text
        batches = [l for l in metrics.splitlines() if l.startswith(("cxr_embed_batches_total", "cxr_embed_images_embedded_total"))]
        print("                       " + ", ".join(batches))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
