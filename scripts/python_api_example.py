"""The Python API in one page: epsilon first, then a run, its records, its epsilon and its model.

  uv run python scripts/python_api_example.py [--rounds=20] [--output_dir=runs/python_api]

Run from the project root (the flagfile path is relative to it). The last line
of stdout is one JSON object (epsilon planned and spent, final test accuracy,
the loaded model's accuracy). tests/test_python_api.py runs it.
"""

from __future__ import annotations

import argparse
import json

import dpfl_tff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output_dir", default="runs/python_api")
    args = parser.parse_args()

    # Accounting only (no TensorFlow imported): the epsilon this run will end at.
    planned = dpfl_tff.epsilon(flagfile="configs/quickstart.cfg", rounds=args.rounds)
    print(f"planned: epsilon {planned['epsilon']:.4g} at delta {planned['delta']:.3g}")

    # The configuration as the driver builds it: the flagfile, then keyword flags (which win).
    cfg = dpfl_tff.make_config(flagfile="configs/quickstart.cfg", rounds=args.rounds, eval_every=5,
                               output_dir=args.output_dir)
    # The driver's run in this process: folder lock, ledger, checkpoints, the TFF worker shut down after.
    result = dpfl_tff.run(cfg, overwrite=True, log=lambda line: None)
    for record in result.records:
        if "test_accuracy" in record:
            print(f"round {record['round']}: test accuracy {record['test_accuracy']:.4f}, "
                  f"epsilon {record['epsilon']:.4g}")

    # The trained model, compiled for evaluation (loss and accuracy as the run computes them).
    from dpfl_tff.tasks import load_task

    data = load_task(cfg.task, cfg.train.seed)
    model = result.model()  # the same as dpfl_tff.load_model(args.output_dir)
    loss, accuracy = model.evaluate(data.test.x, data.test.y, verbose=0)
    print(json.dumps({"epsilon_planned": planned["epsilon"], "epsilon": result.epsilon,
                      "final_test_accuracy": result.summary["final_test_accuracy"],
                      "loaded_model_test_accuracy": accuracy, "loaded_model_test_loss": loss}))


if __name__ == "__main__":
    main()
