"""--workers: two real TFF worker services (experiments.run_worker) on loopback ports.

Over mutual TLS (the module's two workers hold a credential made by
run_worker --make_credentials): same model as the in-process run with DP off;
central DP noise added once, after the merge; a driver without the credential,
or with another run's, is refused with one line on each side and reaches no
TFF worker. Unreachable address fails fast; a worker lost mid-run
(--insecure_workers) fails the round naming it, with the last completed round
checkpointed, and a rerun resumes; a frozen worker (SIGSTOP) fails the round at the stall limit naming it,
and a single SIGTERM ends a round waiting on it; workers stop on SIGTERM and none is left
running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import selectors
import signal
import re
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
import portpicker
import pytest

from dpfl_tff import checkpoints, runtime, training, worker_auth
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task
from tests.conftest import worker_pids

# One xdist worker runs this module (`--dist loadgroup`): its module fixtures (credentials, two worker
# services, a lone one) are then set up once.
pytestmark = pytest.mark.xdist_group("remote_workers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
    """One `python -m experiments.run_worker` process and its worker_binary child.

    `credentials`: the credential folder (`--worker_credentials`), or None for
    `--insecure_workers`. Its stderr goes to a file (`log_lines`).
    """

    def __init__(self, credentials: str | None, port: int | None = None):
        self.port = port or portpicker.pick_unused_port()
        self.address = f"localhost:{self.port}"
        auth = f"--worker_credentials={credentials}" if credentials else "--insecure_workers"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"run_worker_{self.port}_", suffix=".err")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.run_worker", f"--port={self.port}", auth],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        self.banner = self._read_line(timeout=120)
        assert "listening on" in self.banner and f":{self.port}" in self.banner, self.banner
        inner = re.search(r"on 127\.0\.0\.1:(\d+)\)", self.banner)
        assert (inner is not None) == bool(credentials), self.banner
        self.worker_port = int(inner.group(1)) if inner else self.port  # the TFF worker's own port

    def _read_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            raise AssertionError(f"run_worker --port={self.port} printed nothing in {timeout} s")
        return self.proc.stdout.readline()

    def log_lines(self) -> list[str]:
        with open(self.log.name, encoding="utf-8") as f:
            return f.read().splitlines()

    def binary_pid(self) -> int:
        for pid in worker_pids():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--port={self.worker_port}".encode() in f.read().split(b"\0"):
                    return pid
        raise AssertionError(f"no worker_binary on port {self.worker_port}")

    def stop(self) -> tuple[int, str]:
        if self.proc.stdout.closed:  # stopped before
            return self.proc.returncode, ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.log.close()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    """A run's credential, made by the command users run (no TensorFlow import: about a second)."""
    folder = tmp_path_factory.mktemp("credentials") / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.run_worker", f"--make_credentials={folder}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"credential written to {folder}"), proc.stderr
    assert sorted(os.listdir(folder)) == ["driver", "worker"]
    for role in ("driver", "worker"):
        assert sorted(os.listdir(folder / role)) == ["ca.pem", "cert.pem", "key.pem"]
        assert os.stat(folder / role / "key.pem").st_mode & 0o077 == 0  # private keys: owner only
    return str(folder)


@pytest.fixture(scope="module")
def two_workers(credentials):
    workers = [Worker(credentials), Worker(credentials)]
    yield workers
    for w in workers:
        w.stop()


def _cfg(tmp_path, name, workers=(), credentials="", **dp):
    """A small run; with `workers`, over mutual TLS with `credentials`, or --insecure_workers if it is empty."""
    return ExperimentConfig(
        task=TaskConfig(task="digits", num_clients=40),
        train=TrainConfig(
            model="mlp", rounds=3, clients_per_round=8, client_sampling="uniform", client_learning_rate=0.1,
            server_optimizer="sgd", server_learning_rate=1.0, eval_every=0, seed=3, sampling_seed=3,
        ),
        dp=DPConfig(**dp),
        output_dir=str(tmp_path / name),
        workers=tuple(workers),
        worker_timeout=10.0,
        worker_credentials=credentials,
        insecure_workers=bool(workers) and not credentials,
    ).validate()


