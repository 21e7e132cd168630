"""The round loop's state stays in the local worker between rounds (`runtime.states_in_worker`).

What comes back (checkpoints, evaluations, the final model) equals a run whose state comes back every
round; a worker that dies takes the rounds since the last checkpoint with it, and the rerun resumes from
that checkpoint and runs them again, charged again.
"""

import contextlib
import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from dpfl_tff import runtime, training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.runtime import contexts


def _cfg(out, noise_seed=None, **train) -> ExperimentConfig:
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=12, synthetic_examples_per_client=8, synthetic_input_dim=6,
                        synthetic_num_classes=3),
        train=TrainConfig(**{"model": "mlp", "rounds": 6, "clients_per_round": 4, "client_batch_size": 4,
                             "client_optimizer": "sgd", "client_learning_rate": 0.3, "server_optimizer": "sgd",
                             "server_learning_rate": 1.0, "eval_every": 2, "checkpoint_every": 3, "seed": 5,
                             "sampling_seed": 5, **train}),
        dp=DPConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5, noise_seed=noise_seed),
        output_dir=str(out),
    ).validate()


def _fetches(monkeypatch) -> list[int]:
    """Counts the states fetched from the worker."""
    calls = []
    fetch = contexts._WorkerContext.fetch_state

    def counting(self, held, timeout=None):
        calls.append(1)
        return fetch(self, held, timeout)

    monkeypatch.setattr(contexts._WorkerContext, "fetch_state", counting)
    return calls


def _npz(out, r):
    with np.load(os.path.join(out, "checkpoints", f"ckpt_{r:06d}", "state.npz")) as z:
        return {k: z[k] for k in z.files}


def test_checkpoints_evaluations_and_the_final_model_equal_a_run_whose_state_comes_back(tmp_path, monkeypatch):
    fetched = _fetches(monkeypatch)
    resident = training.run(_cfg(tmp_path / "resident", noise_seed=7), log=lambda line: None)
    # Fetched for the evaluations of rounds 2 and 4 and the checkpoints of rounds 3 and 6 (evaluated too): 4
    # times in 6 rounds, never twice for one round.
    assert len(fetched) == 4
    monkeypatch.setattr(runtime, "states_in_worker", contextlib.nullcontext)
    fetched.clear()
    back = training.run(_cfg(tmp_path / "back", noise_seed=7), log=lambda line: None)
    assert not fetched  # the state came back every round

    keys = ("round", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "next_clip_norm")
    assert ([{k: r.get(k) for k in keys} for r in resident.records]
            == [{k: r.get(k) for k in keys} for r in back.records])
    assert [r["round"] for r in resident.records if "test_accuracy" in r] == [2, 4, 6]
    for r in (3, 6):
        a, b = _npz(tmp_path / "resident", r), _npz(tmp_path / "back", r)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert resident.summary["final_model_round"] == back.summary["final_model_round"] == 6
    for a, b in zip(resident.model().get_weights(), back.model().get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_worker_death_loses_the_rounds_after_the_last_checkpoint_and_the_rerun_charges_them_again(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, rounds=9, checkpoint_every=3, eval_every=0)
    lines = []
    others = set(runtime.live_worker_pids())  # the session's worker
    with runtime.local_context():  # a worker of this test's own (the session's is not killed)
        (pid,) = set(runtime.live_worker_pids()) - others

        def log(line):
            lines.append(line)
            if line.startswith("round 5/"):  # round 5 completed: its state (and round 4's) only in the worker
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(training.RoundFailed) as failed:
            training.run(cfg, log=log)
    message = str(failed.value)
    assert message.startswith("round 6 failed: LocalWorkerDied: "), message
    assert message.endswith("; round 5's state was lost with the TFF worker (it stays there between checkpoints): "
                            "a rerun resumes from round 3, the last checkpoint; rounds 4-5 run again and are charged "
                            "again: rerun the same command to resume"), message
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_000003"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 5 and summary["final_model_round"] is None  # round 5's model went with the worker
    assert len(open(out / "ledger.jsonl").readlines()) == 5  # write-ahead: rounds 1-5 are charged

    again = training.run(cfg, log=lines.append)  # the session's worker
    assert f"resuming {out} from round 3 (checkpoint); ledger: 5 released round(s) so far" in lines
    ledger = [json.loads(s) for s in open(out / "ledger.jsonl")]
    assert [e["round"] for e in ledger] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]  # rounds 4 and 5 ran twice
    assert again.summary["rounds_accounted"] == 11 == again.records[-1]["rounds_accounted"]
    assert [r["round"] for r in again.records] == list(range(1, 10))
    # Epsilon composes all 11 executions: more than 9 rounds run once give.
    uninterrupted = training.run(dataclasses.replace(cfg, output_dir=str(tmp_path / "once")), log=lambda line: None)
    assert again.epsilon > uninterrupted.epsilon



