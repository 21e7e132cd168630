"""A candidate's private score (`selection`): its final model's accuracy on the clients' examples, noised once.

Each client of a Poisson sample (probability q = --score_sampling_rate, from
OS entropy) adds its accuracy on its own examples, a value in [0, 1] (0 for a
client without examples), so adding, removing or replacing one client moves
the sum by at most 1 (sensitivity 1). The sum gets one Gaussian draw of std
sigma = --score_noise_multiplier from `privacy.sampler` (float64, bounded at
14.7 sigma: the out-of-reach term `selection.score_out_of_reach` is in the
stated delta), and the released score is (sum + noise) / (q N), N the number
of clients (public, as in the accounting's q = m / N). Only that score is
released: the sample and its size are not. Accounted by
`privacy.events.score_release`. The examples are the clients' training
examples (a held-out split per client is not implemented): the score is DP
either way, but favours settings that fit the clients' own data.

The final model is read from the run folder's newest checkpoint (the learning
state is flattened with the model's trainable then non-trainable weights
first, `checkpoints.CheckpointManager.check_fits`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.selection import SelectionConfig


def final_weights(folder: str, count: int) -> tuple[int, list[np.ndarray]]:
    """(round, the first `count` arrays) of the newest checkpoint of the run in `folder`.

    Raises:
      ValueError: no checkpoint, or a damaged one.
    """
    from dpfl_tff.checkpoints import CHECKPOINTS, CheckpointManager, stored_names

    ckpts = CheckpointManager(folder)
    rounds = ckpts.rounds()
    if not rounds:
        raise ValueError(f"no checkpoint in {os.path.join(folder, CHECKPOINTS)}: the candidate's model is missing")
    meta = ckpts._readable(rounds[-1])  # noqa: SLF001  (checks the checksum)
    with np.load(os.path.join(ckpts.dir, f"ckpt_{rounds[-1]:06d}", "state.npz"), allow_pickle=False) as z:
        return int(meta["round"]), [z[name] for name in stored_names(meta)[:count]]


def client_accuracies(model: Any, clients, batch_size: int = 1024) -> np.ndarray:
    """Each client's accuracy in [0, 1] on its examples (argmax of the logits; 0 for an empty client)."""
    out = np.zeros(len(clients), dtype=np.float64)
    for i, c in enumerate(clients):
        n = len(c)
        if n == 0:
            continue
        hits = 0.0
        for s in range(0, n, batch_size):
            logits = model(c.x[s:s + batch_size], training=False).numpy()
            hits += float(np.sum(np.argmax(logits, axis=-1) == c.y[s:s + batch_size]) /
                          max(1, int(np.prod(c.y.shape[1:]))))
        out[i] = min(1.0, max(0.0, hits / n))
    return out


def private_score(cfg: ExperimentConfig, sel: SelectionConfig, op_seed: int | None = None) -> dict[str, Any]:
    """The candidate's released score and its noise std in accuracy units (see the module docstring).

    `op_seed` seeds the client sample and the noise (tests only: then there is no privacy).
    """
    from dpfl_tff.privacy import sampler
    from dpfl_tff.process import keras_model
    from dpfl_tff.tasks import load_task

    data = load_task(cfg.task, cfg.train.seed)
    model = keras_model(cfg, data)
    variables = model.trainable_weights + model.non_trainable_weights
    round_num, arrays = final_weights(cfg.output_dir, len(variables))
    for v, a in zip(variables, arrays):
        v.assign(a)
    n = data.num_clients
    rng = np.random.default_rng(op_seed)  # None: OS entropy
    q = sel.score_sampling_rate
    sample = np.arange(n) if q >= 1 else np.nonzero(rng.random(n) < q)[0]
    total = float(np.sum(client_accuracies(model, [data.clients[int(i)] for i in sample])))
    noise = float(sampler.normal([1], op_seed=op_seed).numpy()[0]) * sel.score_noise_multiplier
    expected = q * n
    return {"score": (total + noise) / expected, "score_noise_std": sel.score_noise_multiplier / expected,
            "model_round": round_num}
