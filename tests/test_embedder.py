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


def test_batches_in_cpu_chunks_match_single_images(embedder, samples):
    from cxr_embed.embedder import CPU_CHUNK

    paths = sorted(samples.glob("*.jpg"))
    tensors = [embedder.prepare(p)[0] for p in paths]
    assert len(tensors) > CPU_CHUNK  # the batch is split
    whole = embedder.forward(np.stack(tensors))
    single = np.concatenate([embedder.forward(t[None]) for t in tensors])
    np.testing.assert_allclose(whole, single, atol=1e-4)


def test_decoding_threads_run_torch_on_one_thread(embedder, samples):
    """Only the model's thread may own a multi-threaded torch team (cxr_embed/threads.py)."""
    import torch

    from cxr_embed.threads import decode_pool

    before = torch.get_num_threads()
    with decode_pool(2) as pool:
        counts = list(pool.map(lambda _: torch.get_num_threads(), range(4)))
    assert counts == [1, 1, 1, 1]
    embedder.embed([sorted(samples.glob("*.jpg"))[0]])
    assert torch.get_num_threads() == before == embedder.runtime.threads