def _final_state(path: str) -> list[np.ndarray]:
    ckpt = sorted(d for d in os.listdir(os.path.join(path, "checkpoints")) if d.startswith("ckpt_"))[-1]
    with open(os.path.join(path, "checkpoints", ckpt, "meta.json"), encoding="utf-8") as f:
        names = checkpoints.stored_names(json.load(f))  # the arrays in state order
    with np.load(os.path.join(path, "checkpoints", ckpt, "state.npz")) as z:
        return [z[k] for k in names]


def test_dp_off_two_workers_give_the_in_process_model(tmp_path, two_workers, credentials):
    quiet = lambda s: None  # noqa: E731
    local = training.run(_cfg(tmp_path, "local", mode="none"), log=quiet)
    logs = []
    cpu_before = [_cpu_seconds(w.binary_pid()) for w in two_workers]
    driver = os.path.join(credentials, "driver")
    remote = training.run(_cfg(tmp_path, "remote", [w.address for w in two_workers], driver, mode="none"),
                          log=logs.append)
    cpu_used = [_cpu_seconds(w.binary_pid()) - c for w, c in zip(two_workers, cpu_before)]
    assert local.summary["status"] == remote.summary["status"] == "completed"
    assert any("workers: localhost:" in s and f"mutual TLS, credential {driver}" in s for s in logs)
    for w in two_workers:  # through each worker's TLS front, authenticated
        assert any(line.startswith("driver connected from ") for line in w.log_lines()), w.log_lines()
    a, b = _final_state(str(tmp_path / "local")), _final_state(str(tmp_path / "remote"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # and training moved the model: the comparison is not between two initial states
    assert [r["train_loss"] for r in local.records] == pytest.approx([r["train_loss"] for r in remote.records], rel=1e-4)
    assert local.records[-1]["train_loss"] < local.records[0]["train_loss"]
    # both workers did client work (an idle worker uses ~0 s of CPU meanwhile)
    assert min(cpu_used) > 0.2 * max(cpu_used) > 0, cpu_used


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("mode", ["central", "local"])
def test_noise_is_added_once_where_the_mode_says(tmp_path, two_workers, credentials, mode):
    """One round of DP-FedAvg with server SGD(lr=1) over m clients split on two workers.

    central: the model moves by (sum of clipped updates + N(0, (zC)^2 I)) / m, so the
    noise has std zC/m per coordinate; had each worker added it to its partial sum, it
    would be sqrt(2) times that. local (Gaussian): each client adds N(0, (zC)^2 I) to
    its own clipped update and the server averages m of them: std zC/sqrt(m). With
    z = 30 the signal (total norm <= C, so C/sqrt(d) per coordinate) is negligible.
    """
    z, clip, m = 30.0, 0.1, 8
    addresses = [w.address for w in two_workers]
    cfg = _cfg(tmp_path, mode, addresses, credentials, mode=mode, noise_multiplier=z, clip_norm=clip)
    data = load_task(cfg.task, cfg.train.seed)
    with runtime.remote_context(addresses, timeout=10, credential=worker_auth.load(credentials, "driver")):
        process = training.build_learning_process(cfg, data)
        state = training.initial_state(process, cfg, data)
        before = [np.asarray(v) for v in process.get_model_weights(state).trainable]
        clients = training.round_input(cfg, data, range(m), 1)
        after = [np.asarray(v) for v in process.get_model_weights(process.next(state, clients).state).trainable]
    move = np.concatenate([(b - a).ravel() for a, b in zip(before, after)])
    d = move.size
    expected = z * clip / (m if mode == "central" else math.sqrt(m))
    measured = float(np.sqrt(np.mean(move**2)))
    # Unseeded. Sample RMS of d normals: relative s.e. 1/sqrt(2d) (~1.3% for d ~ 3000); 8 s.e. plus the
    # signal's share: failure probability P(|Z| > 8) < 1.3e-15 per case.
    tol = 8 / math.sqrt(2 * d) + (clip / math.sqrt(d)) / expected
    assert d > 1000
    assert abs(measured / expected - 1) < tol, (measured, expected, tol)
    assert tol < (math.sqrt(2) - 1) / 2  # the test can tell once from twice


def test_unreachable_worker_fails_fast_naming_it(tmp_path, two_workers, credentials):
    dead = f"localhost:{portpicker.pick_unused_port()}"
    cfg = _cfg(tmp_path, "unreachable", [two_workers[0].address, dead], credentials, mode="none")
    cfg = dataclasses.replace(cfg, worker_timeout=2.0).validate()
    with pytest.raises(runtime.WorkersUnreachable) as e:  # raised, not TFF's retry loop (forever, 30 s apart)
        training.run(cfg, log=lambda s: None)
    msg = str(e.value)
    assert dead in msg and two_workers[0].address not in msg.split("reachable after")[1]
    assert "--worker_timeout" in msg and "run_worker --port" in msg


# /proc/net/tcp{,6} local addresses (hex, as the kernel prints them) of loopback and of the wildcard address.
_LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listening(port: int) -> set[str]:
    """The local addresses of the sockets listening on TCP `port`, from /proc/net/tcp and /proc/net/tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def _new_log_lines(worker: Worker, before: int, at_least: int = 1) -> list[str]:
    """The worker's log lines after the first `before`, once there are `at_least` (they are written by its thread)."""
    deadline = time.monotonic() + 10
    while len(worker.log_lines()) < before + at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return worker.log_lines()[before:]


def test_a_driver_without_the_credential_is_refused_and_reaches_no_worker(tmp_path, two_workers):
    w = two_workers[0]
    # The TFF worker listens on loopback only, behind the front on every interface.
    assert _listening(w.worker_port) and _listening(w.worker_port) <= _LOOPBACK, _listening(w.worker_port)
    assert _listening(w.port) and all(set(a) == {"0"} for a in _listening(w.port)), _listening(w.port)
    before = len(w.log_lines())
    cfg = _cfg(tmp_path, "no_credential", [w.address], mode="none")  # --insecure_workers: no certificate
    with pytest.raises(runtime.WorkersRefused) as e:
        training.run(cfg, log=lambda s: None)
    assert str(e.value).startswith(f"--workers: {w.address}: does not answer plain gRPC"), str(e.value)
    assert "--worker_credentials" in str(e.value)
    # A TFF call straight at the port, as any client on the network could make it: no answer.
    channel = grpc.insecure_channel(w.address)
    try:
        with pytest.raises(grpc.RpcError) as call:
            channel.unary_unary("/tensorflow_federated.v0.ExecutorGroup/GetExecutor")(b"", timeout=3)
        assert call.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        channel.close()
    new = _new_log_lines(w, before)
    # One line per client host (the driver's probe and gRPC may come from 127.0.0.1 and ::1); the
    # front never opened a connection to the TFF worker ("driver connected" is logged when it does).
    assert 1 <= len(new) <= 2 and all(
        line.startswith("refused a connection from ") and ": it does not speak TLS (" in line for line in new), new


def test_another_runs_credential_is_refused_with_one_line_on_each_side(tmp_path, two_workers):
    other = str(tmp_path / "other_run")
    worker_auth.make_credentials(other)
    w = two_workers[1]
    before = len(w.log_lines())
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run_federated", "--task=synthetic", "--num_clients=20",
         "--clients_per_round=5", "--rounds=1", f"--output_dir={tmp_path / 'x'}", f"--workers={w.address}",
         f"--worker_credentials={other}/driver", "--worker_timeout=20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith(f"error: --workers: {w.address}: refused the worker: its certificate is not one of "
                              "this run's credential"), err[-1]
    assert f"--worker_credentials={other}/driver is another run's" in err[-1]
    # the only line about it: no traceback, no gRPC handshake log
    assert [line for line in err if w.address in line or "andshake" in line or "Traceback" in line] == [err[-1]]
    new = _new_log_lines(w, before)
    assert len(new) == 1 and new[0].startswith("refused a connection from "), new
    assert "it rejected this worker's certificate (tlsv1 alert unknown ca" in new[0], new


def test_a_certificate_that_is_not_this_runs_driver_is_refused_by_the_worker(tmp_path, two_workers, credentials):
    """The driver trusts the worker (the run's ca.pem), but presents another certificate: the worker's own, or
    a driver certificate of another run. The worker refuses it during the handshake."""
    other = str(tmp_path / "other_run")
    worker_auth.make_credentials(other)
    driver, as_worker = worker_auth.load(credentials, "driver"), worker_auth.load(credentials, "worker")
    stranger = worker_auth.load(other, "driver")
    cases = [
        (two_workers[0], dataclasses.replace(driver, cert=as_worker.cert, key=as_worker.key),
         "unsuitable certificate purpose"),
        (two_workers[1], dataclasses.replace(driver, cert=stranger.cert, key=stranger.key),
         "unable to get local issuer certificate"),
    ]
    for w, credential, reason in cases:
        before = len(w.log_lines())
        with pytest.raises(runtime.WorkersRefused) as e:
            runtime.check_reachable([w.address], 10, credential)
        assert str(e.value).startswith(f"--workers: {w.address}: the worker refused this driver's certificate"), e.value
        new = _new_log_lines(w, before)
        assert new == [new[0]] and new[0].startswith("refused a connection from "), new
        assert f"its certificate is not a driver certificate of this run ({reason})" in new[0], new


def test_workers_need_a_credential_or_insecure_workers(tmp_path, credentials):
    from dpfl_tff.config import ConfigError

    with pytest.raises(ConfigError) as e:
        ExperimentConfig(workers=("a:1",)).validate()
    assert str(e.value).startswith("--workers=a:1: give --worker_credentials=DIR/driver") and "--insecure_workers" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ExperimentConfig(workers=("a:1",), worker_credentials=credentials, insecure_workers=True).validate()
    assert "give one of them" in str(e.value)
    ExperimentConfig(worker_credentials=credentials).validate()  # no --workers: nothing to authenticate
    assert worker_auth.load(credentials, "driver").cert == os.path.join(credentials, "driver", "cert.pem")
    with pytest.raises(worker_auth.CredentialError) as e:
        worker_auth.load(os.path.join(credentials, "worker"), "driver")
    assert "holds a worker credential; give the driver's (DIR/driver)" in str(e.value)
    with pytest.raises(worker_auth.CredentialError) as e:
        worker_auth.load(str(tmp_path), "driver")
    assert "no ca.pem, cert.pem, key.pem in" in str(e.value) and "--make_credentials=DIR" in str(e.value)


def test_driver_names_an_unreachable_worker_with_exit_2(tmp_path):
    dead = f"localhost:{portpicker.pick_unused_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run_federated", "--task=synthetic", "--num_clients=20",
         "--clients_per_round=5", "--rounds=1", f"--output_dir={tmp_path / 'x'}", f"--workers={dead}",
         "--worker_timeout=1", "--insecure_workers"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workers:") and dead in last
    assert f"WARNING: --insecure_workers: {dead}: unauthenticated and unencrypted" in proc.stderr


@pytest.mark.parametrize(
    "value,message",
    [("localhost", "is not host:port"), ("localhost:0", "is not host:port"), ("a:1,:80", "':80'")],
)
def test_bad_workers_flag_is_a_config_error(tmp_path, value, message):
    from dpfl_tff.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "bad", value.split(","), mode="none")
    assert str(e.value).startswith(f"--workers={value}:") and message in str(e.value)


