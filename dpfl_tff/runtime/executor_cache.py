"""Executors and caches on a worker: TFF's remote executor with its values kept, compilation cached by
identity, and a LearningProcess state kept in the worker between rounds (`keep_state_in_worker`), also
left there without coming back (`states_in_worker`: a `ResidentState`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_federated as tff
import tree

from dpfl_tff.runtime.tff_internals import (
    executor_pb2,
    structure,
    python_executor_stacks,
    remote_executor,
    remote_executor_stub,
    placements,
)
from dpfl_tff import serialization
from dpfl_tff.runtime.worker_calls import WorkerLost

class _RemoteExecutor(remote_executor.RemoteExecutor):
    """TFF's RemoteExecutor, with three savings per call of a computation.

    * `create_value` serializes with `serialization.serialize_into` (TFF's
      serializer spends ~30 ms on a 4.8 MB model state), and results are read
      with `serialization.deserialize` (2.8 -> 0.4 ms for the MLP's state).
    * A computation is sent to the worker once: TFF's execution context sends
      the (compiled, cached) computation with every call, ~3 ms per round for
      a small model. The worker's value of it is kept (for the 16 computations
      used last, until this executor closes) and called again; computations
      are immutable.
    """

    _KEEP = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._computations: collections.OrderedDict[int, tuple[object, remote_executor.RemoteValue, object]] = (
            collections.OrderedDict()
        )

    async def create_value(self, value, type_spec=None):
        if type_spec is None:
            return await super().create_value(value, type_spec)
        cached = self._computations.get(id(value)) if isinstance(type_spec, tff.FunctionType) else None
        if cached is not None and cached[0] is value and cached[2] == self._executor_id:  # noqa: SLF001
            self._computations.move_to_end(id(value))
            return cached[1]
        self._check_has_executor_id()
        request = executor_pb2.CreateValueRequest(executor=self._executor_id)  # noqa: SLF001
        serialization.serialize_into(value, type_spec, request.value)
        response = self._stub.create_value(request)  # noqa: SLF001
        if not isinstance(type_spec, tff.FunctionType):
            return remote_executor.RemoteValue(response.value_ref, type_spec, self)
        # Kept (with `value`, so that its id stays unique) until close(), which clears the
        # worker's state anyway: no dispose at interpreter exit, when the channel is closed.
        remote = remote_executor.RemoteValue(response.value_ref, type_spec, self, dispose_at_exit=False)
        self._computations[id(value)] = (value, remote, self._executor_id)  # noqa: SLF001
        self._computations.move_to_end(id(value))
        while len(self._computations) > self._KEEP:
            self._computations.popitem(last=False)  # the worker's copy is disposed when collected
        return remote

    async def _compute(self, value_ref, type_spec):
        if self._stream_structs:  # noqa: SLF001  (not used here; TFF's path)
            return await super()._compute(value_ref, type_spec)
        self._check_has_executor_id()
        request = executor_pb2.ComputeRequest(executor=self._executor_id, value_ref=value_ref)  # noqa: SLF001
        return serialization.deserialize(self._stub.compute(request).value, type_spec)  # noqa: SLF001

    def close(self):
        self._computations.clear()
        super().close()


class _ExecutorFactory(python_executor_stacks.ResourceManagingExecutorFactory):
    """TFF's factory (one executor per cardinalities), which can also close all its executors."""

    def close_all(self) -> None:
        """Closes every executor: the worker drops all values they hold (computations, states, data).

        The next call creates a new executor. Without this, a worker shared by
        several runs keeps every finished run's values (about 6 MiB per small
        run, measured), and grows with each run.
        """
        for ex in list(self._executors.values()):
            ex.close()
        self._executors.clear()


def _executor_factory(stub: remote_executor_stub.RemoteExecutorStub) -> _ExecutorFactory:
    def stack_fn(cardinalities):
        cardinalities.setdefault(placements.CLIENTS, 0)
        ex = _RemoteExecutor(stub)
        ex.set_cardinalities(cardinalities)
        return ex

    return _ExecutorFactory(stack_fn)


class _CompileByIdentity:
    """A compiler pipeline whose cache is looked up by the computation object, not by its hash.

    TFF's pipeline caches by `hash(computation)`, which serializes the whole
    computation proto on every call (0.8 ms per round for the MLP's `next`).
    Computations are immutable; the 16 compiled last are kept.
    """

    _KEEP = 16

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self._compiled: collections.OrderedDict[int, tuple[object, object]] = collections.OrderedDict()

    def compile(self, comp):
        hit = self._compiled.get(id(comp))
        if hit is not None and hit[0] is comp:
            self._compiled.move_to_end(id(comp))
            return hit[1]
        compiled = self._pipeline.compile(comp)
        self._compiled[id(comp)] = (comp, compiled)  # `comp` kept: its id stays unique
        while len(self._compiled) > self._KEEP:
            self._compiled.popitem(last=False)
        return compiled


def _struct_to_python(obj):
    return structure.to_odict_or_tuple(obj) if isinstance(obj, structure.Struct) else None


_KEEPS_STATE = "_dpfl_tff_keeps_state"


def keep_state_in_worker(comp, resident=None, fields: tuple[str, ...] = ()) -> None:
    """Marks `comp`, a `(state, data) -> (state, ...)` computation such as a LearningProcess's `next`.

    On our local worker (`local_context`), a marked computation's returned
    state also stays in the worker; a following call of it with that same
    state object, unchanged, uses the worker's copy instead of sending the
    state again (0.8 MB for the MLP, ~4 ms per round here). The state is
    still returned in full: the caller's copy is the state, checkpoints and
    failures see it as before. Its arrays are made read-only, so that it
    cannot change in place unnoticed (a changed state, a new one or a leaf
    replaced, is sent as before). Elsewhere (remote workers) the mark does
    nothing.

    Args:
      comp: the computation.
      resident: the same computation returning `<state, <metrics, state.f for f in fields>>`: what a
        call inside `states_in_worker()` runs instead, so that the state stays in the worker
        (a `ResidentState`) and only the metrics and these fields come back.
      fields: the state's fields `resident` returns.
    """
    setattr(comp, _KEEPS_STATE, (resident, tuple(fields)))


_requests = threading.local()


@contextlib.contextmanager
def states_in_worker() -> Iterator[None]:
    """In this block (this thread), a marked computation's state stays in our local worker: a `ResidentState`.

    A call of a `keep_state_in_worker` computation (with `resident`) on our
    local worker then returns a `ResidentState` for the state: the worker
    keeps it, and only the metrics and the state's `fields` come back (the
    MLP's round: no 0.8 MB state back to Python, ~3 ms). Passing it to the
    next call (or to any computation of this worker, e.g. `get_model_weights`)
    uses the worker's copy; `fetch_state` brings it back when it is needed
    (a checkpoint, the end). If the worker dies, a state that was not fetched
    is lost (`StateLost`). Elsewhere (remote workers) states come back as usual.
    """
    before = getattr(_requests, "resident", False)
    _requests.resident = True
    try:
        yield
    finally:
        _requests.resident = before


def resident_requested() -> bool:
    """Whether this thread is inside `states_in_worker()`."""
    return getattr(_requests, "resident", False)


class StateLost(RuntimeError):
    """A `ResidentState` that was never fetched is gone: its worker died or was stopped, or dropped its values."""


class ResidentState:
    """A process state left in our local worker (`states_in_worker`), with the fields that came back with it.

    The fields fetched with the round (e.g. `aggregator`) are attributes;
    any other attribute, and `_replace`, fetch the whole state first
    (`fetch`, once: it is then kept here, `fetched`). A computation of the
    same worker called with it uses the worker's copy.

    The fetch runs in the calling thread, on a gRPC call of its own: it does
    not queue behind a call still running on the worker (a round cut short in
    the caller by a second stop signal goes on in the context's thread). Only
    a failure of the worker (`WorkerLost`, `StateLost`) marks the state lost
    (`lost`); a fetch cut short in the caller (a signal handler's exception,
    KeyboardInterrupt) leaves it in the worker, to be fetched again. A handle
    is never a checkpoint's leaf (`checkpoints` refuses it): the state is
    fetched first.
    """

    def __init__(self, remote, type_spec, executor, cardinalities: dict, fields: dict[str, Any],
                 fetch: Callable[["ResidentState", float | None], Any]):
        self.remote, self.type_spec, self.executor = remote, type_spec, executor
        self.executor_id = executor._executor_id  # noqa: SLF001  (a closed executor's values are gone)
        self.cardinalities, self.fields, self._fetch = dict(cardinalities), fields, fetch
        self.fetched: Any = None  # the whole state, once fetched
        self.lost: BaseException | None = None  # why it could not be fetched (the worker failed)
        self._lock = threading.Lock()  # one fetch at a time (the round loop's thread, the watchdog's)

    def in_worker(self) -> bool:
        """Whether the worker still holds it (its executor was neither closed nor replaced)."""
        return self.executor._executor_id == self.executor_id  # noqa: SLF001

    def fetch(self, timeout: float | None = None) -> Any:
        """The whole state (from the worker the first time).

        Args:
          timeout: seconds to wait for the worker's answer (and for a fetch
            already under way in another thread); None: no limit (the
            watchdog abandons a worker that gives no answer).

        Raises:
          StateLost: the worker lost it (now, or at an earlier fetch).
          WorkerLost: the worker failed during this fetch (the state is then lost).
          TimeoutError: no answer within `timeout` (the state stays fetchable).
        """
        if self.fetched is not None:
            return self.fetched
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"the state is being fetched by another thread (waited {timeout:g} s)")
        try:
            if self.fetched is None:
                if self.lost is not None:
                    raise StateLost(f"the state was lost with its worker ({self.lost})") from self.lost
                try:
                    self.fetched = self._fetch(self, timeout)
                except (WorkerLost, StateLost) as e:  # the worker's failure; anything else leaves it fetchable
                    self.lost = e
                    raise
        finally:
            self._lock.release()
        return self.fetched

    def __getattr__(self, name: str):  # only for names that are not attributes of this object
        if name.startswith("__"):
            raise AttributeError(name)
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        return getattr(self.fetch(), name)

    def __reduce__(self):  # never pickled (a checkpoint, a process pool): the state must be fetched first
        raise TypeError("a ResidentState (a state left in the TFF worker) cannot be pickled: fetch it first "
                        "(runtime.fetch_state)")

    def _replace(self, **changes):
        return self.fetch()._replace(**changes)


def fetch_state(state: Any) -> Any:
    """`state` itself, or the whole state a `ResidentState` stands for (fetched from the worker once)."""
    return state.fetch() if isinstance(state, ResidentState) else state


class _KeptState:
    """A state returned by a `keep_state_in_worker` computation and the worker's copy of it."""

    def __init__(self, state, remote, executor):
        self.state, self.remote, self.executor = state, remote, executor
        self.leaves = tree.flatten(state)
        for leaf in self.leaves:
            if isinstance(leaf, np.ndarray):
                leaf.flags.writeable = False

    def unchanged(self, state) -> bool:
        """Whether `state` is the kept object, with the same leaves, none of them made writable again."""
        if state is not self.state:
            return False
        leaves = tree.flatten(state)
        return len(leaves) == len(self.leaves) and all(
            a is b and not (isinstance(a, np.ndarray) and a.flags.writeable) for a, b in zip(leaves, self.leaves))


