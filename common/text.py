"""Text data sets (IMDB, AG News) and their synthetic twins, as raw strings and labels.

    data = load_text("imdb", cfg.data_dir, smoke=cfg.smoke)          # -> TextData (raw strings)

Each lab chooses its own tokenizer and vocabulary: Week 6 teaches them (``week06_rnn/tokens.py``).

Real data sets come as their original archives, checked and cached like ``common.data``'s:
offline with nothing on disk is a one-line ``DataUnavailable``; a damaged archive a one-line
``DataError``; never a silent switch to the synthetic twin (that needs ``smoke`` or ``synthetic``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.download import cache_root, checked_root, download, fetching, file_digest
from common.download import damaged as _damaged
from common.errors import DataError, DataUnavailable, one_line
from common.io import atomic_write_text


# ----------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------
@dataclass
class TextData:
    """Raw texts and int64 labels, so each lab chooses its own tokenizer and vocabulary size."""

    train_texts: list[str]
    y_train: torch.Tensor
    test_texts: list[str]
    y_test: torch.Tensor
    classes: list[str]
    source: str
    name: str = ""
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- the synthetic twin: sentiment that depends on negation and word order ----------------
GOOD = ["good", "great", "excellent", "wonderful", "fun", "brilliant", "moving", "superb",
        "charming", "clever"]
BAD = ["bad", "awful", "boring", "terrible", "dull", "weak", "poor", "painful", "silly", "clumsy"]
THINGS = ["movie", "film", "plot", "acting", "story", "ending", "cast", "script", "music",
          "dialogue"]
FILLER = ["i saw it on a sunday", "my friend picked it", "it runs two hours", "the cinema was full",
          "we watched it at home", "it is based on a novel", "the trailer is everywhere",
          "it came out last year", "there is a dog in it", "the sequel is coming"]
OPENERS = ["", "honestly ,", "to be fair ,", "well ,", "in the end ,", "overall ,", "i think"]


def _clause(rng: torch.Generator, positive: bool, negated: bool) -> str:
    """ "the plot was not dull" : a clause whose sentiment is ``positive`` after negation."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    adjective = pick(GOOD if positive != negated else BAD)  # negated: the opposite word
    verb = pick(["was", "is", "felt", "seemed"])
    if negated:
        verb = pick(["was not", "was n't", "is not", "is n't", "never felt", "never seemed"])
    return f"the {pick(THINGS)} {verb} {pick(['', 'very ', 'really ', 'quite '])}{adjective}"