def test_a_checkpoint_refuses_a_handle_of_a_state_left_in_the_worker(tmp_path):
    """A leaf that is no array (a `ResidentState`) is a bug of the caller: refused, nothing written (it was
    pickled into state.npz, or failed there with a pickling error)."""
    from dpfl_tff import checkpoints, release_log

    ckpts = checkpoints.CheckpointManager(str(tmp_path))
    handle = object.__new__(runtime.ResidentState)  # no worker behind it: only its type matters here
    state = {"model": np.zeros(3, np.float32), "aggregator": handle}
    with pytest.raises(TypeError, match=r"internal error: the checkpoint of round 4 got a ResidentState as its leaf "
                                        r"aggregator, not an array .*nothing was written"):
        ckpts.save(4, state, {"round": 4}, release_log.LedgerLog(str(tmp_path)))
    assert ckpts.rounds() == [] and not os.listdir(tmp_path)


def test_a_round_failing_in_a_live_worker_checkpoints_the_state_it_started_from(tmp_path, monkeypatch):
    """Round 4's call fails in the worker (not a worker failure): the state of round 3, fetched before the
    executor is reset, is checkpointed (the fetched state, never its handle) and the line says so."""
    import threading

    from dpfl_tff.runtime.tff_internals import remote_executor_grpc_stub

    compute = remote_executor_grpc_stub.RemoteExecutorGrpcStub.compute
    armed = threading.Event()

    def failing(self, request):
        if armed.is_set() and threading.current_thread() is not threading.main_thread():
            armed.clear()
            raise RuntimeError("injected failure of the round's call")
        return compute(self, request)

    monkeypatch.setattr(remote_executor_grpc_stub.RemoteExecutorGrpcStub, "compute", failing)
    out = tmp_path / "run"

    def log(line):
        if line.startswith("round 3/"):
            armed.set()

    with runtime.local_context(), pytest.raises(training.RoundFailed) as failed:
        training.run(_cfg(out, rounds=6, checkpoint_every=1000, eval_every=0), log=log)
    assert str(failed.value).startswith("round 4 failed: RuntimeError: injected failure of the round's call; round 3 "
                                        "is checkpointed: rerun the same command to resume from it"), failed.value
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_000003"]


def test_values_collected_after_their_context_is_closed_are_not_disposed():
    """A worker's value collected after its context was left makes no call on the closed channel (it raised
    inside the finalizer: 'Exception ignored in ...'); other calls then raise WorkerLost."""
    from dpfl_tff.runtime import worker_calls

    class ClosedChannel:
        def __getattr__(self, name):
            def call(request):
                raise ValueError("Cannot invoke RPC on closed channel!")
            return call

    stub = worker_calls._WatchedStub(ClosedChannel(), "local TFF worker localhost:1 (pid 1)", lambda: None)
    stub.close()
    assert stub.dispose(object()) is None and stub.dispose_executor(object()) is None
    with pytest.raises(runtime.WorkerLost, match="its execution context was closed"):
        stub.compute(object())
