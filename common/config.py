"""A script's ``@dataclass Config`` becomes its command line.

Every field is a ``--flag`` (underscores become dashes) whose help text is the comment written
beside the field, with its default. ``Literal`` fields become choices, ``bool`` fields get
``--flag / --no-flag``, tuple fields take several values (``--hidden 256 128``). A field's
allowed range is declared once, on the field, and checked for flags, ``--config`` files and
defaults alike::

    epochs: Annotated[int, Range(1)] = 10                      # >= 1
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # in [0, 1)

Where a value comes from, strongest first (DESIGN.md 2):

    explicit flag  >  --config FILE.yaml  >  --smoke preset  >  data-set preset  >  Config default

``SMOKE`` (a class attribute) is the ``--smoke`` preset; ``PRESETS`` maps a field's value to the
defaults that suit it (e.g. ``{"dataset": {"iris": {"epochs": 30}}}``), and ``SMOKE_PRESETS``
maps it to the ``--smoke`` settings that suit it (e.g. a smoke learning rate per optimizer). A
preset never replaces what the user said, and the values it applied are printed.
``--resume CHECKPOINT`` (in scripts whose Config subclasses ``ResumableConfig``) starts from the
settings saved in the checkpoint: a resumed run keeps them, except the few that may change
(``RESUME_MAY_CHANGE``).

Bad values stop in parsing with one line and exit status 2 (argparse's convention), before any
work starts. Running the script (signals, exit codes) is ``common.runner``'s concern.

Why not ``tyro``, which turns dataclasses into CLIs too? It prints multi-line error panels (we
promise one line and exit 2) and has no notion of ranges or of our preset precedence; this
module is the plumbing, and a learner never needs to read it to use a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import math
import re
import tempfile
import tokenize
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a number field: ``lo <= value <= hi`` (either end open or absent)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        lo, hi = _number_text(self.lo), _number_text(self.hi)
        if self.hi is None:
            return f"> {lo}" if self.lo_open else f">= {lo}"
        if self.lo is None:
            return f"< {hi}" if self.hi_open else f"<= {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        above = self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))
        return not above


def _number_text(value: float | None) -> str:
    """1 -> "1", 4294967295 -> "4294967295", 0.001 -> "0.001"."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclasses.dataclass
class BaseConfig:
    """The flags every script has. A script's Config subclasses this and adds its own."""

    smoke: bool = False  # few steps, tiny offline data (synthetic twins; bundled sets stay real)
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # seeds Python, NumPy and torch: CPU runs repeat
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    data_dir: str = ""  # data root; empty: $DL_LABS_DATA, else ~/.cache/dl-labs/data
    out: str = "runs"  # runs are written to OUT/weekNN/script/timestamp/

    SMOKE: ClassVar[dict[str, Any]] = {}  # the --smoke preset's values (a script sets its own)
    PRESETS: ClassVar[dict[str, dict[Any, dict[str, Any]]]] = {}  # field -> value -> preset values
    # field -> value -> --smoke values for that value only (applied after SMOKE)
    SMOKE_PRESETS: ClassVar[dict[str, dict[Any, dict[str, Any]]]] = {}
    # Common fields this script ignores (e.g. "device"): no flag for them.
    UNUSED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _checked(type(self), f.name, getattr(self, f.name)))
        if not self.out.strip():
            raise ConfigError("--out must name a folder (e.g. runs), not an empty string")
        self.check()

    def check(self) -> None:
        """Checks that involve several fields; a script overrides this and raises ConfigError."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), ready for YAML, JSON and checkpoints."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclasses.dataclass
class ResumableConfig(BaseConfig):
    """The Config of a script that trains a model and can continue an interrupted run."""

    resume: str = ""  # this script's checkpoint.pt to continue from (its settings are kept)

    # What may differ from the checkpoint's settings when resuming (e.g. --epochs to train on).
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("epochs", "device", "data_dir", "resume")


# ----------------------------------------------------------------------------------------
# Field types: what a flag accepts, and the range check
# ----------------------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _unpack(hint: Any) -> tuple[Any, Range | None]:
    """``Annotated[int, Range(1)]`` -> (int, Range(1)); ``int`` -> (int, None)."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, next((e for e in extras if isinstance(e, Range)), None)
    return hint, None


