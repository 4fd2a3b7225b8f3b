"""A user's mistake is one line `error: <message>` and exit status 2, not a traceback, in
every method script: a missing data path, a malformed list line (named file:line), a file
that is not a checkpoint or lacks the weights, flags that cannot work together."""
import os
import subprocess
import sys

import pytest
import torch

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
    (tmp / "subset.csv").write_text("a.mp4 1\n")
    torch.save({"model": {"unrelated": torch.zeros(1)}}, tmp / "empty.pt")
    return tmp


@pytest.mark.parametrize("argv, message", [
    (["cropmae.py", "--data", "/nonexistent"], "error: /nonexistent: no such image folder"),
    (["sce_image.py", "--data", "/nonexistent"], "error: /nonexistent/train: no such image"),
    (["sigma.py", "--data", "{tmp}/train.csv"], "error: {tmp}/train.csv:2: expected integers"),
    (["sigma.py", "--data", "{tmp}/missing"], "error: --data {tmp}/missing: no such folder"),
    (["cropmae.py", "--eval-only", "--init-from", "{tmp}/not_a_checkpoint.pt"],
     "error: cannot load checkpoint {tmp}/not_a_checkpoint.pt"),
    (["cropmae.py", "--eval-only", "--init-from", "{tmp}/empty.pt"],
     "error: {tmp}/empty.pt: encoder weights missing"),
    (["sigma.py", "--data", "{tmp}/subset.csv"], "error: --data {tmp}/subset.csv: give the folder"),
    (["sigma.py", "--num-frames", "7"], "error: --num-frames 7 must be a multiple of --tubelet"),
    (["sce_image.py", "--queue-size", "60", "--max-steps", "1"],
     "error: --queue-size 60 must be a multiple of the keys enqueued per step"),
    (["cropmae.py", "--mask-ratio", "1.0", "--max-steps", "1"],
     "error: --mask-ratio 1.0 keeps 0 of"),
])
def test_user_mistakes_are_one_line(lists, tmp_path, argv, message):
    argv = [a.format(tmp=lists) for a in argv] + ["--output-dir", str(tmp_path)]
    proc = run(*argv)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.rstrip("\n").split("\n")[-1]  # after any progress bar
    assert last.startswith(message.format(tmp=lists)), proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr


NO_PYAV = "import sys, runpy; sys.modules['av'] = None; sys.argv = {argv!r}; " \
          "runpy.run_path({script!r}, run_name='__main__')"


def test_every_script_imports_without_pyav_and_video_reads_say_what_to_install(tmp_path):
    """A GPU image without PyAV still runs the image methods (no module imports PyAV at start);
    a video method stops at its first video read with one line naming the package."""
    code = ("import sys; sys.modules['av'] = None\n"
            "import sce_image, sce_video, comedian, sigma, tcore, cropmae\n"
            "from common import video\n"
            "assert video.av is None\n"
            "try:\n"
            "    video.read_frames('x.mp4', [0])\n"
            "except video.VideoReadError:\n"  # a missing file is still that error
            "    pass\n"
            f"open({str(tmp_path / 'a.mp4')!r}, 'wb').write(b'x')\n"
            "try:\n"
            f"    video.read_frames({str(tmp_path / 'a.mp4')!r}, [0])\n"
            "except video.PyAVMissing as e:\n"
            "    print('MISSING', e)\n")
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MISSING reading or writing video files needs PyAV: pip install av" in proc.stdout
    # the image method's CLI works; the video demo (which writes its synthetic videos) stops
    help_ = run("-c", NO_PYAV.format(argv=["sce_image.py", "--help"], script="sce_image.py"))
    assert help_.returncode == 0 and "--queue-size" in help_.stdout, help_.stderr[-2000:]
    demo = run("-c", NO_PYAV.format(argv=["sigma.py", "--output-dir", str(tmp_path / "s"),
                                          "--max-steps", "1"], script="sigma.py"))
    assert demo.returncode == 2, demo.stderr[-2000:]
    last = demo.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: reading or writing video files needs PyAV"), last
