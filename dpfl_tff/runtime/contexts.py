"""TFF execution contexts: `local_context()` (a private local worker), `remote_context()` (worker services),
`execution_context()` (either, from a config), and `install()` (TFF's lazily-starting default replaced).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import grpc
import tensorflow_federated as tff
import tree

from dpfl_tff.runtime.tff_internals import (
    structure,
    tracing,
    native_compiler,
    mergeable_comp_compiler,
    tensorflow_computation,
    function_utils,
    context_base,
    context_stack_impl,
    runtime_error_context,
    async_execution_context,
    mergeable_comp_execution_context,
    sync_execution_context,
    executors_errors,
    executor_pb2,
    placements,
    remote_executor_grpc_stub,
    type_conversions,
)
from dpfl_tff import serialization, worker_auth
from dpfl_tff.runtime.executor_cache import (
    _KEEPS_STATE,
    ResidentState,
    StateLost,
    _CompileByIdentity,
    _ExecutorFactory,
    _executor_factory,
    _KeptState,
    _struct_to_python,
    resident_requested,
)
from dpfl_tff.runtime.loopback_binding import _LoopbackBinder
from dpfl_tff.runtime.worker_calls import LocalWorkerDied, WorkerLost, _grpc_reason, _WatchedStub
from dpfl_tff.runtime.worker_process import (
    GRPC_CHANNEL_OPTIONS,
    _binders,
    _live_workers,
    loopback_status,
    start_worker,
    stop_worker,
    wait_until_ready,
)

_active_local: list["_LocalWorker"] = []

_installed = False


def install() -> None:
    """Replaces TFF's lazily-starting default context by one that raises (idempotent).

    TFF's own default context starts a `worker_binary` on the first call made
    outside any context and stops it only from a garbage-collection `__del__`:
    a driver that is killed, or whose stdout is a pipe, then leaves an orphan
    worker. After this, such a call fails with a clear error instead. It also
    turns TFF's tracing spans (debug log lines) off. Every context here calls
    it on entry (so that leaving the context restores the raising one, never
    TFF's); call it yourself before running TFF computations of your own
    outside them.
    """
    global _installed
    if not _installed:
        # TFF's only default tracing provider logs two absl debug lines per traced call (~1-2 ms per round
        # of the MLP); set once, before our first call (changing it while a span is open trips TFF's asserts).
        tracing.set_tracing_providers([])
        context_stack_impl.context_stack.set_default_context(runtime_error_context.create_runtime_error_context())
        gc.collect()  # free TFF's replaced context now, not at interpreter exit when its __del__ fails
        _installed = True


_INVOKE_ONCE = async_execution_context.AsyncExecutionContext.invoke.__wrapped__
# Between a dead worker's socket closing and its exit status being reapable.
_EXIT_GRACE_SECONDS = 1.0


def _run_coroutine(coroutine) -> Any:
    """Runs `coroutine` to completion on a new event loop in this (worker) thread."""
    return asyncio.run(coroutine)


class _WorkerContext(async_execution_context.AsyncExecutionContext):
    """Runs calls on one worker; gives up after `retry_seconds` of failures.

    A remote worker's call (`proc` None) runs in a thread of its own, on its
    own event loop: TFF's RemoteExecutor makes blocking gRPC calls inside its
    coroutines, so on one event loop the workers of a mergeable call (one
    subround each) would run one after the other, not at the same time.

    For a remote worker (`proc` None) any gRPC failure that is not retryable,
    or retryable ones for `retry_seconds`, raise `WorkerLost`. For our local
    worker (`proc` given), a failed call first checks whether the process
    exited (a dead worker closes its socket, so a call blocked on it returns
    at once) and raises `LocalWorkerDied` with its exit status; errors of a
    live worker that are not retryable are raised unchanged. Successful calls
    cost nothing extra.
    """

    def __init__(
        self,
        address: str,
        stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub,
        retry_seconds: float,
        proc: subprocess.Popen | None = None,
        log_path: str | None = None,
    ):
        if proc is not None:
            name = f"local TFF worker {address} (pid {proc.pid})"
            abandon = proc.kill  # our child: its socket closes, so the call returns
        else:
            name = f"TFF worker at {address}"
            abandon = stub._channel.close  # noqa: SLF001  (cancels the calls on it)
        self.watched = _WatchedStub(stub, name, abandon)
        super().__init__(
            executor_fn=_executor_factory(self.watched),
            compiler_fn=native_compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._compiler_pipeline = _CompileByIdentity(self._compiler_pipeline)
        self._kept: _KeptState | None = None
        self.address = address
        self._retry_seconds = retry_seconds
        self._proc = proc
        self._log_path = log_path
        # Its own thread (asyncio's default pool has min(32, cores + 4) threads: more workers would queue).
        self._thread = None if proc is not None else concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"dpfl_tff_worker_{address}")

    def shutdown(self) -> None:
        """Ends the remote worker's call thread (a sweep opens one remote context per run)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def _check_alive(self, grace: float) -> None:
        """Raises `LocalWorkerDied` if the local worker exits within `grace` seconds."""
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return
        raise LocalWorkerDied(self.address, self._proc, self._log_path)

    async def invoke(self, comp, arg, resident: bool = False):
        if asyncio.iscoroutine(arg):
            arg = await arg  # once: a retry must not await it again
        deadline = time.monotonic() + self._retry_seconds
        wait = 0.1
        while True:
            try:
                if self._proc is None:
                    return await asyncio.get_running_loop().run_in_executor(
                        self._thread, _run_coroutine, _INVOKE_ONCE(self, comp, arg))
                if getattr(comp, _KEEPS_STATE, None) is not None or _resident_in(arg) is not None:
                    return await self._invoke_in_worker(comp, arg, resident)
                return await _INVOKE_ONCE(self, comp, arg)
            except (executors_errors.RetryableError, grpc.RpcError) as e:
                retryable = isinstance(e, executors_errors.RetryableError)
                if self._proc is not None:
                    try:
                        self._check_alive(_EXIT_GRACE_SECONDS if retryable else 0.0)
                    except LocalWorkerDied as died:
                        raise died from e
                    if not retryable:
                        raise
                if not retryable or time.monotonic() > deadline:
                    raise WorkerLost(self.address, e) from e
                await asyncio.sleep(wait)
                wait = min(2 * wait, 2.0)

    async def _invoke_in_worker(self, comp, arg, resident: bool):
        """TFF's invoke (without its retries) on our local worker, for states that stay in the worker.

        * A `keep_state_in_worker` computation: the state it returns is also
          kept in the worker (a selection of the result); if the next call
          passes that same state object, unchanged (`_KeptState.unchanged`),
          the kept copy is used instead of sending the state again.
        * With `resident` (`states_in_worker`) and the mark's `resident`
          computation, that one runs instead and the state is returned as a
          `ResidentState`: only the metrics and the mark's fields come back.
        * An argument holding a `ResidentState` of this worker uses the
          worker's copy (run on its executor: the same cardinalities); one of
          another executor (another number of clients) is fetched and sent.
        """
        mark = getattr(comp, _KEEPS_STATE, None)
        stays = resident and mark is not None and mark[0] is not None
        kept = None
        if mark is not None and not stays:  # the state kept by the last call of a marked computation, if any
            kept, self._kept = self._kept, None
        where = _resident_index(arg)
        held = _resident_in(arg)
        if held is not None:
            arg = _with_resident(arg, None, where)  # a placeholder: cardinalities and transforms never see it
        elements = structure.to_elements(arg) if isinstance(arg, structure.Struct) else []
        state = elements[0][1] if elements else None
        if self._transform_args is not None and arg is not None:  # as TFF's invoke: normalized and transformed
            if isinstance(arg, structure.Struct):
                args, kwargs = function_utils.unpack_args_from_struct(arg)
                args = self._transform_args(tree.traverse(_struct_to_python, args))
                kwargs = self._transform_args(tree.traverse(_struct_to_python, kwargs))
                arg = function_utils.pack_args_into_struct(args, kwargs)
            else:
                arg = self._transform_args(tree.traverse(_struct_to_python, arg))
        result_type = comp.type_signature.result
        target = mark[0] if stays else comp
        compiled = self._compiler_pipeline.compile(target)
        cardinalities = self._cardinality_inference_fn(arg, compiled.type_signature.parameter)
        if held is not None:
            param = compiled.type_signature.parameter
            if held.in_worker() and _fits(held.cardinalities, cardinalities) and isinstance(
                    param if where < 0 else param[where], tff.FederatedType):  # else: fetched (an unplaced one)
                cardinalities = held.cardinalities
            else:  # another executor's (or a lost) state: sent from Python
                arg = _with_resident(arg, held.fetch(), where)
                held = None
        with self._reset_factory_on_error(self._executor_factory, cardinalities) as executor:
            try:
                if held is not None:
                    if held.executor is not executor:
                        raise StateLost("the worker's copy of the state is gone (its executor was reset)")
                    arg = _with_resident(arg, held.remote, where)
                elif kept is not None and kept.executor is executor and kept.unchanged(state):
                    arg = structure.Struct([(elements[0][0], kept.remote), *list(structure.iter_elements(arg))[1:]])
                if arg is not None:
                    arg = await async_execution_context._ingest(  # noqa: SLF001
                        executor, arg, compiled.type_signature.parameter)
                call = await executor.create_call(await executor.create_value(compiled, compiled.type_signature), arg)
                if stays:
                    return await self._resident_result(executor, call, cardinalities, result_type, target, mark[1])
                remote_state = await executor.create_selection(call, 0) if mark is not None else None
                result = type_conversions.type_to_py_container(await call.compute(), result_type)
            except Exception:
                # The state the call started from is still the worker's (unless it died): fetched now, before the
                # executor is reset, so that the failed round's caller can still checkpoint it (a worker's
                # failure marks it lost).
                if held is not None and held.fetched is None and self._proc.poll() is None:
                    with contextlib.suppress(Exception):  # the call's error is the one to raise
                        held.fetch()
                raise
            if self._transform_result is not None:
                result = self._transform_result(result)
            if remote_state is not None:
                self._kept = _KeptState(result[0], remote_state, executor)
            return result

    async def _resident_result(self, executor, call, cardinalities, result_type, target, fields):
        """`<state, metrics>` of a `resident` call: the state a `ResidentState`, the metrics and `fields` fetched."""
        remote_state = await executor.create_selection(call, 0)
        fetched_type = target.type_signature.result[1]
        fetched = await (await executor.create_selection(call, 1)).compute()
        metrics = type_conversions.type_to_py_container(fetched[0], result_type[1])
        values = {name: type_conversions.type_to_py_container(fetched[i + 1], fetched_type[i + 1])
                  for i, name in enumerate(fields)}
        if self._transform_result is not None:
            metrics, values = self._transform_result(metrics), self._transform_result(values)
        state = ResidentState(remote_state, result_type[0], executor, cardinalities, values, self.fetch_state)
        container = getattr(result_type, "python_container", None) or tuple
        return container((state, metrics)) if container is tuple else container(state, metrics)

    def fetch_state(self, held: ResidentState, timeout: float | None = None):
        """The whole state `held` stands for, from the worker, in the calling thread (`ResidentState.fetch`).

        One gRPC call of its own (a deadline of `timeout` seconds, if given):
        not on the context's event loop, where a round cut short in the caller
        may still be running, so it does not wait for that round; the worker
        answers it meanwhile. Raises `StateLost` or `WorkerLost` (the state is
        then lost), `TimeoutError` past `timeout`, or what cut it short.
        """
        if not held.in_worker():
            raise StateLost("the worker's copy of the state is gone (its executor was closed)")
        request = executor_pb2.ComputeRequest(executor=held.executor_id, value_ref=held.remote.reference)
        try:
            response = self.watched.compute_within(request, timeout)
        except (executors_errors.RetryableError, grpc.RpcError) as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            self._check_alive(_EXIT_GRACE_SECONDS if isinstance(e, executors_errors.RetryableError) else 0.0)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"{self.watched.worker} gave no answer for {timeout:g} s") from e
            raise WorkerLost(self.address, e) from e
        value = type_conversions.type_to_py_container(
            serialization.deserialize(response.value, held.type_spec), held.type_spec)
        if self._transform_result is not None:
            value = self._transform_result(value)
        return _KeptState(value, None, None).state  # read-only arrays, as a returned state's


