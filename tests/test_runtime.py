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


def _nice_of_this_thread() -> int:
    import os
    import threading

    return int(open(f"/proc/self/task/{threading.get_native_id()}/stat").read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_decoding_threads_run_at_the_niceness_asked_and_no_other_thread_does():
    """The listener's decoding threads at niceness 19 (the kernel's view, /proc), the caller's thread
    and a default pool's threads untouched; out-of-range values are refused."""
    from cxr_embed.errors import ConfigError
    from cxr_embed.threads import decode_pool
    from service.listener import listener_service_settings

    before = _nice_of_this_thread()
    with decode_pool(2, nice=19) as pool:
        assert {pool.submit(_nice_of_this_thread).result() for _ in range(8)} == {19}
    with decode_pool(2) as pool:
        assert pool.submit(_nice_of_this_thread).result() == before
    assert _nice_of_this_thread() == before
    assert listener_service_settings().runtime.decode_nice == 19
    assert listener_service_settings(decode_nice=0).runtime.decode_nice == 0
    from service.listener import LISTENER_RUNTIME_DEFAULTS
    from service.settings import ServiceSettings

    env = {"CXR_EMBED_DECODE_NICE": "5"}
    assert ServiceSettings.from_env(env, defaults=LISTENER_RUNTIME_DEFAULTS).runtime.decode_nice == 5
    assert RuntimeSettings().decode_nice == 0  # embed and the HTTP service: unchanged
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match="decode_nice must be 0 to 19"):
            RuntimeSettings(decode_nice=bad)