def _item_type(kind: Any) -> Any | None:
    """The element type of ``tuple[int, ...]`` or ``list[int]``; None for other types."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    if origin is list:
        return typing.get_args(kind)[0]
    return None


def _convert_one(kind: Any, value: Any, bounds: Range | None) -> Any:
    """Convert ``value`` (flag text, or a YAML/Python value) to ``kind``; ValueError says why."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {value!r}")
    if typing.get_origin(kind) is Literal:
        choices = list(typing.get_args(kind))
        if value not in choices:
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value
    if kind in (int, float):
        expected = f"expected {'an int' if kind is int else 'a float'}, got {value!r}"
        if isinstance(value, bool):
            raise ValueError(expected)
        try:
            number = kind(value) if kind is float or isinstance(value, (int, str)) else None
            if number is None:  # a float given for an int field: only whole numbers pass
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise ValueError(expected) from None
        if kind is float and not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        if bounds is not None and not bounds.contains(number):
            raise ValueError(f"must be {bounds}, got {value!r}")
        if kind is int and abs(number) >= 2**63:  # torch stores ints in 64 bits
            raise ValueError(f"is too large, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        return value
    raise TypeError(f"unsupported Config field type {kind!r} "
                    "(use int, float, str, bool, Literal, tuple[X, ...])")


def _checked(cls: type, name: str, value: Any) -> Any:
    """``value`` converted to the type of field ``name`` and checked against its range."""
    kind, bounds = _unpack(_hints(cls)[name])
    item = _item_type(kind)
    try:
        if item is None:
            return _convert_one(kind, value, bounds)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of values, got {value!r}")
        items = [_convert_one(item, v, bounds) for v in value]
        return tuple(items) if typing.get_origin(kind) is tuple else items
    except ValueError as e:
        raise ConfigError(f"{_flag(name)} {e}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                last_name = None if tok.type == tokenize.NEWLINE else last_name
            if tok.type == tokenize.NAME and tok.start[1] == 4 and last_name is None:
                last_name = tok.string
            elif tok.type == tokenize.COMMENT and last_name is not None:
                comments[last_name] = tok.string.lstrip("#").strip()
                last_name = None
    return comments


# ----------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------
class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we print one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads "-1e3" as an option name unless told that it is a number.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cli_type(kind: Any, bounds: Range | None, name: str):
    """A converter from flag text to a checked value, for argparse's ``type=``."""

    def convert(text: str):
        try:
            return _convert_one(kind, text, bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field, plus ``--config FILE.yaml``.

    Defaults are suppressed, so the parsed namespace holds only what the user typed: that is
    how presets know what they may fill in."""
    parser = OneLineErrorParser(description=description or (cls.__doc__ or "").strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of Config fields "
                        "(a run's own config.yaml works too); flags win over it")
    comments = field_comments(cls)
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in cls.UNUSED:  # a flag appears in --help only if the script honours it
            continue
        kind, bounds = _unpack(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        extra = f"; {bounds}" if bounds is not None else ""
        text = f"{comments.get(f.name, '')} (default: {shown}{extra})".strip()
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        item = _item_type(kind)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = list(typing.get_args(kind))
            kwargs["choices"] = choices
            if not all(isinstance(c, str) for c in choices):  # Literal[1, 2]: the text "2" is 2
                kwargs["type"] = lambda text, choices=choices: next(
                    (c for c in choices if str(c) == text), text)
        elif item is not None:
            kwargs.update(nargs="*", type=_cli_type(item, bounds, f.name),
                          metavar=item.__name__.upper())
        elif kind in (int, float):
            kwargs.update(type=_cli_type(kind, bounds, f.name), metavar=kind.__name__.upper())
        elif kind is str:
            kwargs["metavar"] = "TEXT"
        else:
            raise TypeError(f"Config field {f.name}: unsupported type {kind!r}")
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


# What Run.start writes.
RUN_FILE_KEYS = {"script", "started", "config", "environment", "resumed_from"}


def _from_yaml(cls: type, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of Config fields, "
                          f"got {type(data).__name__}")
    if isinstance(data.get("config"), dict) and set(data) <= RUN_FILE_KEYS:  # a run's config.yaml
        data = {k: v for k, v in data["config"].items() if k != "resume"}  # a replay, not a resume
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown field {key!r} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            values[name] = _checked(cls, name, value)
        except ConfigError as e:
            why = str(e).split(" ", 1)[1]
            raise ConfigError(f"--config {path}: field {name!r}: {why}") from None
    return values


@dataclasses.dataclass
class Resolved:
    """A parsed config and where its values came from (printed by ``run``)."""

    config: Any
    preset_notes: list[str]


def resolve(cls: type, argv: list[str] | None = None, description: str | None = None,
            script: str = "") -> Resolved:
    """Parse ``argv`` into ``cls`` with the precedence of the module docstring. ``script``
    ("week03/part2") lets ``--resume`` refuse another script's checkpoint at once."""
    parser = build_parser(cls, description)
    explicit = vars(parser.parse_args(argv))
    try:
        config_file = explicit.pop("config", None)
        explicit = {k: _checked(cls, k, v) for k, v in explicit.items()}  # flag lists -> tuples
        from_file = _from_yaml(cls, config_file) if config_file else {}
        said = {**from_file, **explicit}  # what the user chose, one way or the other
        defaults = cls()
        values = {f.name: getattr(defaults, f.name) for f in fields(cls)}
        notes: list[str] = []
        if said.get("resume"):
            values.update(_resumed_settings(cls, said, script))
            notes.append(f"resuming {said['resume']} with its own settings")
        else:
            for name, table in cls.PRESETS.items():
                chosen = said.get(name, values[name])
                notes += _apply(values, table.get(chosen, {}), said, f"{name}={chosen} preset")
            if said.get("smoke", values["smoke"]):
                notes += _apply(values, cls.SMOKE, said, "--smoke preset")
                for name, table in cls.SMOKE_PRESETS.items():
                    chosen = said.get(name, values[name])
                    notes += _apply(values, table.get(chosen, {}), said,
                                    f"--smoke preset for {name}={chosen}")
        values.update(said)
        cfg = cls(**values)
        check_out(cfg.out)
    except ConfigError as e:
        parser.error(str(e))
    return Resolved(cfg, notes)


def _apply(values: dict, preset: dict, said: dict, label: str) -> list[str]:
    """Put ``preset`` into ``values`` except where the user said otherwise; notes what changed."""
    applied = {k: v for k, v in preset.items() if k not in said and values.get(k) != v}
    values.update(applied)
    return [f"{label}: " + " ".join(f"{k}={v}" for k, v in applied.items())] if applied else []


def _resumed_settings(cls: type, said: dict, script: str) -> dict[str, Any]:
    """The settings stored in the checkpoint being resumed; a flag may change only the fields
    in ``RESUME_MAY_CHANGE``, because the saved weights and optimizer belong to the others."""
    from common.checkpoint import read_checkpoint
    from common.errors import CheckpointError

    try:
        payload = read_checkpoint(said["resume"])
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if script and payload.get("script") and payload["script"] != script:
        raise ConfigError(f"--resume: {said['resume']} was written by {payload['script']}, "
                          f"not {script}; resume with that script or pass a checkpoint of this one")
    if "epochs" in said and isinstance(said["epochs"], int) and said["epochs"] < payload["epoch"]:
        raise ConfigError(f"--epochs {said['epochs']}: the run being resumed has already trained "
                          f"{payload['epoch']} epochs; pass more to go on, or leave --epochs out")
    saved = payload["config"]
    known = {f.name for f in fields(cls)}
    settings = {}
    for name, value in saved.items():
        if name not in known:
            continue
        try:
            settings[name] = _checked(cls, name, value)
        except ConfigError:
            raise ConfigError(f"--resume {said['resume']}: its saved {name}={value!r} "
                              "is not valid for this script") from None
    may_change = getattr(cls, "RESUME_MAY_CHANGE", ())
    for name, value in said.items():
        if name in settings and name not in may_change and settings[name] != value:
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            said_it = f"{_flag(name)} {shown}" if not isinstance(value, bool) else (
                _flag(name) if value else "--no-" + name.replace("_", "-"))
            raise ConfigError(f"{said_it} differs from the run being resumed ({name}="
                              f"{settings[name]}); a resumed run keeps its settings (only "
                              f"{', '.join(map(_flag, may_change))} may change)")
    return settings


def check_out(out: str) -> None:
    """``--out`` must be a folder we can create or write into; checked before any work."""
    try:
        path = Path(out).expanduser()
    except RuntimeError:  # "~nosuchuser/runs"
        raise ConfigError(f"--out {out}: no such user's home folder; pass a plain path") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; pass a folder for the run outputs")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:  # a real attempt: os.access says yes to root everywhere, even in /proc
        if not existing.is_dir():
            raise OSError("not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {existing} ({e.strerror or e}); "
                          "pass a writable folder") from None


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` (default: sys.argv) into an instance of the dataclass ``cls``."""
    return resolve(cls, argv, description).config


__all__ = ["BaseConfig", "ResumableConfig", "Range", "parse_config", "resolve", "build_parser",
           "check_out"]
