"""The private local worker: its death mid-run fails the run fast, naming it, and a rerun resumes from the last
checkpoint (the state stays in the worker between checkpoints: the rounds after it run again and are charged
again); it listens on loopback only, or one line says it listens on all interfaces."""

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 60
ARGS = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=0",
    f"--rounds={ROUNDS}", "--checkpoint_every=2",
]
EVERY = 2


def _check_failure_line(error: str, out) -> tuple[int, int]:
    """(the last completed round, the checkpoint a rerun resumes from) as the error line states them.

    The state of a round stays in the worker until a checkpoint fetches it: a round after the last
    checkpoint is lost with the worker, and the line says so.
    """
    failed = int(re.match(r"error: round (\d+) failed: ", error).group(1))
    done = failed - 1
    assert done >= 3, error
    ckpt = done - done % EVERY
    if ckpt == done:
        assert f"round {done} is checkpointed: rerun the same command to resume from it" in error, error
    else:
        assert (f"round {done}'s state was lost with the TFF worker (it stays there between checkpoints): a rerun "
                f"resumes from round {ckpt}, the last checkpoint; rounds {ckpt + 1}-{done} run again and are charged "
                "again: rerun the same command to resume") in error, error
    assert [json.loads(s)["round"] for s in open(out / "metrics.jsonl")] == list(range(1, done + 1))
    assert max(int(d.split("_")[1]) for d in os.listdir(out / "checkpoints") if d.startswith("ckpt_")) == ckpt
    assert json.loads((out / "summary.json").read_text())["status"].startswith("stopped: RoundFailed")
    return done, ckpt


def _check_rerun_charged_again(out, done: int, ckpt: int, rounds: int) -> None:
    """The rerun ran rounds ckpt+1.. again: each of them is in the ledger twice, and epsilon counts them all."""
    ledger = [json.loads(s) for s in open(out / "ledger.jsonl")]
    summary = json.loads((out / "summary.json").read_text())
    assert len(ledger) == done + (rounds - ckpt) == summary["rounds_accounted"]
    assert [e["round"] for e in ledger] == [*range(1, done + 1), *range(ckpt + 1, rounds + 1)]
    assert summary["resumed_from_round"] == ckpt


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_killed_local_worker_fails_the_run_within_seconds_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run_federated", *ARGS, f"--output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("round 3/"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        (worker,) = [p for p in _children(proc.pid) if p in worker_pids()]
        os.kill(worker, signal.SIGKILL)
        # The bound: noticed within 30 s (it takes ~0.2 s; before, TFF retried the dead worker forever,
        # silently). A hang guard, not a timing measurement: TimeoutExpired fails the test.
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    errors = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    error = errors[0]
    assert f"(pid {worker})" in error and "localhost:" in error and "killed by SIGKILL" in error, error
    assert str(out / "worker.log") in error, error
    done, ckpt = _check_failure_line(error, out)

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {out} from round {ckpt} (checkpoint)" in again.stdout
    assert [json.loads(s)["round"] for s in open(out / "metrics.jsonl")] == list(range(1, ROUNDS + 1))
    _check_rerun_charged_again(out, done, ckpt, ROUNDS)


def test_frozen_local_worker_ends_the_run_at_the_stall_limit_naming_it_and_a_rerun_resumes(tmp_path):
    """SIGSTOP the driver's own worker: before, the run waited forever, silently (the last line an ETA)."""
    from tests.conftest import run_driver

    out = tmp_path / "run"
    args = [*ARGS, "--stall_seconds=4", f"--output_dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run_federated", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        line = ""
        while not line.startswith("round 3/"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        (worker,) = [p for p in _children(proc.pid) if p in worker_pids()]
        os.kill(worker, signal.SIGSTOP)
        stdout, stderr = proc.communicate(timeout=60)  # a hang guard: TimeoutExpired fails the test
    finally:
        proc.kill()
        if worker in worker_pids():
            os.kill(worker, signal.SIGCONT)  # only if the test failed: the driver kills it
    assert proc.returncode == 1, stderr[-3000:]
    errors = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    m = re.match(rf"error: round (\d+) failed: WorkerStalled: local TFF worker localhost:\d+ \(pid {worker}\) gave "
                 r"no answer for (\d+) s \(stall limit 4 s: --stall_seconds\); ", errors[0])
    assert m and int(m.group(2)) >= 4, errors[0]
    done, ckpt = _check_failure_line(errors[0], out)
    assert f"round {done + 1}/{ROUNDS} | no answer for " in stdout  # the stalled round, not a stale ETA
    assert worker not in worker_pids()  # killed by its driver, which stopped
    # The rerun (here in-process, on the session's worker, and 2 rounds on) resumes from that checkpoint.
    assert run_driver([*args, f"--rounds={done + 2}"]) == 0
    assert [json.loads(s)["round"] for s in open(out / "metrics.jsonl")] == list(range(1, done + 3))
    _check_rerun_charged_again(out, done, ckpt, done + 2)


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = cols[1].split(":")
                raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, 2 * width, 8))  # host-order words
                family = socket.AF_INET if width == 4 else socket.AF_INET6
                found.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def _local_worker(tmp_path, **kw):
    from dpfl_tff import runtime

    warnings = []
    log = tmp_path / "worker.log"
    others = set(runtime.live_worker_pids())  # e.g. the session's `tff_context`
    with runtime.local_context(log_path=str(log), warn=warnings.append, **kw):
        (pid,) = set(runtime.live_worker_pids()) - others
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            port = int(f.read().split(b"--port=")[1].split(b"\0")[0])
        listening = _listening(pid)
    return pid, port, listening, warnings, log.read_text()


def _kernel() -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64") or _kernel() < (5, 6),
                    reason="needs seccomp user notification and pidfd_getfd (Linux >= 5.6, x86_64/aarch64)")
def test_local_worker_listens_on_loopback_only(tmp_path):
    pid, port, listening, warnings, log = _local_worker(tmp_path)
    assert warnings == []  # else the mechanism was refused here: the warning says why
    assert listening and {p for _, p in listening} == {port}, listening
    assert all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a, _ in listening), listening
    assert f"this worker listens on 127.0.0.1:{port} only (loopback)" in log


def _no_seccomp(monkeypatch, runtime):
    broken = {m: (arch, nr_bind, 99999) for m, (arch, nr_bind, _) in runtime.loopback_binding._SECCOMP_ARCH.items()}  # noqa: SLF001
    monkeypatch.setattr(runtime.loopback_binding, "_SECCOMP_ARCH", broken)  # seccomp(2) -> ENOSYS in the helper
    return "Function not implemented"


def _binder_dies(monkeypatch, runtime):
    def close(self):  # as if the thread had died: the worker's bind() gets ENOSYS, the worker exits
        os.close(self.listener)

    monkeypatch.setattr(runtime.loopback_binding._LoopbackBinder, "_run", close)  # noqa: SLF001
    return "the worker could not bind"


@pytest.mark.parametrize("breakage", [_no_seccomp, _binder_dies])
def test_without_the_mechanism_the_worker_listens_everywhere_and_one_line_says_so(tmp_path, monkeypatch, breakage):
    from dpfl_tff import runtime

    reason = breakage(monkeypatch, runtime)
    pid, port, listening, warnings, log = _local_worker(tmp_path)
    assert listening and {a for a, _ in listening} <= {"::", "0.0.0.0"}, listening
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"WARNING: local TFF worker: pid {pid}, port {port} (listens on all interfaces")
    assert reason in warnings[0] and 'see docs/several-machines.md "Security"' in warnings[0], warnings[0]
    assert warnings[0] in log
