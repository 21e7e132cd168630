import numpy as np
import pytest

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks import load_task
from dpfl_tff.tasks.base import shuffle_order, split_dirichlet


def _all_rows(clients):
    return np.concatenate([c.x.reshape(len(c), -1) for c in clients])


def test_digits_iid_split_uses_every_training_example_once():
    data = load_task(TaskConfig(task="digits", num_clients=50), seed=3)
    assert data.num_clients == 50 and data.input_shape == (8, 8, 1) and data.num_classes == 10
    sizes = [len(c) for c in data.clients]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) + len(data.test) == 1797
    assert len(data.test) == 360  # 20% stratified
    train = _all_rows(data.clients)
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    # The test split is held out: its label histogram is stratified.
    counts = np.bincount(data.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_digits_split_is_reproducible_and_seed_dependent():
    a = load_task(TaskConfig(num_clients=20), seed=1)
    b = load_task(TaskConfig(num_clients=20), seed=1)
    c = load_task(TaskConfig(num_clients=20), seed=2)
    assert all(np.array_equal(x.y, y.y) for x, y in zip(a.clients, b.clients))
    assert not all(np.array_equal(x.y, y.y) for x, y in zip(a.clients, c.clients))


def test_dirichlet_split_is_label_skewed_and_complete():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    skewed = split_dirichlet(labels, 20, alpha=0.1, rng=rng)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(1000))
    assert min(len(s) for s in skewed) >= 1
    # With alpha=0.1 a typical client holds mostly one or two labels; with IID, ~10% each.
    top_share = np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in skewed])
    assert top_share > 0.5
    flat = split_dirichlet(labels, 20, alpha=1000.0, rng=rng)
    assert np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in flat]) < 0.3


def test_digits_dirichlet_through_config():
    data = load_task(TaskConfig(num_clients=30, partition="dirichlet", dirichlet_alpha=0.2), seed=0)
    assert sum(len(c) for c in data.clients) == 1437


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(ValueError, match="--num_clients=5000"):
        load_task(TaskConfig(num_clients=5000), seed=0)


def test_synthetic_shapes_and_learnable_labels():
    cfg = TaskConfig(task="synthetic", num_clients=7, synthetic_examples_per_client=13, synthetic_input_dim=5,
                     synthetic_num_classes=3)
    data = load_task(cfg, seed=0)
    assert data.num_clients == 7 and data.input_shape == (5,) and data.num_classes == 3
    assert all(c.x.shape == (13, 5) and c.x.dtype == np.float32 and c.y.dtype == np.int32 for c in data.clients)
    assert set(np.concatenate([c.y for c in data.clients])) <= {0, 1, 2}


def test_client_dataset_batches_and_repeats():
    data = load_task(TaskConfig(task="synthetic", num_clients=2, synthetic_examples_per_client=10), seed=0)
    batches = list(data.client_dataset(0, epochs=3, batch_size=4, shuffle_seed=1))
    assert sum(int(b[1].shape[0]) for b in batches) == 30
    assert batches[0][0].shape[1:] == (32,)


def test_shuffle_order_passes_are_permutations_and_deterministic():
    for buffer in (0, 1, 4, 50):
        order = shuffle_order(10, 3, seed=5, buffer=buffer)
        assert order.dtype == np.int32 and order.shape == (30,)
        for p in range(3):
            assert sorted(order[10 * p:10 * p + 10].tolist()) == list(range(10))
        np.testing.assert_array_equal(order, shuffle_order(10, 3, seed=5, buffer=buffer))
    assert shuffle_order(10, 1, seed=5, buffer=1).tolist() == list(range(10))  # a buffer of 1 keeps the order
    assert shuffle_order(0, 2, seed=5).shape == (0,)


def test_buffered_shuffle_draws_uniformly_from_the_buffer():
    """As tf.data's shuffle(b): the first output is uniform over the first b items (chi-square, 2,000 seeds)."""
    b, trials = 4, 2000
    firsts = np.array([shuffle_order(20, 1, seed=s, buffer=b)[0] for s in range(trials)])
    assert firsts.max() < b
    counts = np.bincount(firsts, minlength=b)
    chi2 = float(np.sum((counts - trials / b) ** 2 / (trials / b)))
    assert chi2 < 21.1  # chi-square with 3 d.o.f.: P(> 21.1) = 1e-4


def test_client_order_caps_examples():
    data = load_task(TaskConfig(task="synthetic", num_clients=2, synthetic_examples_per_client=10), seed=0)
    order = data.client_order(0, epochs=2, shuffle_seed=1, max_examples=4)
    assert order.shape == (8,) and set(order.tolist()) == {0, 1, 2, 3}
