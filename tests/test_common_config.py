"""common.config: a dataclass becomes a CLI with checked values, YAML configs, one-line errors."""

from __future__ import annotations

import sys
import textwrap
from typing import ClassVar, Literal

import pytest

from common.config import BaseConfig, dataclass, parse_config, run
from common.errors import LabError
from tests.conftest import run_script


@dataclass
class Config(BaseConfig):
    """A test config."""

    epochs: int = 5  # passes over the training data
    lr: float = 0.1  # step size
    optimizer: Literal["sgd", "adam"] = "sgd"  # which optimizer
    nesterov: bool = False  # Nesterov momentum
    SMOKE: ClassVar[dict] = {"epochs": 1}


def test_defaults_and_flags():
    cfg = parse_config(Config, ["--epochs", "3", "--lr", "0.5", "--optimizer", "adam", "--nesterov"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.nesterov) == (3, 0.5, "adam", True)
    assert parse_config(Config, []) == Config()
    assert parse_config(Config, ["--smoke", "--data-dir", "/x", "--out", "o", "--seed", "7"]).seed == 7


def test_help_lists_every_field_with_comment_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Config, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, help_text in [("--epochs", "passes over the training data (default: 5)"),
                            ("--lr", "step size (default: 0.1)"), ("--optimizer", "(default: sgd)"),
                            ("--nesterov", "(default: False)"), ("--smoke", "(default: False)"),
                            ("--seed", "(default: 0)"), ("--device", "(default: auto)"),
                            ("--data-dir", "data root"), ("--out", "(default: runs)"), ("--config", "YAML")]:
        assert flag in text and help_text in text, f"{flag}: {help_text!r} missing from --help"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "argument --epochs: must be >= 0, got '-1'"),
    (["--lr", "abc"], "argument --lr: expected a float, got 'abc'"),
    (["--lr", "nan"], "must be a finite number"),
    (["--epochs", "2.5"], "expected a int"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
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
    path.write_text("script: week01/part1\nconfig:\n  epochs: 9\n  lr: 0.3\nenvironment:\n  torch: x\n")
    assert parse_config(Config, ["--config", str(path)]).epochs == 9


@pytest.mark.parametrize("content, message", [
    ("epoch: 3\n", "unknown field 'epoch'"),
    ("epochs: -4\n", "field 'epochs' must be >= 0"),
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
    assert message in err and err.count("\n") == 1


def test_missing_yaml_file(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--config", "/no/such/file.yaml"])
    assert "cannot read it" in capsys.readouterr().err


def test_smoke_overrides_apply_only_with_smoke():
    assert Config(epochs=9).resolved().epochs == 9
    assert Config(epochs=9, smoke=True).resolved().epochs == 1


def test_run_turns_lab_errors_into_one_line_and_exit_1(capsys):
    def main(cfg):
        raise LabError("the thing failed; do this instead")

    with pytest.raises(SystemExit) as exit_info:
        run(main, Config, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the thing failed; do this instead\n"


def test_script_cli_errors_have_no_traceback(tmp_path):
    script = tmp_path / "lab.py"
    script.write_text(textwrap.dedent('''
        """A tiny lab."""
        from common.config import BaseConfig, dataclass, run

        @dataclass
        class Config(BaseConfig):
            epochs: int = 2  # passes

        def main(cfg):
            return {}

        if __name__ == "__main__":
            run(main, Config)
    '''))
    result = run_script(script, "--epochs", "-1", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert sys.executable  # the same interpreter the suite runs under
