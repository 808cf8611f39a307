"""common.config: a dataclass becomes a CLI with ranges, list fields, presets, YAML configs,
one-line errors."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import pytest

from common.config import BaseConfig, Range, parse_config, resolve
from common.errors import ConfigError, LabError
from common.runner import launch
from tests.conftest import run_script


@dataclass
class Config(BaseConfig):
    """A test config.

    Run: python lab.py --epochs 3
         python lab.py --smoke
    """

    epochs: Annotated[int, Range(1)] = 5  # passes over the training data
    lr: Annotated[float, Range(0, lo_open=True)] = 0.1  # step size
    x: float = -1.0  # any finite number, negative too
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # a probability
    optimizer: Literal["sgd", "adam"] = "sgd"  # which optimizer
    nesterov: bool = False  # Nesterov momentum
    hidden: Annotated[tuple[int, ...], Range(1)] = (64, 32)  # hidden widths
    dataset: Literal["mnist", "iris"] = "mnist"  # data set
    SMOKE: ClassVar[dict] = {"epochs": 1, "hidden": (8,)}
    PRESETS: ClassVar[dict] = {"dataset": {"iris": {"hidden": (16,), "epochs": 30, "lr": 0.01}}}


def test_defaults_and_flags():
    cfg = parse_config(Config, ["--epochs", "3", "--lr", "0.5", "--optimizer", "adam",
                                "--nesterov"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.nesterov) == (3, 0.5, "adam", True)
    assert parse_config(Config, []) == Config()
    argv = ["--smoke", "--data-dir", "/x", "--out", "o", "--seed", "7"]
    assert parse_config(Config, argv).seed == 7


def test_help_lists_every_field_with_comment_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Config, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, help_text in [("--epochs", "passes over the training data (default: 5; >= 1)"),
                            ("--lr", "step size (default: 0.1; > 0)"),
                            ("--optimizer", "(default: sgd)"),
                            ("--nesterov", "(default: False)"), ("--smoke", "(default: False)"),
                            ("--seed", "(default: 0; in [0, 4294967295])"),
                            ("--device", "(default: auto)"), ("--data-dir", "data root"),
                            ("--out", "(default: runs)"), ("--config", "YAML")]:
        assert flag in text and help_text in text, f"{flag}: {help_text!r} missing from --help"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got '0'"),
    (["--lr", "0"], "argument --lr: must be > 0, got '0'"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got '1'"),
    (["--dropout", "-0.1"], "must be in [0, 1)"),
    (["--lr", "abc"], "argument --lr: expected a float, got 'abc'"),
    (["--lr", "nan"], "must be a finite number"),
    (["--x", "inf"], "must be a finite number"),
    (["--epochs", "2.5"], "expected an int"),
    (["--seed", "123456789012345678901"], "--seed: must be in [0, 4294967295]"),
    (["--hidden", "8", "0"], "argument --hidden: must be >= 1, got '0'"),
    (["--hidden", "8", "x"], "expected an int, got 'x'"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--out", ""], "--out must name a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_values_fail_in_parsing_with_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Config, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, f"expected one line, got:\n{err}"


def test_yaml_config_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\noptimizer: adam\n")
    cfg = parse_config(Config, ["--config", str(path), "--lr", "0.2"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer) == (7, 0.2, "adam")


def test_yaml_written_by_a_run_is_accepted(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("script: week01/part1\nconfig:\n  epochs: 9\n  lr: 0.3\n"
                    "environment:\n  torch: x\n")
    assert parse_config(Config, ["--config", str(path)]).epochs == 9


@pytest.mark.parametrize("content, message", [
    ("epoch: 3\n", "unknown field 'epoch'"),
    ("epochs: 0\n", "field 'epochs': must be >= 1, got 0"),
    ("dropout: 1.5\n", "field 'dropout': must be in [0, 1)"),
    ("hidden: [8, -1]\n", "field 'hidden': must be >= 1"),
    ("hidden: 8\n", "field 'hidden': expected a list of values"),
    ("optimizer: lion\n", "must be one of ['sgd', 'adam']"),
    ("nesterov: 3\n", "must be true or false"),
    ("[1, 2]\n", "expected a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_bad_yaml_is_one_line_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Config, ["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_yaml_file(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--config", "/no/such/file.yaml"])
    assert "cannot read it" in capsys.readouterr().err


def test_negative_numbers_pass_where_the_field_allows_them():
    assert parse_config(Config, ["--x", "-3"]).x == -3.0


def test_list_fields_from_flags_yaml_and_empty(tmp_path):
    assert parse_config(Config, ["--hidden", "256", "128"]).hidden == (256, 128)
    assert parse_config(Config, ["--hidden"]).hidden == ()
    (tmp_path / "c.yaml").write_text("hidden: [4, 5]\n")
    assert parse_config(Config, ["--config", str(tmp_path / "c.yaml")]).hidden == (4, 5)
    assert Config(hidden=[3]).to_dict()["hidden"] == [3], \
        "lists in YAML/JSON, tuples in the dataclass"


def test_ranges_hold_for_defaults_and_direct_construction_too():
    with pytest.raises(ConfigError, match="--dropout must be in"):
        Config(dropout=2.0)

    @dataclass
    class Broken(BaseConfig):
        epochs: Annotated[int, Range(1)] = 0  # a default outside its own range

    with pytest.raises(ConfigError, match="--epochs must be >= 1, got 0"):
        Broken()


@pytest.mark.parametrize("argv, yaml_text, expected", [
    ([], "", 5),                                                  # the Config default
    (["--smoke"], "", 1),                                         # smoke preset > default
    (["--smoke"], "epochs: 7\n", 7),                              # --config file > smoke preset
    (["--smoke", "--epochs", "3"], "epochs: 7\n", 3),              # explicit flag > file
    (["--epochs", "3"], "smoke: true\n", 3),                      # smoke from the file, flag wins
    (["--dataset", "iris"], "", 30),                              # data-set preset > default
    (["--dataset", "iris", "--smoke"], "", 1),                    # smoke > data-set preset
    (["--dataset", "iris", "--epochs", "2"], "", 2),              # explicit > data-set preset
])
def test_precedence_flag_file_smoke_preset_default(tmp_path, argv, yaml_text, expected):
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    assert parse_config(Config, argv).epochs == expected


def test_presets_say_what_they_applied_and_respect_edited_defaults():
    resolved = resolve(Config, ["--smoke", "--hidden", "48"])
    assert resolved.config.hidden == (48,) and resolved.config.epochs == 1
    assert resolved.preset_notes == ["--smoke preset: epochs=1"]
    iris = resolve(Config, ["--dataset", "iris", "--lr", "0.5"])
    assert (iris.config.hidden, iris.config.epochs, iris.config.lr) == ((16,), 30, 0.5)
    assert iris.preset_notes == ["dataset=iris preset: hidden=(16,) epochs=30"]

    @dataclass
    class Edited(Config):  # a learner's copy with an edited default
        epochs: Annotated[int, Range(1)] = 9  # edited

    assert parse_config(Edited, []).epochs == 9
    assert resolve(Edited, ["--smoke"]).preset_notes == ["--smoke preset: epochs=1 hidden=(8,)"]


def test_smoke_presets_follow_the_chosen_value_and_never_override_the_user(tmp_path):
    @dataclass
    class PerOptimizer(Config):
        SMOKE_PRESETS: ClassVar[dict] = {"optimizer": {"adam": {"lr": 0.003}}}

    assert parse_config(PerOptimizer, ["--smoke"]).lr == 0.1  # sgd: no smoke preset of its own
    adam = resolve(PerOptimizer, ["--smoke", "--optimizer", "adam"])
    assert adam.config.lr == 0.003 and adam.config.epochs == 1
    assert adam.preset_notes[-1] == "--smoke preset for optimizer=adam: lr=0.003"
    assert parse_config(PerOptimizer, ["--optimizer", "adam"]).lr == 0.1  # only under --smoke
    assert parse_config(PerOptimizer, ["--smoke", "--optimizer", "adam", "--lr", "1"]).lr == 1
    (tmp_path / "c.yaml").write_text("optimizer: adam\nlr: 0.5\n")
    assert parse_config(PerOptimizer, ["--smoke", "--config", str(tmp_path / "c.yaml")]).lr == 0.5
    (tmp_path / "c.yaml").write_text("optimizer: adam\n")  # the file's choice selects the preset
    assert parse_config(PerOptimizer, ["--smoke", "--config", str(tmp_path / "c.yaml")]).lr == 0.003


def test_help_keeps_the_docstring_line_breaks_and_shows_ranges(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"], description=Config.__doc__)
    out = capsys.readouterr().out
    assert "Run: python lab.py --epochs 3\n" in out and "python lab.py --smoke" in out
    assert "(default: 0.2; in [0, 1))" in " ".join(out.split())


def test_out_must_be_a_writable_folder(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        parse_config(Config, ["--out", str(tmp_path / "a_file")])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    if os.access(locked, os.W_OK):  # root ignores permissions: nothing to check then
        return
    with pytest.raises(SystemExit):
        parse_config(Config, ["--out", str(locked / "runs")])


def test_run_turns_lab_errors_into_one_line_and_exit_1(capsys):
    def main(cfg):
        raise LabError("the thing failed; do this instead")

    with pytest.raises(SystemExit) as exit_info:
        launch(main, Config, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the thing failed; do this instead\n"


def test_script_cli_errors_have_no_traceback(tmp_path):
    script = tmp_path / "lab.py"
    script.write_text(textwrap.dedent('''
        """A tiny lab."""
        from dataclasses import dataclass

        from typing import Annotated

        from common.config import BaseConfig, Range
        from common.runner import launch

        @dataclass
        class Config(BaseConfig):
            epochs: Annotated[int, Range(1)] = 2  # passes

        def main(cfg):
            return {}

        if __name__ == "__main__":
            launch(main, Config)
    '''))
    result = run_script(script, "--epochs", "-1", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_a_field_the_script_ignores_has_no_flag(capsys):
    @dataclass
    class NumpyOnly(BaseConfig):
        steps: Annotated[int, Range(1)] = 3  # steps
        UNUSED: ClassVar[tuple] = ("device",)

    assert "--device" not in " ".join(build_help(NumpyOnly, capsys).split())
    with pytest.raises(SystemExit):
        parse_config(NumpyOnly, ["--device", "cuda"])
    assert "unrecognized arguments: --device cuda" in capsys.readouterr().err


def build_help(cls, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_config(cls, ["--help"])
    return capsys.readouterr().out


def test_out_with_a_tilde_is_the_home_folder_and_an_unknown_user_is_one_line(tmp_path, monkeypatch,
                                                                              capsys):
    import torch

    from common.runs import Run

    monkeypatch.setenv("HOME", str(tmp_path))
    run = Run.start(parse_config(Config, ["--out", "~/runs"]), "/x/week01_regression/demo.py",
                    torch.device("cpu"), quiet=True)
    assert run.dir.is_relative_to(tmp_path / "runs"), \
        "a quoted ~ must not create a folder named '~'"
    with pytest.raises(SystemExit):
        parse_config(Config, ["--out", "~nosuchuser_xyz/runs"])
    assert "no such user's home folder" in capsys.readouterr().err


def test_literal_choices_that_are_numbers_work_from_the_command_line(capsys):
    @dataclass
    class Heads(BaseConfig):
        heads: Literal[1, 2, 4] = 2  # attention heads

    assert parse_config(Heads, ["--heads", "4"]).heads == 4
    with pytest.raises(SystemExit):
        parse_config(Heads, ["--heads", "3"])
    assert "invalid choice: '3'" in capsys.readouterr().err
