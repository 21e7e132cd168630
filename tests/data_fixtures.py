"""Writers for tiny data files in the exact on-disk formats of the real loaders.

The files written here let the *real* loaders run offline in tests:

* ``tff.simulation.datasets.emnist.load_data(only_digits=..., cache_dir=DIR)``
* ``tff.simulation.datasets.cifar100.load_data(cache_dir=DIR)``
* ``keras.src.datasets.cifar.load_batch(PATH)`` on a ``cifar-10-batches-py``
  folder (the per-file reader used by ``tf.keras.datasets.cifar10.load_data``).

Nothing here needs a TFF execution context: the TFF loaders return
``SqlClientData`` objects backed by ``tf.data.experimental.SqlDataset``.

TFF 0.87 federated datasets (EMNIST, CIFAR-100)
===============================================
Source: ``tensorflow_federated/python/simulation/datasets/{emnist,cifar100,
download,sql_client_data,sql_client_data_utils}.py``.

Download / cache check (``download.get_compressed_file(origin, cache_dir)``):
  ``cache_dir`` defaults to ``~/.tff`` (not Keras' cache, despite the
  docstrings) and is created with ``tf.io.gfile.makedirs`` if missing.  The
  file looked for is ``os.path.join(cache_dir, basename(origin))`` with the
  ``.lzma`` suffix stripped; if ``tf.io.gfile.exists`` of that path is true it
  is used as is (no hash or size check).  Otherwise
  ``download._fetch_lzma_file(origin, extracted_filename)`` streams the URL with
  ``urllib.request.urlopen(origin)`` (no timeout) and LZMA-decompresses it
  into that path.

  * EMNIST:    origin ``https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma``
               -> file ``<cache_dir>/emnist_all.sqlite`` (one file for both
               ``only_digits`` values).
  * CIFAR-100: origin ``https://storage.googleapis.com/tff-datasets-public/cifar100.sqlite.lzma``
               -> file ``<cache_dir>/cifar100.sqlite``.

SQLite schema (``sql_client_data.SqlClientData`` requires tables ``examples``
and ``client_metadata`` and the three ``examples`` columns below; the DDL is
the one of ``sql_client_data_utils.save_to_sql_client_data``)::

    CREATE TABLE examples (
        split_name TEXT NOT NULL,
        client_id TEXT NOT NULL,
        serialized_example_proto BLOB NOT NULL);
    CREATE TABLE client_metadata (
        client_id TEXT NOT NULL,
        split_name TEXT NOT NULL,
        num_examples INTEGER NOT NULL);

  Client ids come from ``SELECT DISTINCT client_id FROM client_metadata WHERE
  split_name = '<split>'`` (sorted); a client's examples from ``SELECT
  serialized_example_proto FROM examples WHERE client_id = '<id>' and
  split_name ='<split>'``.  ``num_examples`` is not read by the loader.

Split names:
  * EMNIST ``only_digits=True``:  ``'digits_only_train'`` / ``'digits_only_test'``
  * EMNIST ``only_digits=False``: ``'all_train'`` / ``'all_test'``
  * CIFAR-100:                    ``'train'`` / ``'test'``

``serialized_example_proto`` is a serialized ``tf.train.Example``:
  * EMNIST: ``pixels`` FloatList of 28*28 = 784 values (parsed as
    ``FixedLenFeature((28, 28), tf.float32)``; 1.0 = background, 0.0 = ink),
    ``label`` Int64List of 1 value (0-9 digits, 0-61 for ``all_*``).
    Loaded element: ``OrderedDict(label=int32 [], pixels=float32 [28, 28])``.
  * CIFAR-100: ``image`` **Int64List** of 32*32*3 = 3072 values in row-major
    HWC order (parsed as ``FixedLenFeature((32, 32, 3), tf.int64)`` and cast to
    uint8), ``label`` Int64List (0-99), ``coarse_label`` Int64List (0-19).
    Loaded element: ``OrderedDict(coarse_label=int64 [], image=uint8
    [32, 32, 3], label=int64 [])``.

TFF 0.87 text datasets (Shakespeare, Stack Overflow)
===================================================
Source: ``tensorflow_federated/python/simulation/datasets/{shakespeare,
stackoverflow}.py``.  Same schema as above; split names ``'train'`` /
``'test'`` (Stack Overflow also ``'heldout'``).

  * Shakespeare: ``snippets`` BytesList of 1 value (a speaking role's lines),
    parsed as ``FixedLenFeature((), tf.string)``.
  * Stack Overflow: ``creation_date``, ``tags``, ``title``, ``tokens``,
    ``type`` BytesList and ``score`` Int64List, one value each (all six parsed
    as ``FixedLenFeature((), ...)``); ``tokens`` is the sentence, words
    separated by spaces.  ``stackoverflow.word_count`` (from
    ``stackoverflow.word_count.tar.bz2``): one ``word count`` line per word, most
    frequent first.

Keras CIFAR-10 python batches
=============================
Source: ``keras/src/datasets/cifar.py`` (``load_batch``) and
``keras/src/datasets/cifar10.py`` (keras 2.14).

Folder ``cifar-10-batches-py`` holding ``data_batch_1`` ... ``data_batch_5`` and
``test_batch`` (plus ``batches.meta``, not read by Keras).  Each batch file is
a pickle of a dict with **bytes** keys (``load_batch`` unpickles with
``encoding="bytes"`` and then calls ``k.decode("utf8")`` on every key, so str
keys would fail):

  * ``b"data"``: ``numpy.uint8`` array of shape ``(N, 3072)``; each row is
    channel-first: 1024 red, then 1024 green, then 1024 blue values, each plane
    row-major 32x32.  ``load_batch`` reshapes it to ``(N, 3, 32, 32)``;
    ``cifar10.load_data`` transposes with ``(0, 2, 3, 1)`` to NHWC.
  * ``b"labels"``: list of N Python ints in 0-9.
  * ``b"batch_label"`` (bytes) and ``b"filenames"`` (list of bytes): present in
    the real files, ignored by Keras.

Caveat: ``tf.keras.datasets.cifar10.load_data()`` itself cannot be pointed at
these files: it takes no directory argument (``get_file`` uses
``~/.keras/datasets``, or ``/tmp/.keras/datasets`` if not writable), it decides
whether to download by checking ``~/.keras/datasets/cifar-10-batches-py.tar.gz``
exists *and* matches the sha256 ``6d958be0...c001ce`` (otherwise it downloads
``https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz``), and it assumes
exactly 10000 examples per batch.  Read fixture batches with ``load_batch``.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from typing import Sequence

import numpy as np

EMNIST_FILENAME = "emnist_all.sqlite"
EMNIST_URL = "https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma"
EMNIST_SPLITS = {
    True: ("digits_only_train", "digits_only_test"),
    False: ("all_train", "all_test"),
}
CIFAR100_FILENAME = "cifar100.sqlite"
CIFAR100_URL = "https://storage.googleapis.com/tff-datasets-public/cifar100.sqlite.lzma"
CIFAR100_SPLITS = ("train", "test")
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

_SCHEMA = (
    """CREATE TABLE examples (
       split_name TEXT NOT NULL,
       client_id TEXT NOT NULL,
       serialized_example_proto BLOB NOT NULL);""",
    """CREATE TABLE client_metadata (
       client_id TEXT NOT NULL,
       split_name TEXT NOT NULL,
       num_examples INTEGER NOT NULL);""",
)


def _example(features: dict) -> bytes:
    """Serializes a ``tf.train.Example`` from {name: ("int"|"float", values)}."""
    import tensorflow as tf

    feature = {}
    for name, (kind, values) in features.items():
        values = np.asarray(values).reshape(-1).tolist()
        if kind == "bytes":
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))
        elif kind == "int":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_sqlite(path: str, rows: dict[str, dict[str, list[bytes]]]) -> str:
    """Writes {split_name: {client_id: [serialized examples]}} to a fresh file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    con = sqlite3.connect(path)
    try:
        with con:
            for q in _SCHEMA:
                con.execute(q)
            for split_name, clients in rows.items():
                for client_id, examples in clients.items():
                    con.executemany(
                        "INSERT INTO examples (split_name, client_id, serialized_example_proto) "
                        "VALUES (?, ?, ?);",
                        [(split_name, client_id, sqlite3.Binary(e)) for e in examples],
                    )
                    con.execute(
                        "INSERT INTO client_metadata (client_id, split_name, num_examples) "
                        "VALUES (?, ?, ?);",
                        (client_id, split_name, len(examples)),
                    )
    finally:
        con.close()
    return path


