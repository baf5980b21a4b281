"""The real service: uvicorn in a subprocess on 127.0.0.1, called over HTTP with httpx."""

import base64
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_embed import Store
from probes import save_probe, train_probe
from cxr_embed.labels import read_labels
from servers import Server, free_port as _free_port


@pytest.fixture(scope="module")
def probe_dir(tb_store, shared, tmp_path_factory):
    store = Store(tb_store)
    table = read_labels(shared / "tasks" / "tb_shenzhen_mc.csv", require_split=True)
    tr = [i for i, s in enumerate(table.splits) if s == "train"]
    X = store.get([table.images[i] for i in tr])
    d = tmp_path_factory.mktemp("probes")
    save_probe(train_probe(X, table.labels[tr], kind="linear", identity=store.identity), d / "tb.json")
    save_probe(train_probe(X, table.labels[tr], kind="gbm", identity=store.identity), d / "tb-gbm.json")
    return d


@pytest.fixture(scope="module")
def server(probe_dir, tb_store, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("srv"),
                 ["--model", "imagenet-effnet-lite0", "--probes", str(probe_dir), "--store", str(tb_store)],
                 env={"CXR_EMBED_MAX_BODY_BYTES": str(8 * 1024 * 1024), "CXR_EMBED_MAX_FILES": "4",
                      "CXR_EMBED_MAX_QUEUE": "6", "CXR_EMBED_MAX_BATCH": "4",
                      "CXR_EMBED_SEARCH_METADATA": "label"})
    yield srv
    srv.stop()


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def post(server, path, data, ctype="application/dicom", **kw):
    return httpx.post(server.url + path, content=data, headers={"content-type": ctype}, timeout=60, **kw)


def test_health_ready_info_docs(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    info = httpx.get(server.url + "/info").json()
    assert info["model"]["model_name"] == "imagenet-effnet-lite0" and info["model"]["dim"] == 1280
    assert set(info["probes"]) == {"tb", "tb-gbm"} and info["limits"]["max_files"] == 4
    assert info["store"]["images"] == 326
    assert info["chest_check"]["policy"] == "auto" and info["chest_check"]["by_image"]
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/embed" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_embed_real_chest_dicom(server, dcm_dir):
    r = post(server, "/embed", (dcm_dir / "RG1_UNCR.dcm").read_bytes())
    assert r.status_code == 200
    body = r.json()
    res = body["results"][0]
    assert res["ok"] and len(res["embedding"]) == 1280
    assert body["model"]["weights_hash"] and body["model"]["preprocess_version"].startswith("cxr-pre-v1")
    f = res["findings"]
    assert f["modality"] == "CR" and f["view_position"] == "PA" and f["body_part"] == "CHEST"
    assert f["original_size"] == [1955, 1841]
    assert res["chest_check"]["is_frontal_cxr"] and "warning" not in res
    # default policy "auto": tags that say CR, CHEST and PA are trusted; the check network is not run
    assert res["chest_check"]["checked_by"] == ["dicom_tags"] and res["chest_check"]["nearest_reference_similarity"] is None
    s = res["scores"]["tb"]
    assert 0 <= s["probability"] <= 1 and 0 < s["threshold"] < 1 and isinstance(s["positive"], bool)
    assert s["reliable"] is True and set(res["scores"]) == {"tb", "tb-gbm"}
    # the same file, base64 float32
    b = post(server, "/embed?encoding=base64", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).json()["results"][0]
    vec = np.frombuffer(base64.b64decode(b["embedding_base64"]), "<f4")
    np.testing.assert_allclose(vec, res["embedding"], atol=1e-5)


def test_no_patient_data_in_logs_or_replies(server, dcm_dir):
    ds = pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")
    secrets = [str(v) for v in (ds.get("PatientName"), ds.get("PatientID"), ds.get("PatientBirthDate")) if v]
    text = post(server, "/embed", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).text
    log = server.log_path.read_text(errors="replace")
    for s in secrets:
        assert s not in text and s not in log


def test_not_a_chest_radiograph_is_flagged(server, dcm_dir, samples):
    from skimage import data

    cases = {
        "tibia": (dcm_dir / "RG3_UNCR.dcm").read_bytes(),
        "ct": (dcm_dir / "693_UNCR.dcm").read_bytes(),
        "ultrasound": (dcm_dir / "US1_UNCR.dcm").read_bytes(),
    }
    for name, data_ in cases.items():
        res = post(server, "/embed", data_).json()["results"][0]
        assert res["ok"] and not res["chest_check"]["is_frontal_cxr"], name
        assert res["chest_check"]["checked_by"] == ["dicom_tags", "image"], name  # tags do not confirm: image too
        assert "unreliable" in res["warning"] and res["scores"]["tb"]["reliable"] is False
    tibia = post(server, "/predict", cases["tibia"]).json()["results"][0]
    assert any("EXTREMITY" in r for r in tibia["chest_check"]["reasons"])
    cat = post(server, "/embed", _png(data.chelsea()), "image/png").json()["results"][0]
    assert not cat["chest_check"]["is_frontal_cxr"] and cat["chest_check"]["checked_by"] == ["image"]
    assert "does not look like a chest radiograph" in " ".join(cat["chest_check"]["reasons"])
    for jpg in sorted(samples.glob("*.jpg")):
        res = post(server, "/embed", jpg.read_bytes(), "image/jpeg").json()["results"][0]
        assert res["chest_check"]["is_frontal_cxr"], (jpg.name, res["chest_check"])
        assert res["chest_check"]["nearest_reference_similarity"] >= res["chest_check"]["reference_threshold"]


def test_multipart_reports_errors_per_image(server, dcm_dir, samples):
    jpg = sorted(samples.glob("*.jpg"))[0]
    files = [("files", ("chest.dcm", (dcm_dir / "RG1_J2KR.dcm").read_bytes(), "application/dicom")),
             ("files", ("junk.bin", b"not an image at all" * 10, "application/octet-stream")),
             ("files", ("cine.dcm", (dcm_dir / "liver.dcm").read_bytes(), "application/dicom")),
             ("files", (jpg.name, jpg.read_bytes(), "image/jpeg"))]
    r = httpx.post(server.url + "/embed", files=files, timeout=60)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["ok"] for x in res] == [True, False, False, True]
    assert res[1]["error"]["code"] == "not_an_image" and res[1]["filename"] == "junk.bin"
    assert res[2]["error"]["code"] == "multi_frame" and res[2]["error"]["status"] == 422
    # lossless JPEG 2000 in a multipart form = the uncompressed file sent raw
    raw = post(server, "/embed", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).json()["results"][0]["embedding"]
    np.testing.assert_allclose(res[0]["embedding"], raw, atol=1e-5)


