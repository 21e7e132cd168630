"""`shakespeare` and `stackoverflow`: next-token prediction on TFF's SQLite files, clients streamed from disk.

Data: TFF 0.87's `simulation/datasets/shakespeare.py` (`shakespeare.sqlite`,
splits `train` / `test`, feature `snippets`: 715 clients, 16,068 / 2,356
snippets) and `simulation/datasets/stackoverflow.py` (`stackoverflow.sqlite`,
splits `train` / `heldout` / `test`, feature `tokens` among creation_date,
score, tags, title, type: 342,477 train clients with 135,818,730 sentences;
the vocabulary from `stackoverflow.word_count`, the most frequent words first).

Preprocessing is TFF's own, from `simulation/baselines/`:

* Shakespeare (`shakespeare/char_prediction_preprocessing.py`): the 86
  characters of `CHAR_VOCAB` are ids 1..86, pad 0, oov 87, bos 88, eos 89
  (`get_special_tokens`); each snippet becomes [bos, chars, eos] padded with
  0 to a multiple of 81 (`_build_tokenize_fn(split_length=81)`, called here),
  cut into windows of 81 = 80 + 1, split into input [:-1] and target [1:]
  (`_split_target`). An example is one window.
* Stack Overflow (`stackoverflow/word_prediction_preprocessing.py`): the
  first `--stackoverflow_vocab_size` (10,000) words are ids 1..V, pad 0, oov
  V+1, bos V+2, eos V+3 (`get_special_tokens(V, 1)`); each sentence becomes
  [bos, its first 20 words, eos if fewer than 20] (`build_to_ids_fn(vocab,
  20)`, called here), padded to 21 and split into [:-1] and [1:]
  (`batch_and_split`). An example is one sentence.

Token ids are stored as float32 (exact below 2^24; the models' embedding
casts them); labels are int32 of shape (80,) or (20,). Test accuracies as
TFF's baselines: Shakespeare's `accuracy` masks pad; Stack Overflow's
`test_accuracy` masks pad, oov and eos (TFF's
`accuracy_without_out_of_vocab_or_end_of_sentence`, the papers' figure) and
`test_accuracy_with_oov_eos` only pad (TFF's `accuracy`).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow_federated.python.simulation.baselines.shakespeare import char_prediction_preprocessing as shakespeare_pp
from tensorflow_federated.python.simulation.baselines.stackoverflow import word_prediction_preprocessing as so_pp

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks import sqlite_stream
from dpfl_tff.tasks.base import ClientArrays, FederatedData
from dpfl_tff.tasks.files import DataFileError, require_file

SHAKESPEARE_FILE = "shakespeare.sqlite"
STACKOVERFLOW_FILE = "stackoverflow.sqlite"
WORD_COUNT_FILE = "stackoverflow.word_count"
SHAKESPEARE_SEQUENCE_LENGTH = 80  # TFF baselines' DEFAULT_SEQUENCE_LENGTH (McMahan et al. 2017)
STACKOVERFLOW_SEQUENCE_LENGTH = 20  # TFF baselines' stackoverflow constants.DEFAULT_SEQUENCE_LENGTH
SPLITS = ("train", "test")
EVAL_SEED = 0  # the fixed order of the test clients the evaluation sample is taken from
SHAKESPEARE_EXPECTED = 'expected TFF\'s Shakespeare file, see docs/tasks-and-models.md "Tasks and data files"'
STACKOVERFLOW_EXPECTED = 'expected TFF\'s Stack Overflow file, see docs/tasks-and-models.md "Tasks and data files"'


def _how_to_get(loader: str, file: str) -> str:
    return (f"on a machine with internet, python -c \"import tensorflow_federated as tff; "
            f"tff.simulation.datasets.{loader}(cache_dir='DIR')\" writes DIR/{file} (TFF downloads "
            f"tff-datasets-public/{file}.lzma from Google Cloud Storage and decompresses it); copy that file into "
            "--data_dir.")


def _parse(blobs: list[bytes], feature: str, where: str, expected: str) -> tf.Tensor:
    """The string feature `feature` of each serialized tf.train.Example (as TFF's parsing, FixedLenFeature)."""
    try:
        return tf.io.parse_example(tf.constant(blobs, tf.string),
                                   {feature: tf.io.FixedLenFeature(shape=(), dtype=tf.string)})[feature]
    except (tf.errors.OpError, ValueError) as e:
        cause = re.sub(r"^\{\{[^}]*\}\}\s*", "", " ".join(str(getattr(e, "message", e)).split()))[:200]
        raise DataFileError(f"{where}: examples cannot be read ({cause}) ({expected})") from e


def _windows_to_arrays(sequences: np.ndarray) -> ClientArrays:
    """Token sequences of L + 1 -> (x = [:-1] as float32, y = [1:] as int32): TFF's split into input and target."""
    sequences = sequences.reshape(sequences.shape[0], -1)
    return ClientArrays(sequences[:, :-1].astype(np.float32), sequences[:, 1:].astype(np.int32))


class ShakespeareReader:
    """Snippets -> 81-token windows, with TFF's tokenizer."""

    def __init__(self):
        self._tokenize = shakespeare_pp._build_tokenize_fn(split_length=SHAKESPEARE_SEQUENCE_LENGTH + 1)  # noqa: SLF001

    def snippets(self, blobs: list[bytes], where: str) -> tf.Tensor:
        return _parse(blobs, "snippets", where, SHAKESPEARE_EXPECTED)

    def __call__(self, blobs: list[bytes], where: str) -> ClientArrays:
        if not blobs:
            raise DataFileError(f"{where}: no examples ({SHAKESPEARE_EXPECTED})")
        snippets = self.snippets(blobs, where)
        tokens = [self._tokenize({"snippets": s}).numpy() for s in snippets]
        return _windows_to_arrays(np.concatenate(tokens).reshape(-1, SHAKESPEARE_SEQUENCE_LENGTH + 1))

    @staticmethod
    def windows(snippet_bytes: int) -> int:
        """Windows of one snippet of this many bytes: ceil((bytes + bos + eos) / 81)."""
        return -(-(snippet_bytes + 2) // (SHAKESPEARE_SEQUENCE_LENGTH + 1))


class StackOverflowReader:
    """Sentences -> 21-token sequences, with TFF's `build_to_ids_fn`."""

    def __init__(self, vocab: list[str]):
        to_ids = so_pp.build_to_ids_fn(vocab, STACKOVERFLOW_SEQUENCE_LENGTH, num_out_of_vocab_buckets=1)

        # TFF's per-sentence `to_ids` mapped over a client's sentences in one function traced once (a tf.data
        # pipeline per client would trace a new function for every client read: slow, and memory that grows).
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def ids(sentences):
            ragged = tf.map_fn(lambda s: to_ids(collections.OrderedDict(tokens=s)), sentences,
                               fn_output_signature=tf.RaggedTensorSpec(shape=[None], dtype=tf.int64))
            return ragged.to_tensor(0, shape=[None, STACKOVERFLOW_SEQUENCE_LENGTH + 1])  # padded_batch's pad

        self._ids = ids

    def __call__(self, blobs: list[bytes], where: str) -> ClientArrays:
        if not blobs:
            raise DataFileError(f"{where}: no examples ({STACKOVERFLOW_EXPECTED})")
        tokens = _parse(blobs, "tokens", where, STACKOVERFLOW_EXPECTED)
        return _windows_to_arrays(self._ids(tokens).numpy())


def load_vocab(data_dir: str, vocab_size: int) -> list[str]:
    """The first `vocab_size` words of `stackoverflow.word_count` (TFF's `load_word_counts`: `word count` lines)."""
    path = require_file("stackoverflow", data_dir, WORD_COUNT_FILE, _how_to_get(
        "stackoverflow.load_word_counts", "stackoverflow.word_count").replace(
            "stackoverflow.word_count.lzma", "stackoverflow.word_count.tar.bz2").replace(
            "and decompresses it", "and unpacks it into DIR/datasets/"))
    vocab: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise DataFileError(f"{path}: line {k} is not 'word count' (expected TFF's "
                                        "stackoverflow.word_count, one 'word count' per line, most frequent first)")
                vocab.append(parts[0])
                if len(vocab) >= vocab_size:
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: cannot be read ({e})") from e
    if not vocab:
        raise DataFileError(f"{path}: empty (expected TFF's stackoverflow.word_count)")
    return vocab


def _eval_sample(index: sqlite_stream.ClientIndex, reader, examples: int, where: str) -> ClientArrays:
    """The test split's first `examples` examples with its clients in a fixed seeded order (0: all).

    TFF's `create_tf_dataset_from_all_clients(seed=0)` order: the sorted ids
    shuffled by `np.random.RandomState(0)`, each client's examples in file order.
    """
    ids, _ = sqlite_stream.client_ids_and_counts(index, SPLITS[1])
    np.random.RandomState(seed=EVAL_SEED).shuffle(ids)
    blobs: list[bytes] = []
    for c in ids:
        blobs += index.rows(SPLITS[1], c)
        if examples and len(blobs) >= examples:
            break
    return reader(blobs[:examples] if examples else blobs, where)


def _streamed(path: str, expected: str, reader, sizes_fn: Callable | None = None):
    sqlite_stream.check_file(path, expected)
    index = sqlite_stream.ClientIndex(path, SPLITS, expected)
    ids, counts = sqlite_stream.client_ids_and_counts(index, SPLITS[0])
    sizes = counts if sizes_fn is None else sizes_fn(index, ids)
    clients = sqlite_stream.StreamedClients(index, SPLITS[0], ids, sizes, reader)
    clients[0]  # noqa: B018  (parse one training client now: a bad file fails here, not in round 1)
    return index, clients


def load_shakespeare(cfg: TaskConfig, seed: int) -> FederatedData:
    del seed  # the client split is the data's own
    path = require_file("shakespeare", cfg.data_dir, SHAKESPEARE_FILE,
                        _how_to_get("shakespeare.load_data", SHAKESPEARE_FILE))
    reader = ShakespeareReader()

    def window_counts(index, ids):  # 715 clients, 16,068 snippets: read once for the sizes
        sizes = []
        for c in ids:
            snippets = reader.snippets(index.rows(SPLITS[0], c), f"{path}: split 'train', client '{c}'")
            sizes.append(sum(reader.windows(len(s)) for s in snippets.numpy()))
        return np.asarray(sizes, np.int64)

    index, clients = _streamed(path, SHAKESPEARE_EXPECTED, reader, window_counts)
    pad, _, _, _ = shakespeare_pp.get_special_tokens()
    vocab = len(shakespeare_pp.CHAR_VOCAB) + 4
    return FederatedData(
        clients=clients,
        test=_eval_sample(index, reader, cfg.eval_examples, f"{path}: split 'test'"),
        input_shape=(SHAKESPEARE_SEQUENCE_LENGTH,),
        num_classes=vocab,
        description=(f"Shakespeare next character: {len(clients)} speaking roles, windows of "
                     f"{SHAKESPEARE_SEQUENCE_LENGTH}, {vocab} tokens, streamed from {SHAKESPEARE_FILE}"),
        label_shape=(SHAKESPEARE_SEQUENCE_LENGTH,),
        test_accuracies={"": (pad,)},
    )


def load_stackoverflow(cfg: TaskConfig, seed: int) -> FederatedData:
    del seed  # the client split is the data's own
    path = require_file("stackoverflow", cfg.data_dir, STACKOVERFLOW_FILE,
                        _how_to_get("stackoverflow.load_data", STACKOVERFLOW_FILE))
    vocab = load_vocab(cfg.data_dir, cfg.stackoverflow_vocab_size)
    reader = StackOverflowReader(vocab)
    index, clients = _streamed(path, STACKOVERFLOW_EXPECTED, reader)
    special = so_pp.get_special_tokens(len(vocab), 1)
    tokens = len(vocab) + special.get_number_of_special_tokens()
    return FederatedData(
        clients=clients,
        test=_eval_sample(index, reader, cfg.eval_examples, f"{path}: split 'test'"),
        input_shape=(STACKOVERFLOW_SEQUENCE_LENGTH,),
        num_classes=tokens,
        description=(f"Stack Overflow next word: {len(clients):,} users, sentences of "
                     f"{STACKOVERFLOW_SEQUENCE_LENGTH} words, {len(vocab):,} words + 4 special tokens, streamed from "
                     f"{STACKOVERFLOW_FILE}"),
        label_shape=(STACKOVERFLOW_SEQUENCE_LENGTH,),
        test_accuracies={"": (special.padding, *special.out_of_vocab, special.end_of_sentence),
                         "with_oov_eos": (special.padding,)},
    )