def test_lost_worker_fails_the_round_then_a_rerun_resumes(tmp_path, lone_worker):
    a, b = lone_worker, Worker(None)  # --insecure_workers; only b is lost (the module's lone worker stays)
    try:
        cfg = _cfg(tmp_path, "lost", [a.address, b.address], mode="central", noise_multiplier=1.0, clip_norm=0.5)
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, rounds=4, checkpoint_every=0), worker_timeout=3.0
        ).validate()

        def kill_b_after_round_2(line: str) -> None:
            if line.startswith("round 2/"):
                os.kill(b.binary_pid(), signal.SIGKILL)

        with pytest.raises(training.RoundFailed) as e:
            training.run(cfg, log=kill_b_after_round_2)
        msg = str(e.value)
        assert msg.startswith("round 3 failed: WorkerLost: TFF worker at " + b.address), msg
        assert "round 2 is checkpointed" in msg
        assert checkpoints.CheckpointManager(cfg.output_dir).rounds() == [2]
        # The worker is back on the same address (its port was the killed binary's), started while b's
        # run_worker exits by itself (that takes seconds: TensorFlow's interpreter shutdown).
        b2 = Worker(None, port=b.port)
        try:
            b.proc.wait(timeout=120)
            code, out = b.stop()
            assert code == 1  # run_worker reports its worker's death
            logs = []
            result = training.run(cfg, log=logs.append)
            assert any("resuming" in s and "from round 2" in s for s in logs)
            assert result.summary["status"] == "completed" and result.summary["rounds"] == 4
            assert [r["round"] for r in result.records] == [1, 2, 3, 4]
        finally:
            b2.stop()
    finally:
        b.stop()


