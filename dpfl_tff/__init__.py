"""dpfl_tff: differentially private federated learning simulations on TFF.

Importing the package, or any module of it, has no side effect: it starts
nothing and changes no TFF setting. `dpfl_tff.config`, `dpfl_tff.plan`,
`dpfl_tff.privacy.accounting`, `dpfl_tff.outputs` and `dpfl_tff.plots` work
without TensorFlow. TFF computations run inside `runtime.local_context()` or
`runtime.remote_context(addresses)`, which first call `runtime.install()` (TFF's
worker-starting default context is replaced by one that raises).
"""


def load_model(run_dir: str, compile: bool = True):  # noqa: A002
    """The trained model of a run folder, compiled for `evaluate` (`dpfl_tff.trained_model.load_model`)."""
    from dpfl_tff.trained_model import load_model as _load

    return _load(run_dir, compile=compile)
