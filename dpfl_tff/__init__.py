"""dpfl_tff: differentially private federated learning simulations on TFF.

Importing the package imports nothing heavy: `dpfl_tff.config`, `dpfl_tff.outputs`
and `dpfl_tff.plots` work without TensorFlow Federated. The modules that build TFF
computations (`training`, `grouped_fedavg`, `privacy.aggregators`, `privacy.local`,
`privacy.nonfinite`) import `dpfl_tff.runtime`, which replaces TFF's
lazily-starting default execution context (see that module): TFF computations
run inside `runtime.local_context()` or `runtime.remote_context(addresses)` only.
"""
