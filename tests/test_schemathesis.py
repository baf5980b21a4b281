"""Schemathesis against the real service's own OpenAPI schema: whatever it generates from the
documented routes, bodies and parameters, the server answers without a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from servers import Server

pytestmark = pytest.mark.slow

# Bodies of our image media types: random bytes, and random bytes behind each format's magic number
for media_type, magic in (("application/dicom", b"\x00" * 128 + b"DICM"), ("image/png", b"\x89PNG\r\n\x1a\n"),
                          ("image/jpeg", b"\xff\xd8\xff")):
    schemathesis.openapi.media_type(media_type, st.one_of(st.binary(max_size=2048),
                                                          st.binary(max_size=2048).map(lambda b, m=magic: m + b)))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, probe_dir_for_fuzz):
    srv = Server(tmp_path_factory.mktemp("fuzz"), ["--model", "imagenet-effnet-lite0", "--probes", str(probe_dir_for_fuzz)],
                 env={"CXR_EMBED_MAX_QUEUE": "64"})
    yield schemathesis.openapi.from_url(srv.url + "/openapi.json")
    srv.stop()


@pytest.fixture(scope="module")
def probe_dir_for_fuzz(tb_store, shared, tmp_path_factory):
    from cxr_embed import Store, read_labels
    from probes import save_probe, train_probe

    store, table = Store(tb_store), read_labels(shared / "tasks" / "tb_shenzhen_mc.csv", require_split=True)
    rows = table.rows_in(store, "train", "store")
    d = tmp_path_factory.mktemp("fuzz-probes")
    save_probe(train_probe(store.get([table.images[i] for i in rows]), table.y[rows], identity=store.identity), d / "tb.json")
    return d


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
