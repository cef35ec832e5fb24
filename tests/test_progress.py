"""Progress bars (grad2.tools.progress): drawn on a terminal, plain rate-limited lines in a
log, silent without tqdm."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from grad2.tools.progress import progress_bar


def test_a_fast_loop_writes_no_frames_to_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in progress_bar(range(10_000), desc="fast"):
        pass
    bar = progress_bar(total=10_000, desc="manual")
    for _ in range(10_000):
        bar.update()
    bar.close()
    written = capsys.readouterr().err
    assert "\r" not in written
    assert len(written.splitlines()) <= 2


def test_postfix_updates_wait_for_the_timed_redraw(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar(range(500), desc="epoch 1/1")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.set_description(f"epoch 1/1 step {step}")
    bar.close()
    assert len(capsys.readouterr().err.splitlines()) <= 2


def test_a_log_gets_one_plain_line_per_redraw() -> None:
    log = io.StringIO()
    outer = progress_bar(range(2), desc="outer", file=log, mininterval=0, delay=0)
    for _ in outer:
        for _ in progress_bar(range(3), desc="inner", file=log, leave=False, mininterval=0,
                              delay=0):
            time.sleep(0.001)
    written = log.getvalue()
    assert "\r" not in written and "\x1b" not in written
    lines = written.splitlines()
    assert lines and all(line.startswith(("outer:", "inner:")) for line in lines)
    assert lines[-1].startswith("outer: 100%")


def test_a_terminal_gets_the_drawn_bar() -> None:
    screen = io.StringIO()
    for _ in progress_bar(range(10_000), desc="drawn", file=screen, terminal=True):
        pass
    assert screen.getvalue().startswith("\rdrawn:")
    assert "10000/10000" in screen.getvalue()


@pytest.mark.parametrize("terminal", [True, False])
def test_disable_is_honoured(terminal: bool) -> None:
    stream = io.StringIO()
    bar = progress_bar(range(5), file=stream, terminal=terminal, disable=True, mininterval=0,
                       delay=0)
    assert list(bar) == list(range(5))
    assert stream.getvalue() == ""


def test_without_tqdm_the_tools_import_and_bars_are_silent() -> None:
    """A host without the lab extra: the operator's tools import, and a bar iterates and
    takes updates without drawing."""
    script = (
        "import sys\n"
        "for name in ('tqdm', 'matplotlib', 'requests', 'scipy'): sys.modules[name] = None\n"
        "import grad2.tools.gate_files, grad2.tools.ownership, grad2.tools.target_files\n"
        "from grad2.tools.progress import progress_bar\n"
        "bar = progress_bar(range(3), desc='x')\n"
        "assert list(bar) == [0, 1, 2]\n"
        "bar.update(2); bar.set_postfix(loss=1.0); bar.close()\n"
        "with progress_bar(total=4) as manual:\n"
        "    manual.update()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "it/s" not in result.stderr
