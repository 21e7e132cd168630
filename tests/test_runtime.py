"""dpfl_tff.runtime: the private worker's environment, and no TFF call outside a context."""

import os
import subprocess
import sys

import pytest

from dpfl_tff import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode() for k, v in items}


@pytest.mark.parametrize("preset", [None, "4"])
def test_worker_gets_two_malloc_arenas_unless_the_user_chose(monkeypatch, preset):
    if preset is None:
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    else:
        monkeypatch.setenv("MALLOC_ARENA_MAX", preset)
    proc, _ = runtime.start_worker()
    try:
        assert _environ(proc.pid)["MALLOC_ARENA_MAX"] == (preset or runtime.WORKER_MALLOC_ARENA_MAX)
    finally:
        runtime.stop_worker(proc)
    assert proc.poll() is not None and proc.pid not in runtime.live_worker_pids()
    assert os.environ.get("MALLOC_ARENA_MAX") == preset  # ours is unchanged


_OUTSIDE = """
import os
from dpfl_tff import runtime
runtime.install()  # the raising default context
import tensorflow as tf
import tensorflow_federated as tff

@tff.tensorflow.computation
def one():
    return tf.constant(1)

try:
    one()
except RuntimeError as e:
    print("raised:", type(e).__name__)
children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
print("children:", len(children))
"""


def test_tff_call_outside_a_context_raises_instead_of_starting_a_worker():
    # In a fresh interpreter: this session's `tff_context` fixture may hold a context.
    proc = subprocess.run([sys.executable, "-c", _OUTSIDE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: RuntimeError" in proc.stdout and "children: 0" in proc.stdout, proc.stdout


def test_a_computation_is_sent_to_the_worker_once_and_evicted_beyond_the_cache(tff_context, monkeypatch):
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    from dpfl_tff import serialization

    sent = []
    real = serialization.serialize_into

    def counting(value, type_spec, target):
        if isinstance(type_spec, tff.FunctionType):
            sent.append(id(value))
        real(value, type_spec, target)

    monkeypatch.setattr(serialization, "serialize_into", counting)

    def make(k):
        @tff.tensorflow.computation(tff.TensorType(np.float32, (3,)))
        def add_k(x):
            return x + tf.constant(float(k))

        return add_k

    comps = [make(k) for k in range(runtime.executor_cache._RemoteExecutor._KEEP + 4)]  # noqa: SLF001
    x = np.arange(3, dtype=np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(comps[0](x), x)
    assert len(sent) == 1  # three calls, one transfer
    for k, comp in enumerate(comps):  # more computations than are kept: the first ones are evicted
        np.testing.assert_array_equal(comp(x), x + k)
    sent.clear()
    np.testing.assert_array_equal(comps[0](x), x)  # evicted: sent again, still right
    np.testing.assert_array_equal(comps[-1](x), x + len(comps) - 1)  # kept: not sent
    assert len(sent) == 1


def _one():
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.tensorflow.computation
    def one():
        return tf.constant(1)

    return one


def test_a_starting_worker_is_waited_for_by_the_first_call_and_stopped_if_never_called():
    one = _one()
    others = set(runtime.live_worker_pids())  # e.g. the session's `tff_context`
    with runtime.local_context(wait=False):
        (pid,) = set(runtime.live_worker_pids()) - others
        assert one() == 1  # waits until the worker answers, then runs there
        assert one() == 1
    assert pid not in runtime.live_worker_pids()
    with runtime.local_context(wait=False):  # no call: left without waiting for it
        (pid,) = set(runtime.live_worker_pids()) - others
    assert pid not in runtime.live_worker_pids() and not os.path.exists(f"/proc/{pid}")  # stopped and reaped


def test_a_worker_that_cannot_start_fails_the_first_call(tmp_path, monkeypatch):
    fake = tmp_path / "worker_binary"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runtime.worker_process, "WORKER_BINARY", str(fake))
    one = _one()
    others = set(runtime.live_worker_pids())
    with pytest.raises(RuntimeError, match=r"TFF worker at localhost:\d+ exited with code 3 before it was ready"):
        with runtime.local_context(wait=False):
            one()
    assert set(runtime.live_worker_pids()) <= others


def test_the_private_tff_modules_refuse_another_tff_version_in_one_line(monkeypatch):
    """tff_internals.py checks the TFF version before importing TFF's private modules; another version gets one
    ImportError naming the supported versions and the fix, not a missing attribute inside a round."""
    import runpy

    import tensorflow_federated as tff

    from dpfl_tff.runtime import tff_internals

    assert tff.__version__ in runtime.SUPPORTED_TFF_VERSIONS
    monkeypatch.setattr(tff, "__version__", "0.99.0")
    with pytest.raises(ImportError, match=r"supports tensorflow-federated 0\.87\.0 only .* found 0\.99\.0\. Install "
                                          r"the locked environment: `uv sync`"):
        runpy.run_path(tff_internals.__file__)
