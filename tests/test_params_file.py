"""Reading params files: YAML errors with their line, presets as differences, the generated docs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from specauf.config import Params, ParamsError
from specauf.params_file import load_params, params_doc
from tests.conftest import ROOT


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 0\n rollouts: [\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line \d+: malformed YAML"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_shipped_params_are_complete_and_valid():
    """DVC tracks params by key and fails on keys missing from the file: spell every key out."""
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k not in ("eval",) or (isinstance(v, dict) and prefix == ""):
                out |= keys(v, prefix + k + ".")
        return out

    full = yaml.safe_load(Params().model_dump_json())
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = {k for k in keys(full) if not k.startswith("prompts.eval.")} - keys(data)
    assert not missing, f"params.yaml lacks {sorted(missing)}"


def test_presets_spell_only_what_they_change():
    """A preset is its differences from the defaults (so a changed default reaches it, and a
    reader sees what the preset is about); `specauf new` fills in the rest."""
    defaults = json.loads(Params().model_dump_json())

    def same(data, base, where=""):
        if isinstance(data, dict) and isinstance(base, dict) and not where.endswith("prompts.eval"):
            return [k for key, v in data.items() for k in same(v, base.get(key), f"{where}.{key}".lstrip("."))]
        return [where] if data == base else []

    for path in sorted((ROOT / "presets").glob("*.yaml")):
        load_params(path)
        assert not same(yaml.safe_load(path.read_text()), defaults), f"{path.name} repeats defaults"


def test_params_doc_is_current():
    assert (ROOT / "docs" / "params.md").read_text() == params_doc(), \
        "docs/params.md is stale: run `specauf params-doc > docs/params.md`"
    for name, field in Params.model_fields.items():
        section = field.annotation
        for key, f in section.model_fields.items():
            assert f.description, f"{name}.{key} has no docstring"


def test_cli_check_params():
    proc = subprocess.run([sys.executable, "-m", "specauf.cli", "check-params", str(ROOT / "params.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout
