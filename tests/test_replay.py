"""Tau by replay equals tau by decoding: the walk, the batched anchor pass, and the two end to end."""
from __future__ import annotations

import pytest
import torch

from specauf.config import LabelsParams, RolloutsParams
from specauf.evaluate.decode import DrafterProposer, OracleProposer, speculative_generate
from specauf.train.domino import domino_config
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.data.dataset import LabelsDataset
from specauf.data.generation import encode_chat
from specauf.data.labels import run_labels
from specauf.errors import ExactnessError
from specauf.evaluate.replay import (anchor_guesses, check_replay, replay_check, replay_drafter,
                            summarize_replay, walk)
from specauf.data.rollouts import run_rollouts
from tests.conftest import prompt_rows

MASK_ID = 3


def drafter_for(model, block_size=6, seed=0, layer_ids=(0, 2), domino=False):
    torch.manual_seed(seed)
    cfg = DrafterConfig.from_target_config(model.config, num_layers=2, block_size=block_size, mask_token_id=MASK_ID,
                                           target_layer_ids=list(layer_ids), initializer_range=0.2)
    if domino:  # a head strong enough to change guesses
        cfg.dflash_config.update(domino_config(cfg.hidden_size, gru_dim=16, emb_dim=8))
    drafter = BlockDrafter(cfg).eval()
    if domino:
        for p in drafter.embed_proj.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return drafter


def test_walk_reproduces_the_decode_loop(tiny_model):
    """Same proposals in the same order -> the walk's accounting is the decode loop's, including
    the last cycle's shorter block, stop tokens inside a block and every accepted-prefix length."""
    model, _, _ = tiny_model
    V = model.config.vocab_size
    for i, prompt in enumerate(([5, 9, 17, 33, 2], [7] * 9, [40, 41, 42])):
        max_new = 17 + i
        greedy = speculative_generate(model, prompt, block_size=1, max_new_tokens=max_new).token_ids
        stops = {greedy[9 + i]}  # a stop token the greedy text really reaches
        response = greedy[: greedy.index(greedy[9 + i]) + 1]  # greedy text up to and including its first stop
        seq = torch.tensor(prompt + greedy)
        for error_rate in (0.0, 0.3, 0.7, 1.0):
            for block_size in (2, 3, 5):
                kw = dict(block_size=block_size, max_new_tokens=max_new, stop_token_ids=stops)
                decoded = speculative_generate(model, prompt, proposer=OracleProposer(seq, V, error_rate, seed=i), **kw)
                oracle = OracleProposer(seq, V, error_rate, seed=i)
                replayed = walk(response, lambda c, n: oracle.propose(seq[: len(prompt) + c], n).argmax(-1).tolist(),
                                block_size, max_new, stops)
                assert (replayed["emitted"], replayed["cycles"]) == (decoded.decode_tokens, decoded.num_cycles)
                assert replayed["attempted"] == decoded.attempted and replayed["accepted"] == decoded.accepted
                assert sum(n * c for n, c in enumerate(replayed["lengths"])) == decoded.decode_tokens
                if error_rate == 0.0:
                    assert replayed["accepted"] == replayed["attempted"]
    # the greedy text without a stop, cut by max_new_tokens: the last cycle drafts fewer guesses
    greedy = speculative_generate(model, [5, 9, 17], block_size=1, max_new_tokens=13).token_ids
    seq = torch.tensor([5, 9, 17] + greedy)
    decoded = speculative_generate(model, [5, 9, 17], proposer=OracleProposer(seq, V, 0.0), block_size=5, max_new_tokens=13)
    replayed = walk(greedy, lambda c, n: seq[3 + c: 3 + c + n].tolist(), 5, 13, set())
    assert (replayed["emitted"], replayed["cycles"]) == (decoded.decode_tokens, decoded.num_cycles) == (12, 3)


