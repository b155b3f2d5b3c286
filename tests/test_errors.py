"""UserError: the user's input is at fault, so one line and exit 2; every other exception is a bug."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from specauf.errors import UserError
from specauf.stage import one_line_errors


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as code, one_line_errors():
        raise UserError("train.seeds: seeds must not repeat, got [0, 0]")
    assert code.value.code == 2
    assert capsys.readouterr().err == "error: train.seeds: seeds must not repeat, got [0, 0]\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("k"), OSError(errno.EBADF, "bad fd")])
def test_anything_else_propagates_with_its_traceback(exc):
    with pytest.raises(type(exc)), one_line_errors():
        raise exc


def test_pydantic_validators_may_raise_it():
    """It is a ValueError, so a validator's UserError becomes a ValidationError naming the field."""
    class P(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def _positive(cls, v):
            if v < 0:
                raise UserError("must be >= 0")
            return v

    with pytest.raises(ValidationError, match="must be >= 0"):
        P(n=-1)


def test_the_cli_prints_one_line_not_a_traceback(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "mine.txt").write_text("a user's file")
    proc = subprocess.run([sys.executable, "-m", "specauf.cli", "new", str(tmp_path / "ws")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'ws'}: directory is not empty\n"
    assert (tmp_path / "ws" / "mine.txt").read_text() == "a user's file"
