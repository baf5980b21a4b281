"""The one runtime: batches, shared CPU workers and the chest check give each image what it gets alone."""

import numpy as np
import pytest

from cxr_embed.runtime import Runtime, RuntimeSettings


@pytest.mark.parametrize("cpu_workers", [1, 2])
def test_engine_batches_match_single_images(samples, dcm_dir, cpu_workers):
    """A batch, whether run on one team of threads in CPU chunks or shared among single-threaded
    workers, with the chest check on some images only, gives each image what it gets alone."""
    import threading


    rt = Runtime(RuntimeSettings(image_check="always", cpu_chunk=4, cpu_workers=cpu_workers))
    assert rt.workers == cpu_workers
    try:
        files = sorted(samples.glob("*.jpg")) + [dcm_dir / "RG1_UNCR.dcm"]
        x = np.stack([rt.prepare(p.read_bytes()).tensor for p in files])
        wants = [i % 3 != 1 for i in range(len(files))]
        helper_threads = set()
        if cpu_workers > 1:  # the helper really takes part
            original = rt.network  # the model as the runtime calls it (eager, or its TorchScript copy)

            def spy(*args, **kw):
                helper_threads.add(threading.current_thread().name)
                return original(*args, **kw)

            rt.network = spy
        embs, checks = rt.forward(x, wants)
        assert len(helper_threads) == (2 if cpu_workers > 1 else 0)
        for i in range(len(files)):
            e1, c1 = rt.forward(x[i : i + 1], [True])
            np.testing.assert_allclose(embs[i], e1[0], atol=1e-4)
            if wants[i]:
                np.testing.assert_allclose(checks[i], c1[0], atol=1e-4)
            else:
                assert checks[i] is None
    finally:
        rt.close()