def single_block_guesses(drafter, model, ids, feats, anchor, width, keep):
    """The reference: one block, alone, on exactly the context before its anchor."""
    block = torch.full((1, width), MASK_ID)
    block[0, 0] = ids[anchor]
    with torch.no_grad():
        h = drafter(model.get_input_embeddings()(block), feats[None, :anchor],
                    block_position_ids=torch.arange(anchor, anchor + width)[None],
                    context_position_ids=torch.arange(anchor)[None])
    return drafter.draft_logits(h[0, 1:keep + 1], model.get_output_embeddings().weight).argmax(-1).tolist()


def test_batched_anchor_pass_equals_each_block_alone(tiny_model):
    """Many blocks in one forward (more than one chunk), mixed widths: each block's guesses are
    those of that block run on its own."""
    model, _, _ = tiny_model
    drafter = drafter_for(model)
    ids = torch.randint(4, model.config.vocab_size, (90,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    feats = torch.cat([hs[1][0], hs[3][0]], -1)
    anchors = list(range(3, 89))
    widths = [2 + (a % 5) for a in anchors]  # 2..6 tokens, the drafter's block size being 6
    got = anchor_guesses(drafter, model.get_input_embeddings(), model.get_output_embeddings().weight, ids, feats,
                         anchors, widths, keep=5)
    for row, a, w in zip(got, anchors, widths):
        assert row[: w - 1].tolist() == single_block_guesses(drafter, model, ids, feats, a, w, w - 1)


class Recording(DrafterProposer):
    """The decode's own proposer, keeping what it proposed at each committed length."""

    def reset(self, prompt_ids):
        super().reset(prompt_ids)
        self.start, self.proposed = prompt_ids.shape[0], {}

    def propose(self, tokens, n):
        logits = super().propose(tokens, n)
        self.proposed[tokens.shape[0] - self.start] = logits.argmax(-1).tolist()
        return logits


@pytest.fixture(scope="module")
def eval_answers(tiny_model, tmp_path_factory):
    """Greedy answers and fp32 features, written by the real rollouts and labels code (as the
    eval_rollouts and eval_labels stages do)."""
    model, tok, manifest = tiny_model
    root = tmp_path_factory.mktemp("answers")
    rows = prompt_rows(4)
    run_rollouts(model, tok, rows, RolloutsParams(max_new_tokens=24, batch_size=4, shard_size=4), out_dir=root / "r",
                 work_dir=root / "rw", seed=0, stop_ids=manifest["stop_token_ids"],
                 manifest_extra={"target_fingerprint": manifest["fingerprint"]})
    run_labels(model, root / "r", LabelsParams(layer_ids=[0, 1, 2], feature_dtype="float32", batch_size=4),
               out_dir=root / "l", work_dir=root / "lw", pad_id=0, manifest_extra={"target_fingerprint": "x"})
    return root / "l", rows


@pytest.mark.parametrize("layout, backbone", [("trained", "dflash"), ("short", "dflash"), ("trained", "domino"),
                                              ("short", "domino")])
def test_replay_equals_decoding(tiny_model, eval_answers, layout, backbone):
    """Every prompt, every block size, two lengths: replayed cycles and acceptance equal the decode's,
    and the guesses the walk used are the ones the decode's drafter proposed (Domino: each guess
    fed back through its head, in the batched pass as in the decode)."""
    model, tok, manifest = tiny_model
    labels_dir, rows = eval_answers
    drafter = drafter_for(model, layer_ids=(0, 2), domino=backbone == "domino")  # a subset of the stored layers
    stops = manifest["stop_token_ids"]
    data = LabelsDataset(labels_dir)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings().weight
    feature_cols = torch.cat([torch.arange(0, 64), torch.arange(128, 192)])  # layers 0 and 2 of the stored 0, 1, 2
    checked = 0
    for max_new in (24, 11):
        replayed = replay_drafter(drafter, model, labels_dir, {r["prompt_id"]: "s" for r in rows}, [2, 4, 6], layout,
                                  max_new, stops)
        decoded = []
        for r, rep in zip(rows, replayed):
            ids = encode_chat(tok, r["turns"][:1])
            item = next(data[i] for i in range(len(data)) if data[i]["prompt_id"] == r["prompt_id"])
            assert item["input_ids"][: len(ids)].tolist() == ids
            row = {"set": "s", "prompt_id": r["prompt_id"]}
            for b in (2, 4, 6):
                proposer = Recording(drafter, model, layout)
                out = speculative_generate(model, ids, proposer=proposer, block_size=b, max_new_tokens=max_new,
                                           stop_token_ids=stops)
                got = rep[f"b{b}"]
                assert (got["emitted"], got["cycles"]) == (out.decode_tokens, out.num_cycles), (r["prompt_id"], b)
                # the guesses themselves: the batched pass on stored features = the decode's proposer
                cs = sorted(proposer.proposed)
                widths = [6 if layout == "trained" else len(proposer.proposed[c]) + 1 for c in cs]
                batched = anchor_guesses(drafter, emb, head, item["input_ids"], item["features"][:, feature_cols],
                                         [len(ids) + c - 1 for c in cs], widths, keep=5)
                assert all(batched[j][: len(proposer.proposed[c])].tolist() == proposer.proposed[c] for j, c in enumerate(cs))
                checked += len(cs)
                assert got["attempted"] == out.attempted and got["accepted"] == out.accepted
                row[f"b{b}"] = {"emitted": out.decode_tokens, "cycles": out.num_cycles}
            decoded.append(row)
        check = replay_check(decoded, replayed)
        assert check["max_abs_prompt_difference"] == 0 and check["prompts_differing"] == 0
        check_replay(check, gate=True)
    assert checked > 100
    s = summarize_replay(replayed, "b4")
    assert s["prompts"] == len(rows) and s["tau"] == s["decode_tokens"] / s["cycles"]


def test_layouts_differ(tiny_model, eval_answers):
    """The layout param is real: a short block and the trained block give different guesses."""
    model, _, _ = tiny_model
    labels_dir, rows = eval_answers
    drafter = drafter_for(model)
    ids = torch.randint(4, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    feats = torch.cat([hs[1][0], hs[3][0]], -1)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings().weight
    short = anchor_guesses(drafter, emb, head, ids, feats, list(range(5, 39)), [2] * 34, keep=1)
    trained = anchor_guesses(drafter, emb, head, ids, feats, list(range(5, 39)), [6] * 34, keep=1)
    assert (short != trained).any()


def test_disagreement_fails_with_one_line():
    decoded = [{"set": "s", "prompt_id": "p", "b4": {"emitted": 20, "cycles": 10}}]
    replayed = [{"set": "s", "prompt_id": "p", "b4": {"emitted": 20, "cycles": 8}}]
    check = replay_check(decoded, replayed)
    assert check["pooled"]["b4"]["difference"] == pytest.approx(0.5)
    with pytest.raises(ExactnessError, match="replay disagrees with decoding at block size 4"):
        check_replay(check, gate=True)


def test_disagreement_without_the_gate_warns(caplog):
    """eval.exactness_gate off (a GPU's batched kernels can flip a near-tie): recorded and logged, not fatal."""
    decoded = [{"set": "s", "prompt_id": "p", "b4": {"emitted": 20, "cycles": 10}}]
    replayed = [{"set": "s", "prompt_id": "p", "b4": {"emitted": 20, "cycles": 8}}]
    with caplog.at_level("WARNING", logger="specauf"):
        check_replay(replay_check(decoded, replayed), gate=False)
    assert "replay differs from decoding beyond 0.02 at block sizes 4" in caplog.text


def test_missing_answer_is_named(tiny_model, eval_answers):
    model, _, manifest = tiny_model
    labels_dir, rows = eval_answers
    with pytest.raises(Exception, match="no answer for eval prompt 'nope'"):
        replay_drafter(drafter_for(model), model, labels_dir, {"nope": "s"}, [2], "trained", 10, manifest["stop_token_ids"])