def _resident_in(arg) -> ResidentState | None:
    """The `ResidentState` an argument holds: the argument itself, or one of its elements."""
    where = _resident_index(arg)
    if where is None:
        return None
    return arg if where < 0 else arg[where]


def _resident_index(arg) -> int | None:
    """-1 if `arg` is a `ResidentState`, the index of the element that is one, or None."""
    if isinstance(arg, ResidentState):
        return -1
    if isinstance(arg, structure.Struct):
        for i, (_, v) in enumerate(structure.iter_elements(arg)):
            if isinstance(v, ResidentState):
                return i
    return None


def _with_resident(arg, value, where: int):
    """`arg` with its element `where` (-1: the whole argument), the state, replaced by `value`."""
    if where < 0:
        return value
    elements = structure.to_elements(arg)
    elements[where] = (elements[where][0], value)
    return structure.Struct(elements)


def _fits(held: dict, inferred: dict) -> bool:
    """Whether a call whose argument needs `inferred` cardinalities can run on the executor of `held`'s."""
    full = {placements.CLIENTS: 0, **held}
    return all(full.get(k) == v for k, v in inferred.items())


class _SyncWorkerContext(sync_execution_context.SyncExecutionContext):
    """TFF's sync context over a `_WorkerContext` instead of its forever-retrying async context."""

    def __init__(self, worker_context: _WorkerContext):
        super().__init__(
            executor_fn=worker_context.executor_factory,
            compiler_fn=native_compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._async_context = worker_context  # what SyncExecutionContext.invoke runs

    def invoke(self, comp, arg):
        # `states_in_worker` is read here, in the caller's thread: the call itself runs on the runner's.
        return self._async_runner.run_coro_and_return_result(
            self._async_context.invoke(comp, arg, resident_requested()))


class WorkersUnreachable(RuntimeError):
    """Some `--workers` addresses did not answer before training."""


class WorkersRefused(WorkersUnreachable):
    """A `--workers` address answered, but the TLS handshake failed: the two sides hold different credentials."""


def check_reachable(
    addresses: list[str], timeout: float, credential: worker_auth.Credential | None = None
) -> list[remote_executor_grpc_stub.RemoteExecutorGrpcStub]:
    """Connects to every address; raises naming all that do not answer within `timeout` seconds.

    Each address is first probed by one connection of our own
    (`worker_auth.probe` with `credential`, else `worker_auth.probe_insecure`),
    so that a worker holding another credential, or none, is named with the
    reason at once instead of gRPC's retrying it silently until the timeout.

    Args:
      addresses: `host:port` of each worker.
      timeout: seconds to wait for all of them.
      credential: the driver's credential (mutual TLS), or None for workers
        started with `--insecure_workers`.

    Returns:
      One stub per address, in order.

    Raises:
      WorkersRefused: a worker and this driver do not hold the same credential.
      WorkersUnreachable: some addresses did not answer.
    """
    deadline = time.monotonic() + timeout
    pending = list(addresses)
    while pending:
        for a in list(pending):
            wait = max(0.2, min(2.0, deadline - time.monotonic()))
            try:
                up = worker_auth.probe(a, credential, wait) if credential else worker_auth.probe_insecure(a, wait)
            except worker_auth.Refused as e:
                raise WorkersRefused(f"--workers: {e}") from None
            if up:
                pending.remove(a)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if credential is None:
        channels = [grpc.insecure_channel(a, GRPC_CHANNEL_OPTIONS) for a in addresses]
    else:
        channels = [worker_auth.secure_channel(a, credential, GRPC_CHANNEL_OPTIONS) for a in addresses]
    stubs = [remote_executor_grpc_stub.RemoteExecutorGrpcStub(c) for c in channels]
    while not pending and not all(s.is_ready for s in stubs) and time.monotonic() < deadline:
        time.sleep(0.05)
    down = pending or [a for a, s in zip(addresses, stubs) if not s.is_ready]
    if down:
        for c in channels:
            _close_unready_channel(c)
        raise WorkersUnreachable(
            f"--workers: TFF worker(s) not reachable after {timeout:g} s: {', '.join(down)} "
            "(start one per address with `uv run python -m experiments.run_worker --port=PORT`, or raise "
            "--worker_timeout)"
        )
    return stubs


@contextlib.contextmanager
def remote_context(
    addresses: list[str], timeout: float = 30.0, credential: worker_auth.Credential | None = None
) -> Iterator[None]:
    """Runs TFF computations on remote worker services for the `with` block.

    Every computation is compiled to TFF's mergeable form
    (`compile_to_mergeable_comp_form`): the clients of a call are split into
    one subround per worker, each worker runs the client work and the
    aggregation up to the merge of partial aggregates, and the merge and
    everything after it (for central DP: the noise, added once to the merged
    sum, and the server update) run once. A computation with a dependent
    second aggregation cannot be split and fails to compile.

    The workers are not ours: they are neither started nor stopped here.

    Args:
      addresses: `host:port` of each worker (`experiments.run_worker`).
      timeout: seconds to wait for every worker before starting, and how long
        a subround keeps retrying a worker that stopped answering before the
        call fails with `WorkerLost` naming it.
      credential: the driver's credential (`worker_auth.load(dir, "driver")`):
        every channel is mutual TLS with workers started with the same
        credential. None: workers started with `--insecure_workers`
        (unauthenticated, unencrypted); one warning line on stderr says so.

    Raises:
      WorkersRefused: a worker holds another credential, or none.
      WorkersUnreachable: a worker is not reachable within `timeout`.
    """
    install()
    if credential is None:
        _warn(f"WARNING: --insecure_workers: {', '.join(addresses)}: unauthenticated and unencrypted; anyone who "
              "can reach these ports can run code there and read the data sent (docs/several-machines.md "
              "\"Security\")")
    stubs = check_reachable(list(addresses), timeout, credential)
    contexts = [_WorkerContext(a, s, timeout) for a, s in zip(addresses, stubs)]
    stack = context_stack_impl.context_stack
    previous = stack.current
    stack.set_default_context(
        mergeable_comp_execution_context.MergeableCompExecutionContext(
            async_contexts=contexts,
            compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
        )  # as tff.backends.native.create_mergeable_comp_execution_context builds it
    )
    try:
        yield
    finally:
        stack.set_default_context(previous)
        for c in contexts:  # values collected from now on are not disposed (no call on a closed channel)
            c.watched.close()
        for s in stubs:  # first: a call still waiting on a frozen worker is cancelled, so its thread ends
            s._channel.close()  # noqa: SLF001  (the stub owns no close())
        for c in contexts:
            c.shutdown()


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _LocalWorker:
    """Our private local worker: started at once, connected (`connect`) when first needed."""

    def __init__(self, log: IO | None, log_path: str | None, startup_timeout: float, retry_seconds: float,
                 warn: Callable[[str], None]):
        self.log, self.log_path, self.warn = log, log_path, warn
        self.startup_timeout, self.retry_seconds = startup_timeout, retry_seconds
        self.proc, self.port = start_worker(log=log, loopback_only=True)
        self.address = f"localhost:{self.port}"
        self.channel: grpc.Channel | None = None
        self.context: _SyncWorkerContext | None = None

    def connect(self) -> _SyncWorkerContext:
        """Waits until the worker answers (restarting it once without the loopback redirection if that failed)."""
        if self.context is not None:
            return self.context
        try:
            self.address, self.channel, stub = _connect(self.proc, self.port, self.startup_timeout)
            reason = loopback_status(self.proc)
        except RuntimeError as e:
            binder = _binders.get(self.proc)
            if not isinstance(binder, _LoopbackBinder) or binder.bound:
                raise
            # The redirection itself failed (the worker could not bind): once more, as TFF starts it.
            reason = f"{binder.failure or 'the worker could not bind'}; {e}"
            stop_worker(self.proc)
            self.proc, self.port = start_worker(log=self.log)
            self.address, self.channel, stub = _connect(self.proc, self.port, self.startup_timeout)
        if reason is not None:
            line = (
                f"WARNING: local TFF worker: pid {self.proc.pid}, port {self.port} (listens on all interfaces, "
                f"unauthenticated: could not restrict it to loopback: {reason}; see docs/several-machines.md "
                "\"Security\")"
            )
            self.warn(line)
            if self.log is not None:
                os.write(self.log.fileno(), f"dpfl_tff: {line}\n".encode())
        self.context = _SyncWorkerContext(
            _WorkerContext(self.address, stub, self.retry_seconds, proc=self.proc, log_path=self.log_path))
        return self.context

    def close(self) -> None:
        if self.context is not None:  # values collected from now on are not disposed (no call on a closed channel)
            self.context._async_context.watched.close()  # noqa: SLF001
        if self.channel is not None:
            self.channel.close()
        stop_worker(self.proc)


class _StartingWorkerContext(context_base.SyncContext):
    """The context of a `local_context(wait=False)` block: its first call waits for the worker, then runs there."""

    def __init__(self, worker: _LocalWorker):
        self._worker = worker

    @property
    def executor_factory(self):
        return self._worker.connect().executor_factory

    def invoke(self, comp, arg):
        return self._worker.connect().invoke(comp, arg)


@contextlib.contextmanager
def local_context(
    log_path: str | None = None,
    startup_timeout: float = 60.0,
    retry_seconds: float = 30.0,
    warn: Callable[[str], None] = _warn,
    wait: bool = True,
) -> Iterator[None]:
    """Runs TFF computations on a private local worker for the `with` block.

    The worker listens on loopback only (`start_worker(loopback_only=True)`).
    Where this machine does not allow that, it listens on all interfaces, as
    TFF's worker does, and one line through `warn` (stderr by default, and the
    worker log) gives its pid, its port and the reason.

    A call that fails because the worker died raises `LocalWorkerDied` (a
    `WorkerLost`) at once, with the worker's exit status, and so does the next
    call if it died between calls; a live worker that keeps answering
    UNAVAILABLE fails the call with `WorkerLost` after `retry_seconds`.

    Args:
      log_path: file that receives the worker's output (appended); /dev/null
        when None.
      startup_timeout: seconds to wait for the worker to answer.
      retry_seconds: how long a call retries a live worker that does not answer.
      warn: receives the line saying the worker listens on all interfaces.
      wait: wait on entry until the worker answers. False: the block starts
        while the worker is still starting (about 1 s here), and the first TFF
        call waits for it (and raises what entering would have raised); a run
        builds its computations meanwhile.

    Yields:
      Nothing; TFF computations invoked inside the block use the worker.
    """
    install()
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115
    worker = None
    stack = context_stack_impl.context_stack
    previous = stack.current
    try:
        worker = _LocalWorker(log, log_path, startup_timeout, retry_seconds, warn)
        stack.set_default_context(worker.connect() if wait else _StartingWorkerContext(worker))
        _active_local.append(worker)
        try:
            yield
        finally:
            _active_local.pop()
    finally:
        stack.set_default_context(previous)
        if worker is not None:
            worker.close()
        if log is not None:
            log.close()


def _connect(
    proc: subprocess.Popen, port: int, timeout: float
) -> tuple[str, grpc.Channel, remote_executor_grpc_stub.RemoteExecutorGrpcStub]:
    """A channel and stub to our worker on `port`, once it answers (else RuntimeError)."""
    address = f"localhost:{port}"
    channel = grpc.insecure_channel(address, GRPC_CHANNEL_OPTIONS)
    try:
        stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
        wait_until_ready(stub, address, timeout, proc)
    except BaseException:
        _close_unready_channel(channel)
        raise
    return address, channel, stub


def _close_unready_channel(channel: grpc.Channel) -> None:
    """Closes a channel that never connected once its connectivity-polling thread has stopped.

    Closed while that thread still tries to connect, the thread dies with "Cannot monitor channel state:
    Channel closed!" and a traceback on stderr. It stops within ~0.2 s once nothing is subscribed.
    """
    state = getattr(channel, "_connectivity_state", None)
    if state is not None and hasattr(channel, "_unsubscribe_all"):
        channel._unsubscribe_all()  # noqa: SLF001
        deadline = time.monotonic() + 1.0
        while state.polling and time.monotonic() < deadline:
            time.sleep(0.01)
    channel.close()


def execution_context(
    workers: tuple[str, ...] | list[str], log_path: str | None = None, timeout: float = 30.0,
    credential: worker_auth.Credential | None = None,
) -> contextlib.AbstractContextManager[None]:
    """The context a run executes in.

    `remote_context(workers, timeout, credential)` if workers are given. Otherwise, inside
    an enclosing `local_context()` (a sweep, a notebook, a test session), that
    context's worker is used, `log_path` gets one line naming it, and on
    leaving the block the worker's values of the block are cleared (its
    executors closed: a shared worker does not grow run by run); else a new
    `local_context(log_path, wait=False)`: the worker starts while the run
    builds its computations, and the first call waits for it.
    """
    if workers:
        return remote_context(list(workers), timeout, credential)
    if _active_local:
        return _reuse_local(log_path)
    return local_context(log_path=log_path, wait=False)


@contextlib.contextmanager
def _reuse_local(log_path: str | None) -> Iterator[None]:
    worker = _active_local[-1]
    worker.connect()  # its final pid and address (a restart without the loopback redirection changes them)
    proc = worker.proc
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"dpfl_tff: this run used the TFF worker of an enclosing runtime.local_context() (pid "
                    f"{proc.pid}, {worker.address}); its output goes to {worker.log_path or '/dev/null'}\n")
    try:
        yield
    finally:  # the shared worker forgets this run's values: a sweep's worker does not grow run by run
        factory = getattr(context_stack_impl.context_stack.current, "executor_factory", None)
        if isinstance(factory, _ExecutorFactory) and proc.poll() is None:
            try:
                factory.close_all()
            except (grpc.RpcError, executors_errors.RetryableError) as e:  # a worker that stopped answering
                _warn(f"WARNING: could not clear the shared TFF worker's values after the run: {_grpc_reason(e)}")


def live_worker_pids() -> list[int]:
    """Pids of workers started by this process that are still running."""
    return [p.pid for p in _live_workers if p.poll() is None]
