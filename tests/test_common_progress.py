"""common.progress: silent on fast loops, a plain line at a steady interval without a terminal."""

from common.progress import progress


def test_items_pass_through_unchanged_and_fast_loops_print_nothing(capsys):
    assert list(progress(range(5), "x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_without_a_terminal_a_plain_line_is_printed_at_the_interval(capsys, monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("common.progress.time.monotonic", lambda: next(clock))
    assert list(progress(list(range(4)), "epoch 2", every_s=2)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["epoch 2: 2/4 batches, 2 s", "epoch 2: 4/4 batches, 4 s"]
