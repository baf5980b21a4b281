"""Instances per second through C-STORE into `cxr-embed listen`, against `cxr-embed embed` on the same
images, measured in the same run.

`embed`: N copies of RG1_UNCR.dcm (new SOP Instance UIDs) in a folder, `cxr-embed embed` in a
subprocess; its own img/s (model load excluded). Listener: `cxr-embed listen` in a subprocess (one per
variant, all started first), fed by sender processes, one association each, every instance with a new
SOP Instance UID:
- `dcmtk`: DCMTK's C++ `storescu` (`+II --repeat K`), what PACS and modalities use; timed from its
  start to its exit (association included);
- `pynetdicom`: a Python process with pynetdicom's API, reading the file once and timing its own sends.
The rate is N / (last end - first start). Each C-STORE is answered only after the store commit that
holds it, so this is the acknowledged, durable rate. CPU seconds per instance are reported for the
listener (from /proc) and the senders (their rusage): on one machine they share the cores. Also: the
machine's busy fraction while each variant ran (/proc/stat), `embed`'s CPU s per image (its summary
line), and the ceiling "all cores busy would give": cores / (listener + senders CPU per instance),
against `embed`'s rate - no scheduling can beat it on this machine.

Variants, in the same run and in turns (round 1: embed, every variant; round 2 ...): `--pdu` lists the
listener's maximum PDU sizes to compare (16382 is pynetdicom's default); `--env-variant` adds the
listener with other CXR_EMBED_* settings; `--baseline DIR` adds a listener run from another source
tree (e.g. `git worktree add /tmp/cxr-old COMMIT`) at its defaults.
Goal: 4 associations >= 0.8x `embed`.

    python bench/listener_throughput.py [--n 384] [--rounds 1] [--senders dcmtk pynetdicom]
        [--pdu 4194304 16382] [--baseline DIR] [--model imagenet-effnet-lite0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

SENDER = r"""
import json, sys, time
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ds = pydicom.dcmread(path)
ae = AE(ae_title="BENCH")
ae.maximum_pdu_size = 4 * 2**20  # only our replies travel this way; the data set goes in the listener's PDU size
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


def dcmtk_storescu() -> str:
    """DCMTK's storescu (not pynetdicom's command of the same name, which a Python environment may put first)."""
    for candidate in ("/usr/bin/storescu", shutil.which("storescu")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            if "dcmtk" in out.stdout.lower():
                return candidate
    raise SystemExit("DCMTK's storescu was not found (apt-get install dcmtk), or use --senders pynetdicom")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot (/proc/stat): busy excludes idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def busy_since(before: tuple[int, int]) -> float:
    """The machine's busy fraction (0-1, all cores) since `before` (machine_cpu())."""
    now = machine_cpu()
    return (now[0] - before[0]) / max(1, now[1] - before[1])


def embed_rate(tmp: Path, n: int, model: str) -> tuple[float, float]:
    """`cxr-embed embed`'s own img/s and CPU s per image (its summary line; model load excluded)."""
    folder = tmp / "images"
    if not folder.exists():
        folder.mkdir()
        ds = pydicom.dcmread(source_file())
        for i in range(n):
            ds.SOPInstanceUID = generate_uid()
            ds.save_as(folder / f"{i:04d}.dcm")
    out = tmp / f"embed-{time.time_ns()}.h5"
    res = subprocess.run([sys.executable, "-m", "cxr_embed", "embed", "--images", str(folder), "--out", str(out),
                          "--model", model, "--no-progress"], capture_output=True, text=True, check=True, cwd=ROOT)
    found = re.search(r"\(([\d.]+) img/s; ([\d.]+) CPU s per image\)", res.stdout)
    return float(found.group(1)), float(found.group(2))


@dataclass
class Variant:
    name: str
    tree: Path
    args: list[str]
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    port: int = 0

    def start(self, tmp: Path, model: str) -> None:
        self.port, log = free_port(), tmp / f"listener-{self.name}.log"
        env = {**os.environ, "PYTHONPATH": str(self.tree), **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "cxr_embed", "listen", "--port", str(self.port), "--out",
                                      str(tmp / f"listener-{self.name}.h5"), "--model", model, *self.args],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=self.tree, env=env)
        while b"listening for DICOM" not in log.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.3)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def sender_commands(kind: str, port: int, n: int, associations: int, sender_py: Path) -> list[list[str]]:
    per = [n // associations + (i < n % associations) for i in range(associations)]
    if kind == "dcmtk":
        return [[dcmtk_storescu(), "-aec", "CXREMBED", "-R", "+II", "--repeat", str(k), "127.0.0.1", str(port),
                 str(source_file())] for k in per]
    return [[sys.executable, str(sender_py), str(port), str(source_file()), str(k)] for k in per]


def send(variant: Variant, kind: str, n: int, associations: int, sender_py: Path) -> dict:
    """Rate (instances/s) and CPU seconds per instance of the listener and of the senders."""
    cmds = sender_commands(kind, variant.port, n, associations, sender_py)
    cpu0, children0, machine0 = variant.cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu()
    t0 = time.time()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    t1 = time.time()
    busy = busy_since(machine0)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a sender failed: {[o[-800:] for o in outs]}")
    if kind == "dcmtk":
        elapsed = t1 - t0
    else:
        results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        if any(r["bad"] for r in results):
            raise RuntimeError(f"failed C-STOREs: {results}")
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    senders = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return {"rate": n / elapsed, "listener_cpu": (variant.cpu_s() - cpu0) / n, "sender_cpu": senders / n,
            "busy": busy}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=384,
                    help="instances per measurement (default %(default)s: with 96, the senders' start-up and "
                         "association set-up, which embed's own rate does not include, weigh about 10%%)")
    ap.add_argument("--model", default="imagenet-effnet-lite0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--senders", nargs="+", default=["dcmtk", "pynetdicom"], choices=["dcmtk", "pynetdicom"])
    ap.add_argument("--pdu", nargs="+", type=int, default=[4 * 2**20],
                    help="the listener's maximum PDU sizes to compare (default %(default)s)")
    ap.add_argument("--baseline", type=Path, default=None, help="also run the listener of this source tree")
    ap.add_argument("--env-variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="also run this tree's listener (first --pdu) with these environment variables, e.g. "
                         "team:CXR_EMBED_MODEL_THREADS=0,CXR_EMBED_CPU_WORKERS=0 (the model on one OpenMP team)")
    return ap.parse_args()


