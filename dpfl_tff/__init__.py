"""dpfl_tff: differentially private federated learning simulations on TFF.

Importing the package, or any module of it, has no side effect: it starts
nothing and changes no TFF setting. `dpfl_tff.config`, `dpfl_tff.plan`,
`dpfl_tff.privacy.accounting`, `dpfl_tff.outputs` and `dpfl_tff.plots` work
without TensorFlow. TFF computations run inside `runtime.local_context()` or
`runtime.remote_context(addresses)`, which first call `runtime.install()` (TFF's
worker-starting default context is replaced by one that raises).

The Python API (docs/python.md): `make_config(flagfile=None, **flags)`, `run(cfg)`,
`epsilon(**flags)` (no TensorFlow) and `load_model(run_dir)`; they import
what they need when called.
"""

from typing import Any


def make_config(flagfile: str | None = None, **flags: Any):
    """A checked `ExperimentConfig` from a flagfile and flag names (`dpfl_tff.api.make_config`)."""
    from dpfl_tff import api

    return api.make_config(flagfile, **flags)


def run(cfg=None, **kwargs: Any):
    """Trains `cfg` as the driver does, in this process; returns a `training.RunResult` (`dpfl_tff.api.run`)."""
    from dpfl_tff import api

    return api.run(cfg, **kwargs)


def epsilon(cfg=None, **kwargs: Any) -> dict:
    """Epsilon of a planned run, without training or TensorFlow (`dpfl_tff.api.epsilon`)."""
    from dpfl_tff import api

    return api.epsilon(cfg, **kwargs)


def load_model(run_dir: str, compile: bool = True):  # noqa: A002
    """The trained model of a run folder, compiled for `evaluate` (`dpfl_tff.trained_model.load_model`)."""
    from dpfl_tff.trained_model import load_model as _load

    return _load(run_dir, compile=compile)
