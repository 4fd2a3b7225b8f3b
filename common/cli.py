"""Command line from a dataclass: every `Args` field becomes a flag, its docstring the help.

    @dataclass
    class Args:
        tau: float = 0.1
        '''temperature (Eq. 4.3)'''   # (written with double quotes in the scripts)
    PRESETS = {"cifar10": {"tau": 0.2}, "demo": {...}}
    args = cli.parse(Args, PRESETS)

Rules: defaults < `--preset NAME` < explicit flags. `--a_b` and `--a-b` are the same flag;
booleans are `--x/--no-x`; `Literal[...]` fields become choices; `Optional[X]` accepts `none`;
`list[X]` / `tuple[X, ...]` take several values. A script whose `Args` has a `data` field and
whose `PRESETS` has `demo` runs the demo preset when neither `--data` nor `--preset` is given.
"""
import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import typing
from typing import Any, Literal, Optional, Union


def field_docs(cls) -> dict:
    """Map field name -> the string literal written right after it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. defined in a REPL)
        return {}
    body, docs = tree.body[0].body, {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _none_or(conv):
    def convert(s: str):
        return None if s.lower() == "none" else conv(s)
    convert.__name__ = getattr(conv, "__name__", "value")
    return convert


def _add_field(parser, f: dataclasses.Field, tp, doc: str) -> None:
    kw: dict[str, Any] = {"dest": f.name, "help": (doc or "(undocumented)").replace("%", "%%")}
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    optional = origin is Union and type(None) in targs
    if optional:
        rest = [a for a in targs if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"field {f.name}: only Optional[X] unions are supported")
        tp = rest[0]
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kw["choices"] = list(targs)
        kw["type"] = type(targs[0])
    elif origin in (list, tuple):
        elem = targs[0] if targs else str
        kw["type"] = elem
        fixed = origin is tuple and targs and targs[-1] is not Ellipsis
        kw["nargs"] = len(targs) if fixed else "+"
        kw["metavar"] = elem.__name__.upper()
    elif tp in (int, float, str):
        kw["type"] = tp
    else:
        raise TypeError(f"field {f.name}: unsupported type {tp!r}")
    if optional and "type" in kw:
        kw["type"] = _none_or(kw["type"])
    parser.add_argument(f"--{f.name.replace('_', '-')}", **kw)  # the spelling --help shows
    if "_" in f.name:  # the underscore spelling is accepted too, and hidden from --help
        parser.add_argument(f"--{f.name}", **{**kw, "help": argparse.SUPPRESS})


def build_parser(cls, presets: Optional[dict] = None, prog: Optional[str] = None):
    """The argparse parser for dataclass `cls` (defaults are filled in by `parse`)."""
    presets = presets or {}
    doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc.strip().split("\n\n")[0] or None, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(presets) or None,
                        help="named setting of the paper (defaults < preset < flags)")
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name != "preset":
            _add_field(parser, f, hints[f.name], docs.get(f.name, ""))
    return parser


def parse(cls, presets: Optional[dict] = None, argv: Optional[list] = None):
    """Parse `argv` (default: sys.argv[1:]) into an instance of `cls`."""
    presets = presets or {}
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # which preset?
    first.add_argument("--preset", default=None)
    first.add_argument("--data", default=None)
    first.add_argument("--init-from", "--init_from", dest="init_from", default=None)
    known = first.parse_known_args(argv)[0]
    preset = known.preset
    if preset is not None and preset not in presets:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {sorted(presets)}")
    names = {f.name for f in dataclasses.fields(cls)}
    # The demo when nothing real is named: no --data, and no weights file to start from or
    # evaluate (a released checkpoint would not fit the demo's small model)
    weights = known.init_from not in (None, "", "random", "none")
    if preset is None and "data" in names and known.data is None and not weights \
            and "demo" in presets:
        preset = "demo"
    defaults = dataclasses.asdict(cls())
    for key, value in (presets[preset] if preset else {}).items():
        if key not in names:
            raise ValueError(f"preset {preset!r} sets unknown field {key!r}")
        defaults[key] = value
    parser = build_parser(cls, presets)
    parser.set_defaults(**defaults)
    ns = vars(parser.parse_args(argv))  # unknown flags: argparse error and exit 2
    ns.pop("preset", None)
    for f in dataclasses.fields(cls):  # nargs gives lists; keep tuples where declared
        if isinstance(ns.get(f.name), list) and isinstance(defaults.get(f.name), tuple):
            ns[f.name] = tuple(ns[f.name])
    if "preset" in names:
        ns["preset"] = preset or ""
    return cls(**ns)


class UserError(Exception):
    """A mistake in what the user gave (a path, a list file, an annotation, a flag, a
    checkpoint): `run` prints `error: <message>` and exits with status 2, no traceback.
    Library code raises subclasses that also derive from the built-in type a caller expects
    (e.g. `class ListFormatError(UserError, ValueError)`)."""


class InputError(UserError, ValueError):
    """A malformed input: a list or annotation line (the message names `file:line`), an
    unreadable label file, an impossible combination of flags."""


def run(main, cls, presets: Optional[dict] = None, argv: Optional[list] = None):
    """A script's entry point: `main(parse(cls, presets, argv))`.

    Errors about the user's input (`UserError`, `FileNotFoundError`, `NotADirectoryError`)
    print one line `error: <message>` on stderr and exit with status 2, as argparse does for a
    bad flag; every other exception keeps its traceback (a genuine bug).
    """
    args = parse(cls, presets, argv)
    try:
        return main(args)
    except (UserError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _message(e: BaseException) -> str:
    """The user's one line. An error raised in a DataLoader worker comes back with the
    worker's traceback as its message ("Caught X in DataLoader worker ... Original
    Traceback ..."): keep only the original message, its last line less the class name."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def save_args(args, output_dir: str) -> str:
    """Write `args` as `<output_dir>/args.json` (call on rank 0); returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "args.json")
    with open(path, "w") as fh:
        json.dump(dataclasses.asdict(args), fh, indent=2, sort_keys=True)
    return path
