"""Prompt sets (specauf/data/prompts.py): deterministic disjoint splits, dedup, length filters, the files on disk."""
import json
import random

import pytest

from specauf.artifacts import ArtifactError
from specauf.config import PromptSource, PromptsParams
from specauf.data.prompt_sources import PromptsError, mtbench_prompts
from specauf.data.prompts import build_prompt_sets, check_disjoint, load_prompt_set, rank, write_prompt_sets


def jsonl_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def jsonl_src(path, count, **kw):
    return PromptSource(source="jsonl", path=path, count=count, **kw)


def params(train=(), eval=None, **kw):
    return PromptsParams(train=list(train), eval=eval or {}, **kw)


def ids(rows):
    return [r["prompt_id"] for r in rows]


# --- streaming JSON array ------------------------------------------------------------------

# --- packaged benchmarks -------------------------------------------------------------------

# --- sets ----------------------------------------------------------------------------------

def test_split_is_deterministic_by_id_not_file_order(tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"Question number {i}: explain item {i}."} for i in range(60)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a, b = jsonl_file(tmp_path / "a.jsonl", rows), jsonl_file(tmp_path / "b.jsonl", shuffled)

    def build(path, seed):
        tr, ev, _ = build_prompt_sets(params(train=[jsonl_src(path, 30)], eval={"held": [jsonl_src(path, 10)]}), seed)
        return ids(tr), ids(ev["held"])

    tr, held = build(a, 0)
    assert len(tr) == 30 and len(held) == 10 and set(tr).isdisjoint(held)
    assert tr == sorted(tr, key=lambda i: rank(0, i)) and held == sorted(held, key=lambda i: rank(0, i))
    assert build(b, 0) == (tr, held)  # same seed, other file order: same sets, same row order
    tr1, held1 = build(a, 1)
    assert set(held1) != set(held) and set(tr1) != set(tr)


def test_eval_text_is_removed_from_training(tmp_path):
    mt = list(mtbench_prompts(2))
    train_rows = [{"id": "copy", "prompt": mt[5]["turns"][0]},
                  {"id": "shouty", "prompt": "  " + mt[7]["turns"][0].upper().replace(" ", "\n ") + " "},
                  {"id": "second-turn", "prompt": mt[9]["turns"][1]}]
    train_rows += [{"id": f"t{i}", "prompt": f"An ordinary training prompt {i}."} for i in range(20)]
    path = jsonl_file(tmp_path / "train.jsonl", train_rows)
    p = params(train=[jsonl_src(path, 10)], eval={"mt-bench": [PromptSource(source="mtbench", count=80)]})
    tr, ev, stats = build_prompt_sets(p, seed=0)
    assert len(ev["mt-bench"]) == 80 and len(tr) == 10  # training backfills what it lost
    tr, _, stats = build_prompt_sets(p.model_copy(update={"train": [jsonl_src(path, 100)]}), seed=0)
    # eval sets are single-turn: a training prompt equal to MT-Bench's second turn is no eval prompt
    assert not {"copy", "shouty"} & set(ids(tr)) and "second-turn" in ids(tr) and len(tr) == 21
    assert stats["sets"]["train"]["dropped_overlap"] == 2 and stats["sets"]["train"]["short"] == {"0": 21}


def test_multi_turn_sources_are_for_training_only():
    two = PromptSource(source="mtbench", count=80, turns=2)
    assert params(train=[two]).train[0].turns == 2
    with pytest.raises(ValueError, match=r"prompts.eval.mt-bench\[0\]: multi-turn prompts are for training sets only"):
        params(eval={"mt-bench": [two]})
    rows = list(mtbench_prompts(2))
    assert len(rows) == 80 and all(len(r["turns"]) == 2 for r in rows)


def test_check_disjoint_guard_names_set_and_id():
    ev = {"mt-bench": [{"prompt_id": "mt-bench/81", "source": "mtbench", "turns": ["Hello  World"]}]}
    check_disjoint([{"prompt_id": "x", "source": "jsonl", "turns": ["other"]}], ev)
    with pytest.raises(PromptsError, match="'x' equals prompt 'mt-bench/81' of evaluation set 'mt-bench'"):
        check_disjoint([{"prompt_id": "x", "source": "jsonl", "turns": ["hello world"]}], ev)


def test_length_filter_and_dedup_within_set(tmp_path):
    path = jsonl_file(tmp_path / "p.jsonl", [{"id": 1, "prompt": "Hello   World, how are you?"},
                                             {"id": 2, "prompt": "hello world, HOW are you?"},
                                             {"id": 3, "prompt": "short"}, {"id": 4, "prompt": "x" * 50},
                                             {"id": 5, "prompt": "A fine prompt."}])
    tr, _, stats = build_prompt_sets(params(train=[jsonl_src(path, 10)], max_chars=40), seed=0)
    assert len(tr) == 2 and {"3", "4"}.isdisjoint(ids(tr)) and "5" in ids(tr)
    assert stats["sets"]["train"]["dropped_length"] == 2 and stats["sets"]["train"]["dropped_dedup"] == 1


