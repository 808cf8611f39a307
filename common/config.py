"""A script's ``@dataclass Config`` becomes its command line.

Every field is a ``--flag`` (underscores become dashes) whose help text is the comment written
beside the field, with its default shown. Numbers must be finite and >= 0, ``Literal`` fields
become choices, ``bool`` fields get ``--flag / --no-flag``. ``--config FILE.yaml`` sets fields
from a file; flags given on the command line win over the file. Bad values stop in parsing
with one line and exit status 2 (argparse's convention), before any work starts.

``run(main, Config)`` is what every script's ``if __name__ == "__main__":`` calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import sys
import tokenize
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from common.errors import LabError


@dataclass
class BaseConfig:
    """The flags every script has. A script's Config subclasses this and adds its own."""

    smoke: bool = False  # tiny offline data (synthetic twins; bundled sets stay real), few steps: seconds
    seed: int = 0  # seeds Python, NumPy and torch so CPU runs repeat
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    data_dir: str = ""  # data root; empty: $DL_LABS_DATA, else ~/.cache/dl-labs/data
    out: str = "runs"  # runs are written to OUT/weekNN/script/timestamp/
    resume: str = ""  # a checkpoint.pt to continue training from (scripts that train a model)

    # Field values that --smoke replaces (a script sets its own, e.g. {"epochs": 1}).
    SMOKE: ClassVar[dict[str, Any]] = {}

    def resolved(self):
        """This config with the SMOKE overrides applied when ``smoke`` is set."""
        return dataclasses.replace(self, **self.SMOKE) if self.smoke else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_comments(cls: type) -> dict[str, str]:
    """Map each field name to the ``# comment`` written after it in the class body(s)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        last_name = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NEWLINE or tok.type == tokenize.NL:
                last_name = None if tok.type == tokenize.NEWLINE else last_name
            if tok.type == tokenize.NAME and tok.start[1] == 4 and last_name is None:
                last_name = tok.string
            elif tok.type == tokenize.COMMENT and last_name is not None:
                comments[last_name] = tok.string.lstrip("#").strip()
                last_name = None
    return comments


def _number(kind: type, name: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print one line."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field, plus ``--config FILE.yaml``."""
    parser = OneLineErrorParser(description=description or (cls.__doc__ or "").strip() or None)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of Config fields (flags win over it)")
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        help_text = comments.get(f.name, " ")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text + f" (default: {default})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif kind in (int, float):
            kwargs["type"] = _number(kind, f.name)
            kwargs["metavar"] = kind.__name__.upper()
        elif kind is str:
            kwargs["metavar"] = "TEXT"
        else:
            raise TypeError(f"Config field {f.name}: unsupported type {kind!r} (use int, float, str, bool, Literal)")
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


def _from_yaml(parser: argparse.ArgumentParser, cls: type, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror})")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of Config fields, got {type(data).__name__}")
    # Accept the config.yaml a run wrote: its fields sit under "config".
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            parser.error(f"--config {path}: unknown field {key!r} (known: {', '.join(known)})")
        # Re-use the command-line checks so a file cannot smuggle in a bad value.
        values[name] = _check_value(parser, path, name, hints[name], value)
    return values


def _check_value(parser, path, name, kind, value):
    where = f"--config {path}: field {name!r}"
    if kind is bool:
        if not isinstance(value, bool):
            parser.error(f"{where} must be true or false, got {value!r}")
        return value
    if typing.get_origin(kind) is Literal:
        if value not in typing.get_args(kind):
            parser.error(f"{where} must be one of {list(typing.get_args(kind))}, got {value!r}")
        return value
    if kind in (int, float):
        try:
            return _number(kind, name)(str(value))
        except argparse.ArgumentTypeError as e:
            parser.error(f"{where} {e}")
    return str(value)


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default: sys.argv) into an instance of the dataclass ``cls``."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    values = _from_yaml(parser, cls, config_file) if config_file else {}
    values.update(args)
    return cls(**values)


def run(main, cls: type, argv: list[str] | None = None) -> dict:
    """Parse the command line into ``cls``, call ``main(cfg)``, and turn a LabError into
    one line on stderr and a non-zero exit instead of a traceback."""
    cfg = parse_config(cls, argv, description=(sys.modules[main.__module__].__doc__ or "").strip() or None)
    try:
        return main(cfg)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


__all__ = ["BaseConfig", "dataclass", "field", "parse_config", "run", "build_parser"]
