"""Custom task functions used by the tests via --task=tests.custom_tasks:<name>.

`csv_by_user` is the example of docs/tasks-and-models.md "Your own task" (the
docs show the same code; tests/test_custom_task.py checks that they agree).
"""

import csv
import os

import numpy as np

from dpfl_tff.tasks import ClientArrays, FederatedData

# --- the documented example ---------------------------------------------------------------------------------------


def csv_by_user(data_dir, seed):
    """One client per user_id of DATA_DIR/examples.csv (columns: user_id, label, then numeric features).

    A seeded fifth of the users (at least one) is the central test set: no client holds their rows.
    """
    with open(os.path.join(data_dir, "examples.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    features = [k for k in rows[0] if k not in ("user_id", "label")]
    by_user = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
    users = sorted(by_user)
    np.random.default_rng(seed).shuffle(users)
    n_test = max(1, len(users) // 5)

    def arrays(user_ids):
        user_rows = [r for u in user_ids for r in by_user[u]]
        x = np.array([[float(r[k]) for k in features] for r in user_rows], np.float32)
        y = np.array([int(r["label"]) for r in user_rows], np.int32)
        return ClientArrays(x, y)

    return FederatedData(
        clients=[arrays([u]) for u in users[n_test:]],
        test=arrays(users[:n_test]),
        input_shape=(len(features),),
        num_classes=max(int(r["label"]) for r in rows) + 1,
        description=f"examples.csv: {len(users) - n_test} users as clients, {n_test} test users",
    )


# --- helpers and broken task functions for the tests ---------------------------------------------------------------


def write_examples_csv(data_dir, users=30, rows_per_user=8, features=4, seed=0):
    """Writes DATA_DIR/examples.csv: a learnable 3-class problem (label = argmax of a fixed linear map)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((features, 3))
    path = os.path.join(data_dir, "examples.csv")
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["user_id", "label", *[f"f{i}" for i in range(features)]])
        for u in range(users):
            for _ in range(rows_per_user):
                x = rng.standard_normal(features)
                out.writerow([f"user{u:03d}", int(np.argmax(x @ weights)), *[f"{v:.5f}" for v in x]])
    return path


def _data(clients=None, test=None, input_shape=(2,), num_classes=2):
    ok = ClientArrays(np.zeros((3, 2), np.float32), np.array([0, 1, 0], np.int32))
    return FederatedData(clients=[ok, ok] if clients is None else clients, test=ok if test is None else test,
                         input_shape=input_shape, num_classes=num_classes)


def tiny(num_clients):
    """A valid task that honours --num_clients (one client per requested client)."""
    ok = ClientArrays(np.zeros((3, 2), np.float32), np.array([0, 1, 0], np.int32))
    return _data(clients=[ok] * num_clients)


def seven_clients():
    """A valid task with 7 clients whatever --num_clients says."""
    return tiny(7)


def returns_tuple(data_dir):
    return ([], None)


def float64_features():
    return _data(clients=[ClientArrays(np.zeros((3, 2)), np.array([0, 1, 0], np.int32))])


def int64_labels():
    return _data(clients=[ClientArrays(np.zeros((3, 2), np.float32), np.array([0, 1, 0]))])


def label_out_of_range():
    return _data(clients=[ClientArrays(np.zeros((2, 2), np.float32), np.array([0, 2], np.int32))])


def empty_client():
    ok = ClientArrays(np.zeros((3, 2), np.float32), np.array([0, 1, 0], np.int32))
    return _data(clients=[ok, ClientArrays(np.zeros((0, 2), np.float32), np.zeros(0, np.int32))])


def no_clients():
    return _data(clients=[])


def nan_feature():
    x = np.zeros((3, 2), np.float32)
    x[1, 0] = np.nan
    return _data(clients=[ClientArrays(x, np.array([0, 1, 0], np.int32))])


def shape_mismatch():
    return _data(input_shape=(3,))


def no_test_set():
    return FederatedData(clients=_data().clients, test=None, input_shape=(2,), num_classes=2)


def one_class():
    return _data(num_classes=1)


def raises(data_dir):
    raise FileNotFoundError(f"{data_dir}/examples.csv\nmissing")


def needs_path(path):
    return _data()
