"""Prompt source `hf`: datasets written in each layout and format through the real `datasets`
writers and loaders, the train/eval disjointness, the inputs fingerprint, and bad data named
by dataset, split and row."""
from __future__ import annotations

import json
import os

import datasets
import pytest

from specauf.config import Params, PromptSource, PromptsParams
from specauf.data.hf_prompts import hf_prompts
from specauf.data.prompt_sources import PromptsError
from specauf.data.prompts import build_prompt_sets
from specauf.errors import UserError
from specauf.target.inputs import write_inputs
from tests.stage_runner import Workspace, expect_error, prompts_jsonl, snapshot

QUESTIONS = [f"question number {i}: how do robots paint stories?" for i in range(6)]

LAYOUTS = {
    # ShareGPT: from/value; the row starting with the model is a continuation and is skipped
    "conversations": ([{"id": f"c{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "sure"}]}
                       for i, q in enumerate(QUESTIONS)]
                      + [{"id": "cont", "conversations": [{"from": "gpt", "value": "and then"}, {"from": "human", "value": "more"}]}],
                      {"id_column": "id"}, [f"c{i}" for i in range(6)]),
    # OpenAI-style messages, a system turn first
    "messages": ([{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"  {q} "},
                                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]}
                  for q in QUESTIONS], {}, [f"train/{i}" for i in range(6)]),
    "text": ([{"prompt": q, "uid": i * 7} for i, q in enumerate(QUESTIONS)], {"id_column": "uid"},
             [str(i * 7) for i in range(6)]),
    # a layout spelled out: its own column, turn keys and user speaker
    "spelled": ([{"dialog": [{"speaker": "customer", "text": q}, {"speaker": "agent", "text": "hi"}]} for q in QUESTIONS],
                {"column": "dialog", "role_key": "speaker", "content_key": "text", "user_roles": ["customer"]},
                [f"train/{i}" for i in range(6)]),
}


def write(rows: list[dict], fmt: str, dest) -> str:
    """rows as a dataset on disk in format fmt, through the `datasets` writers users have."""
    ds = datasets.Dataset.from_list(rows)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        ds.to_parquet(str(dest / "data.parquet"))
        return str(dest / "data.parquet")
    if fmt == "json":
        ds.to_json(str(dest / "data.jsonl"))  # JSON lines
        return str(dest / "data.jsonl")
    if fmt == "saved":
        ds.save_to_disk(str(dest / "saved"))
        return str(dest / "saved")
    if fmt == "files":  # a folder of two parquet files, read in name order
        half = len(rows) // 2
        datasets.Dataset.from_list(rows[:half]).to_parquet(str(dest / "part-0.parquet"))
        datasets.Dataset.from_list(rows[half:]).to_parquet(str(dest / "part-1.parquet"))
        return str(dest)
    raise ValueError(fmt)


def hf_source(path: str, count: int = 6, **hf) -> PromptSource:
    return PromptSource.model_validate({"source": "hf", "count": count, "hf": {"path": path, **hf}})


