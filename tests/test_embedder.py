import numpy as np
import pytest

from cxr_embed import InputError


def test_embeddings_are_float32_and_deterministic(embedder, samples):
    paths = sorted(samples.glob("*.jpg"))
    a = embedder.embed(paths)
    b = embedder.embed(paths)
    assert a.dtype == np.float32 and a.shape == (len(paths), 1280)
    assert np.array_equal(a, b)
    assert np.linalg.norm(a - a[0], axis=1)[1:].min() > 0  # different images, different embeddings


def test_paths_bytes_and_arrays_agree(embedder, samples):
    from PIL import Image

    path = sorted(samples.glob("*.jpg"))[0]
    arr = np.asarray(Image.open(path).convert("L"))
    e = embedder.embed([path, path.read_bytes(), arr])
    np.testing.assert_allclose(e[0], e[1], rtol=0, atol=0)
    np.testing.assert_allclose(e[0], e[2], atol=1e-5)


def test_lossless_dicoms_embed_identically(embedder, dcm_dir):
    e = embedder.embed([dcm_dir / "RG1_UNCR.dcm", dcm_dir / "RG1_J2KR.dcm"])
    assert np.array_equal(e[0], e[1])


def test_bad_input_is_reported_per_item(embedder, samples, dcm_dir):
    good = sorted(samples.glob("*.jpg"))[0]
    results = list(embedder.iter_embed([("a", good), ("b", b"garbage bytes" * 20), ("c", dcm_dir / "liver.dcm")]))
    assert [r.key for r in results] == ["a", "b", "c"]
    assert results[0].error is None and results[0].embedding.shape == (1280,)
    assert results[1].error.code == "not_an_image" and results[2].error.code == "multi_frame"
    with pytest.raises(InputError):
        embedder.embed([good, b"garbage bytes" * 20])
