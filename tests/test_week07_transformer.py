"""Week 7: NumPy attention and multi-head attention == PyTorch (values and gradients, with and
without masks), the positional encoding, what the masks promise (no information from the future,
none from padding), the AG News loader, and the labs learning their tasks.

Parity checks run in float64 (common.parity), so the tolerance measures our math, not float32
rounding.
"""

from __future__ import annotations

import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import DataError, DataUnavailable
from common.parity import assert_close, torch_reference
from common.runs import Run
from common.text import AG_NEWS_CLASSES, TOPIC_WORDS, ag_news_twin, load_text
from tests.conftest import run_lab
from week06_rnn.tokens import PAD, UNK
from week07_transformer import part1, part2, seq2seq, tweaks, vs_rnn
from week07_transformer.baseline import BagOfEmbeddings
from week07_transformer.data import encode


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them; rows are metrics.csv)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    for d in (4, 64, 1024):  # q.k has std sqrt(d_k); divided by sqrt(d_k), std 1
        assert abs(summary[f"score_std_unscaled_d{d}"] / math.sqrt(d) - 1) < 0.1, summary
        assert abs(summary[f"score_std_scaled_d{d}"] - 1) < 0.1, summary
    # saturation
    assert summary["max_weight_unscaled_d1024"] > 0.9 > 0.5 > summary["max_weight_scaled_d1024"]
    assert summary["softmax_grad_unscaled_d1024"] < 0.2 * summary["softmax_grad_scaled_d1024"]
    # vs central differences
    assert summary["mha_dx_rel_error"] < 1e-6 and summary["mha_dwq_rel_error"] < 1e-6
    assert summary["causal_weight_above_diagonal"] == 0 and summary["weight_on_pad_keys"] == 0
    assert 1.7 < summary["memory_exponent"] < 2.3, "the L x L matrices make memory grow as L^2"


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == summary["epochs_done"] and losses[-1] < 0.8 * losses[0], losses
    # Chance is 0.25. Measured (benchmarks/smoke_margins.py): 0.930 test / 0.922 val; with
    # --lr 1e-9 (nothing learns) 0.242 / 0.216, at least 0.36 under the threshold.
    assert summary["test_acc"] > 0.6 and summary["val_acc"] > 0.6, summary
    assert np.sum(summary["confusion"]) == 128  # every test text counted once


def check_seq2seq(summary: dict, rows: list[dict]) -> None:
    assert summary["final_train_loss"] < 0.3 * summary["first_train_loss"], summary
    assert summary["test_exact"] > 0.5, summary  # exact match by chance: about 10^-4 for 3-5 digits


def check_vs_rnn(summary: dict, rows: list[dict]) -> None:
    for model in ("transformer", "rnn"):
        assert summary[f"test_acc_{model}"] > 0.5, summary  # chance 0.25
        assert summary[f"params_{model}"] > 0 and summary[f"activation_mib_{model}"] > 0
        assert summary[f"epoch_time_s_{model}"] > 0
    assert {r["model"] for r in rows} == {"transformer", "rnn"}


def check_tweaks(summary: dict, rows: list[dict]) -> None:
    assert set(summary["variants"]) == set(tweaks.VARIANTS)
    for name in tweaks.VARIANTS:
        assert summary[f"test_acc_{name}"] > 0.4, (name, summary)  # chance 0.25
    assert summary["best_variant"] in tweaks.VARIANTS


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "seq2seq.py": check_seq2seq,
                  "vs_rnn.py": check_vs_rnn, "tweaks.py": check_tweaks}


