"""The one embedding runtime: decode -> preprocess -> chest check -> batched forward, on CPU or GPU.

The Python `Embedder`, `cxr-embed embed` and the service's dynamic batcher are thin callers of a
`Runtime`; a fix made here (a pixel cap, a NaN check, a thread policy) holds for all of them.

Thread policy (why: `threads.py`, BENCHMARKS.md):
- decoding runs in a small pool whose threads run torch on one thread each;
- the model runs in the thread that built the runtime, on a team of `model_threads` threads, in
  calls of `cpu_chunk` images on the CPU (past a few images per call the activations outgrow the
  caches);
- with `cpu_workers` > 1 on the CPU, a batch's model calls (main network and chest check) are
  shared by that many threads that each run torch on one thread (`_forward_shared`).
  The service's engine may instead run that many batches at once, one per thread, each on one torch
  thread (`forward(..., shared=False)`; `service/engine.py`).

Backends (`RuntimeSettings.backend`, chosen at construction; the same `forward` contract either way,
numpy arrays in and out): "torch" runs the inference copy of the model (`torch_backend.py`);
"openvino" runs its checked ONNX export (`export_onnx.py`, `openvino_backend.py`) on the CPU at an
explicit precision, on OpenVINO's own team of `model_threads` threads (so `cpu_workers` stays 1), in
calls of `OPENVINO_CHUNK` images. The chest-check network runs on the same backend as the main one
(on OpenVINO always at f32: its decisions are torch's). Decoding and preprocessing are numpy, so the
"openvino" backend runs with no PyTorch installed (a slim install: README); asking such an install
for "torch" raises MissingDependency. `describe()` says what ran; `cxr-embed embed` records it with
every embedding.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .chest import CHECK_MODEL, ChestCheck, ReferenceSet, check_chest, check_input, needs_image_check
from .errors import ConfigError, InputError, NonFiniteEmbedding
from .identity import ModelIdentity
from .image import ImageInfo
from .ingest import MAX_PIXELS, MIN_SIDE, ImageSource, load_image
from .optional import require
from .preprocess import preprocess
from .threads import decode_pool, model_threads

CPU_CHUNK = 4  # images per model call on the CPU (per image, 4 was fastest on 2 cores; 16 was 1.6x slower)
# the OpenVINO backend's best chunks on 2 cores (bench/backends.py --chunks, BENCHMARKS.md "Backends")
OPENVINO_CHUNK = {"f32": 16, "bf16": 4}
BACKENDS = ("torch", "openvino")
# cpu_workers=0 (auto): one single-threaded worker per model thread up to this many cores; beyond it
# one team of threads (Python's GIL, which every op's dispatch needs, would be shared by too many)
AUTO_CPU_WORKERS_MAX = 4
IMAGE_CHECK_POLICIES = ("auto", "always", "never")


@dataclass
class RuntimeSettings:
    """How a runtime runs: model, device, threads, chest-check policy and input limits.

    The service, `cxr-embed embed` and a DICOM listener share these (the service adds only what is
    about HTTP and batching across requests)."""

    model: str | None = None  # registered name or .safetensors path; None: the shipped default
    device: str = "auto"  # auto: cuda when available
    # "is this a frontal CXR?": auto = by DICOM tags when they say so (CR/DX, chest, AP/PA), else by the
    # image too; always = by the image too, every time; never = by DICOM tags only (no check network)
    image_check: str = "never"
    # what runs the model: "torch", or "openvino" (CPU only; the same model's ONNX export, shipped in the
    # package or cached; the only backend of a slim install, which has no torch); "auto": torch where
    # it is installed, else openvino (resolved at construction)
    backend: str = "auto"
    # arithmetic of the model: "f32", or "bf16" (openvino only, opt-in: faster, embeddings off by up to ~0.5)
    precision: str = "f32"
    model_threads: int = 0  # threads running the model; 0: torch's default (one per core)
    # torch on the CPU: run a frozen TorchScript copy of the model (exact; checked when traced), whose
    # forward pass does not take Python's GIL back after every op (torch_backend.TorchNetwork)
    torchscript: bool = True
    cpu_chunk: int = 0  # on the CPU, images per model call; 0: the backend's best (CPU_CHUNK, OPENVINO_CHUNK)
    # on the CPU, threads that share a batch's model calls, each running torch on one thread;
    # 0: auto (one per model thread on up to 4 cores, else 1); 1: one team of threads for everything
    cpu_workers: int = 1
    decode_threads: int = 2
    min_side: int = MIN_SIDE  # images with a shorter side are refused
    max_pixels: int = MAX_PIXELS  # images declaring more (rows x columns x frames x samples) are refused before decoding

    def __post_init__(self):
        if not isinstance(self.torchscript, bool):
            raise ConfigError(f"torchscript must be True or False, not {self.torchscript!r}")
        aliases = {"1": "always", "0": "never", "true": "always", "false": "never"}
        value = str(self.image_check).strip().lower()
        value = aliases.get(value, value)
        if value not in IMAGE_CHECK_POLICIES:
            raise ConfigError(f"image check policy {self.image_check!r}: expected one of {', '.join(IMAGE_CHECK_POLICIES)}")
        self.image_check = value
        for name in ("model_threads", "cpu_workers", "cpu_chunk", "decode_threads", "min_side", "max_pixels"):
            if int(getattr(self, name)) < (1 if name == "decode_threads" else 0):
                raise ConfigError(f"{name} must be a {'positive' if name == 'decode_threads' else 'non-negative'} "
                                  f"integer, not {getattr(self, name)!r}")
        self._check_backend()

    def _check_backend(self) -> None:
        self.backend, self.precision = str(self.backend).strip().lower(), str(self.precision).strip().lower()
        if self.backend == "auto":
            self.backend = default_backend(self.model)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.precision not in OPENVINO_CHUNK:
            raise ConfigError(f"precision {self.precision!r}: expected f32 (exact) or bf16 (openvino only)")
        if self.backend == "torch" and self.precision != "f32":
            raise ConfigError(f"precision {self.precision!r} needs backend 'openvino'; the torch backend runs f32")
        if self.backend == "torch" and str(self.model or "").endswith(".onnx"):
            raise ConfigError(f"model {self.model}: an ONNX export runs on backend 'openvino' (--runtime openvino)")
        if self.backend == "openvino":
            if str(self.device) not in ("auto", "cpu"):
                raise ConfigError(f"backend 'openvino' runs on the CPU, not device {self.device!r}; "
                                  "use device 'cpu' (or 'auto'), or backend 'torch'")
            if int(self.cpu_workers) > 1:
                raise ConfigError("cpu_workers > 1 is for the torch backend; OpenVINO runs its own team of "
                                  "model_threads threads: leave cpu_workers at 0 or 1")


def default_backend(model=None) -> str:
    """openvino for an ONNX export, else torch where it is installed, else openvino (a slim install
    has no torch: README)."""
    try:
        torch = importlib.util.find_spec("torch")
    except ImportError:  # an import hook that refuses it
        torch = None
    return "openvino" if str(model or "").endswith(".onnx") or torch is None else "torch"


@dataclass
class EmbeddingResult:
    """One input's outcome: an embedding and findings (and a chest check when the runtime runs
    one), or the error that stopped it."""

    key: object
    embedding: np.ndarray | None
    info: ImageInfo | None
    error: InputError | None = None
    chest: ChestCheck | None = None


@dataclass
class Prepared:
    """A decoded, preprocessed input: the model's input (a float32 array (3, S, S)) and what
    ingestion found."""

    tensor: np.ndarray | None
    info: ImageInfo | None
    error: InputError | None = None
    wants_check: bool = False


def in_chunks(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, step: int) -> np.ndarray:
    """`fn` over `x` in slices of `step` images, concatenated."""
    step = max(1, int(step))
    return np.concatenate([fn(x[i : i + step]) for i in range(0, len(x), step)])


def as_batch(x) -> np.ndarray:
    """Model inputs (N, 3, S, S) as float32 numpy: `prepare`'s arrays stacked, or a torch tensor."""
    if hasattr(x, "detach"):  # a torch tensor (only where torch is installed)
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), as torch counts them by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Runtime:
    """Models, chest-check reference and thread pools for one embedding model.

    Build it in the thread that will run the model (see the module docstring); `prepare` may be
    called from any thread, `forward` and `iter_embed` from the building thread, and
    `forward(..., shared=False)` (one torch thread, no team) from any thread."""

    def __init__(self, settings: RuntimeSettings | None = None, model=None):
        """`model`: an EmbeddingModel to run instead of `settings.model` (its inference copy is made;
        the object is left as it was)."""
        self.settings = settings = settings or RuntimeSettings()
        # self.model: what the model is (name, dim, preprocess, identity); self.network: a function
        # numpy inputs -> numpy embeddings; the same two for the chest check (None with "never")
        if settings.backend == "torch":
            self._build_torch(model)
        else:
            self._build_openvino(model)
        self.chunk = settings.cpu_chunk or (CPU_CHUNK if settings.backend == "torch" else OPENVINO_CHUNK[settings.precision])
        self.workers = 1
        if self.on_cpu and settings.backend == "torch":
            auto = self.threads if self.threads <= AUTO_CPU_WORKERS_MAX else 1
            self.workers = max(1, settings.cpu_workers or auto)
        self._helpers = decode_pool(self.workers - 1, prefix="cxr-model") if self.workers > 1 else None
        self._decode = None
        self._decode_lock = threading.Lock()

    def _build_torch(self, model) -> None:
        torch = require("torch", "the torch backend (--runtime torch)")
        from .models import create_model, inference_model
        from .torch_backend import TorchNetwork, pick_device

        self.device = pick_device(self.settings.device)
        self.on_cpu = self.device.type == "cpu"
        self.threads = self.settings.model_threads or torch.get_num_threads()
        model_threads(self.threads)
        base = model if model is not None else create_model(self.settings.model, device="cpu")
        # an inference copy (BatchNorm folded, channels_last on the CPU): the caller's model is left as it was
        self.model = inference_model(base, self.device)
        self.network = TorchNetwork(self.model, self.device, script=self.settings.torchscript)
        self.network.prepare((3, self.model.preprocess.size, self.model.preprocess.size))
        self.check_network = self.reference = self.check_model = None
        if self.settings.image_check != "never":
            self.check_model = self.model if self.model.name == CHECK_MODEL else \
                inference_model(create_model(CHECK_MODEL, device="cpu"), self.device)
            self.reference = self._reference(self.check_model)
            # one network per model: a TorchNetwork keeps a TorchScript copy per input size
            self.check_network = self.network if self.check_model is self.model else \
                TorchNetwork(self.check_model, self.device, script=self.settings.torchscript)
            self.check_network.prepare((3, self.reference.size, self.reference.size))

    def _build_openvino(self, model) -> None:
        from .openvino_backend import open_network

        self.device, self.on_cpu = "cpu", True
        self.threads = self.settings.model_threads or available_cores()
        self.network = open_network(model if model is not None else self.settings.model, self.settings.precision,
                                    self.threads)
        self.model = self.network.model  # an ExportedModel: no torch module is held
        self.check_network = self.reference = self.check_model = None
        if self.settings.image_check != "never":  # at f32 always: the check's decisions are torch's
            self.check_network = open_network(CHECK_MODEL, "f32", self.threads, size=ReferenceSet.size_for(CHECK_MODEL))
            self.check_model = self.check_network.model
            self.reference = self._reference(self.check_model)

    @staticmethod
    def _reference(check_model) -> ReferenceSet:
        reference = ReferenceSet.for_model(check_model)
        if reference is None:  # a silently disabled check would call a photograph a CXR
            raise ConfigError(f"the chest-check reference set of {CHECK_MODEL} is missing or does not match its weights "
                              f"({ReferenceSet.path_for(CHECK_MODEL)}); reinstall cxr-embed, or run with image check 'never'")
        return reference

    def describe(self) -> dict:
        """What runs the model and how: recorded with embeddings (store metadata, the service's /info)."""
        out = {"backend": self.settings.backend, "precision": self.settings.precision, "device": str(self.device),
               "threads": self.threads, "cpu_chunk": self.chunk, "cpu_workers": self.workers}
        if self.settings.backend == "torch":
            out["torch"] = sys.modules["torch"].__version__.split("+")[0]
        else:
            from .openvino_backend import openvino_version

            out.update(openvino=openvino_version(), onnx=self.network.path.name, threads=self.network.threads)
        return out

    @property
    def label(self) -> str:
        """The backend and precision in one word, e.g. "openvino/bf16"."""
        return f"{self.settings.backend}/{self.settings.precision}"

    @property
    def identity(self) -> ModelIdentity:
        return self.model.identity

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def decode_pool(self):
        """Decoding threads (torch on one thread each), started on first use and kept."""
        with self._decode_lock:
            if self._decode is None:
                self._decode = decode_pool(self.settings.decode_threads)
            return self._decode

    def close(self) -> None:
        """Stop the runtime's threads (they also stop with the process)."""
        for pool in (self._decode, self._helpers):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._decode = self._helpers = None

    # --- one input ---------------------------------------------------------------------------------

    def prepare(self, source: ImageSource) -> Prepared:
        """Decode and preprocess one input; a bad input gives a Prepared with its error, never raises."""
        try:
            decoded = load_image(source, min_side=self.settings.min_side, max_pixels=self.settings.max_pixels)
            tensor = preprocess(decoded, self.model.preprocess)
        except InputError as exc:
            return Prepared(None, None, exc)
        wants = self.reference is not None and needs_image_check(decoded.info, self.settings.image_check)
        return Prepared(tensor, decoded.info, None, wants)

    def chest_check(self, info: ImageInfo, check_embedding: np.ndarray | None) -> ChestCheck:
        """The verdict on one image: its DICOM tags, plus its check embedding when one was taken."""
        return check_chest(info, check_embedding, self.reference)

    # --- the forward pass --------------------------------------------------------------------------

    def forward(self, x, wants_check: list[bool] | None = None, shared: bool = True) -> tuple[np.ndarray, list]:
        """Embeddings of preprocessed inputs (N, 3, S, S) (numpy, or a torch tensor), and the
        chest-check embeddings of those that want one (else None). Runs in the calling thread (and
        the helpers, see `_forward_shared`); with `shared` False, in the calling thread alone, on one
        torch thread (the service's parallel model workers: `service/engine.py`)."""
        x = as_batch(x)
        wants_check = wants_check or [False] * len(x)
        step = self.chunk if self.on_cpu else len(x)
        work = [(self.network, x, step)]  # (network as a function, its input, images per call)
        idx = [i for i, w in enumerate(wants_check) if w] if self.reference is not None else []
        if idx:
            work.append((self.check_network, check_input(x[idx], self.reference.size),
                         self._check_chunk(step, x.shape[-1])))
        if shared and self.workers > 1 and len(x) + len(idx) > 1:
            outs = self._forward_shared(work)
        else:
            if self.settings.backend == "torch":
                model_threads(self.threads if shared else 1)
            outs = [in_chunks(fn, inputs, per_call) for fn, inputs, per_call in work]
        check: list = [None] * len(wants_check)
        for i, e in zip(idx, outs[1] if idx else []):
            check[i] = e
        return outs[0], check

    def _check_chunk(self, step: int, side: int) -> int:
        """Images per check-network call: as many pixels as `step` images of `side` px for the main
        model (12 at 128 px against 4 at 224 px: 2.6 instead of 3.3 ms per image; BENCHMARKS.md)."""
        return max(step, round(step * (side / self.reference.size) ** 2))

    def _forward_shared(self, work: list[tuple]) -> list[np.ndarray]:
        """`in_chunks` for each (function, input, images per call) of `work`, with the model calls
        shared among `cpu_workers` threads, each running torch on one thread: the caller and
        `cpu_workers - 1` helpers take the next call from a common list until none is left.

        On a few cores this beats one team of threads on the same calls: a team's threads wait for
        each other at every op, so when one of them is pre-empted both cores stall; single-threaded
        workers just go on (BENCHMARKS.md). Each image's embedding is the same as alone (tested)."""
        calls = []  # (which entry of work, function, input slice)
        for k, (fn, inputs, per_call) in enumerate(work):
            step = max(1, min(per_call, -(-len(inputs) // self.workers)))
            calls += [(k, fn, inputs[i : i + step]) for i in range(0, len(inputs), step)]
        results: list = [None] * len(calls)
        todo = iter(enumerate(calls))
        lock = threading.Lock()
        failed = threading.Event()  # once a call fails, the others stop taking calls

        def run_calls() -> None:
            model_threads(1)  # the helpers already are; the caller switches back for lone calls
            while not failed.is_set():
                with lock:
                    n, call = next(todo, (None, None))
                if call is None:
                    return
                try:
                    results[n] = call[1](call[2])
                except BaseException:
                    failed.set()
                    raise

        helpers = [self._helpers.submit(run_calls) for _ in range(min(self.workers, len(calls)) - 1)]
        try:
            run_calls()
        finally:
            for f in helpers:  # always wait: the next batch must not overlap with this one
                f.exception()
        for f in helpers:
            f.result()  # a helper's failure fails the batch, as the caller's own would
        return [np.concatenate([r for (k, _, _), r in zip(calls, results) if k == entry]) for entry in range(len(work))]

    # --- many inputs -------------------------------------------------------------------------------

    def iter_embed(self, items: Iterable[tuple[object, ImageSource]], batch_size: int = 32) -> Iterator[EmbeddingResult]:
        """One result per (key, source), in input order; bad inputs yield their error, not raise.

        Decoding runs in the pool ahead of the model (PIL, pydicom and numpy release the GIL for
        the heavy parts), so the CPU forward pass is rarely kept waiting."""
        for chunk in self._prepared_batches(items, max(1, int(batch_size))):
            ok = [p for _, p in chunk if p.error is None]
            embs, checks = self.forward(np.stack([p.tensor for p in ok]), [p.wants_check for p in ok]) if ok \
                else (None, None)
            j = 0
            for key, p in chunk:
                if p.error is not None:
                    yield EmbeddingResult(key, None, None, p.error)
                    continue
                emb, j = embs[j], j + 1
                if not np.isfinite(emb).all():  # never handed on as data (errors.NonFiniteEmbedding)
                    yield EmbeddingResult(key, None, p.info, NonFiniteEmbedding("the model gave a non-finite embedding"))
                    continue
                chest = self.chest_check(p.info, checks[j - 1]) if self.reference is not None else None
                yield EmbeddingResult(key, emb, p.info, None, chest)

    def _prepared_batches(self, items: Iterable[tuple[object, ImageSource]], batch_size: int):
        pending: deque[tuple[object, Future]] = deque()
        batch: list[tuple[object, Prepared]] = []
        pool, it = self.decode_pool, iter(items)
        try:
            while True:
                for key, source in it:
                    pending.append((key, pool.submit(self.prepare, source)))
                    if len(pending) >= 2 * batch_size:
                        break
                if not pending:
                    break
                key, fut = pending.popleft()
                batch.append((key, fut.result()))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:  # an abandoned iteration: drop decoding that has not started
            for _, fut in pending:
                fut.cancel()