@pytest.mark.parametrize("line, field, message", [
    ('{"id": 3, "prompt": "ok"', "prompt", "bad JSON"),
    ('{"id": 3, "text": "ok"}', "prompt", "missing field 'prompt'"),
    ('["not", "an", "object"]', "prompt", "expected a JSON object"),
    ('{"id": 1, "prompt": "again"}', "prompt", "duplicate id '1' \\(first on line 1\\)"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "prompt": "first prompt"}\n\n' + line + "\n")
    with pytest.raises(PromptsError, match=f"bad.jsonl:3: {message}") as e:
        build_prompt_sets(params(train=[jsonl_src(str(path), 5, text_field=field)]), seed=0)
    assert "\n" not in str(e.value)


def test_jsonl_line_number_ids_and_missing_file(tmp_path):
    path = jsonl_file(tmp_path / "p.jsonl", [{"prompt": "first prompt"}, {"prompt": "second prompt"}])
    tr, _, _ = build_prompt_sets(params(train=[jsonl_src(path, 5, id_field=None)]), seed=0)
    assert sorted(ids(tr)) == ["1", "2"]
    with pytest.raises(PromptsError, match="nope.jsonl: prompts file not found"):
        build_prompt_sets(params(train=[jsonl_src(str(tmp_path / "nope.jsonl"), 5)]), seed=0)


def test_empty_source_and_reserved_name_are_errors():
    p = params(eval={"humaneval": [PromptSource(source="humaneval", count=164)]}, max_chars=10)
    with pytest.raises(PromptsError, match=r"^prompts.eval.humaneval\[0\]: source 'humaneval' produced no prompts \(164 longer than prompts\.max_chars \(10\)\)$"):
        build_prompt_sets(p, seed=0)
    with pytest.raises(PromptsError, match="reserved"):
        build_prompt_sets(params(eval={"train": [PromptSource(source="humaneval", count=1)]}), seed=0)


def test_default_build_is_byte_identical_and_disjoint(tmp_path):
    p = PromptsParams()
    first, second = build_prompt_sets(p, seed=0), build_prompt_sets(p, seed=0)
    assert first == second
    tr, ev, stats = first
    assert len(tr) == PromptsParams().train[0].count and {n: len(r) for n, r in ev.items()} == {
        "alpaca-like": 128, "gsm8k-like": 128, "humaneval": 164, "mt-bench": 80}  # the evidence issue's counts
    assert set(ids(tr)).isdisjoint(ids(ev["alpaca-like"]))  # held-out ShareGPT ids never train...
    assert stats["sets"]["train"]["dropped_overlap"] == 0  # ...because training never even draws them
    assert all(len(set(ids(rows))) == len(rows) for rows in [tr, *ev.values()])
    check_disjoint(tr, ev)
    extra = {"params_hash": "abc"}
    m = write_prompt_sets(tmp_path / "a", tr, ev, extra, stats)
    write_prompt_sets(tmp_path / "b", *second[:2], extra, second[2])
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == ["eval-alpaca-like.arrow", "eval-gsm8k-like.arrow", "eval-humaneval.arrow",
                     "eval-mt-bench.arrow", "manifest.json", "train.arrow"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m["kind"] == "prompts" and m["params_hash"] == "abc" and m["counts"]["train"] == {"sharegpt": PromptsParams().train[0].count}
    assert m["files"]["mt-bench"]["rows"] == 80 and m["stats"]["sharegpt"]["complete"] is False
    assert load_prompt_set(tmp_path / "a", "train") == tr
    assert load_prompt_set(tmp_path / "a", "mt-bench") == ev["mt-bench"]
    _, ev1, _ = build_prompt_sets(p, seed=1)
    assert set(ids(ev1["alpaca-like"])) != set(ids(ev["alpaca-like"]))


def test_load_prompt_set_verifies_checksum(tmp_path):
    rows = [{"prompt_id": "a", "source": "jsonl", "turns": ["hi there"]}]
    write_prompt_sets(tmp_path / "p", rows, {"x": rows}, {})
    with pytest.raises(ArtifactError, match="no prompt set 'y'"):
        load_prompt_set(tmp_path / "p", "y")
    f = tmp_path / "p" / "eval-x.arrow"
    data = bytearray(f.read_bytes())
    i = data.find(b"hi there")
    data[i] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_prompt_set(tmp_path / "p", "x")
    assert load_prompt_set(tmp_path / "p", "train") == rows


def test_eval_prompt_in_two_sets(tmp_path):
    """The replay counts each prompt once: a prompt id in two eval sets is refused by name."""
    from specauf.data.prompts import load_eval_prompts

    p = {"prompt_id": "p", "source": "jsonl", "turns": ["hi there"]}
    q = {"prompt_id": "q", "source": "jsonl", "turns": ["bye now"]}
    write_prompt_sets(tmp_path / "ok", [], {"a": [p], "b": [q]}, {})
    assert load_eval_prompts(tmp_path / "ok", None) == {"a": [p], "b": [q]}
    assert list(load_eval_prompts(tmp_path / "ok", ["b"])) == ["b"]
    with pytest.raises(PromptsError, match=r"eval\.sets: no evaluation set 'c' \(have: a, b\)"):
        load_eval_prompts(tmp_path / "ok", ["c"])
    write_prompt_sets(tmp_path / "dup", [], {"a": [p], "b": [p, q]}, {})
    with pytest.raises(PromptsError, match=r"^prompts\.eval: prompt 'p' is in both 'a' and 'b'; give each set its own prompts$"):
        load_eval_prompts(tmp_path / "dup", None)