# ------------------------------------------------------------------------------------------
# Part 1: scaled dot-product attention == F.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------
def qkv(n=2, heads=3, lq=5, lk=5, d=4, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((n, heads, lq, d)), rng.standard_normal((n, heads, lk, d)), \
        rng.standard_normal((n, heads, lk, d))
    q[0, 0, 1] = 0.0  # an all-zero query: every score 0, a uniform row of weights (ties)
    k[1, 1, 2] = k[1, 1, 0]  # two equal keys: tied scores
    v[0, 2, :, 1] = 0.0  # exact zeros among the values
    upstream = rng.standard_normal((n, heads, lq, d))
    return q, k, v, upstream


def keep_by_hand(lengths: list[int], lk: int) -> np.ndarray:
    """(N, lk), True for each row's first ``length`` keys: written out here, not taken from
    part1.padding_mask (tested on its own below), so a wrong mask there cannot hide."""
    keep = np.zeros((len(lengths), lk), dtype=bool)
    for row, length in enumerate(lengths):
        keep[row, :length] = True
    return keep


def test_padding_mask_keeps_exactly_the_real_tokens():
    expected = [[True, True, True, False], [True, False, False, False], [True] * 4, [False] * 4]
    assert part1.padding_mask([3, 1, 4, 0], 4).tolist() == expected
    assert keep_by_hand([3, 1, 4, 0], 4).tolist() == expected


def mask_for(kind: str, n: int, lq: int, lk: int) -> np.ndarray | None:
    """Part 1's convention, True = may attend (as SDPA reads a boolean mask)."""
    causal = np.tril(np.ones((lq, lk), dtype=bool))
    padding = keep_by_hand([lk, 3], lk)[:, None, None, :][:n]
    return {"none": None, "causal": causal, "padding": padding, "both": causal & padding}[kind]


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "both"])
@pytest.mark.parametrize("lq, lk", [(5, 5), (4, 6)], ids=["self", "cross"])
def test_attention_matches_sdpa_values_and_gradients(kind, lq, lk):
    q, k, v, upstream = qkv(lq=lq, lk=lk)
    mask = mask_for(kind, 2, lq, lk)
    torch_mask = (None if mask is None
                  else torch.from_numpy(np.broadcast_to(mask, (2, 1, lq, lk)).copy()))
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=torch_mask)
    expected, (gq, gk, gv) = torch_reference(sdpa, q, k, v, upstream=upstream)
    out, cache = part1.attention_forward(q, k, v, mask)
    assert_close(out, expected, "attention output")
    dq, dk, dv = part1.attention_backward(upstream, cache)
    assert_close(dq, gq, "dL/dq")
    assert_close(dk, gk, "dL/dk")
    assert_close(dv, gv, "dL/dv")
    if mask is not None:
        assert np.all(cache.p[~np.broadcast_to(mask, cache.p.shape)] == 0), (
            "a masked link must get weight 0 exactly")


def test_attention_with_a_custom_scale_matches_sdpa():
    q, k, v, upstream = qkv(seed=1)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=0.3)
    expected, grads = torch_reference(sdpa, q, k, v, upstream=upstream)
    out, cache = part1.attention_forward(q, k, v, scale=0.3)
    assert_close(out, expected, "output, scale 0.3")
    for mine, theirs, name in zip(part1.attention_backward(upstream, cache), grads, "qkv"):
        assert_close(mine, theirs, f"dL/d{name}, scale 0.3")


def test_causal_mask_keeps_earlier_outputs_independent_of_later_tokens():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 8))
    params = part1.init_mha(8, rng)
    before, _, _ = part1.mha_forward(x, x, x, params, 2, attn_mask=part1.causal_mask(6))
    changed = x.copy()
    changed[0, 4] = rng.standard_normal(8)  # a different token at position 4
    after, _, _ = part1.mha_forward(changed, changed, changed, params, 2,
                                    attn_mask=part1.causal_mask(6))
    np.testing.assert_array_equal(after[0, :4], before[0, :4])  # 0..3 never saw position 4
    assert not np.allclose(after[0, 4:], before[0, 4:])
    unmasked, _, _ = part1.mha_forward(changed, changed, changed, params, 2)
    assert not np.allclose(unmasked[0, :4], before[0, :4]), (
        "without the mask the change does leak backwards")


