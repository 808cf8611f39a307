"""Week 6: the tokenizer, vocabulary and length buckets; NumPy embedding, RNN and LSTM (forward
and BPTT) == PyTorch; packing; the IMDB lab (learning, padding that changes nothing, clipping,
best checkpoint, exact resume); GloVe and the length study.

Parity checks run in float64 (common.parity), so the tolerance measures our math, not float32
rounding. Inputs contain exact zeros (zero vectors, a zero initial state) and repeated ids.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.checkpoint import read_checkpoint
from common.errors import CheckpointError, ConfigError, DataError
from common.parity import assert_close
from tests.conftest import run_lab
from tests.test_common_text import write_reviews
from week06_rnn import glove_vs_random, max_length, part1, part2
from week06_rnn.baseline import NgramBag
from week06_rnn.tokens import PAD, UNK, LengthBatches, Vocab, encode_texts, pad_batch, tokenize


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them; rows are metrics.csv)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["rnn_first_over_last"] < 1e-6, (
        "a default-init RNN's gradient must vanish over 40 steps")
    assert summary["rnn_big_first_over_last"] > 1, (
        "3x recurrent weights: the gradient grows back in time")
    assert summary["lstm_first_over_last"] > 1e3 * summary["rnn_first_over_last"], (
        "the LSTM keeps it far longer")


def check_part2(summary: dict, rows: list[dict]) -> None:
    # Measured (benchmarks/smoke_margins.py): 0.949, majority class 0.516; with --lr 1e-9
    # (nothing learns) 0.547, 0.17 under the threshold.
    assert summary["test_acc"] >= summary["majority_baseline"] + 0.2, summary
    assert summary["last_train_loss"] < 0.5 * summary["first_train_loss"], summary
    accs = [float(r["val_acc"]) for r in rows]
    assert summary["best_epoch"] == 1 + accs.index(max(accs)), (
        "the kept model is the best on validation")
    matrix = np.array(summary["confusion"])
    assert matrix.sum() == 256
    assert np.trace(matrix) / matrix.sum() == pytest.approx(summary["test_acc"])
    assert all(math.isfinite(float(r["grad_norm"])) for r in rows)


def check_glove(summary: dict, rows: list[dict]) -> None:
    assert summary["coverage"] == 1, summary  # the twin's stand-in vectors cover every word
    # Vectors that already separate positive from negative words: learned in the time a random
    # embedding is still at chance.
    assert summary["test_acc_glove"] >= 0.8 and summary["glove_gain"] >= 0.1, summary


def check_max_length(summary: dict, rows: list[dict]) -> None:
    lengths = [int(r["max_len"]) for r in rows]
    assert lengths == sorted(lengths) and len(lengths) >= 2
    # The twin's sentiment clause comes after filler: cutting to 4 tokens loses it, 64 keeps it.
    assert summary["test_acc_longest"] >= summary["test_acc_shortest"] + 0.1, summary


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2,
                  "glove_vs_random.py": check_glove, "max_length.py": check_max_length}


# ------------------------------------------------------------------------------------------
# Tokens: the tokenizer, the vocabulary, padding, length buckets (week06_rnn/tokens.py)
# ------------------------------------------------------------------------------------------
def test_tokenize_lowercases_splits_punctuation_and_keeps_negation():
    assert tokenize("Great movie!<br /><br />I didn't LIKE the end, it's 10/10") == [
        "great", "movie", "!", "i", "did", "n't", "like", "the", "end", ",", "it", "'s", "10", "/",
        "10"]
    assert tokenize("not bad") == ["not", "bad"]
    assert tokenize("Isn’t it") == ["is", "n't", "it"]  # the typographic apostrophe too
    assert tokenize("café<br/>x") == ["café", "x"]
    assert tokenize("") == []


def test_tokenize_odd_input_empty_punctuation_and_unicode():
    assert tokenize("   \n\t") == [] and tokenize("<br /><br />") == []
    # only punctuation: kept, one mark each
    assert tokenize("!!!...?") == ["!", "!", "!", ".", ".", ".", "?"]
    # The same word typed composed or with a combining accent is one token (NFC), and a
    # lowercased "İ" (i + combining dot, no precomposed form) does not split its word.
    assert tokenize("Café") == tokenize("Cafe\u0301") == ["café"]
    assert len(tokenize("İstanbul")) == 1
    assert tokenize("日本語 naïve Ünï") == ["日本語", "naïve", "ünï"]
    # BOM gone, zero-width space splits
    assert tokenize("\ufeffzero\u200bwidth") == ["zero", "width"]
    vocab = Vocab.build([tokenize("a b")], max_size=10)
    x, lengths = encode_texts(["", "!!!", "\u200b"], vocab, max_len=4)
    assert lengths.tolist() == [1, 3, 1] and x[0].eq(PAD).all() and x[1, :3].eq(UNK).all()


def test_vocab_orders_by_frequency_then_word_and_maps_unknown_to_unk():
    texts = [["b", "a", "c", "a"], ["c", "d", "a"], ["e"]]  # a:3, c:2, b:1, d:1, e:1
    vocab = Vocab.build(texts, max_size=5)
    assert vocab.itos == ["<pad>", "<unk>", "a", "c", "b"]  # ties (b, d, e) broken alphabetically
    assert len(vocab) == 5 and vocab.itos[PAD] == "<pad>" and vocab.itos[UNK] == "<unk>"
    assert vocab.encode(["a", "d", "zzz", "b"]) == [2, UNK, UNK, 4]
    assert Vocab.build(reversed(texts), max_size=5).itos == vocab.itos, (
        "reading order must not matter")
    assert Vocab.build(texts, max_size=100, min_freq=2).itos == ["<pad>", "<unk>", "a", "c"]
    assert Vocab.build([["<unk>", "<pad>", "x"]], max_size=10).itos == ["<pad>", "<unk>", "x"]


def test_vocab_state_dict_round_trips_through_a_weights_only_checkpoint(tmp_path):
    vocab = Vocab.build([tokenize("the film was n't good, the film was bad")], max_size=50)
    torch.save({"vocab": vocab.state_dict()}, tmp_path / "v.pt")
    again = Vocab.from_state_dict(torch.load(tmp_path / "v.pt", weights_only=True)["vocab"])
    assert again.itos == vocab.itos
    assert again.encode(["film", "nope"]) == vocab.encode(["film", "nope"])
    for bad in ({"itos": ["a", "b"]}, {"itos": [1, 2]}, {}, {"itos": ["<pad>", "<unk>", "x", "x"]}):
        with pytest.raises(CheckpointError):
            Vocab.from_state_dict(bad)


def test_pad_batch_right_pads_truncates_and_keeps_lengths_at_least_one():
    x, lengths = pad_batch([[5, 6, 7], [8], []], max_len=10)
    assert x.tolist() == [[5, 6, 7], [8, PAD, PAD], [PAD, PAD, PAD]] and x.dtype == torch.long
    assert lengths.tolist() == [3, 1, 1]
    x, lengths = pad_batch([[1, 2, 3, 4, 5], [9, 9]], max_len=3)
    assert x.tolist() == [[1, 2, 3], [9, 9, PAD]] and lengths.tolist() == [3, 2]
    vocab = Vocab.build([["good"]], max_size=10)
    x, lengths = encode_texts(["Good good!", "bad"], vocab, 8)
    assert x.tolist() == [[2, 2, UNK], [UNK, PAD, PAD]] and lengths.tolist() == [3, 1]


def test_encode_texts_keeps_the_first_or_the_last_tokens():
    vocab = Vocab.build([["a", "b", "c", "d"]], max_size=10)  # a=2 b=3 c=4 d=5
    assert encode_texts(["a b c d"], vocab, 2)[0].tolist() == [[2, 3]]
    assert encode_texts(["a b c d", "a"], vocab, 2, keep="last")[0].tolist() == [[4, 5], [2, PAD]]


def padding_per_batch(loader: LengthBatches) -> list[int]:
    """PAD cells each batch carries: its width x rows - the real tokens in it."""
    return [int((x == PAD).sum()) for x, _ in loader]


def test_length_buckets_carry_little_padding_yet_change_every_epoch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 201, (3200,), generator=g)  # 1 to 200 tokens, like reviews
    x, _ = pad_batch([[7] * int(n) for n in lengths], max_len=200)
    y = torch.arange(3200) % 2

    def loader(bucket: bool) -> LengthBatches:
        return LengthBatches(x, lengths, y, batch_size=32, shuffle=True, bucket=bucket, seed=1)

    plain, bucketed = loader(False), loader(True)
    assert len(bucketed) == len(list(bucketed)) == 100  # 2 pools of 50 batches
    # Random batches of 32 are padded to about the longest of 32 draws (~194): ~100 pads a row.
    # Sorted pools of 1,600 give batches of neighbours in length: a few pads a row.
    assert sum(padding_per_batch(bucketed)) < 0.1 * sum(padding_per_batch(plain))
    first = [idx.tolist() for idx in bucketed.batches(1)]
    second = [idx.tolist() for idx in bucketed.batches(2)]
    assert sorted(sum(first, [])) == list(range(3200)), "every review once per epoch"
    assert first != second and first == [idx.tolist() for idx in loader(True).batches(1)]
    assert sorted(map(sorted, first)) != sorted(map(sorted, second)), "not the same batches again"


# ------------------------------------------------------------------------------------------
# Part 1: embeddings, RNN, LSTM == PyTorch
# ------------------------------------------------------------------------------------------
def inputs(rng, n=3, t=5, d=4, h=6):
    x = rng.standard_normal((n, t, d))
    x[0, 1] = 0.0  # an exact zero input vector
    x[2, :, 0] = 0.0
    return x, np.zeros((n, h)), rng.standard_normal((n, h))  # a zero and a random initial state


@pytest.mark.parametrize("zero_h0", [True, False])
def test_rnn_forward_and_bptt_match_nn_rnn(zero_h0):
    rng = np.random.default_rng(0)
    x, h_zero, h_rand = inputs(rng)
    h0 = h_zero if zero_h0 else h_rand
    w = part1.init_weights(rng, 4, 6, 1)
    dh = rng.standard_normal((3, 5, 6))  # a loss on every output: L = sum(h * dh)
    h = part1.rnn_forward(x, h0, **w)
    grads = part1.rnn_backward(dh, x, h0, h, w["W_ih"], w["W_hh"])

    rnn = nn.RNN(4, 6, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for name, value in w.items():
            param = f"weight_{name[2:]}_l0" if name.startswith("W") else f"bias_{name[2:]}_l0"
            getattr(rnn, param).copy_(torch.from_numpy(value))
    xt, h0t = torch.tensor(x, requires_grad=True), torch.tensor(h0[None], requires_grad=True)
    out, h_n = rnn(xt, h0t)
    (out * torch.from_numpy(dh)).sum().backward()
    assert_close(h, out.detach().numpy(), "RNN outputs")
    assert_close(h[:, -1], h_n[0].detach().numpy(), "RNN h_n")
    assert_close(grads["x"], xt.grad.numpy(), "dL/dx")
    assert_close(grads["h0"], h0t.grad[0].numpy(), "dL/dh0")
    assert_close(grads["W_ih"], rnn.weight_ih_l0.grad.numpy(), "dL/dW_ih")
    assert_close(grads["W_hh"], rnn.weight_hh_l0.grad.numpy(), "dL/dW_hh")
    assert_close(grads["b"], rnn.bias_ih_l0.grad.numpy(), "dL/db_ih")
    assert_close(grads["b"], rnn.bias_hh_l0.grad.numpy(), "dL/db_hh")


def load_lstm(w: dict, hidden: int, input_size: int) -> nn.LSTM:
    lstm = nn.LSTM(input_size, hidden, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(w["W_ih"]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(w["W_hh"]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(w["b_ih"]))
        lstm.bias_hh_l0.copy_(torch.from_numpy(w["b_hh"]))
    return lstm


@pytest.mark.parametrize("last_only", [False, True])
def test_lstm_forward_and_bptt_match_nn_lstm(last_only):
    rng = np.random.default_rng(1)
    x, h0, c0 = inputs(rng)
    c0[1] = 0.0
    w = part1.init_weights(rng, 4, 6, 4)
    dh = rng.standard_normal((3, 5, 6))
    # last_only: a classifier reading h_T only: earlier steps get gradient through time alone
    if last_only:
        dh[:, :-1] = 0.0
    dc = rng.standard_normal((3, 6))  # and a loss on c_T: the cell path is checked from its end too
    h, cache = part1.lstm_forward(x, h0, c0, **w)
    grads = part1.lstm_backward(dh, cache, w["W_ih"], w["W_hh"], dc_last=dc)

    lstm = load_lstm(w, 6, 4)
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0[None], requires_grad=True)
    c0t = torch.tensor(c0[None], requires_grad=True)
    out, (h_n, c_n) = lstm(xt, (h0t, c0t))
    ((out * torch.from_numpy(dh)).sum() + (c_n[0] * torch.from_numpy(dc)).sum()).backward()
    assert_close(h, out.detach().numpy(), "LSTM outputs")
    assert_close(h[:, -1], h_n[0].detach().numpy(), "LSTM h_n")
    assert_close(cache[4][:, -1], c_n[0].detach().numpy(), "LSTM c_n")
    assert_close(grads["x"], xt.grad.numpy(), "dL/dx")
    assert_close(grads["h0"], h0t.grad[0].numpy(), "dL/dh0")
    assert_close(grads["c0"], c0t.grad[0].numpy(), "dL/dc0")
    assert_close(grads["W_ih"], lstm.weight_ih_l0.grad.numpy(), "dL/dW_ih")
    assert_close(grads["W_hh"], lstm.weight_hh_l0.grad.numpy(), "dL/dW_hh")
    assert_close(grads["b"], lstm.bias_hh_l0.grad.numpy(), "dL/db")


def test_embedding_gradient_is_a_scatter_add_equal_to_autograd():
    rng = np.random.default_rng(2)
    E = rng.standard_normal((7, 3))
    E[PAD] = 0.0
    ids = np.array([[3, 3, 5, PAD], [3, 6, PAD, PAD]])  # repeated ids accumulate; PAD gets nothing
    dx = rng.standard_normal((2, 4, 3))
    dx[0, 2] = 0.0
    assert_close(part1.embedding_forward(E, ids), E[ids], "lookup")
    Et = torch.tensor(E, requires_grad=True)
    x = F.embedding(torch.from_numpy(ids), Et, padding_idx=PAD)
    (x * torch.from_numpy(dx)).sum().backward()
    dE = part1.embedding_backward(dx, ids, 7)
    assert_close(dE, Et.grad.numpy(), "dL/dE")
    assert_close(dE[3], dx[0, 0] + dx[0, 1] + dx[1, 0], "the three uses of id 3")
    assert not dE[[1, 2, 4]].any() and not dE[PAD].any()


def test_vanishing_gradient_rnn_vs_lstm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 60, 8))
    rnn = part1.gradient_through_time("rnn", part1.init_weights(rng, 8, 16, 1), x)
    lstm_w = part1.init_weights(rng, 8, 16, 4)
    lstm_w["b_hh"][16:32] += 1.0
    lstm = part1.gradient_through_time("lstm", lstm_w, x)
    assert rnn[0] / rnn[-1] < 1e-8 and lstm[0] / lstm[-1] > 1e4 * rnn[0] / rnn[-1]
    rate = np.polyfit(np.arange(60), np.log(rnn), 1)[0]  # log-norm gained per step towards the end
    assert rate > 0.3, "the RNN's gradient should shrink by a steady factor per step back"


# ------------------------------------------------------------------------------------------
# Part 2: packing, the final states, padding, clipping
# ------------------------------------------------------------------------------------------
def test_reverse_within_length_keeps_padding_at_the_end():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    got = part2.reverse_within_length(x, torch.tensor([3, 2, 1]))
    assert got.tolist() == [[3, 2, 1, 0], [5, 4, 0, 0], [6, 0, 0, 0]]


def ragged_batch(seed=0, n=5, vocab=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 7, 2])[:n]
    x = torch.randint(2, vocab, (n, 7), generator=g)
    for i, length in enumerate(lengths):
        x[i, length:] = PAD
    return x, lengths


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_and_padded_give_each_sequence_its_own_final_states(cell):
    torch.manual_seed(0)
    x, lengths = ragged_batch()
    model = part2.TextRNN(30, 2, 5, 4, cell=cell, bidirectional=True).double().eval()
    padded = model.summary(x)
    model.packed = True
    packed = model.summary(x)
    alone = torch.cat([model.summary(x[i:i + 1, :length]) for i, length in enumerate(lengths)])
    assert_close(packed.detach().numpy(), alone.detach().numpy(),
                 "packed batch vs each sequence alone")
    assert_close(padded.detach().numpy(), alone.detach().numpy(),
                 "padded + gather vs each sequence alone")
    # What goes wrong without either: the RNN's last output has read the padding.
    out, _ = model.forward_rnn(model.embed(x))
    assert not torch.allclose(out[:, -1][lengths < 7], alone[lengths < 7, :4])


def test_one_layer_textrnn_is_exactly_a_bidirectional_nn_lstm():
    torch.manual_seed(1)
    x, lengths = ragged_batch(1)
    model = part2.TextRNN(30, 2, 5, 4, cell="lstm", bidirectional=True).double().eval()
    bi = nn.LSTM(5, 4, batch_first=True, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.forward_rnn.named_parameters():
            getattr(bi, name).copy_(p)
            getattr(bi, f"{name}_reverse").copy_(getattr(model.backward_rnn, name))
    _, (h_n, _) = bi(pack_padded_sequence(model.embed(x), lengths, batch_first=True,
                                          enforce_sorted=False))
    expected = torch.cat([h_n[0], h_n[1]], dim=1)
    assert_close(model.summary(x).detach().numpy(), expected.detach().numpy(),
                 "TextRNN vs nn.LSTM(bidirectional)")


@pytest.mark.parametrize("model_name", ["lstm", "gru", "ngram_bag"])
def test_extra_padding_does_not_change_a_prediction(model_name):
    torch.manual_seed(2)
    cfg = part2.Config(model=model_name, embed_dim=6, hidden=5, ngram_buckets=64, dropout=0.5)
    model = part2.make_model(cfg, 30, 2).double().eval()
    x, lengths = ragged_batch(2)
    wider = torch.cat([x, torch.full((len(x), 9), PAD)], dim=1)
    assert_close(model(wider).detach().numpy(), model(x).detach().numpy(),
                 "logits with 9 more PAD columns")
    alone = torch.cat([model(x[i:i + 1, :length]) for i, length in enumerate(lengths)])
    assert_close(model(x).detach().numpy(), alone.detach().numpy(), "logits in a batch vs alone")


def test_ngram_bag_bigrams_never_touch_padding():
    bag = NgramBag(10, 2, 3, buckets=7)
    ids = bag.ngrams(torch.tensor([[4, 5, 6, PAD], [4, 5, PAD, PAD]]))
    assert ids.shape == (2, 7) and ids[0, 4:6].ge(10).all()
    assert ids[0, 6] == PAD and ids[1, 5:].eq(PAD).all()
    assert ids[0, 4] == ids[1, 4], "the same bigram (4, 5) has the same bucket in every review"


def test_train_one_epoch_clips_the_global_norm_and_logs_the_norm_before_clipping():
    """One batch and plain SGD with lr 1: the step taken is the (clipped) gradient itself."""
    torch.manual_seed(0)
    model = NgramBag(10, 2, 3, buckets=7)
    x, y = torch.tensor([[4, 5, 6, PAD], [2, 3, PAD, PAD]]), torch.tensor([0, 1])
    train = LengthBatches(x, torch.tensor([3, 2]), y, batch_size=2)

    def one_epoch(clip: float) -> tuple[dict, torch.Tensor]:
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        row = part2.train_one_epoch(trained, train, optimizer, scheduler, clip)
        step = [(a - b).flatten() for a, b in zip(model.parameters(), trained.parameters())]
        return row, torch.cat(step).detach()

    row, free = one_epoch(0)  # --clip 0: measured, not clipped
    norm = free.norm().item()
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5) and row["clipped"] == 0
    row, clipped = one_epoch(norm / 4)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5), (
        "the logged norm is the one before clipping")
    assert row["grad_norm_max"] == row["grad_norm"] and row["clipped"] == 1.0
    assert clipped.norm().item() == pytest.approx(norm / 4, rel=1e-5), "the step is bounded"
    torch.testing.assert_close(clipped / clipped.norm(), free / norm)  # the direction is kept


# ------------------------------------------------------------------------------------------
# Part 2 as a program: best checkpoint, bad input, exact resume
# ------------------------------------------------------------------------------------------
TINY = ("--smoke", "--epochs", "3", "--embed-dim", "8", "--hidden", "8", "--no-packed")


def lab(module, out: Path, *argv: str) -> dict:
    return run_lab(module.main, module.Config, ["--out", str(out), "--device", "cpu", *argv])


def test_best_checkpoint_holds_the_validation_best_and_its_vocabulary(tmp_path):
    summary = lab(part2, tmp_path, *TINY)
    run_dir = Path(summary["run_dir"])
    best = read_checkpoint(run_dir / "best_model.pt")
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    accs = [float(r["val_acc"]) for r in rows]
    assert best["epoch"] == summary["best_epoch"] == 1 + accs.index(max(accs))
    vocab = Vocab.from_state_dict(best["extra"]["vocab"])
    assert len(vocab) == summary["vocab"] and "good" in vocab.stoi
    assert (run_dir / "confusion.png").is_file() and (run_dir / "curves.png").is_file()


def test_part2_resumes_exactly_after_ctrl_c(tmp_path, capsys, ctrl_c):
    whole = lab(part2, tmp_path / "whole", *TINY)
    steps_per_epoch = math.ceil((1024 - round(0.1 * 1024)) / 32)  # 922 training reviews
    ctrl_c(steps_per_epoch + 5)  # in epoch 2
    assert lab(part2, tmp_path / "cut", *TINY) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut").glob("week06/part2/*/checkpoint.pt")
    assert f"the checkpoint of epoch 1 is {checkpoint}" in capsys.readouterr().err
    assert read_checkpoint(checkpoint)["epoch"] == 1
    hook = ctrl_c(0)
    resumed = lab(part2, tmp_path / "cut", "--resume", str(checkpoint))
    assert hook.steps == 2 * steps_per_epoch, "the resumed run trains epochs 2 and 3 only"
    rows = list(csv.DictReader((checkpoint.parent / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and resumed["epochs_done"] == 3
    for key in ("test_acc", "val_acc", "best_epoch", "epochs_done", "confusion", "last_train_loss"):
        assert resumed[key] == whole[key], key
    for name in ("checkpoint.pt", "best_model.pt"):
        (a,), (b,) = ((tmp_path / d).glob(f"week06/part2/*/{name}") for d in ("whole", "cut"))
        expected, got = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
        assert all(torch.equal(expected[k], got[k]) for k in expected), name  # bit for bit
    # best_model.pt (weights only) is no resume point: refused in one line, not a silent restart
    (best,) = (tmp_path / "whole").glob("week06/part2/*/best_model.pt")
    capsys.readouterr()
    runs_before = sorted((tmp_path / "whole").glob("week06/part2/*"))
    assert lab(part2, tmp_path / "whole", "--resume", str(best)) == {"exit": 2}
    assert "holds the weights only" in capsys.readouterr().err
    assert sorted((tmp_path / "whole").glob("week06/part2/*")) == runs_before


def test_part2_bad_input_is_one_line(tmp_path, offline, capsys):
    for argv, code, words in ((["--max-len", "0"], 2, "--max-len"),
                              (["--data-dir", str(tmp_path / "nope")], 1, "imdb: --data-dir"),
                              (["--resume", str(tmp_path / "bad.pt")], 2, "corrupt"),
                              (["--smoke", "--batch-size", "923"], 2,
                               "--batch-size 923 is more than the 922 training reviews")):
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        assert lab(part2, tmp_path / "runs", *argv) == {"exit": code}
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# Self-work: GloVe reading, the length study
# ------------------------------------------------------------------------------------------
def test_glove_text_file_fills_known_rows_and_counts_coverage(tmp_path):
    path = tmp_path / "glove.6B.3d.txt"
    path.write_text("good 0.5 1 -1\nbad -0.5 -1 1\nthe 0 0 0\n")
    vocab = Vocab(["<pad>", "<unk>", "good", "bad", "film"])
    vectors = glove_vs_random.read_glove_txt(path, 3, set(vocab.itos))
    assert set(vectors) == {"good", "bad"}  # only the vocabulary's words are kept
    matrix, found = glove_vs_random.embedding_matrix(vocab, vectors, 3, seed=0)
    assert found == 2 and matrix.shape == (5, 3)
    assert matrix[2].tolist() == [0.5, 1.0, -1.0] and matrix[3].tolist() == [-0.5, -1.0, 1.0]
    # a word without a vector keeps a random one
    assert not matrix[PAD].any() and matrix[4].abs().sum() > 0
    with pytest.raises(DataError, match="line 1 .* has 3 numbers, expected 50"):
        glove_vs_random.read_glove_txt(path, 50)
    path.write_text("good 0.5 1 -1\nbroken 1 2\n")
    with pytest.raises(DataError, match="line 2"):
        glove_vs_random.read_glove_txt(path, 3)
    for line in ("bad 1 nan 0", "bad 1 inf 0", "bad 1 x 0"):  # never a silent nan embedding
        path.write_text(f"good 0.5 1 -1\n{line}\n")
        with pytest.raises(DataError, match="line 2"):
            glove_vs_random.read_glove_txt(path, 3)


@pytest.mark.parametrize("at_step, during, kept", [(5, "random", "no epoch had finished"),
                                                   (29 + 5, "glove", "finished (1 epochs in all)")])
def test_glove_ctrl_c_says_plainly_what_was_kept(tmp_path, capsys, ctrl_c, at_step, during, kept):
    """The script has no --resume: after Ctrl-C it must not offer one (29 steps an epoch)."""
    ctrl_c(at_step)
    args = ("--smoke", "--epochs", "1", "--hidden", "8")
    assert lab(glove_vs_random, tmp_path, *args) == {"exit": 130}
    err = capsys.readouterr().err
    assert f"interrupted while training the {during} model" in err and kept in err, err
    assert "has no --resume" in err and "continue with" not in err and err.count("\n") == 1, err
    if during == "glove":
        (metrics,) = tmp_path.glob("week06/glove_vs_random/*/metrics.csv")
        assert str(metrics) in err
        assert [r["init"] for r in csv.DictReader(metrics.open())] == ["random"]


def test_glove_missing_is_one_line_and_leaves_no_run(tmp_path, offline, capsys):
    root = tmp_path / "data"
    for name, blob in write_reviews(root).items():  # a tiny IMDB, but no GloVe file
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    # 5 training reviews: a batch of at most 5 (a larger one is refused first, exit 2)
    args = ("--dim", "100", "--data-dir", str(root), "--batch-size", "4")
    assert lab(glove_vs_random, tmp_path / "runs", *args) == {"exit": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "glove.6B.100d.txt" in err
    assert "--glove PATH" in err and "--smoke" in err
    assert not (tmp_path / "runs").exists()


def test_max_length_refuses_a_batch_larger_than_the_training_set_before_the_run_folder(
        tmp_path, offline, capsys):
    assert lab(max_length, tmp_path / "runs", "--smoke", "--batch-size", "923") == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 923 is more than the 922 training reviews" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lengths", [(), (8, 8), (0, 16)])
def test_max_length_refuses_lengths_that_cannot_be_compared(lengths):
    with pytest.raises(ConfigError, match="--lengths"):
        max_length.Config(lengths=lengths)