@pytest.mark.parametrize("fmt", ["parquet", "json", "saved", "files"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_in_every_format(tmp_path, layout, fmt):
    rows, hf, ids = LAYOUTS[layout]
    path = write(rows, fmt, tmp_path / "data")
    before = snapshot(tmp_path / "data")
    stats: dict = {}
    got = list(hf_prompts(hf_source(path, **hf).hf, stats))
    assert got == [{"prompt_id": pid, "source": "hf", "turns": [q]} for pid, q in zip(ids, QUESTIONS)]
    assert stats["continuations"] == (1 if layout == "conversations" else 0)
    assert snapshot(tmp_path / "data") == before  # nothing written beside the user's data (save_to_disk folders included)


def test_where_filter_and_a_saved_dataset_dict(tmp_path):
    rows = [{"prompt": q, "language": "English" if i % 2 else "French"} for i, q in enumerate(QUESTIONS)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    got = list(hf_prompts(hf_source(str(tmp_path / "dd"), where={"language": ["English"]}).hf))
    assert [r["turns"][0] for r in got] == QUESTIONS[1::2]
    assert [r["prompt_id"] for r in got] == ["train/1", "train/3", "train/5"]  # row numbers before filtering
    assert len(list(hf_prompts(hf_source(str(tmp_path / "dd"), split="test").hf))) == 2
    with pytest.raises(PromptsError, match=r"^dataset .*dd: no split 'validation' \(has: train, test\)$"):
        list(hf_prompts(hf_source(str(tmp_path / "dd"), split="validation").hf))


def test_train_and_eval_from_one_dataset_never_share_a_prompt(tmp_path):
    rows = [{"prompt": f"{q} variant {i}", "id": f"r{i}"} for i, q in enumerate(QUESTIONS * 5)]
    path = write(rows, "parquet", tmp_path)
    src = hf_source(path, count=12, id_column="id")
    params = PromptsParams(train=[src], eval={"mine": [src.model_copy(update={"count": 10})]})
    train, eval_sets, stats = build_prompt_sets(params, seed=3)
    assert len(train) == 12 and len(eval_sets["mine"]) == 10
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in eval_sets["mine"]}
    assert build_prompt_sets(params, seed=3)[0] == train  # same seed, same prompts in the same order


BAD = {
    "missing id column": ([{"prompt": "hello there"}], {"id_column": "uid"},
                          r"^dataset \S+, split 'train': no column 'uid' \(has: prompt\)$"),
    "missing prompt column": ([{"prompt": "hello there"}], {"column": "question"},
                              r"^dataset \S+, split 'train': no column 'question' \(has: prompt\)$"),
    "layout not recognised": ([{"body": "hello there"}], {},
                              r"^dataset \S+, split 'train': layout not recognised: no column conversations, messages, prompt "
                              r"\(has: body\); set hf.column$"),
    "turn keys not recognised": ([{"messages": [{"speaker": "user", "text": "hello"}]}], {},
                                 r"^dataset \S+, split 'train', row 0: layout not recognised: a turn has \['speaker', 'text'\], "
                                 r"not role/content or from/value \(set hf.role_key and hf.content_key\)$"),
    "empty conversation": ([{"messages": [{"role": "user", "content": "hi there"}]}, {"messages": []}], {},
                           r"^dataset \S+, split 'train', row 1: empty conversation$"),
    "system turns only": ([{"messages": [{"role": "system", "content": "be brief"}]}], {},
                          r"^dataset \S+, split 'train', row 0: the conversation holds system turns only$"),
    "repeated id": ([{"prompt": "a prompt", "id": "x"}, {"prompt": "another", "id": "x"}], {"id_column": "id"},
                    r"^dataset \S+, split 'train', row 1: id 'x' repeats row 0 \(column 'id'\); name a unique id column"),
    "where on a list column": ([{"prompt": "hello there", "tags": ["a", "b"]}], {"where": {"tags": ["a"]}},
                               r"^dataset \S+, split 'train', row 0: hf.where column 'tags' holds list, not a single value"),
    "unreadable file": (None, {}, r"^dataset \S+data.parquet, split 'train': cannot be read as parquet \(ArrowInvalid: "),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_gets_one_line_naming_dataset_split_and_row(tmp_path, case):
    rows, hf, message = BAD[case]
    if rows is None:
        (tmp_path / "data.parquet").write_bytes(b"not parquet at all")
        path = str(tmp_path / "data.parquet")
    else:
        path = write(rows, "parquet", tmp_path)
    with pytest.raises(PromptsError, match=message) as e:
        list(hf_prompts(hf_source(path, **hf).hf))
    assert "\n" not in str(e.value)


def test_a_hub_dataset_without_a_network_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1, no retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    src = PromptSource.model_validate({"source": "hf", "count": 3, "hf": {"dataset": "specauf-tests/no-such-dataset"}})
    with pytest.raises(PromptsError, match=r"^dataset 'specauf-tests/no-such-dataset': needs a network, and none answers "
                                           r"\(ConnectionError: .*\); copy it to this machine and set hf.path$"):
        list(hf_prompts(src.hf))


@pytest.mark.parametrize("hf, message", [
    ({}, "set exactly one of hf.dataset"),
    ({"dataset": "a/b", "path": "x"}, "set exactly one of hf.dataset"),
    ({"path": "x", "revision": "main"}, "hf.revision and hf.subset apply to a hub dataset"),
    ({"dataset": "a/b", "format": "parquet"}, "hf.format applies to local data"),
    ({"path": "x", "role_key": "speaker"}, "set hf.role_key and hf.content_key together"),
    ({"path": "x", "where": {"language": []}}, "every column needs at least one value"),
    ({"path": "x", "colum": "text"}, "colum"),
])
def test_bad_hf_params(hf, message):
    with pytest.raises(ValueError, match=message):
        PromptSource.model_validate({"source": "hf", "count": 1, "hf": hf})
    with pytest.raises(ValueError, match="hf applies to source 'hf' only"):
        PromptSource.model_validate({"source": "sharegpt", "count": 1, "hf": {"path": "x"}})
    with pytest.raises(ValueError, match="hf .* is required when source is 'hf'"):
        PromptSource.model_validate({"source": "hf", "count": 1})


def test_unset_hf_leaves_the_params_hash_of_other_sources_alone():
    assert "hf" not in PromptSource(source="sharegpt", count=3).model_dump()
    assert "hf" not in json.loads(PromptsParams().model_dump_json())["train"][0]


def _inputs_params(tmp_path, **hf) -> Params:
    raw = json.loads(Params().model_dump_json())
    raw["prompts"]["train"] = [{"source": "hf", "count": 3, "hf": hf}]
    return Params.model_validate(raw)


def test_inputs_fingerprint_the_data_not_its_times(tmp_path):
    path = write([{"prompt": q} for q in QUESTIONS], "saved", tmp_path / "data")
    params = _inputs_params(tmp_path, path=path)

    def record() -> bytes:
        write_inputs(params, tmp_path / "out", tmp_path / "hashes.json")
        return (tmp_path / "out" / "prompts.json").read_bytes()

    first = record()
    assert json.loads(first)["inputs"][0]["param"] == "prompts.train[0].hf.path"
    for f in (tmp_path / "data" / "saved").iterdir():  # a touch is no edit
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert record() == first
    datasets.Dataset.from_list([{"prompt": q} for q in QUESTIONS[::-1]]).save_to_disk(path)  # an edit
    assert record() != first


def test_inputs_record_a_hub_dataset_by_its_commit(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    params = _inputs_params(tmp_path, dataset="org/chats", subset="en", revision=sha)
    described = write_inputs(params, tmp_path / "out", tmp_path / "hashes.json")
    assert described["prompts"] == [{"param": "prompts.train[0].hf.dataset", "dataset": "org/chats",
                                     "subset": "en", "commit": sha}]  # a commit is its own record: no network
    # a branch must be asked of the hub: here there is none (or the id does not exist): one line, named
    params = _inputs_params(tmp_path, dataset="specauf-tests/no-such-dataset", revision="main")
    with pytest.raises(UserError, match=r"^prompts.train\[0\].hf.dataset: cannot resolve 'specauf-tests/no-such-dataset' "
                                        r"at revision 'main' on the hub \(.*\); pin hf.revision to a commit sha"):
        write_inputs(params, tmp_path / "out2", tmp_path / "hashes.json")


def test_the_prompts_stage_refuses_bad_data_and_keeps_its_output(tmp_path):
    ws = Workspace(tmp_path)
    prompts_jsonl(ws / "eval.jsonl", 2, "e", ["Write a short poem about the sea.", "What is seven times six?"])
    write([{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS], "parquet", tmp_path / "good")
    good = {"prompts": {"train": [{"source": "hf", "count": 4, "hf": {"path": str(tmp_path / "good/data.parquet")}}]}}
    code, err = ws.run("prompts", ws.params(good))
    assert code == 0, err
    write([{"messages": [{"role": "user", "content": "fine"}]}, {"messages": []}], "parquet", tmp_path / "bad")
    bad = {"prompts": {"train": [{"source": "hf", "count": 4, "hf": {"path": str(tmp_path / "bad/data.parquet")}}]}}
    expect_error(ws, "prompts", r"dataset \S+bad/data.parquet, split 'train', row 1: empty conversation$", ws.params(bad))


def _chats(n_english: int, n_french: int, edited: int | None = None) -> list[dict]:
    rows = []
    for i in range(n_english + n_french):
        q = f"Tell me a short story about robot number {i} and its paint."
        if i == edited:
            q = "Tell me instead about a lazy dog who paints."
        rows.append({"id": f"chat-{i}", "language": "English" if i < n_english else "French",
                     "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Once upon a time."}]})
    return rows


def test_smoke_pipeline_trains_on_a_local_parquet_dataset(built_smoke, tmp_path):
    """The bar: a smoke workspace whose training prompts come from a local Parquet dataset in the
    `messages` layout runs end to end; an edit to the data reruns `prompts`, and only an edit
    that changes the prompt sets reruns what reads them."""
    import yaml

    from specauf.artifact_datasets import load_artifact
    from tests.conftest import BUILT_SMOKE_TRAIN_PROMPTS, copy_workspace, dvc
    from tests.test_dvc_pipeline import ran

    ws = copy_workspace(built_smoke, tmp_path / "ws")
    chats = ws / "mydata" / "chats.parquet"
    chats.parent.mkdir()
    n = BUILT_SMOKE_TRAIN_PROMPTS + 6
    datasets.Dataset.from_list(_chats(n, 4)).to_parquet(str(chats))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["prompts"]["train"] = [{"source": "hf", "count": BUILT_SMOKE_TRAIN_PROMPTS,
                                   "hf": {"path": "mydata/chats.parquet", "id_column": "id", "where": {"language": ["English"]}}}]
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stages = ran(dvc(ws, "repro").stdout)
    assert "target" not in stages and {"prompts", "rollouts", "labels", "train@auf-0", "eval@auf-0", "report"} <= set(stages)
    train = load_artifact(ws / "data/prompts")["train"]
    assert train.num_rows == BUILT_SMOKE_TRAIN_PROMPTS and set(train["source"]) == {"hf"}
    assert set(train["prompt_id"]) <= {f"chat-{i}" for i in range(n)}  # English rows only
    assert sorted(load_artifact(ws / "data/rollouts")["prompt_id"]) == sorted(train["prompt_id"])
    assert "up to date" in dvc(ws, "status", "report").stdout.lower()

    datasets.Dataset.from_list(_chats(n, 5)).to_parquet(str(chats))  # one more French row: filtered out
    assert ran(dvc(ws, "repro").stdout) == ["inputs", "prompts"]  # prompts reread the data, its sets are the same bytes
    chosen = int(train["prompt_id"][0].removeprefix("chat-"))
    datasets.Dataset.from_list(_chats(n, 5, edited=chosen)).to_parquet(str(chats))  # a chosen prompt edited
    assert ran(dvc(ws, "repro", "rollouts").stdout) == ["inputs", "prompts", "rollouts"]


def test_the_readmes_examples_are_valid_params():
    import re

    import yaml

    from tests.conftest import ROOT

    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "source: hf" in b]
    assert len(blocks) == 2
    hub, local = (PromptsParams.model_validate(yaml.safe_load(b)["prompts"]) for b in blocks)
    assert hub.train[0].hf.dataset and local.train[0].hf.path and local.train[0].hf.where == {"language": ["English"]}


def test_all_user_turns_make_one_conversation(tmp_path):
    rows, _, ids = LAYOUTS["messages"]
    path = write(rows, "parquet", tmp_path)
    got = list(hf_prompts(hf_source(path, user_turns="all").hf))
    assert got == [{"prompt_id": pid, "source": "hf", "turns": [q, "and?"]} for pid, q in zip(ids, QUESTIONS)]
    with pytest.raises(ValueError, match=r"prompts.eval.mine\[0\]: multi-turn prompts are for training sets only"):
        PromptsParams(eval={"mine": [hf_source(path, user_turns="all")]})
