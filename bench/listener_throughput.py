"""Instances per second through C-STORE into `cxr-embed listen`, against `cxr-embed embed` on the same
images, measured in the same run.

`embed`: N copies of RG1_UNCR.dcm (new SOP Instance UIDs) in a folder, `cxr-embed embed` in a
subprocess; its own img/s (model load excluded). Listener: `cxr-embed listen` in a subprocess, fed by
sender processes (pynetdicom's API, each its own association) that read RG1_UNCR once, give each
send a new SOP Instance UID and time their sends; the rate is N / (last end - first start), the model
load excluded. Each C-STORE is answered only after the store commit that holds it, so this is the
acknowledged, durable rate. Goal: 4 associations >= 0.8x `embed`.

    python bench/listener_throughput.py [--n 64] [--model imagenet-effnet-lite0] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

SENDER = r"""
import json, sys, time
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ds = pydicom.dcmread(path)
ae = AE(ae_title="BENCH")
ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", port, ae_title="CXREMBED")
assert assoc.is_established
start, bad = time.time(), 0
for _ in range(n):
    ds.SOPInstanceUID = generate_uid()
    bad += int(assoc.send_c_store(ds).Status) != 0
end = time.time()
assoc.release()
print(json.dumps({"start": start, "end": end, "bad": bad}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_file() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


def embed_rate(tmp: Path, n: int, model: str) -> float:
    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    ds = pydicom.dcmread(source_file())
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{i:04d}.dcm")
    out = tmp / f"embed-{time.time_ns()}.h5"
    res = subprocess.run([sys.executable, "-m", "cxr_embed", "embed", "--images", str(folder), "--out", str(out),
                          "--model", model, "--no-progress"], capture_output=True, text=True, check=True)
    return float(re.search(r"\(([\d.]+) img/s\)", res.stdout).group(1))


def start_listener(tmp: Path, model: str) -> tuple[subprocess.Popen, int]:
    port, log = free_port(), tmp / "listener.log"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_embed", "listen", "--port", str(port), "--out",
                             str(tmp / "listener.h5"), "--model", model], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    while b"listening for DICOM" not in log.read_bytes():
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.3)
    return proc, port


def listener_rate(port: int, sender: Path, n: int, associations: int) -> float:
    per = [n // associations + (i < n % associations) for i in range(associations)]
    procs = [subprocess.Popen([sys.executable, str(sender), str(port), str(source_file()), str(k)],
                              stdout=subprocess.PIPE, text=True) for k in per]
    results = [json.loads(p.communicate()[0]) for p in procs]
    if any(r["bad"] for r in results):
        raise RuntimeError(f"failed C-STOREs: {results}")
    return n / (max(r["end"] for r in results) - min(r["start"] for r in results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default="imagenet-effnet-lite0")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sender = tmp / "sender.py"
        sender.write_text(SENDER)
        proc, port = start_listener(tmp, args.model)
        try:
            listener_rate(port, sender, 4, 1)  # warm-up: first batches, first commits
            for r in range(args.rounds):
                embed = embed_rate(tmp, args.n, args.model)
                one = listener_rate(port, sender, args.n, 1)
                four = listener_rate(port, sender, args.n, 4)
                print(f"round {r + 1}: embed {embed:.2f} img/s | listen, 1 association {one:.2f} img/s "
                      f"({one / embed:.2f}x embed) | 4 associations {four:.2f} img/s ({four / embed:.2f}x embed)",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
