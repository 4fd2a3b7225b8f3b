"""A user's mistake is one line `error: <message>` and exit status 2, not a traceback, in
every method script: a missing data path, a malformed list line (named file:line), a file
that is not a checkpoint."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lists")
    (tmp / "train.csv").write_text("a.mp4 1\nb.mp4 one\n")
    (tmp / "val.csv").write_text("a.mp4 1\n")
    (tmp / "not_a_checkpoint.pt").write_text("hello")
    return tmp


@pytest.mark.parametrize("argv, message", [
    (["cropmae.py", "--data", "/nonexistent"], "error: /nonexistent: no such image folder"),
    (["sce_image.py", "--data", "/nonexistent"], "error: /nonexistent/train: no such image"),
    (["sigma.py", "--data", "{tmp}/train.csv"], "error: {tmp}/train.csv:2: expected integers"),
    (["sigma.py", "--data", "{tmp}/missing"], "error: --data {tmp}/missing: no such folder"),
    (["cropmae.py", "--eval-only", "--init-from", "{tmp}/not_a_checkpoint.pt"],
     "error: cannot load checkpoint {tmp}/not_a_checkpoint.pt"),
])
def test_user_mistakes_are_one_line(lists, tmp_path, argv, message):
    argv = [a.format(tmp=lists) for a in argv] + ["--output-dir", str(tmp_path)]
    proc = run(*argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(message.format(tmp=lists)), proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