def test_run_worker_stops_on_sigterm_and_takes_its_worker_down(credentials):
    w = Worker(credentials)
    pid = w.binary_pid()
    code, out = w.stop()
    assert code == 0 and "stopped by SIGTERM" in out
    deadline = time.monotonic() + 10
    while pid in worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid not in worker_pids()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port=70000", "--insecure_workers"], "--port=70000: give the TCP port to listen on, in 1..65535"),
        (["--port=8000"], "--worker_credentials is missing: give the worker's credential"),
        (["--port=8000", "--worker_credentials={c}/driver"], "--worker_credentials={c}/driver: {c}/driver holds a "
         "driver credential; give the worker's (DIR/worker)"),
        (["--port=8000", "--worker_credentials={c}", "--insecure_workers"], "--worker_credentials={c} with "
         "--insecure_workers: give one of them"),
        (["--make_credentials={c}"], "--make_credentials={c}: exists and is not empty; give a new folder"),
    ],
)
def test_run_worker_bad_flags_are_a_one_line_error(credentials, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run_worker", *(a.format(c=credentials) for a in args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {message.format(c=credentials)}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def lone_worker():
    """One worker of its own for the tests that freeze it (SIGSTOP): the shared two are never frozen."""
    w = Worker(None)
    yield w
    w.stop()


@contextlib.contextmanager
def _frozen(pid: int, guard: float):
    """SIGSTOP `pid` for the block; SIGCONT on leaving, or after `guard` s (a hang guard: the run then goes on
    and the test fails instead of hanging)."""
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(guard, os.kill, (pid, signal.SIGCONT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        os.kill(pid, signal.SIGCONT)


def test_frozen_worker_fails_the_round_at_the_stall_limit_naming_it_then_a_rerun_resumes(tmp_path, lone_worker):
    cfg = _cfg(tmp_path, "frozen", [lone_worker.address], mode="central", noise_multiplier=1.0, clip_norm=0.5)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=6, checkpoint_every=0),
                              stall_seconds=4.0).validate()
    pid, frozen = lone_worker.binary_pid(), contextlib.ExitStack()
    logs = []

    def freeze_after_round_3(line: str) -> None:
        logs.append(line)
        if line.startswith("round 3/"):
            frozen.enter_context(_frozen(pid, guard=120))

    with frozen, pytest.raises(training.RoundFailed) as e:
        training.run(cfg, log=freeze_after_round_3)
    msg = str(e.value)
    head = f"round 4 failed: WorkerStalled: TFF worker at {lone_worker.address} gave no answer for "
    assert msg.startswith(head), msg
    assert "(stall limit 4 s: --stall_seconds); round 3 is checkpointed" in msg, msg
    assert any(s.startswith("round 4/6 | no answer for ") for s in logs), logs
    assert checkpoints.CheckpointManager(cfg.output_dir).rounds() == [3]
    result = training.run(cfg, log=logs.append)  # the worker answers again: the rerun resumes
    assert result.summary["resumed_from_round"] == 3 and [r["round"] for r in result.records] == list(range(1, 7))


def test_one_sigterm_during_a_frozen_workers_round_exits_after_the_grace_with_the_last_round(tmp_path, lone_worker):
    """Before, "stopping after the current round" never ended: it took SIGKILL."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run_federated", "--task=synthetic", "--num_clients=20",
         "--clients_per_round=5", "--eval_every=0", "--rounds=1000", "--checkpoint_every=1000",
         f"--workers={lone_worker.address}", "--insecure_workers", "--stop_grace_seconds=1", f"--output_dir={out}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = ""
        while not line.startswith("round 3/"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        with _frozen(lone_worker.binary_pid(), guard=120):
            time.sleep(0.5)  # the next round is waiting on the frozen worker
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=90)  # a hang guard: TimeoutExpired fails the test
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM, and the round has not ended 1 s later (--stop_grace_seconds): abandoning it" in stdout
    assert any(s.startswith("stopped by SIGTERM: last completed round checkpointed") for s in stderr.splitlines())
    rows = [json.loads(s)["round"] for s in open(out / "metrics.jsonl")]
    assert len(rows) >= 3 and rows == list(range(1, len(rows) + 1))
    assert os.path.isdir(out / "checkpoints" / f"ckpt_{len(rows):06d}")
