"""The user-facing `specauf` command: version, help, presets, and `new` from the shipped params."""
from __future__ import annotations

import subprocess
import sys

import pytest

from specauf import __version__
from specauf.cli import main, presets
from tests.conftest import ROOT


def test_version_and_help_for_users(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"specauf {__version__}"
    out = subprocess.run([sys.executable, "-m", "specauf.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Accept-Until-Fail" in out and "scripts/run.sh pipeline" in out and "docs/params.md" in out
    for cmd, positional in (("new", "dest"), ("export", "out"), ("fill-params", "params")):
        text = subprocess.run([sys.executable, "-m", "specauf.cli", cmd, "--help"], capture_output=True, text=True,
                              check=True).stdout
        line = next(l for l in text.splitlines() if l.strip().startswith(positional))
        assert len(line.split()) > 1, f"{cmd} {positional} has no help text"


def test_presets_list_the_shipped_params_first():
    assert presets()[0] == "default" and {"smoke", "gpu"} <= set(presets())


def test_new_from_default_params_and_a_bad_preset(tmp_path, capsys):
    main(["new", str(tmp_path / "ws"), "--preset", "default"])
    assert (tmp_path / "ws" / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    assert (tmp_path / "ws" / "dvc.yaml").is_file() and (tmp_path / "ws" / ".git").is_dir()
    with pytest.raises(SystemExit) as e:
        main(["new", str(tmp_path / "ws2"), "--preset", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
