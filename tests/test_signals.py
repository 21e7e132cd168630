"""A stop request, however many times it arrives, checkpoints the last completed round before exiting."""

import json
import os
import shutil
import signal
import subprocess
import time

from tests.conftest import worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=0",
]


def test_batch_scheduler_cancel_under_uv_run_keeps_the_last_round(tmp_path):
    """`setsid uv run ... &` then `kill -TERM -PGID`: the driver gets SIGTERM twice (the group kill, and
    uv forwarding it). The second may cut the round in progress short, never the checkpoint."""
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH (.ci/run installs it)"
    out = tmp_path / "run"
    cmd = ["setsid", uv, "run", "--frozen", "python", "-m", "experiments.run_federated", *SMALL,
           "--rounds=100000", "--checkpoint_every=1000", f"--output_dir={out}"]
    before = set(worker_pids())  # e.g. this session's shared worker
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while not line.startswith("round 3/") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        workers = set(worker_pids()) - before  # the driver's own
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)  # as a batch scheduler cancels a job
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    # (uv forwards the signal, so "SIGTERM received again" appears in stderr here; not asserted, since only
    # the outcome below is the contract, whatever uv's version does.)
    assert "Traceback" not in stderr
    assert any(line.startswith("stopped by SIGTERM: last completed round checkpointed")
               for line in stderr.splitlines()), stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = len(rows)
    assert last >= 3 and [r["round"] for r in rows] == list(range(1, last + 1))
    assert (out / "checkpoints" / f"ckpt_{last:06d}" / "meta.json").exists()  # nothing completed is lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == last and summary["status"].startswith("stopped: RunInterrupted")
    deadline = time.monotonic() + 15
    while workers & set(worker_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not workers & set(worker_pids())


# In-process: the driver's own handler (`Signals`) on SIGTERM, a run on a worker of the test's own (the
# session's is never made to wait or killed), and a round made slow or a fetch made slow where the second
# signal must land. Each ends with round 3, the last completed one, checkpointed and the plain exit line.

def _cfg(out, **kw):
    from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig

    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=12, synthetic_examples_per_client=8, synthetic_input_dim=6,
                        synthetic_num_classes=3),
        train=TrainConfig(model="mlp", rounds=50, clients_per_round=4, client_batch_size=4, eval_every=0,
                          checkpoint_every=1000, seed=5, sampling_seed=5),
        dp=DPConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5),
        output_dir=str(out), **kw,
    ).validate()


def _stopped_at_round_3(out, stop) -> None:
    """The run stopped with round 3 (the last completed) checkpointed, and nothing after it recorded."""
    assert stop.exit_code == 128 + signal.SIGTERM
    assert stop.checkpoint_note == "last completed round checkpointed", stop.checkpoint_note
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_000003"]
    assert json.loads((out / "summary.json").read_text())["status"].startswith("stopped: RunInterrupted")


def _run_with_sigterm_handler(cfg, log):
    """`training.run(cfg)` under run_federated's handler on SIGTERM; returns its RunInterrupted."""
    import pytest

    from dpfl_tff import runtime, training
    from experiments.run_federated import Signals

    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    with runtime.local_context(), pytest.raises(training.RunInterrupted) as stopped:
        training.run(cfg, log=log, stop_requested=signals.stop_requested)
    return stopped.value


def _slow_round_calls(monkeypatch, wake):
    """Once `wake` is armed (`wake.slow`), the context thread's next gRPC `compute` (the round's) waits on it."""
    import threading

    from dpfl_tff.runtime.tff_internals import remote_executor_grpc_stub

    compute = remote_executor_grpc_stub.RemoteExecutorGrpcStub.compute

    def slow(self, request):
        if wake.slow and threading.current_thread() is not threading.main_thread():
            wake.slow = False
            wake.wait(60)
        return compute(self, request)

    monkeypatch.setattr(remote_executor_grpc_stub.RemoteExecutorGrpcStub, "compute", slow)


