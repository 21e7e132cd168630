"""dpfl_tff: differentially private federated learning simulations on TFF.

Importing the package imports `dpfl_tff.runtime`, which replaces TFF's
lazily-starting default execution context (see that module): TFF
computations run inside `runtime.local_context()` or
`runtime.remote_context(addresses)` only.
"""

from dpfl_tff import runtime  # noqa: F401