def listener_variants(args: argparse.Namespace) -> list[Variant]:
    out = [Variant(f"pdu{p}", ROOT, ["--max-pdu", str(p)]) for p in args.pdu]
    for spec in args.env_variant:
        name, _, assignments = spec.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        out.append(Variant(name, ROOT, ["--max-pdu", str(args.pdu[0])], env))
    if args.baseline:
        out.append(Variant("baseline", args.baseline.resolve(), []))
    return out


def main() -> None:
    args = parse_args()
    variants = listener_variants(args)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sender_py = tmp / "sender.py"
        sender_py.write_text(SENDER)
        try:
            for v in variants:
                v.start(tmp, args.model)
                send(v, args.senders[0], 4, 1, sender_py)  # warm-up: first batches, first commits
            for r in range(args.rounds):
                machine0 = machine_cpu()
                embed, embed_cpu = embed_rate(tmp, args.n, args.model)
                print(f"round {r + 1}: embed {embed:.2f} img/s, {embed_cpu:.3f} CPU s per image (machine busy "
                      f"{busy_since(machine0):.0%} over the whole command, model load included)", flush=True)
                for kind in args.senders:
                    for k in (1, 4):
                        # innermost: the variants compared back to back, in turns (the first run after
                        # `embed` was measured slower whichever variant it was)
                        for v in (variants if r % 2 == 0 else variants[::-1]):
                            m = send(v, kind, args.n, k, sender_py)
                            # the most this listener could do here: every core busy with it and its senders
                            ceiling = os.cpu_count() / (m["listener_cpu"] + m["sender_cpu"])
                            print(f"  {kind:>10} senders, {k} association(s), {v.name:>12}: {m['rate']:6.2f} inst/s "
                                  f"({m['rate'] / embed:.2f}x embed); CPU s per instance: listener "
                                  f"{m['listener_cpu']:.3f}, senders {m['sender_cpu']:.3f}; machine busy {m['busy']:.0%}; "
                                  f"all cores busy would give {ceiling / embed:.2f}x", flush=True)
        finally:
            for v in variants:
                if v.proc is not None:
                    v.proc.terminate()
                    v.proc.wait(60)


if __name__ == "__main__":
    main()