def write_emnist_sqlite(
    cache_dir: str,
    num_clients: int = 3,
    examples_per_client: int | Sequence[int] = 4,
    only_digits: bool = True,
    seed: int = 0,
) -> str:
    """Writes ``<cache_dir>/emnist_all.sqlite`` for TFF's ``emnist.load_data``.

    All four splits (``digits_only_train/test`` with labels 0-9 and
    ``all_train/test`` with labels 0-61) are always written, each with
    ``num_clients`` clients (ids ``f0000_00``, ``f0001_01``, ...) holding
    ``examples_per_client`` examples, so both ``only_digits=True`` and
    ``only_digits=False`` load from the same file.  In the ``all_*`` splits
    each client's first example has a letter label (10-61) so the two label
    ranges are distinguishable.  ``only_digits`` is accepted for call-site
    symmetry with ``emnist.load_data`` and does not change the file.
    ``examples_per_client`` may also be one count per client (every split).

    Returns the path written.
    """
    del only_digits  # Both label ranges are always written; see docstring.
    rng = np.random.default_rng(seed)
    client_ids = [f"f{i:04d}_{i % 100:02d}" for i in range(num_clients)]
    counts = ([int(examples_per_client)] * num_clients if np.ndim(examples_per_client) == 0
              else [int(k) for k in examples_per_client])
    if len(counts) != num_clients:
        raise ValueError(f"examples_per_client: {len(counts)} counts for {num_clients} clients")
    rows: dict[str, dict[str, list[bytes]]] = {}
    for digits, (train_split, test_split) in EMNIST_SPLITS.items():
        for split in (train_split, test_split):
            rows[split] = {}
            for cid, count in zip(client_ids, counts):
                examples = []
                for j in range(count):
                    pixels = rng.random((28, 28), dtype=np.float32)
                    if digits:
                        label = int(rng.integers(0, 10))
                    elif j == 0:
                        label = int(rng.integers(10, 62))
                    else:
                        label = int(rng.integers(0, 62))
                    examples.append(_example({"pixels": ("float", pixels), "label": ("int", [label])}))
                rows[split][cid] = examples
    return _write_sqlite(os.path.join(cache_dir, EMNIST_FILENAME), rows)