def _later(seconds, fn):
    import threading

    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_a_second_sigterm_while_a_round_is_in_flight_keeps_the_last_completed_round(tmp_path, monkeypatch,
                                                                                    own_signals):
    """The round in flight is cut short in the driver and goes on in the worker; round 3's state, left
    there, is fetched meanwhile and checkpointed (it was given up as lost while a call was in flight)."""
    import threading

    wake = threading.Event()
    wake.slow = False
    _slow_round_calls(monkeypatch, wake)
    out, timers = tmp_path / "run", []

    def log(line):
        if line.startswith("round 3/"):
            wake.slow = True  # round 4's call waits until after both signals
            timers.extend([_later(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)),
                           _later(0.8, lambda: os.kill(os.getpid(), signal.SIGTERM)),
                           _later(3.0, wake.set)])

    try:
        stop = _run_with_sigterm_handler(_cfg(out), log)
    finally:
        wake.set()
        for t in timers:
            t.join()
    _stopped_at_round_3(out, stop)


def test_a_second_sigterm_during_the_fetch_of_the_state_keeps_it(tmp_path, monkeypatch, own_signals):
    """The first signal stops the run after round 3; the second lands while round 3's state is fetched from
    the worker for its checkpoint: the fetch ends, the checkpoint is written (the signal's exception waits;
    it used to cut the fetch short and mark the state lost)."""
    import threading
    import time

    from dpfl_tff import serialization

    armed, timers = threading.Event(), []
    deserialize = serialization.deserialize

    def slow(*args, **kwargs):
        if armed.is_set():
            armed.clear()
            timers.append(_later(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM)))  # mid-fetch
            time.sleep(1.0)
        return deserialize(*args, **kwargs)

    monkeypatch.setattr(serialization, "deserialize", slow)
    out = tmp_path / "run"

    def log(line):
        if line.startswith("round 3/"):
            os.kill(os.getpid(), signal.SIGTERM)  # handled here: the run stops after round 3
            armed.set()  # the next thing read from the worker is round 3's state, for its checkpoint

    try:
        stop = _run_with_sigterm_handler(_cfg(out), log)
    finally:
        for t in timers:
            t.join()
    assert not armed.is_set() and timers  # the second signal did land during the fetch
    _stopped_at_round_3(out, stop)


def test_a_round_abandoned_at_the_stop_grace_limit_keeps_the_last_completed_round(tmp_path, monkeypatch,
                                                                                 own_signals):
    """One SIGTERM while round 4 hangs: at --stop_grace_seconds the worker is abandoned (killed), but round 3's
    state is fetched from it first and checkpointed (it used to be lost with the worker)."""
    import threading

    wake = threading.Event()
    wake.slow = False
    _slow_round_calls(monkeypatch, wake)
    out, timers = tmp_path / "run", []

    def log(line):
        if line.startswith("round 3/"):
            wake.slow = True
            timers.append(_later(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)))
        if "(--stop_grace_seconds): abandoning it" in line:
            timers.append(_later(0.5, wake.set))  # after the kill: the round's call then fails

    try:
        stop = _run_with_sigterm_handler(_cfg(out, stop_grace_seconds=1.0), log)
    finally:
        wake.set()
        for t in timers:
            t.join()
    _stopped_at_round_3(out, stop)


def test_a_second_signal_waits_for_a_deferred_block_even_while_other_threads_run(own_signals):
    """Blocking the signal in the main thread did not hold it back (the kernel hands it to another thread, and
    Python still runs the handler in the main thread): the deferral is the handler's, in Python."""
    import threading
    import time

    import pytest

    from dpfl_tff import errors, stop_signals
    from experiments.run_federated import Signals

    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)  # as TensorFlow's, gRPC's, the watchdog's threads
    other.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: recorded only
        time.sleep(0.05)
        reached = False
        with pytest.raises(errors.RunInterrupted, match="stopped by SIGTERM"):
            with stop_signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs here, and must not raise here
                reached = True
        assert reached
        with stop_signals.deferred(raise_pending=False):  # a caller raising its own stop right after
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
    finally:
        done.set()
        other.join()


def test_a_second_signal_inside_a_finalizer_does_not_raise_there(own_signals, capfd):
    """Python would print the handler's exception as 'Exception ignored in ...' after cutting the clean-up
    short (e.g. TFF's disposal of a worker's value); the run stops after the round instead."""
    import gc
    import time

    from experiments.run_federated import Signals

    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    cleaned = []

    class Resource:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here
            cleaned.append(True)

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    resource = Resource()
    del resource
    gc.collect()
    assert cleaned == [True]
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "received again, inside clean-up code: stopping after the current round" \
        in err, err
    assert signals.stop_requested() is not None
