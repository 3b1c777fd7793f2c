import subprocess
import sys

from trickbag import __version__
from trickbag.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "usage: trickbag" in out
    assert "examples:" in out


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "trickbag", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"trickbag {__version__}"
