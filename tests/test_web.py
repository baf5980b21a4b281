"""The web page at / and the offline /docs, in a real browser (Debian's chromium driven by Playwright)
against a real `cxr-embed serve` with a bearer token, a probe and a store.

Skipped only where no browser can be had; with CI set (CI installs chromium) that is a failure."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from servers import Server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "web-s3cret"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "web-page.png"  # rewritten by UPDATE_SCREENSHOT=1 python3 -m pytest tests/test_web.py


def _no_browser_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not importable (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"no browser at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _no_browser_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


def _variants(path: Path) -> list[Image.Image]:
    im = Image.open(path).convert("L")
    w, h = im.size
    return [im, ImageOps.mirror(im), im.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
            im.crop((w // 10, 0, w, h - h // 10)), im.rotate(4)]


@pytest.fixture(scope="module")
def web_server(samples, embedder, tmp_path_factory):
    """The NIH samples as the store; an 'ap_view' probe trained on 5 variants of each (AP = 1)."""
    from cxr_embed.cli import main
    from probes import save_probe, train_probe

    tmp = tmp_path_factory.mktemp("web")
    assert main(["embed", "--images", str(samples / "samples.csv"), "--out", str(tmp / "nih.h5"),
                 "--model", "imagenet-effnet-lite0", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(samples / "samples.csv")))
    images = [v for r in rows for v in _variants(samples / r["image"])]
    labels = np.repeat([int(r["label"]) for r in rows], 5)
    (tmp / "probes").mkdir()
    save_probe(train_probe(embedder.embed(images), labels, kind="linear", identity=embedder.identity),
               tmp / "probes" / "ap_view.json")
    srv = Server(tmp, ["--model", "imagenet-effnet-lite0", "--probes", str(tmp / "probes"), "--store", str(tmp / "nih.h5")],
                 env={"CXR_EMBED_TOKEN": TOKEN, "CXR_EMBED_SEARCH_METADATA": "view"})
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.requested, pg.errors = [], []
    pg.on("request", lambda r: pg.requested.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if "Content Security Policy" in m.text else None)
    yield pg
    context.close()


def _assert_all_local(pg, server):
    # blob: URLs are the page's own images, made in the browser from what the server sent
    outside = [u for u in pg.requested if not u.startswith((server.url + "/", f"blob:{server.url}/"))]
    assert pg.requested and not outside, outside
    assert not pg.errors, pg.errors


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, format="JPEG")
    return path


def _card(pg, name: str):
    return pg.locator(".card", has=pg.locator(".name", has_text=name))


def _api_predict(server, path: Path) -> dict:
    r = httpx.post(server.url + "/predict", files={"files": (path.name, path.read_bytes())},
                   headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    return r.json()["results"][0]


def test_page_shows_what_the_model_saw_scores_verdicts_and_neighbours(page, web_server, dcm_dir, photo, tmp_path):
    from playwright.sync_api import expect

    srv, chest, cine = web_server, dcm_dir / "RG1_UNCR.dcm", dcm_dir / "liver.dcm"
    assert httpx.get(srv.url + "/info").status_code == 401  # the API still needs the token
    page.goto(srv.url + "/")
    page.get_by_text("needs its access token").wait_for(timeout=30_000)
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.get_by_text("Ready: 1 probe(s) (ap_view), a store of 6 images").wait_for(timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('cxr-embed-token')") == TOKEN

    page.set_input_files("#files", [str(chest), str(photo), str(cine)])
    expect(page.locator(".card:not([data-state=busy])")).to_have_count(3, timeout=120_000)

    card = _card(page, "RG1_UNCR.dcm")
    expected = _api_predict(srv, chest)["scores"]["ap_view"]
    assert card.get_attribute("data-state") == "done"
    assert card.locator(".verdict.ok").inner_text().startswith("Frontal chest radiograph")
    row = card.locator("tr[data-probe=ap_view]").inner_text()
    assert f"{expected['probability']:.3f}" in row and f"{expected['threshold']:.3f}" in row
    assert "(unreliable)" not in row and "CR · CHEST · PA · 1841×1955 px" in card.locator(".findings").inner_text()
    assert card.locator(".preview img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [224, 224]
    neighbours = card.locator(".neighbours tbody tr").all_inner_texts()
    names = {r["image"] for r in csv.DictReader(open(ROOT / "tests" / "data" / "nih" / "samples.csv"))}
    assert len(neighbours) == 5 and all(n.split(" ")[0].split("\t")[0] in names for n in neighbours)
    assert all("view=" in n for n in neighbours)  # the one metadata field this server exposes

    cat = _card(page, "chelsea.jpg")
    reasons = _api_predict(srv, photo)["chest_check"]["reasons"]
    verdict = cat.locator(".verdict.bad").inner_text()
    assert verdict.startswith("Not a frontal chest radiograph") and reasons and reasons[0] in verdict
    assert "(unreliable)" in cat.locator("tr[data-probe=ap_view]").inner_text()
    assert cat.locator(".preview img").evaluate("img => img.naturalWidth") == 224

    bad = _card(page, "liver.dcm")
    assert bad.get_attribute("data-state") == "failed"
    assert "multi-frame DICOM (3 frames)" in bad.locator(".errors").inner_text()
    assert "HTTP 422" in bad.locator(".errors").inner_text()
    assert bad.locator(".preview img").evaluate("img => img.naturalWidth") == 0

    shot = tmp_path / "web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1100
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(shot, SCREENSHOT)
    _assert_all_local(page, srv)


def test_docs_work_offline_and_upload_a_dicom(page, web_server, dcm_dir):
    srv = web_server
    html = httpx.get(srv.url + "/docs").text  # no token needed for the docs
    assert "static/docs/swagger-ui-bundle.js" in html and "http" not in html.replace(srv.url, "")
    page.goto(srv.url + "/docs")
    op = page.locator("#operations-default-predict_predict_post")
    op.locator(".opblock-summary").click()
    op.locator("select.content-type").first.select_option("multipart/form-data")
    files = op.locator("tr[data-property-name=files] input[type=file]")
    assert files.count() == 1
    # the token, through Swagger UI's own Authorize dialog
    page.locator(".auth-wrapper .authorize").click()
    page.locator(".modal-ux input").fill(TOKEN)
    page.locator(".modal-ux .auth-btn-wrapper .authorize").click()
    page.locator(".modal-ux .btn-done").click()
    files.set_input_files(str(dcm_dir / "RG1_UNCR.dcm"))
    op.locator(".execute").click()
    response = op.locator(".live-responses-table .response")
    response.first.wait_for(timeout=60_000)
    assert response.locator(".response-col_status").first.inner_text().strip() == "200"
    assert '"ap_view"' in response.locator(".microlight, pre").first.inner_text()
    assert any(u.endswith("/static/docs/swagger-ui.css") for u in page.requested)
    _assert_all_local(page, srv)