@pytest.mark.parametrize("data, ctype, status, code", [
    (b"hello", "text/plain", 415, "unsupported_media_type"),
    (b"{}", "application/json", 415, "unsupported_media_type"),
    (b"", "application/dicom", 400, "empty_input"),
    (b"this is not a dicom file" * 40, "application/dicom", 400, "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png", 400, "truncated_or_corrupt"),
])
def test_bad_requests(server, data, ctype, status, code):
    r = post(server, "/embed", data, ctype)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert " at 0x" not in r.json()["error"]["message"]  # Pillow's text named its stream, with an address


def test_every_error_has_the_documented_shape(server, samples):
    """FastAPI's own replies ({"detail": ...}) for a bad query parameter, an unknown route or method
    took the place of the documented {"error": {"code", "message"}} (found by an attacker review)."""
    jpg = next(samples.glob("*.jpg")).read_bytes()
    cases = [(httpx.post(server.url + "/search?k=0", content=jpg, headers={"content-type": "image/jpeg"}), 422,
              "invalid_parameter", "k: "),
             (post(server, "/embed?encoding=bogus", jpg, "image/jpeg"), 422, "invalid_parameter", "encoding: "),
             (httpx.get(server.url + "/embed"), 405, "method_not_allowed", "GET is not allowed on /embed"),
             (httpx.get(server.url + "/no/such/route"), 404, "not_found", "no route /no/such/route")]
    for r, status, code, message in cases:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["message"].startswith(message), r.text


def test_missing_content_type_is_415(server):
    r = httpx.post(server.url + "/embed", content=b"\x00" * 10, headers={"content-type": ""})
    assert r.status_code == 415