def test_softmax_is_stable_and_gives_masked_scores_exactly_zero():
    p = part1.softmax(np.array([[1000.0, 1000.0, -np.inf], [0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(p, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])


# ------------------------------------------------------------------------------------------
# Part 1: multi-head attention == nn.MultiheadAttention with the same weights
# ------------------------------------------------------------------------------------------
def torch_mha(params: dict, embed: int, heads: int) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(embed, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        w_in = np.concatenate([params["w_q"], params["w_k"], params["w_v"]])
        b_in = np.concatenate([params["b_q"], params["b_k"], params["b_v"]])
        mha.in_proj_weight.copy_(torch.from_numpy(w_in))
        mha.in_proj_bias.copy_(torch.from_numpy(b_in))
        mha.out_proj.weight.copy_(torch.from_numpy(params["w_o"]))
        mha.out_proj.bias.copy_(torch.from_numpy(params["b_o"]))
    return mha


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("kind", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("attention", ["self", "cross"])
def test_multihead_attention_matches_torch(heads, kind, attention):
    rng = np.random.default_rng(3)
    embed, lq = 8, 5
    lk = lq if attention == "self" else 7
    params = part1.init_mha(embed, rng)
    params["w_k"][0] = 0.0  # exact zeros among the weights
    query = rng.standard_normal((2, lq, embed))
    key = query if attention == "self" else rng.standard_normal((2, lk, embed))
    value = query if attention == "self" else rng.standard_normal((2, lk, embed))
    upstream = rng.standard_normal((2, lq, embed))
    keep = keep_by_hand([lk, lk - 2], lk) if kind in ("padding", "both") else None
    causal = np.tril(np.ones((lq, lk), dtype=bool)) if kind in ("causal", "both") else None

    mha = torch_mha(params, embed, heads)
    tensors = [torch.tensor(a, requires_grad=True) for a in (query, key, value)]
    # torch's masks: True = blocked
    out, weights = mha(*tensors, key_padding_mask=None if keep is None else torch.from_numpy(~keep),
                       attn_mask=None if causal is None else torch.from_numpy(~causal),
                       need_weights=True, average_attn_weights=False)
    out.backward(torch.from_numpy(upstream))

    mine, my_weights, cache = part1.mha_forward(query, key, value, params, heads, keep, causal)
    assert_close(mine, out.detach().numpy(), "MHA output")
    assert_close(my_weights, weights.detach().numpy(), "attention weights per head")
    d_query, d_key, d_value, grads = part1.mha_backward(upstream, params, cache)
    for mine_grad, tensor, name in zip((d_query, d_key, d_value), tensors,
                                       ("query", "key", "value")):
        assert_close(mine_grad, tensor.grad.numpy(), f"dL/d{name}")
    in_w, in_b = mha.in_proj_weight.grad.numpy(), mha.in_proj_bias.grad.numpy()
    for i, name in enumerate("qkv"):
        assert_close(grads[f"w_{name}"], in_w[i * embed:(i + 1) * embed], f"dL/dW_{name}")
        assert_close(grads[f"b_{name}"], in_b[i * embed:(i + 1) * embed], f"dL/db_{name}")
    assert_close(grads["w_o"], mha.out_proj.weight.grad.numpy(), "dL/dW_o")
    assert_close(grads["b_o"], mha.out_proj.bias.grad.numpy(), "dL/db_o")


def test_mha_rejects_heads_that_do_not_divide_the_width():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 6))
    with pytest.raises(ValueError, match="not divisible"):
        part1.mha_forward(x, x, x, part1.init_mha(6, rng), 4)


# ------------------------------------------------------------------------------------------
# Positional encoding
# ------------------------------------------------------------------------------------------
def test_positional_encoding_matches_its_formula_and_the_torch_module():
    max_len, d = 50, 16
    expected = np.zeros((max_len, d))
    for pos in range(max_len):
        for i in range(d // 2):
            expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
            expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
    pe = part1.positional_encoding(max_len, d)
    assert_close(pe, expected, "PE vs the formula")
    module = part2.PositionalEncoding(d, max_len)
    # The module stores float32 (the model's dtype): float32 rounding of values in [-1, 1].
    np.testing.assert_allclose(module.pe.numpy(), expected, rtol=0, atol=1e-7)
    x = torch.randn(2, 7, d)
    torch.testing.assert_close(module(x), x + module.pe[:7])


def test_positional_encoding_shifts_are_rotations():
    """PE[pos + k] is PE[pos] with each (sin, cos) pair rotated by k * frequency: the same linear
    map for every pos, which is what lets attention read relative positions."""
    d, k = 8, 3
    pe = part1.positional_encoding(40, d)
    for i in range(d // 2):
        angle = k / 10000 ** (2 * i / d)
        rotation = np.array([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
        pairs = pe[:, 2 * i:2 * i + 2]
        assert_close(pairs[:-k] @ rotation, pairs[k:], f"pair {i} shifted by {k}")


def test_positional_encoding_needs_an_even_width():
    with pytest.raises(ValueError, match="even"):
        part1.positional_encoding(4, 5)


# ------------------------------------------------------------------------------------------
# Part 2: the classifier
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_padding_does_not_change_a_prediction(pool):
    torch.manual_seed(0)
    model = part2.TransformerClassifier(50, 4, d_model=16, nhead=2, layers=2, dropout=0.3,
                                        pool=pool).eval()
    ids = torch.randint(2, 50, (3, 6))
    ids[1, 4:] = PAD  # a shorter text in the batch
    padded = torch.cat([ids, torch.full((3, 5), PAD)], dim=1)  # the same texts, 5 more pads each
    with torch.inference_mode():
        torch.testing.assert_close(model(padded), model(ids), atol=1e-5, rtol=1e-5)
        alone = model(ids[1:2, :4])  # the short text on its own, no pads at all
        torch.testing.assert_close(model(ids)[1:2], alone, atol=1e-5, rtol=1e-5)


def test_the_pad_mask_matters_in_the_model():
    """Without src_key_padding_mask the pads would be attended to: the mask is what makes the
    test above pass, not an accident of the numbers."""
    torch.manual_seed(0)
    model = part2.TransformerClassifier(50, 4, d_model=16, nhead=2, layers=1, dropout=0.0).eval()
    ids = torch.randint(2, 50, (1, 6))
    padded = torch.cat([ids, torch.full((1, 5), PAD)], dim=1)
    x = model.position(model.embed(padded) * model.scale)
    unmasked = model.encoder(x)[:, :6].mean(1)
    masked = model.encoder(x, src_key_padding_mask=padded == PAD)[:, :6].mean(1)
    assert not torch.allclose(unmasked, masked, atol=1e-4)


def test_an_empty_text_gives_finite_scores():
    model = part2.TransformerClassifier(20, 4, d_model=8, nhead=2, layers=1).eval()
    with torch.inference_mode():
        assert torch.isfinite(model(torch.full((2, 3), PAD))).all()


def test_bag_of_embeddings_averages_real_tokens_only():
    model = BagOfEmbeddings(20, 4, dim=6)
    ids = torch.tensor([[5, 7, PAD, PAD]])
    expected = model.head(model.bag.weight[[5, 7]].mean(0, keepdim=True))
    torch.testing.assert_close(model(ids), expected)


def test_warmup_then_cosine_schedule():
    factor = part2.warmup_then_cosine(total_steps=110, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert lrs[10] == pytest.approx(1.0) and lrs[11] < lrs[10]


def test_vocabulary_comes_from_training_texts_only():
    data = load_text("ag_news", synthetic=True, n_synthetic=200)
    data.train_texts = [f"marker{i} {text}" for i, text in enumerate(data.train_texts)]
    data.test_texts[0] = "zebrafish " * 5  # a word seen only in the test set
    splits, vocab = encode(part2.Config(val_fraction=0.1), data)
    assert "zebrafish" not in vocab.stoi and splits.x_test[0, :5].eq(UNK).all()
    assert len(splits.x_train) == 180 and len(splits.x_val) == 20
    assert len(splits.x_test) == len(data.test_texts)
    # Every text starts with a word of its own: in validation texts it must be unknown.
    assert splits.x_val[:, 0].eq(UNK).all(), "a word only in validation texts must be <unk>"
    assert splits.x_train[:, 0].ne(UNK).all()


def test_training_batches_come_in_a_new_order_every_epoch(tmp_path):
    data = load_text("ag_news", synthetic=True, n_synthetic=96)
    cfg = part2.Config(model="bag", d_model=8, epochs=2, batch_size=16, val_fraction=0.25,
                       patience=2, out=str(tmp_path))
    splits, vocab = encode(cfg, data)
    model = part2.build_model(cfg, len(vocab), 4)
    seen = []  # the id batches of every training step, in order (evaluation runs in eval mode)
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if m.training else None)
    run = Run.start(cfg, tmp_path / "lab.py", torch.device("cpu"), quiet=True)
    part2.train_model(cfg, model, splits, torch.device("cpu"), run)
    assert len(seen) == 2 * 5  # 72 training texts: 4 full batches and one of 8, twice
    first, second = torch.cat(seen[:5]), torch.cat(seen[5:])
    for epoch in (first, second):  # each epoch sees every training text once
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, splits.x_train.tolist()))
    assert not torch.equal(first, second), "the training batches must be reshuffled every epoch"


def lab(tmp_path: Path, *argv: str, module=part2) -> dict:
    return run_lab(module.main, module.Config,
                   ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv])


def test_bag_baseline_learns_the_twin(tmp_path, offline):
    summary = lab(tmp_path, "--smoke", "--model", "bag", "--lr", "0.05", "--epochs", "4")
    assert summary["test_acc"] > 0.6 and summary["params"] < 5000, summary


@pytest.mark.parametrize("argv, message", [
    (["--d-model", "30", "--nhead", "4"], "must be divisible by --nhead 4"),
    (["--d-model", "9", "--nhead", "3"], "must be even"),
    (["--dropout", "1"], "--dropout: must be in [0, 1)"),
    (["--warmup", "0.9"], "--warmup: must be in [0, 0.5]"),
    (["--pool", "max"], "invalid choice"),
])
def test_impossible_settings_fail_in_parsing_with_one_line(tmp_path, argv, message, capsys):
    assert lab(tmp_path, *argv) == {"exit": 2}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module", [part2, tweaks, vs_rnn], ids=lambda m: m.__name__)
def test_a_batch_larger_than_the_training_set_is_refused_before_the_run_folder(tmp_path, offline,
                                                                              capsys, module):
    """data.encode checks it, for every script that encodes AG News."""
    assert lab(tmp_path, "--smoke", "--batch-size", "100000000", module=module) == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 100000000 is more than the" in err and "training texts" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_only_the_ag_news_test_file_is_named_with_the_command_that_splits_it(tmp_path, offline,
                                                                              capsys):
    """Some copies of AG News ship the test file alone: say so, and give a command that works."""
    rows = [f'"{1 + i % 4}","Title {i}","{TOPIC_WORDS[i % 4][i % 14]} news number {i}"'
            for i in range(6040)]
    (tmp_path / "ag_news_test.csv").write_text("\n".join(rows) + "\n")
    assert lab(tmp_path, "--data-dir", str(tmp_path)) == {"exit": 1}
    err = capsys.readouterr().err
    assert "only the test file ag_news_test.csv" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    split = tmp_path / "ag_news_split"
    assert f"--data-dir {split}" in err
    exec(re.search(r'python -c "(.*?)"', err).group(1), {})  # the command, as the message gives it
    data = load_text("ag_news", split)
    assert len(data.train_texts) == 6000 and len(data.test_texts) == 40


def test_missing_ag_news_offline_is_one_line(tmp_path, offline, capsys):
    assert lab(tmp_path, "--data-dir", str(tmp_path)) == {"exit": 1}
    err = capsys.readouterr().err
    assert "ag_news is not in" in err and "--smoke" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# The AG News loader
# ------------------------------------------------------------------------------------------
CSV = ('"3","Oil climbs","Crude prices rose #36;2 on Monday \\\\ traders said."\n'
       '"2","Win","The coach said."\n')


def test_ag_news_reads_a_folder_of_csv_files(tmp_path):
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    (folder / "train.csv").write_text(CSV)
    # a header, as pandas writes
    (folder / "test.csv").write_text("label,title,description\n" + CSV)
    data = load_text("ag_news", tmp_path)
    assert data.classes == AG_NEWS_CLASSES
    assert data.y_train.tolist() == [2, 1] and data.y_test.tolist() == [2, 1]
    assert data.train_texts[0] == "Oil climbs. Crude prices rose $2 on Monday traders said."


def test_ag_news_reads_the_archive_and_checks_its_md5(tmp_path, monkeypatch):
    folder = tmp_path / "src" / "ag_news_csv"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(CSV)
    (folder / "test.csv").write_text(CSV)
    archive = tmp_path / "root" / "ag_news_csv.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="ag_news_csv")
    with pytest.raises(DataError, match="md5 is not the original"):
        load_text("ag_news", archive.parent)
    from common import text

    monkeypatch.setattr(text, "AG_NEWS_MD5", text._md5(archive))  # pretend it is the original
    assert load_text("ag_news", archive.parent).y_test.tolist() == [2, 1]


def test_damaged_ag_news_csv_is_one_line(tmp_path):
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    (folder / "train.csv").write_text(CSV + '"7","Bad label","x"\n')
    (folder / "test.csv").write_text(CSV)
    with pytest.raises(DataError, match=r"train.csv line 3: expected label \(1-4\)") as info:
        load_text("ag_news", tmp_path)
    assert "\n" not in str(info.value)
    (folder / "train.csv").unlink()  # half a folder: named as damaged, not downloaded over
    with pytest.raises(DataError, match="train.csv"):
        load_text("ag_news", tmp_path)


@pytest.mark.parametrize("test_csv, words", [
    (b'"0","Label zero","x"\n', "line 1: expected label"),  # labels are 1..4 in the file
    (b'"4","no description"\n', "line 1: expected label"),
    (b'"2","t","d"\n"3","t","d","extra"\n', "line 2: expected label"),
    (b"", "has no rows"),
    (b'"1","caf\xe9","latin-1"\n', "utf-8"),
    (b'"1","t","' + b"a" * 200_000 + b'"\n', "field larger"),
])
def test_bad_rows_in_ag_news_test_csv_are_one_line(tmp_path, test_csv, words):
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    (folder / "train.csv").write_text(CSV)
    (folder / "test.csv").write_bytes(test_csv)
    with pytest.raises(DataError, match="test.csv") as info:
        load_text("ag_news", tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_ag_news_offline_names_the_set_and_leaves_nothing(tmp_path, offline):
    root = tmp_path / "empty-data-root"
    with pytest.raises(DataUnavailable, match="ag_news is not in") as info:
        load_text("ag_news")
    message = str(info.value)
    assert "--data-dir" in message and "--smoke" in message and "\n" not in message
    assert not root.exists()


def test_ag_news_twin_is_balanced_and_its_topic_words_decide():
    texts, y = ag_news_twin(400, seed=1)
    assert torch.bincount(y).tolist() == [100] * 4
    for text, label in zip(texts, y.tolist()):
        counts = [sum(word in TOPIC_WORDS[k] for word in text.split()) for k in range(4)]
        assert counts[label] == max(counts) and counts.count(max(counts)) == 1, (text, label)


# ------------------------------------------------------------------------------------------
# The encoder-decoder
# ------------------------------------------------------------------------------------------
def test_reverse_and_sort_pairs():
    src, tgt = seq2seq.make_pairs(50, 2, 6, "reverse", seed=0)
    for s, t in zip(src, tgt):
        digits = s[s != seq2seq.PAD]
        end = len(digits) + 1
        assert t[0] == seq2seq.BOS and t[end] == seq2seq.EOS
        assert torch.all(t[end + 1:] == seq2seq.PAD)
        assert torch.equal(t[1:end], digits.flip(0))
    src, tgt = seq2seq.make_pairs(20, 2, 6, "sort", seed=0)
    for s, t in zip(src, tgt):
        digits = s[s != seq2seq.PAD]
        assert torch.equal(t[1:len(digits) + 1], digits.sort().values)


def test_decoder_cannot_see_future_target_tokens():
    torch.manual_seed(0)
    model = seq2seq.Seq2SeqTransformer(d_model=16, nhead=2, layers=2).eval()
    src, tgt = seq2seq.make_pairs(4, 3, 5, "reverse", seed=0)
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 3) % 10 + 3  # another digit at target position 3
    with torch.inference_mode():
        before, after = model(src, tgt), model(src, changed)
    # positions 0..2 never read it
    torch.testing.assert_close(after[:, :3], before[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 3:], before[:, 3:])


def test_greedy_decoding_stops_after_eos():
    class Says(nn.Module):
        """A fake model that always predicts: 5, then <eos>."""

        def encode(self, src):
            return src, src == seq2seq.PAD

        def decode(self, tgt_in, memory, src_pad):
            token = seq2seq.EOS if tgt_in.shape[1] > 1 else 5 + 3
            return F.one_hot(torch.full(tgt_in.shape, token), seq2seq.VOCAB).float()

        def eval(self):
            return self

    out = seq2seq.greedy_decode(Says(), torch.ones(2, 3, dtype=torch.long), max_steps=6)
    assert out.tolist() == [[8, seq2seq.EOS]] * 2