def sentiment_twin(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` short reviews labelled 0 (neg) / 1 (pos), balanced, where the label needs order.

    Three kinds, a third each: a plain clause ("the plot was great"); a negated one ("the
    plot was n't great" is negative, "the acting was not awful" positive); and a contrast
    ("the music was great , but the plot was dull"), whose label is the clause AFTER "but".
    A bag of words sees "great", "dull", "not" and "but" in every order; it cannot tell which
    adjective a "not" belongs to or which clause came last, so only a model of word order can
    be right on all three. Filler sentences make lengths vary (4 to about 40 tokens).
    """
    rng = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=rng)]
    texts = []
    for label in labels.tolist():
        kind = int(torch.randint(3, (1,), generator=rng))
        negated = bool(torch.randint(2, (1,), generator=rng)) if kind != 0 else False
        if kind == 1:
            negated = True
        last = _clause(rng, bool(label), negated)
        if kind == 2:  # contrast: the first clause says the opposite, maybe negated too
            first = _clause(rng, not label, bool(torch.randint(2, (1,), generator=rng)))
            last = f"{first} , but {last}"
        opener = OPENERS[int(torch.randint(len(OPENERS), (1,), generator=rng))]
        count = int(torch.randint(3, (1,), generator=rng))
        fillers = [FILLER[int(i)] for i in torch.randint(len(FILLER), (count,), generator=rng)]
        before = int(torch.randint(len(fillers) + 1, (1,), generator=rng))
        parts = [*fillers[:before], f"{opener} {last}".strip(), *fillers[before:]]
        texts.append(" . ".join(parts) + " .")
    return texts, labels


def _sentiment_twin_data(name: str) -> Callable[[int, int], TextData]:
    def make(n_train: int, seed: int) -> TextData:
        n_test = max(n_train // 4, 8)
        texts, y = sentiment_twin(n_train + n_test, seed)
        return TextData(texts[:n_train], y[:n_train], texts[n_train:], y[n_train:], ["neg", "pos"],
                        "common.text.sentiment_twin", f"{name} (synthetic twin)", synthetic=True)

    return make


# --- IMDB: the original aclImdb archive ---------------------------------------------------
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
# the original name, and a repacked copy
IMDB_ARCHIVES = ("aclImdb_v1.tar.gz", "imdb_aclImdb.tar.gz")
IMDB_CLASSES = ["neg", "pos"]
_IMDB_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(neg|pos)/(\d+)_(\d+)\.txt$")


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def _decode_imdb(source: Path) -> dict[str, list]:
    """Read ``aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt`` from a folder or a .tar.gz,
    sorted by (split, class, id) so the order never depends on the file system."""
    found = []

    def add(member: str, data: bytes):
        match = _IMDB_MEMBER.search(member)
        if match:
            split, label, index = match.group(1), match.group(2), int(match.group(3))
            text = data.decode("utf-8", errors="replace")
            found.append((split, IMDB_CLASSES.index(label), index, text))

    member = str(source)
    try:
        if source.is_dir():
            for path in source.glob("*/*/*.txt"):
                member = str(path)
                add(path.relative_to(source.parent).as_posix(), path.read_bytes())
        else:
            with tarfile.open(source) as tar:
                for info in tar:
                    member = f"{source}:{info.name}"
                    if info.isfile() and info.name.endswith(".txt"):
                        add(info.name, tar.extractfile(info).read())
        member = str(source)
        for split in ("train", "test"):
            labels = {label for s, label, _, _ in found if s == split}
            if labels != {0, 1}:
                raise ValueError(f"no aclImdb/{split}/{{neg,pos}}/*.txt reviews of both classes")
    except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error) as e:
        raise _damaged("imdb", f"could not read {member} ({one_line(e)})", source) from None
    found.sort(key=lambda item: item[:3])
    blob: dict[str, list] = {}
    for split in ("train", "test"):
        rows = [item for item in found if item[0] == split]
        blob[f"{split}_texts"] = [item[3] for item in rows]
        blob[f"y_{split}"] = [item[1] for item in rows]
    return blob


def _cache_key(source: Path) -> str:
    """Changes when the source does: size and mtime of the archive, or of the class folders."""
    paths = [source] if source.is_file() else [source / s / c for s in ("train", "test")
                                               for c in IMDB_CLASSES]
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
             for p in paths if p.exists()]
    return hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]


def _check_imdb_blob(blob) -> None:
    """ValueError unless ``blob`` has the shape ``_decode_imdb`` writes (a cache edited or
    written by another version must be decoded again, not crash the lab)."""
    if not isinstance(blob, dict):
        raise ValueError("not a JSON object")
    for split in ("train", "test"):
        texts, labels = blob.get(f"{split}_texts"), blob.get(f"y_{split}")
        if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels)
                and all(isinstance(t, str) for t in texts) and all(y in (0, 1) for y in labels)):
            raise ValueError(f"no {split} texts with as many 0/1 labels")


def _imdb_from(source: Path) -> TextData:
    """Decode once (50,000 small files take a while), then read the JSON cache."""
    cache = cache_root() / f"imdb-{_cache_key(source)}.json"
    blob = None
    if cache.exists():
        try:
            blob = json.loads(cache.read_text(encoding="utf-8"))
            _check_imdb_blob(blob)
        except (OSError, ValueError) as e:  # our own cache: decode again rather than fail
            print(f"the cache {cache} does not load ({one_line(e)}); decoding again", flush=True)
            blob = None
    if blob is None:
        if source.name == IMDB_ARCHIVES[0] and source.is_file() and _sha256(source) != IMDB_SHA256:
            raise _damaged("imdb", f"{source.name} is damaged (its sha256 is not the original's)",
                           source.parent)
        print(f"decoding {source} once into {cache} ...", flush=True)
        blob = _decode_imdb(source)
        try:
            atomic_write_text(cache, json.dumps(blob))
        except OSError as e:
            print(f"warning: could not keep the decoded copy in {cache} ({e.strerror or e}); "
                  "set DL_LABS_CACHE to a writable folder to skip decoding next time")
    return TextData(blob["train_texts"], torch.tensor(blob["y_train"], dtype=torch.long),
                    blob["test_texts"], torch.tensor(blob["y_test"], dtype=torch.long),
                    IMDB_CLASSES, str(source), "imdb")


def _imdb(root: Path) -> TextData:
    """``root/aclImdb/`` if it is there, else one of the archives, else a download."""
    if (root / "aclImdb" / "train").is_dir():
        return _imdb_from(root / "aclImdb")
    for name in IMDB_ARCHIVES:
        if (root / name).is_file():
            return _imdb_from(root / name)
    with fetching("imdb", root):  # the publisher's sha256 is checked before the file is kept
        download(IMDB_URL, root / IMDB_ARCHIVES[0], IMDB_SHA256)
    return _imdb_from(root / IMDB_ARCHIVES[0])


# --- AG News: the CSV archive of Zhang, Zhao and LeCun (2015) -----------------------------
AG_NEWS_URL = "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz"
# 11,784,419 bytes; the checksum fastai publishes for this file
AG_NEWS_MD5 = "b86f328f4dbd072486591cb7a5644dcd"
AG_NEWS_ARCHIVE = "ag_news_csv.tgz"
# labels 1..4 in the CSV files (classes.txt)
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
_ENTITY = re.compile(r"&?#(\d{2,4});")  # the CSVs spell "$" as "#36;" and "'" as "#39;"


def _ag_news_rows(text: str, where: str) -> tuple[list[str], list[int]]:
    """``"label","title","description"`` rows (label 1..4) -> texts "title. description" and
    labels 0..3. A header row (as in copies saved with pandas) is skipped; the backslashes
    that stand for line breaks and the "#36;"-style entities are cleaned up, runs of spaces
    made one."""
    texts, labels = [], []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number == 1 and row and not row[0].strip().isdigit():
            continue  # a header such as "label,title,description"
        if not row:
            continue
        if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
            raise ValueError(f"{where} line {number}: expected label (1-4), title, description; "
                             f"got {row[:3]!r}")
        body = f"{row[1].strip()}. {row[2].strip()}".replace("\\", " ")
        texts.append(" ".join(_ENTITY.sub(lambda m: chr(int(m.group(1))), body).split()))
        labels.append(int(row[0]) - 1)
    if not texts:
        raise ValueError(f"{where} has no rows")
    return texts, labels


def _ag_news_from(source: Path) -> TextData:
    """``train.csv`` and ``test.csv`` from a folder, or from ``ag_news_csv/`` in the archive."""
    splits = {}
    member = str(source)
    try:
        if source.is_dir():
            for split in ("train", "test"):
                member = str(source / f"{split}.csv")
                text = (source / f"{split}.csv").read_text(encoding="utf-8")
                splits[split] = _ag_news_rows(text, member)
        else:
            with tarfile.open(source) as tar:
                for split in ("train", "test"):
                    member = f"{source}:ag_news_csv/{split}.csv"
                    handle = tar.extractfile(f"ag_news_csv/{split}.csv")
                    if handle is None:
                        raise ValueError("not a file")
                    splits[split] = _ag_news_rows(handle.read().decode("utf-8"), member)
    except (OSError, EOFError, KeyError, ValueError, UnicodeDecodeError, csv.Error,
            tarfile.TarError, zlib.error) as e:
        raise _damaged("ag_news", f"could not read {member} ({one_line(e)})", source) from None
    (train_texts, y_train), (test_texts, y_test) = splits["train"], splits["test"]
    return TextData(train_texts, torch.tensor(y_train, dtype=torch.long), test_texts,
                    torch.tensor(y_test, dtype=torch.long), AG_NEWS_CLASSES, str(source), "ag_news")


def _ag_news(root: Path) -> TextData:
    """``root/ag_news_csv/{train,test}.csv`` if there, else ``root/ag_news_csv.tgz``, else a
    download."""
    folder, archive = root / "ag_news_csv", root / AG_NEWS_ARCHIVE
    if (folder / "train.csv").is_file() or (folder / "test.csv").is_file():
        return _ag_news_from(folder)  # half a folder: reported as damaged, not downloaded over
    if archive.is_file():
        if _md5(archive) != AG_NEWS_MD5:
            raise _damaged("ag_news", f"{archive.name} is damaged (its md5 is not the original's)",
                           root)
        return _ag_news_from(archive)
    with fetching("ag_news", root):
        download(AG_NEWS_URL, archive, AG_NEWS_MD5, "md5")
    return _ag_news_from(archive)


# --- the AG News twin: four topics, told apart by their words -----------------------------
TOPIC_WORDS = [
    ["minister", "election", "embassy", "troops", "parliament", "refugees", "ceasefire",
     "president", "border", "treaty", "protest", "diplomats", "rebels", "un"],  # World
    ["coach", "season", "league", "goal", "championship", "playoffs", "striker", "tournament",
     "olympic", "quarterback", "victory", "medal", "inning", "defender"],  # Sports
    ["shares", "profit", "earnings", "merger", "investors", "stocks", "quarterly", "revenue",
     "bank", "oil", "prices", "retailer", "dividend", "analysts"],  # Business
    ["software", "internet", "computer", "chip", "wireless", "researchers", "space", "nasa",
     "browser", "linux", "scientists", "spam", "satellite", "processor"],  # Sci/Tech
]
NEWS_FILLER = ["on monday", "on tuesday", "according to a report", "reuters", "ap", "in new york",
               "in london", "officials said", "this week", "after talks", "for the first time",
               "late on friday", "sources say", "the company said", "in a statement"]


def ag_news_twin(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` short news items labelled 0..3 (World, Sports, Business, Sci/Tech), balanced.

    Each has 2 to 4 words of its own topic, up to 2 words of one other topic (a World story
    may mention "oil"), and neutral news phrases around them, in a random order. The topic is
    the one with more words, so a model has to weigh the evidence, not spot one keyword.
    """
    rng = torch.Generator().manual_seed(seed)

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=rng))

    labels = (torch.arange(n) % len(TOPIC_WORDS))[torch.randperm(n, generator=rng)]
    texts = []
    for label in labels.tolist():
        own = 2 + randint(3)
        other = (label + 1 + randint(len(TOPIC_WORDS) - 1)) % len(TOPIC_WORDS)
        words = [TOPIC_WORDS[label][randint(len(TOPIC_WORDS[label]))] for _ in range(own)]
        words += [TOPIC_WORDS[other][randint(len(TOPIC_WORDS[other]))]
                  for _ in range(min(randint(3), own - 1))]
        words += [NEWS_FILLER[randint(len(NEWS_FILLER))] for _ in range(1 + randint(4))]
        order = torch.randperm(len(words), generator=rng).tolist()
        texts.append(" ".join(words[i] for i in order) + " .")
    return texts, labels


def _ag_news_twin_data(n_train: int, seed: int) -> TextData:
    n_test = max(n_train // 4, 8)
    texts, y = ag_news_twin(n_train + n_test, seed)
    return TextData(texts[:n_train], y[:n_train], texts[n_train:], y[n_train:], AG_NEWS_CLASSES,
                    "common.text.ag_news_twin", "ag_news (synthetic twin)", synthetic=True)


# ----------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------
@dataclass
class TextEntry:
    load_real: Callable[[Path], TextData]
    make_twin: Callable[[int, int], TextData]


TEXT_REGISTRY: dict[str, TextEntry] = {
    "imdb": TextEntry(_imdb, _sentiment_twin_data("imdb")),
    "ag_news": TextEntry(_ag_news, _ag_news_twin_data),
}


def validate_text(name: str, data: TextData) -> None:
    """One-line ``DataError`` unless every split has texts, as many labels, in 0..K-1."""
    for split, texts, y in (("training", data.train_texts, data.y_train),
                            ("test", data.test_texts, data.y_test)):
        problem = None
        if not texts:
            problem = f"the {split} set is empty"
        elif len(texts) != len(y):
            problem = f"the {split} set has {len(texts)} texts but {len(y)} labels"
        elif (y.dtype != torch.long or y.ndim != 1 or int(y.min()) < 0
              or int(y.max()) >= len(data.classes)):
            problem = f"{split} labels must be int64 in 0..{len(data.classes) - 1}"
        if problem:
            raise DataError(f"{name}: {problem} (in {data.source})")


def load_text(name: str, data_dir: str | Path | None = None, smoke: bool = False,
              synthetic: bool = False, n_synthetic: int = 512, seed: int = 0) -> TextData:
    """A text data set from ``TEXT_REGISTRY``, checked: the real one from the data root, or
    (``smoke`` / ``synthetic``) its twin with ``n_synthetic`` training texts."""
    if name not in TEXT_REGISTRY:
        raise DataUnavailable(f"unknown text data set {name!r}; "
                              f"known: {', '.join(sorted(TEXT_REGISTRY))}")
    entry = TEXT_REGISTRY[name]
    if smoke or synthetic:
        data = entry.make_twin(n_synthetic, seed)
    else:
        data = entry.load_real(checked_root(name, data_dir))
    validate_text(name, data)
    return data


__all__ = ["TextData", "load_text", "TEXT_REGISTRY", "TextEntry", "sentiment_twin", "validate_text",
           "ag_news_twin", "AG_NEWS_CLASSES"]