def test_dicom_problems_are_422(server, dcm_dir):
    assert post(server, "/embed", (dcm_dir / "emri_small_RLE.dcm").read_bytes()).status_code == 422
    assert post(server, "/embed", (dcm_dir / "SC_rgb.dcm").read_bytes()).json()["error"]["code"] == "image_too_small"
    ds = pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")
    del ds.PixelData
    del ds.Rows
    buf = io.BytesIO()
    ds.save_as(buf)
    r = post(server, "/embed", buf.getvalue())
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_pixel_data"
    data = (dcm_dir / "RG1_UNCR.dcm").read_bytes()
    assert post(server, "/embed", data[: len(data) // 3]).status_code == 400  # truncated


def test_limits_413(server, dcm_dir, samples):
    r = post(server, "/embed", b"\x00" * (9 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    jpg = sorted(samples.glob("*.jpg"))[0].read_bytes()
    files = [("files", (f"{i}.jpg", jpg, "image/jpeg")) for i in range(5)]
    r = httpx.post(server.url + "/embed", files=files, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"


def test_predict_and_search(server, dcm_dir, samples):
    r = post(server, "/predict?probes=tb", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).json()["results"][0]
    assert "embedding" not in r and set(r["scores"]) == {"tb"}
    assert post(server, "/predict?probes=nope", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).status_code == 404
    long = post(server, "/predict?probes=" + "z" * 10_000 + "%00", (dcm_dir / "RG1_UNCR.dcm").read_bytes())
    message = long.json()["error"]["message"]  # a request's text is not echoed whole, nor its control characters
    assert long.status_code == 404 and len(message) < 300 and "\x00" not in message and "'zzz" in message
    jpg = sorted(samples.glob("*.jpg"))[0].read_bytes()
    s = post(server, "/search?k=3", jpg, "image/jpeg").json()["results"][0]
    assert len(s["neighbours"]) == 3
    n = s["neighbours"][0]
    # only the metadata the owner exposed (the store also holds patient_id, split, findings ...)
    assert n["image_id"].startswith("images/") and -1 <= n["similarity"] <= 1 and set(n["metadata"]) == {"label"}


def test_concurrent_burst_only_200_or_429(server, samples):
    jpgs = [p.read_bytes() for p in sorted(samples.glob("*.jpg"))]

    def one(i):
        files = [("files", (f"{j}.jpg", jpgs[(i + j) % len(jpgs)], "image/jpeg")) for j in range(3)]
        return httpx.post(server.url + "/embed", files=files, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(32)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1
    for r in replies:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'cxr_embed_requests_total{route="/embed",method="POST",status="200"}' in metrics
    assert "cxr_embed_queue_depth" in metrics and "cxr_embed_request_seconds_bucket" in metrics
    assert httpx.get(server.url + "/health").status_code == 200  # the worker survived


def test_bearer_token(tmp_path, samples):
    srv = Server(tmp_path, ["--model", "imagenet-effnet-lite0"], env={"CXR_EMBED_TOKEN": "s3cret"})
    try:
        jpg = sorted(samples.glob("*.jpg"))[0].read_bytes()
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/info").status_code == 401
        assert post(srv, "/embed", jpg, "image/jpeg").status_code == 401
        ok = httpx.post(
            srv.url + "/embed", content=jpg, headers={"content-type": "image/jpeg", "authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["results"][0]["ok"]
    finally:
        srv.stop()


def test_probe_of_another_model_refused_at_start(probe_dir):
    proc = subprocess.run([sys.executable, "-m", "cxr_embed", "serve", "--port", str(_free_port()),
                           "--probes", str(probe_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "different model" in proc.stderr and "tb" in proc.stderr


def test_a_probes_path_that_does_not_exist_is_refused_before_the_model_loads(tmp_path):
    for command in (["serve", "--port", str(_free_port())], ["listen", "--port", str(_free_port()), "--out",
                                                             str(tmp_path / "s.h5")]):
        proc = subprocess.run([sys.executable, "-m", "cxr_embed", *command, "--probes", str(tmp_path / "nope")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"--probes {tmp_path / 'nope'}: no such file or folder" in proc.stderr
        assert "loading" not in proc.stdout + proc.stderr and not (tmp_path / "s.h5").exists()


def test_ready_is_503_until_loaded():
    """In process, before the engine has loaded: /health up, /ready and work routes 503 with Retry-After."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.engine import Engine
    from service.settings import ServiceSettings

    settings = ServiceSettings.from_env({}, model="imagenet-effnet-lite0")
    client = TestClient(create_app(settings, Engine(settings)))  # no lifespan: nothing loads
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["status"] == "loading"
    r = client.post("/predict?probes=x", content=b"\xff\xd8\xff" + b"\x00" * 300, headers={"content-type": "image/jpeg"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert client.get("/info").status_code == 503


def test_settings_from_environment():
    from service.settings import ServiceSettings

    s = ServiceSettings.from_env({"CXR_EMBED_MAX_FILES": "3", "CXR_EMBED_BATCH_WAIT_MS": "2.5", "CXR_EMBED_TOKEN": "t"})
    assert s.max_files == 3 and s.batch_wait_ms == 2.5 and s.token == "t"
    with pytest.raises(ValueError, match="CXR_EMBED_MAX_QUEUE"):
        ServiceSettings.from_env({"CXR_EMBED_MAX_QUEUE": "lots"})
    assert s.image_check == "auto" and s.search_metadata == ()  # /search: ids and distances only by default
    assert ServiceSettings.from_env({"CXR_EMBED_SEARCH_METADATA": "label, view"}).search_metadata == ("label", "view")
    assert ServiceSettings.from_env({"CXR_EMBED_IMAGE_CHECK": "0"}).image_check == "never"  # the old on/off values
    assert ServiceSettings.from_env({"CXR_EMBED_IMAGE_CHECK": "Always"}).image_check == "always"
    with pytest.raises(ValueError, match="auto, always, never"):
        ServiceSettings.from_env({"CXR_EMBED_IMAGE_CHECK": "maybe"})


def _photo_tagged_as_chest(dcm_dir) -> bytes:
    """RG1_UNCR's header (CR, CHEST, PA) around a photograph of a cat: tags that lie."""
    from skimage import color, data, transform

    ds = pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")
    grey = transform.resize(color.rgb2gray(data.chelsea()), (600, 800), anti_aliasing=True)
    arr = (grey * 4000).astype(np.uint16)
    for tag in ("WindowCenter", "WindowWidth", "VOILUTSequence", "WindowCenterWidthExplanation"):
        if tag in ds:
            delattr(ds, tag)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize("policy, flagged, checked_by", [
    ("auto", False, ["dicom_tags"]),          # complete chest tags are trusted (documented)
    ("always", True, ["dicom_tags", "image"]),  # the image check sees the cat anyway
    ("never", False, ["dicom_tags"]),
])
def test_image_check_policies_on_a_dicom_whose_tags_lie(dcm_dir, policy, flagged, checked_by):
    import asyncio

    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings.build(image_check=policy))
    engine.load()
    try:
        lying, real = _photo_tagged_as_chest(dcm_dir), (dcm_dir / "RG1_UNCR.dcm").read_bytes()
        res = asyncio.run(engine.process([("cat.dcm", lying), ("chest.dcm", real)]))
    finally:
        engine.close()
    cat, chest = res
    assert cat.error is None and cat.info.body_part == "CHEST"
    assert cat.chest.is_frontal_cxr is (not flagged) and cat.chest.checked_by == checked_by
    if flagged:
        assert "does not look like a chest radiograph" in cat.chest.reasons[0]
    assert chest.chest.is_frontal_cxr and chest.chest.checked_by == checked_by
    assert (engine.runtime.check_model is None) is (policy == "never")


def test_a_failing_helper_fails_its_batch_not_the_batcher(samples):
    """A model error in a helper thread reaches the batch's requests; the next batch runs."""
    import asyncio
    import threading
    import time

    from service.engine import Engine
    from service.settings import ServiceSettings

    # one batcher whose batches the helper shares (with one model thread, auto would give each worker its own)
    engine = Engine(ServiceSettings.build(image_check="always", cpu_workers=2, model_workers=1))
    engine.load()
    try:
        jpgs = [("a.jpg", p.read_bytes()) for p in sorted(samples.glob("*.jpg"))[:4]]
        original = engine.runtime.check_network  # the check network as the runtime calls it

        def broken(x):
            if threading.current_thread().name.startswith("cxr-model"):  # the helper, not the batcher
                raise RuntimeError("simulated failure in the check network")
            time.sleep(0.3)  # the batcher dawdles: the helper surely takes a check call meanwhile
            return original(x)

        engine.runtime.check_network = broken
        with pytest.raises(RuntimeError, match="simulated failure"):
            asyncio.run(engine.process(jpgs))
        engine.runtime.check_network = original
        results = asyncio.run(engine.process(jpgs))
        assert all(r.error is None and r.embedding is not None and r.chest.checked_by == ["image"] for r in results)
    finally:
        engine.close()


def test_parallel_model_workers_run_a_second_image_while_the_first_runs(samples):
    """With the model on single-threaded CPU workers (the listener's default), each worker is a batcher
    of its own: an image queued while another one's forward pass runs starts at once on the other
    worker instead of waiting for it (one batcher would make it wait: the first call holds until the
    second starts, so this fails there); each image gets what it gets alone; model_workers=1 keeps one
    batcher."""
    import threading

    from cxr_embed.errors import ConfigError
    from service.engine import Engine
    from service.settings import ServiceSettings

    with pytest.raises(ConfigError, match="MODEL_WORKERS"):
        ServiceSettings.build(model_workers=-1)
    engine = Engine(ServiceSettings.build(image_check="always", model_threads=1, cpu_workers=2))
    engine.load()
    original = engine.runtime.network  # the model as the runtime calls it (eager, or its TorchScript copy)
    try:
        assert engine.model_workers == 2
        jpgs = sorted(samples.glob("*.jpg"))[:2]
        prepared = [engine.prepare(p.read_bytes()) for p in jpgs]
        alone = [engine.runtime.forward(p.tensor[None], [True], shared=False) for p in prepared]
        started, overlap, threads, overlapped = threading.Event(), threading.Event(), set(), []

        def held(x):
            threads.add(threading.current_thread().name)
            if not started.is_set():  # the first call waits (bounded) for a second call on another thread
                started.set()
                overlapped.append(overlap.wait(20))
            else:
                overlap.set()
            return original(x)

        engine.runtime.network = held
        first = engine.submit(prepared[0])
        assert started.wait(20)
        second = engine.submit(prepared[1])
        results = [first.result(60), second.result(60)]
        assert overlapped == [True] and len(threads) == 2  # the second ran while the first was held
        assert all(t.startswith("cxr-batcher") for t in threads)  # each on its worker, no batch shared with helpers
        for (emb, check), (emb1, check1) in zip(results, alone):
            np.testing.assert_allclose(emb, emb1[0], atol=1e-4)
            np.testing.assert_allclose(check, check1[0], atol=1e-4)
        assert engine.images_embedded == 2 and engine.queue_depth == 0
    finally:
        engine.runtime.network = original
        engine.close()
    one = Engine(ServiceSettings.build(image_check="never", model_threads=1, cpu_workers=2, model_workers=1))
    team = Engine(ServiceSettings.build(image_check="never"))  # the service's default: one team, one batcher
    for engine in (one, team):
        engine.load()
        try:
            assert engine.model_workers == 1 and len(engine._workers) == 1
        finally:
            engine.close()


def test_malloc_tuning_applies_once_and_can_be_turned_off():
    """glibc keeps freed buffers (allocator.py); CXR_EMBED_MALLOC_TUNING=0 leaves malloc alone."""
    code = ("from cxr_embed.allocator import keep_freed_memory as k; "
            "import platform; print(k(), k(), platform.libc_ver()[0])")
    for value, expected in (("1", "True"), ("0", "False"), (" Off ", "False"), ("yes", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "CXR_EMBED_MALLOC_TUNING": value}).stdout.split()
        if out[2] != "glibc":
            pytest.skip("malloc tuning is for glibc only")
        assert out[:2] == [expected, expected]


def test_a_flag_that_is_not_one_is_refused_by_name():
    """A typo in an on/off variable is a typed error naming it, never a silent on or off: the same
    parser for the allocator's flag (read before any command runs) and the service's settings."""
    from cxr_embed.errors import ConfigError
    from service.settings import ServiceSettings

    env = {**os.environ, "CXR_EMBED_MALLOC_TUNING": "flase"}
    run = subprocess.run([sys.executable, "-m", "cxr_embed", "models"], capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    assert "CXR_EMBED_MALLOC_TUNING='flase'" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ConfigError, match="CXR_EMBED_TORCHSCRIPT='maybe'"):
        ServiceSettings.from_env({"CXR_EMBED_TORCHSCRIPT": "maybe"})
    assert ServiceSettings.from_env({"CXR_EMBED_TORCHSCRIPT": "OFF"}).runtime.torchscript is False


def test_embed_route_equals_the_embed_command(server, dcm_dir, tmp_path):
    """One runtime: the service's embedding of a DICOM is the one `cxr-embed embed` stores."""
    from cxr_embed.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "chest.dcm").write_bytes((dcm_dir / "RG1_UNCR.dcm").read_bytes())
    assert main(["embed", "--images", str(folder), "--out", str(tmp_path / "s.h5"), "--model", "imagenet-effnet-lite0",
                 "--no-progress"]) == 0
    stored = Store(tmp_path / "s.h5").get(["chest.dcm"])[0]
    reply = post(server, "/embed?encoding=base64", (dcm_dir / "RG1_UNCR.dcm").read_bytes()).json()
    served = np.frombuffer(base64.b64decode(reply["results"][0]["embedding_base64"]), "<f4")
    assert served.shape == stored.shape and np.abs(served - stored).max() <= 1e-5
    assert reply["model"] == dict(Store(tmp_path / "s.h5").identity)
