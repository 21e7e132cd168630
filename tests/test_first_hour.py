"""Issue 30's smaller points: error lines that name the real cause, and local DP's done line with both views."""

import os

import pytest

from dpfl_tff.config import ConfigError
from dpfl_tff.tasks import DataMissingError
from dpfl_tff.tasks.files import require_file
from dpfl_tff.user_code import import_function
from experiments.run_federated import done_line
from tests.conftest import run_driver


def test_a_bad_flag_in_a_flagfile_names_the_file_and_line(tmp_path, capsys):
    flagfile = tmp_path / "typo.cfg"
    flagfile.write_text("--task=digits\n--roundz=3\n")
    from absl import flags
    from absl.testing import flagsaver

    from experiments import cli, run_federated
    from experiments import flags as dpfl_flags

    with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
        flags.FLAGS.unparse_flags()
        cli.parser_for(run_federated.__doc__, dpfl_flags.GROUPS)(["run_federated", f"--flagfile={flagfile}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: Unknown command line flag 'roundz'. Did you mean: rounds ? (in --flagfile={flagfile}, line 2)")


def test_a_missing_custom_module_mentions_the_current_folder_and_pythonpath():
    with pytest.raises(ConfigError) as e:
        import_function("model", "mymodels_not_here:small_cnn")
    assert "cannot import mymodels_not_here (ModuleNotFoundError" in str(e.value)
    assert f"imported from the current folder ({os.getcwd()}) and PYTHONPATH" in str(e.value)


def test_a_relative_data_dir_is_said_to_be_relative_to_the_current_folder(tmp_path):
    os.chdir(tmp_path)  # pytest's monkeypatch-free chdir is undone by the next line's finally
    try:
        with pytest.raises(DataMissingError) as e:
            require_file("emnist", "data", "emnist_all.sqlite", "how")
    finally:
        os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert f"--data_dir=data (relative to the current folder: {tmp_path / 'data'})" in str(e.value)


def test_a_task_with_its_own_split_does_not_blame_num_clients(capsys):
    """tests.custom_tasks:seven_clients fixes N = 7; --num_clients is left at its default and never set."""
    assert run_driver(["--task=tests.custom_tasks:seven_clients", "--clients_per_round=9", "--dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --clients_per_round=9: must be <= N = 7 (--task=tests.custom_tasks:seven_clients "
                          "has its own client split")
    assert "--num_clients=" not in err


def test_local_dps_done_line_shows_both_views_labelled():
    summary = {"neighboring_relation": "replace_one", "noise_multiplier": 1.0, "epsilon": 1.593, "accountant": "rdp",
               "local_epsilon": 71.92, "final_test_accuracy": 0.4, "rounds": 100, "delta": 7.42e-4}
    assert done_line(summary, "runs/local") == (
        "done: 100 rounds, test accuracy 0.4000, epsilon 1.593 (central view: replace-one, RDP), local epsilon 71.92 "
        "(each client against the server) at delta 0.000742; outputs in runs/local")


def test_the_sweep_table_labels_both_views_when_a_row_is_local_dp():
    from dpfl_tff import sweep_results

    base = {"delta": 7.42e-4, "accountant": "rdp", "test_accuracy_mean": 0.5, "test_accuracy_std": None,
            "test_accuracy_n": 1, "rounds": "10", "wall_seconds_mean": 1.0, "epsilon_differs": False}
    rows = [{**base, "setting": "dp_mode=central", "epsilon": 4.0, "local_epsilon": None,
             "neighboring_relation": "replace_one"},
            {**base, "setting": "dp_mode=local", "epsilon": 1.593, "local_epsilon": 71.92,
             "neighboring_relation": "replace_one"}]
    head, _, *lines = sweep_results.markdown(rows, 0).splitlines()
    assert head.startswith("| setting | epsilon (central view) | local epsilon (against the server) | delta |")
    assert lines[1].startswith("| `dp_mode=local` | 1.593 | 71.92 |")
    assert sweep_results.markdown(rows[:1], 0).startswith("| setting | epsilon | delta |")  # no local row: as before


def test_the_sweep_plot_draws_local_dp_at_both_views_labelled(tmp_path, monkeypatch):
    import types

    import matplotlib.axes

    from dpfl_tff import sweep_results

    labels = []
    legend = matplotlib.axes.Axes.legend

    def recording_legend(ax, *args, **kwargs):
        labels.extend(ax.get_legend_handles_labels()[1])
        return legend(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", recording_legend)
    run = types.SimpleNamespace
    plan = run(runs=[run(setting=f"dp_mode=local,noise_multiplier={z}", settings={"dp_mode": "local",
                                                                               "noise_multiplier": z})
                     for z in (1, 2)])
    table = [{"setting": f"dp_mode=local,noise_multiplier={z}", "epsilon": e, "local_epsilon": le, "delta": 7.4e-4,
              "neighboring_relation": "replace_one", "test_accuracy_mean": a, "test_accuracy_std": 0.01}
             for z, e, le, a in ((1, 1.593, 77.52, 0.42), (2, 0.70, 27.26, 0.28))]
    path = sweep_results.plot(plan, table, str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(labels) == ["dp_mode=local (epsilon: central view, replace-one, delta=0.00074)",
                              "dp_mode=local (local epsilon: each client against the server)"]


def test_a_local_dp_summary_labels_its_two_epsilons(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_driver(["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=1", "--dp_mode=local",
                       "--client_sampling=uniform", f"--output_dir={out}"]) == 0
    import json

    summary = json.load(open(out / "summary.json"))
    assert summary["local_epsilon"] > summary["epsilon"] > 0
    assert summary["epsilon_views"]["local_epsilon"].startswith("each client against the server")
    assert summary["epsilon_views"]["epsilon"].startswith("central view")
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"local epsilon {summary['local_epsilon']:.4g} (each client against the server)" in done
    assert f"epsilon {summary['epsilon']:.4g} (central view: replace-one, RDP)" in done
