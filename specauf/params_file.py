"""params.yaml as a file: strict YAML reading, the pipeline's own acceptance check, filling in
missing keys without losing comments, and docs/params.md generated from the field docstrings."""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from specauf.config import Params, ParamsError, PromptSource, RandomTargetParams, Section


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    where = f"{source}: {loc}: " if loc else f"{source}: "
    value = first.get("input")
    if first["type"] in ("int_type", "float_type", "int_parsing", "float_parsing") and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:  # YAML 1.1 reads 1e9 (no dot) as text, and strict params take no text for a number
            plain = f"{int(number)}" if number.is_integer() and first["type"].startswith("int") else f"{number!r}"
            return f"{where}{value!r} is text to YAML, not a number: write {plain} (without quotes)"
    quiet = first["type"] in ("extra_forbidden", "missing") or isinstance(first.get("input"), dict)
    got = "" if quiet else f" (got {first.get('input')!r})"
    return f"{where}{msg}{got}"


def parse_params(data: Any, source: str = "params") -> Params:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_error(e, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a repeated key (PyYAML keeps the last one silently; DVC refuses)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params_yaml(path: str | Path) -> Any:
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, not a params file")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where}: malformed YAML ({getattr(e, 'problem', e)})") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_params_yaml(path), str(path))


def check_pipeline_params(path: str | Path, dvc_yaml: str | Path) -> Params:
    """What `dvc repro` accepts, checked before DVC touches any output: valid params, and every
    key that a stage of dvc.yaml tracks present in the file (DVC fails a stage whose tracked key
    is missing, after it has deleted that stage's outputs)."""
    data = read_params_yaml(path)
    if data is None:
        raise ParamsError(f"{path}: empty params file (every section must be spelled out; `specauf fill-params {path}`)")
    params = parse_params(data, str(path))
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    for name, spec in stages.items():
        for key in spec.get("do", spec).get("params", []):
            if isinstance(key, dict):
                continue
            node = data
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ParamsError(f"{path}: {key}: missing (stage {name!r} tracks it; `specauf fill-params {path}` "
                                      "writes every key with its default)")
                node = node[part]
    return params


def params_doc() -> str:
    """Markdown for docs/params.md, generated from the field docstrings."""
    lines = ["# params.yaml reference", "",
             "Generated from the docstrings in `specauf/config.py` by `specauf params-doc`;",
             "a test fails when this file is out of date.", ""]

    def walk(model: type[Section], prefix: str):
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            optional = [a for a in typing.get_args(ann) if a is not type(None)]  # `X | None` of a section: its keys too
            if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], Section):
                ann = optional[0]
            if isinstance(ann, type) and issubclass(ann, Section) and name != "random" or ann is RandomTargetParams:
                nested.append((key, ann, field.description))
                continue
            default = field.default if field.default is not None else "null"
            if isinstance(default, BaseModel):
                default = default.model_dump()
            if isinstance(default, (list, dict)):
                default = json.dumps(json.loads(json.dumps(default, default=lambda o: o.model_dump())))
            typ = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            doc = (field.description or "").replace("\n", " ")
            rows.append(f"| `{key}` | `{typ}` | `{default}` | {doc} |")
        if rows:
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for key, ann, doc in nested:
            lines.extend([f"## `{key}`", "", (doc or "").replace("\n", " "), ""])
            walk(ann, key + ".")

    walk(Params, "")
    lines.extend(["## Prompt source entries (`prompts.train[]`, `prompts.eval.<name>[]`)", ""])
    walk(PromptSource, "")
    return "\n".join(lines).rstrip() + "\n"


def _add_missing(doc, full, prefix: str, added: list[str]) -> None:
    if isinstance(doc, dict) and isinstance(full, dict):
        for key, value in full.items():
            if key not in doc:
                doc[key] = value
                added.append(f"{prefix}{key}")
            else:
                _add_missing(doc[key], value, f"{prefix}{key}.", added)
    elif isinstance(doc, list) and isinstance(full, list) and len(doc) == len(full):
        for i, (d, f) in enumerate(zip(doc, full)):
            _add_missing(d, f, f"{prefix.rstrip('.')}[{i}].", added)


def full_params(path: str | Path) -> dict:
    """A params file (a preset spells only what differs from the defaults) as the full params it
    stands for, every key spelled, as plain data."""
    return json.loads(load_params(path).model_dump_json())


def fill_params_file(path: str | Path, backup: bool = True) -> list[str]:
    """Write every key the file leaves out, with its typed default, into the file itself.

    DVC tracks params by key and refuses a missing one. Round-trip YAML keeps the user's
    comments, order and values; the previous text is kept as `<file>.bak`. Returns the keys added."""
    from io import StringIO

    from ruamel.yaml import YAML

    from specauf.artifacts import write_bytes_atomic

    path = Path(path)
    full = full_params(path)  # validates first: a bad file is never rewritten
    text = path.read_text(encoding="utf-8")
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 100
    doc = rt.load(text)
    if doc is None:
        doc = {}
    added: list[str] = []
    _add_missing(doc, full, "", added)
    if added:
        out = StringIO()
        rt.dump(doc, out)
        if backup:
            write_bytes_atomic(path.with_name(path.name + ".bak"), text.encode())
        write_bytes_atomic(path, out.getvalue().encode())
    return added
