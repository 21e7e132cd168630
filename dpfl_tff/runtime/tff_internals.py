"""The private TensorFlow Federated modules the runtime builds on, in one place, behind a version check.

dpfl_tff's contexts, executors and worker handling subclass and call TFF
internals (its async/sync execution contexts, the remote executor and its
gRPC stub, the compiler pipeline, the context stack) whose names and
behaviour change between TFF releases. They are imported here only, and only
for the TFF versions this code was written and tested against
(`SUPPORTED_TFF_VERSIONS`); any other version fails at import with one line
that says which versions work, instead of a missing attribute deep inside a
round.
"""

from __future__ import annotations

import tensorflow_federated as tff

SUPPORTED_TFF_VERSIONS = ("0.87.0",)

if tff.__version__ not in SUPPORTED_TFF_VERSIONS:
    raise ImportError(
        f"dpfl_tff.runtime supports tensorflow-federated {', '.join(SUPPORTED_TFF_VERSIONS)} only (it uses TFF's "
        f"private execution-context and executor modules); found {tff.__version__}. Install the locked "
        "environment: `uv sync` (uv.lock pins tensorflow-federated==0.87.0)."
    )

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure, tracing
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.computation import function_utils
from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl, runtime_error_context
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import executors_errors
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub, remote_executor_stub
from tensorflow_federated.python.core.impl.types import placements, type_conversions

__all__ = [
    "async_execution_context", "context_base", "context_stack_impl", "executor_pb2", "executors_errors",
    "function_utils", "mergeable_comp_compiler", "mergeable_comp_execution_context", "native_compiler", "placements",
    "python_executor_stacks", "remote_executor", "remote_executor_grpc_stub", "remote_executor_stub",
    "runtime_error_context", "structure", "sync_execution_context", "tensorflow_computation", "tracing",
    "type_conversions",
]
