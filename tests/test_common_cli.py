import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import torch

from common import cli


@dataclass
class Args:
    data: str = ""
    """dataset root (empty: embedded synthetic data)"""
    tau_m: float = 0.07
    """target temperature (Eq. 4.6), 100% faithful"""
    epochs: int = 200
    """pretraining epochs"""
    symmetric: bool = False
    """symmetrised loss"""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """autocast dtype"""
    init_from: Optional[str] = None
    """weights to start from"""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop scale range"""
    ks: list[int] = field(default_factory=lambda: [20, 200])
    """k values for kNN"""
    preset: str = ""
    """name of the applied preset (set by cli)"""


PRESETS = {"cifar10": {"epochs": 800, "tau_m": 0.05, "symmetric": True},
           "demo": {"epochs": 2}}


def test_defaults_with_data_are_the_dataclass_defaults():
    a = cli.parse(Args, PRESETS, ["--data", "/x"])
    assert a == dataclasses.replace(Args(), data="/x")


def test_demo_preset_without_data_or_weights():
    assert cli.parse(Args, PRESETS, []).epochs == 2
    assert cli.parse(Args, PRESETS, []).preset == "demo"
    for argv in (["--init-from", "w.pt"], ["--init_from=w.pt"]):  # real weights: the defaults
        a = cli.parse(Args, PRESETS, argv)
        assert (a.preset, a.epochs, a.init_from) == ("", Args().epochs, "w.pt"), argv
    assert cli.parse(Args, PRESETS, ["--init-from", "random"]).preset == "demo"  # no file
    assert cli.parse(Args, PRESETS, ["--init-from", "w.pt", "--preset", "demo"]).epochs == 2


def test_precedence_default_preset_flag():
    a = cli.parse(Args, PRESETS, ["--data=/x", "--preset", "cifar10", "--tau-m", "0.1"])
    assert (a.epochs, a.tau_m, a.symmetric, a.preset) == (800, 0.1, True, "cifar10")
    b = cli.parse(Args, PRESETS, ["--tau_m", "0.2", "--data", "/x", "--preset=cifar10",
                                  "--no-symmetric"])
    assert (b.tau_m, b.symmetric) == (0.2, False)


def test_types():
    a = cli.parse(Args, PRESETS, ["--data", "/x", "--init-from", "w.pt", "--crop_scale", "0.3",
                                  "0.9", "--ks", "5", "10", "15", "--amp", "none"])
    assert a.init_from == "w.pt" and a.crop_scale == (0.3, 0.9) and a.ks == [5, 10, 15]
    assert isinstance(a.crop_scale, tuple) and a.amp == "none"
    assert cli.parse(Args, PRESETS, ["--data", "/x", "--init-from", "none"]).init_from is None


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--amp", "fp8"], ["--epochs", "1.5"],
                                  ["--crop-scale", "0.1"], ["--epo", "3"]])
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(Args, PRESETS, ["--data", "/x", *argv])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_preset_names_the_choices():
    with pytest.raises(SystemExit, match="unknown preset 'nope'.*cifar10"):
        cli.parse(Args, PRESETS, ["--preset", "nope"])


def test_preset_with_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown field 'lr'"):
        cli.parse(Args, {"bad": {"lr": 1}}, ["--preset", "bad"])


def test_help_shows_every_docstring_and_preset_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(Args, PRESETS, ["--preset", "cifar10", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    docs = cli.field_docs(Args)
    assert set(docs) == {f.name for f in dataclasses.fields(Args)}
    for name, doc in docs.items():
        if name != "preset":
            assert doc in out, name
    assert "100% faithful" in out and "--no-symmetric" in out and "--tau-m" in out
    assert "pretraining epochs (default: 800)" in out


def test_save_args(tmp_path):
    a = cli.parse(Args, PRESETS, ["--data", "/x"])
    path = cli.save_args(a, str(tmp_path / "run"))
    saved = json.load(open(path))
    assert saved == json.loads(json.dumps(dataclasses.asdict(a)))


def test_help_lists_each_flag_once_and_both_spellings_parse(capsys):
    with pytest.raises(SystemExit):
        cli.parse(Args, PRESETS, ["--help"])
    out = capsys.readouterr().out
    assert "--tau_m" not in out and "--no-symmetric, --symmetric" not in out
    out = out.split("options:")[1]  # the list below the usage line
    assert out.count("--tau-m") == 1 and out.count("--symmetric") == 1
    assert out.count("--crop-scale") == 1 and "--init_from" not in out
    assert cli.parse(Args, PRESETS, ["--tau_m", "0.2"]).tau_m == 0.2  # still accepted
    assert cli.parse(Args, PRESETS, ["--tau-m", "0.3"]).tau_m == 0.3
    assert cli.parse(Args, PRESETS, ["--init_from", "x"]).init_from == "x"


def test_run_turns_user_errors_into_one_line_and_status_2(capsys):
    def missing(args):
        raise FileNotFoundError(f"{args.data}: no such list file")

    def malformed(args):
        raise cli.InputError("train.csv:3: expected 'path label', got 'a b c d'")

    def bug(args):
        raise KeyError("a genuine bug keeps its traceback")
    for fn, text in [(missing, "error: /nope: no such list file"),
                     (malformed, "error: train.csv:3: expected 'path label'")]:
        with pytest.raises(SystemExit) as e:
            cli.run(fn, Args, PRESETS, ["--data", "/nope"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(text) and err.count("\n") == 1
    with pytest.raises(KeyError):
        cli.run(bug, Args, PRESETS, ["--data", "/x"])
    assert cli.run(lambda a: a.epochs, Args, PRESETS, ["--data", "/x"]) == 200


class _BadLine(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise cli.InputError(f"train.csv:{i + 1}: expected 'path label', got 'a b c'")


def test_an_error_in_a_loader_worker_is_still_one_line(capsys):
    """A DataLoader worker sends its error back with its traceback as the message: the user
    still sees only the original line."""
    def main(args):
        for _ in torch.utils.data.DataLoader(_BadLine(), num_workers=1):
            pass
    with pytest.raises(SystemExit) as e:
        cli.run(main, Args, PRESETS, ["--data", "/x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: train.csv:1: expected 'path label', got 'a b c'\n"