def write_cifar100_sqlite(
    cache_dir: str,
    num_clients: int = 3,
    examples_per_client: int = 4,
    seed: int = 0,
) -> str:
    """Writes ``<cache_dir>/cifar100.sqlite`` for TFF's ``cifar100.load_data``.

    Splits ``train`` and ``test`` each get ``num_clients`` clients with string
    ids ``"0"``, ``"1"``, ... (as in the real file) and ``examples_per_client``
    examples: ``image`` int64 values 0-255 of shape 32x32x3, ``label`` 0-99 and
    ``coarse_label = label // 5`` (0-19; not CIFAR-100's real taxonomy).

    Returns the path written.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, dict[str, list[bytes]]] = {}
    for split in CIFAR100_SPLITS:
        rows[split] = {}
        for i in range(num_clients):
            examples = []
            for _ in range(examples_per_client):
                image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.int64)
                label = int(rng.integers(0, 100))
                examples.append(
                    _example(
                        {
                            "coarse_label": ("int", [label // 5]),
                            "image": ("int", image),
                            "label": ("int", [label]),
                        }
                    )
                )
            rows[split][str(i)] = examples
    return _write_sqlite(os.path.join(cache_dir, CIFAR100_FILENAME), rows)


def write_cifar10_batches(data_dir: str, examples_per_batch: int = 10, seed: int = 0) -> str:
    """Writes ``<data_dir>/cifar-10-batches-py`` in Keras' CIFAR-10 pickle format.

    Files: ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` (each
    ``examples_per_batch`` examples) and ``batches.meta``.  Each batch is a
    pickled dict with bytes keys: ``b"batch_label"`` (bytes), ``b"labels"``
    (list of int 0-9), ``b"data"`` (uint8 ndarray ``(N, 3072)``, channel-first
    R/G/B planes of 32x32, row-major) and ``b"filenames"`` (list of bytes).
    Read a file with ``keras.src.datasets.cifar.load_batch(path)`` -> data of
    shape ``(N, 3, 32, 32)``; ``.transpose(0, 2, 3, 1)`` gives NHWC.

    Returns the ``cifar-10-batches-py`` folder path.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, CIFAR10_DIRNAME)
    os.makedirs(folder, exist_ok=True)
    names = [(f"data_batch_{i}", f"training batch {i} of 5") for i in range(1, 6)]
    names.append(("test_batch", "testing batch 1 of 1"))
    for fname, batch_label in names:
        data = rng.integers(0, 256, size=(examples_per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=examples_per_batch)]
        batch = {
            b"batch_label": batch_label.encode("utf8"),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{fname}_{j:05d}.png".encode("utf8") for j in range(examples_per_batch)],
        }
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"num_cases_per_batch": examples_per_batch,
        b"label_names": [n.encode("utf8") for n in CIFAR10_LABEL_NAMES],
        b"num_vis": 3072,
    }
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


SHAKESPEARE_FILENAME = "shakespeare.sqlite"
STACKOVERFLOW_FILENAME = "stackoverflow.sqlite"
STACKOVERFLOW_WORD_COUNT = "stackoverflow.word_count"
_WORDS = ["the", "a", "to", "is", "i", "you", "it", "of", "in", "and", "for", "this", "that", "with", "on",
          "be", "if", "not", "can", "use"]


def shakespeare_snippet(rng: np.random.Generator, length: int) -> bytes:
    """A snippet of Shakespeare-like characters (a few outside TFF's vocabulary, as in the real file)."""
    chars = list("abcdefghijklmnopqrstuvwxyz ABCDEFG,.;:!?'\n") + ["~"]
    return "".join(rng.choice(chars, size=length)).encode()


def write_shakespeare_sqlite(cache_dir: str, num_clients: int = 4, snippets_per_client: int = 3,
                             test_snippets_per_client: int = 1, seed: int = 0) -> str:
    """Writes ``<cache_dir>/shakespeare.sqlite`` for TFF's ``shakespeare.load_data``: clients
    ``PLAY_ROLE_<i>`` with snippets of 5-200 characters in ``train`` and ``test``."""
    rng = np.random.default_rng(seed)
    ids = [f"THE_PLAY_{i:02d}_ROLE" for i in range(num_clients)]
    rows = {split: {c: [_example({"snippets": ("bytes", [shakespeare_snippet(rng, int(rng.integers(5, 200)))])})
                        for _ in range(k)] for c in ids}
            for split, k in (("train", snippets_per_client), ("test", test_snippets_per_client))}
    return _write_sqlite(os.path.join(cache_dir, SHAKESPEARE_FILENAME), rows)


def stackoverflow_example(tokens: str, score: int = 1) -> bytes:
    return _example({"creation_date": ("bytes", [b"2010-01-08 09:34:05 UTC"]), "score": ("int", [score]),
                     "tags": ("bytes", [b"python|sqlite"]), "title": ("bytes", [b"a title"]),
                     "tokens": ("bytes", [tokens.encode()]), "type": ("bytes", [b"answer"])})


def write_stackoverflow_sqlite(cache_dir: str, num_clients: int = 4, sentences_per_client: int = 3,
                               test_clients: int = 3, seed: int = 0, heldout: bool = True) -> str:
    """Writes ``<cache_dir>/stackoverflow.sqlite`` (splits train, heldout, test) and
    ``<cache_dir>/stackoverflow.word_count`` (the first 15 of ``_WORDS``: the rest are out of vocabulary).

    Sentences have 1-30 words (so some are cut at 20), a few words unknown to the vocabulary."""
    rng = np.random.default_rng(seed)
    words = _WORDS + ["zyzzyva", "qwerty"]

    def sentence() -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(1, 31))))

    rows: dict[str, dict[str, list[bytes]]] = {
        "train": {f"{100 + i}": [stackoverflow_example(sentence()) for _ in range(sentences_per_client)]
                  for i in range(num_clients)},
        "test": {f"{500 + i}": [stackoverflow_example(sentence()) for _ in range(sentences_per_client)]
                 for i in range(test_clients)},
    }
    if heldout:
        rows["heldout"] = {"990": [stackoverflow_example(sentence())]}
    with open(os.path.join(cache_dir, STACKOVERFLOW_WORD_COUNT), "w") as f:
        for k, w in enumerate(_WORDS[:15]):
            f.write(f"{w} {1000 - k}\n")
    return _write_sqlite(os.path.join(cache_dir, STACKOVERFLOW_FILENAME), rows)
