"""common.text: the IMDB loader and the sentiment twin (Week 6's tokenizer: test_week06_rnn.py)."""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.errors import DataError, DataUnavailable
from common.text import BAD, GOOD, load_text, sentiment_twin
from week06_rnn.tokens import tokenize


def rule_label(text: str) -> int:
    """The twin's generating rule, read back: the clause after "but" decides; "not", "n't" or
    "never" flips the polarity of its adjective."""
    clause = text.split(" but ")[-1]
    words = re.sub(r"\s*\.\s*", " . ", clause).split(" . ")
    clause = next(part for part in words if any(w in GOOD + BAD for w in part.split()))
    positive = any(w in GOOD for w in clause.split())
    negated = any(w in ("not", "n't", "never") for w in clause.split())
    return int(positive != negated)


def test_sentiment_twin_needs_negation_and_order_but_follows_its_rule():
    texts, y = sentiment_twin(600, seed=3)
    assert len(texts) == 600 and y.tolist().count(1) == 300
    assert [rule_label(t) for t in texts] == y.tolist()
    again, y2 = sentiment_twin(600, seed=3)
    assert again == texts and torch.equal(y, y2)
    assert sentiment_twin(600, seed=4)[0] != texts
    # The same bag of sentiment words with both labels: a bag-of-words model cannot be perfect.
    sentiment_words = set(GOOD + BAD + ["not", "n't", "never", "but"])
    bags: dict[tuple, set] = {}
    for text, label in zip(texts, y.tolist()):
        bag = tuple(sorted(Counter(w for w in tokenize(text) if w in sentiment_words).items()))
        bags.setdefault(bag, set()).add(label)
    assert sum(len(labels) == 2 for labels in bags.values()) >= 5
    # Stronger, on whole bags of words: swap the two adjectives of a contrast review ("the X
    # was great , but the Y was dull") and the review is just as likely under the generator,
    # has exactly the same tokens, and the opposite label. No bag-of-words model can get both
    # right, so it is wrong on at least half of these (about a twelfth of the twin: >= 4% error).
    swappable = 0
    for text, label in zip(texts, y.tolist()):
        words = tokenize(text)
        if "but" not in words or any(w in ("not", "n't", "never") for w in words):
            continue
        adjectives = [i for i, w in enumerate(words) if w in GOOD + BAD]
        assert len(adjectives) == 2
        swapped = list(words)
        swapped[adjectives[0]], swapped[adjectives[1]] = words[adjectives[1]], words[adjectives[0]]
        assert Counter(swapped) == Counter(words) and rule_label(" ".join(swapped)) == 1 - label
        swappable += 1
    assert swappable > len(texts) // 20, swappable
    lengths = [len(tokenize(t)) for t in texts]
    assert min(lengths) <= 8 and max(lengths) >= 30, (
        "lengths must vary (packing has something to do)")


def test_smoke_and_synthetic_give_the_twin_without_looking_at_the_data_root(offline):
    data = load_text("imdb", offline / "not-there", smoke=True, n_synthetic=64)
    assert data.synthetic and len(data.train_texts) == 64 and data.classes == ["neg", "pos"]
    assert len(data.test_texts) == len(data.y_test) >= 8
    assert not (offline / "not-there").exists()


def write_reviews(root: Path) -> dict[str, bytes]:
    """A tiny aclImdb layout (3 reviews per class and split) as {member name: bytes}."""
    files = {}
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            for i in (10, 2, 0):  # not in sorted order on purpose
                files[f"aclImdb/{split}/{label}/{i}_{7 if label == 'pos' else 2}.txt"] = \
                    f"{split} {label} review {i}<br />end".encode()
    files["aclImdb/train/urls_pos.txt"] = b"http://example.com\n"
    return files


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def check_tiny_imdb(data):
    assert data.classes == ["neg", "pos"] and not data.synthetic
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.y_test.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.train_texts[0] == "train neg review 0<br />end"
    assert data.test_texts[-1] == "test pos review 10<br />end"


def test_imdb_reads_an_aclimdb_folder_and_caches_the_decoded_texts(offline):
    root = offline / "data"
    for name, blob in write_reviews(root).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    check_tiny_imdb(load_text("imdb", root))
    assert len(list((offline / "cache").glob("imdb-*.json"))) == 1
    check_tiny_imdb(load_text("imdb", root))  # from the cache


@pytest.mark.parametrize("cache_text",
                         ["[]", '{"x": 1}', '{"train_texts": [1], "y_train": [0]}', "{bad json"])
def test_imdb_decodes_again_when_its_cache_is_damaged(offline, cache_text, capsys):
    root = offline / "data"
    for name, blob in write_reviews(root).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    load_text("imdb", root)
    (cache,) = (offline / "cache").glob("imdb-*.json")
    cache.write_text(cache_text)
    check_tiny_imdb(load_text("imdb", root))
    assert "decoding again" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["imdb_aclImdb.tar.gz", "aclImdb_v1.tar.gz"])
def test_imdb_reads_the_archive_and_rejects_a_damaged_one(offline, name):
    root = offline / "data"
    root.mkdir()
    archive = write_tar(root / name, write_reviews(root))
    if name == "imdb_aclImdb.tar.gz":  # a repacked copy: read as is
        check_tiny_imdb(load_text("imdb", root))
        # truncated (a new size: the cache no longer matches)
        archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError) as info:  # the original name: its sha256 must be Stanford's
        load_text("imdb", root)
    message = str(info.value)
    assert message.startswith("imdb: ") and name in message
    assert "\n" not in message and "--smoke" in message


def test_missing_imdb_offline_is_one_clear_line_and_leaves_nothing_on_disk(offline):
    root = offline / "empty-data-root"
    with pytest.raises(DataUnavailable) as info:
        load_text("imdb")
    message = str(info.value)
    assert message.startswith("imdb is not in") and str(root) in message
    assert "--data-dir PATH" in message
    assert "--smoke" in message and "\n" not in message
    assert not root.exists()
    with pytest.raises(DataUnavailable, match="does not exist"):
        load_text("imdb", offline / "typo")
    with pytest.raises(DataUnavailable, match="unknown text data set"):
        load_text("nope")
