"""Week 6 benchmark: the classic baseline our IMDB models must beat, and our bag of n-grams, in
one entry.

    python benchmarks/run.py imdb_tfidf_vs_bag --data-dir DATA

The baseline is scikit-learn's TF-IDF of word unigrams and bigrams (``min_df=2``, sublinear tf)
with a logistic regression (``C=8``), fitted on the 25k training reviews and scored once on the
25k test reviews. Our bag (``week06_rnn/part2.py --model ngram_bag``, the settings of
``benchmarks/week06.py``) runs in the same process afterwards. Both report test accuracy and the
CPU seconds of their own work (reading the data is shared and counted once, before either), so
the figures compare even on a machine shared with other jobs. Goal: the bag at least as
accurate as the baseline, in less CPU time.
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.run import Benchmark, config_options


def tfidf_logistic(train_texts: list[str], y_train, test_texts: list[str], y_test) -> dict:
    """The baseline: TF-IDF word 1-2 grams -> logistic regression; its accuracy and CPU time."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0, cpu0 = time.perf_counter(), time.process_time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(train_texts)  # (25000, ~1.5M) sparse
    model = LogisticRegression(C=8, max_iter=1000).fit(features, y_train)
    accuracy = (model.predict(vectorizer.transform(test_texts)) == y_test).mean()
    return {"test_acc": round(float(accuracy), 4), "cpu_s": round(time.process_time() - cpu0, 2),
            "wall_s": round(time.perf_counter() - t0, 2), "features": features.shape[1]}


def tfidf_vs_bag(data_dir: str, device: str, options: dict) -> dict:
    from benchmarks.week06 import NGRAM_BAG, _timed_main
    from common.text import load_text
    from week06_rnn import part2

    fields, _ = config_options(options, part2.Config, default_threads=1)
    data = load_text("imdb", data_dir)
    baseline = tfidf_logistic(data.train_texts, data.y_train.numpy(),
                              data.test_texts, data.y_test.numpy())
    with tempfile.TemporaryDirectory() as out:
        bag = _timed_main({**NGRAM_BAG, **fields}, data_dir, device, out)
    gap = round(bag["test_acc"] - baseline["test_acc"], 4)
    return {"metric": "bag_minus_tfidf_acc", "value": gap,
            "tfidf_test_acc": baseline["test_acc"], "tfidf_cpu_s": baseline["cpu_s"],
            "tfidf_wall_s": baseline["wall_s"], "tfidf_features": baseline["features"],
            "bag_test_acc": bag["test_acc"], "bag_cpu_s": bag["main_cpu_s"],
            "bag_wall_s": bag["main_s"],
            "meets_goal": gap >= 0 and bag["main_cpu_s"] < baseline["cpu_s"]}


ENTRIES = {
    "imdb_tfidf_vs_bag": Benchmark(
        tfidf_vs_bag, "Week 6: TF-IDF 1-2 gram logistic regression vs our bag of n-grams on IMDB, "
                      "same run (goal: bag >= baseline, in less CPU time)"),
}
