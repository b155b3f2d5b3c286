"""The Domino head (specauf/train/domino.py): drafting equals teacher forcing up to the first
failure, the two-branch loss, and a Domino run trains, saves its head and resumes exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specauf.config import TrainParams
from specauf.train import run as train_mod
from specauf.train.domino import domino_config, chained_guesses, head_sizes, is_domino, teacher_forced_logits
from specauf.train.drafter import BlockDrafter, DrafterConfig
from specauf.train.losses import LossOptions, compute_loss, domino_loss
from tests.conftest import Killed, die_after
from tests.test_train import BASE, data, train, weights  # noqa: F401  (data: the module fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_domino(vocab: int = 50, hidden: int = 32, draft_vocab: int = 0, seed: int = 0) -> BlockDrafter:
    torch.manual_seed(seed)
    config = DrafterConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, block_size=6, num_target_layers=4, draft_vocab_size=draft_vocab,
                           dflash_config={"mask_token_id": vocab - 1, "target_layer_ids": [1, 2],
                                          **domino_config(hidden, gru_dim=16, emb_dim=8)})
    drafter = BlockDrafter(config).eval()
    for p in drafter.embed_proj.parameters():  # a head strong enough to change argmaxes
        nn.init.normal_(p, std=1.0)
    if draft_vocab:
        drafter.d2t.copy_(torch.randperm(vocab)[:draft_vocab].sort().values)
    return drafter


def test_head_sizes_follow_the_reference_ratios():
    assert head_sizes(4096) == (1024, 256) and head_sizes(576) == (144, 40) and head_sizes(64) == (16, 8)
    assert head_sizes(576, gru_dim=100, emb_dim=12) == (100, 12)
    names = {n for n, _ in tiny_domino().named_parameters()}
    assert {"prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight", "embed_proj.2.weight"} <= names
    assert not any(n.startswith("prefix_gru.bias") for n in names)  # no biases, as the reference
    assert is_domino(tiny_domino().config) and not is_domino(DrafterConfig(dflash_config={"target_layer_ids": [0]}))


@pytest.mark.parametrize("draft_vocab", [0, 20])
def test_drafting_equals_teacher_forcing_up_to_the_first_failure(draft_vocab):
    """Greedy drafting feeds back its own guesses; teacher forcing reads the labels. Where the
    labels are the guesses (every slot up to and including the first miss), the logits agree."""
    drafter = tiny_domino(draft_vocab=draft_vocab)
    embed = nn.Embedding(50, 32)
    d2t = drafter.d2t if draft_vocab else None
    M, K = 16, 5
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(M, K, 32, generator=g)
    base = torch.randn(M, K, draft_vocab or 50, generator=g)
    anchors = torch.randint(0, 49, (M,), generator=g)
    with torch.no_grad():
        guesses, drafted = chained_guesses(drafter, hidden, base, anchors, embed, d2t)
        first_miss = torch.randint(0, K, (M,), generator=g)
        labels = guesses.clone()  # target ids: the guesses up to the first miss, other tokens after
        for m in range(M):
            labels[m, first_miss[m]:] = (guesses[m, first_miss[m]:] + 1 + m) % 49
        tokens = torch.cat([anchors[:, None], labels[:, : K - 1]], dim=1)
        forced = teacher_forced_logits(drafter, hidden, base, embed(tokens))
    for m in range(M):
        upto = int(first_miss[m]) + 1  # slot first_miss still read only true guesses before it
        torch.testing.assert_close(drafted[m, :upto], forced[m, :upto], rtol=1e-5, atol=1e-5)
        assert torch.equal(drafted[m, :upto].argmax(-1), forced[m, :upto].argmax(-1))
    assert torch.equal(drafted[:, 0], base[:, 0])  # the first guess is the backbone's own
    assert not torch.equal(drafted[:, 1:], base[:, 1:])  # the head corrects the rest
    if d2t is not None:
        assert set(guesses.flatten().tolist()) <= set(d2t.tolist())


def test_the_two_branch_loss():
    g = torch.Generator().manual_seed(0)
    base, final = torch.randn(8, 5, 30, generator=g), torch.randn(8, 5, 30, generator=g)
    labels = torch.randint(0, 30, (8, 5), generator=g)
    labels[:4] = final[:4].argmax(-1)  # blocks the final logits accept in full
    validity = torch.ones(8, 5, dtype=torch.bool)
    validity[6, 3:] = False
    opts = LossOptions(gamma=2.0)
    for name in ("decay", "dpace", "auf"):
        at_one, _ = domino_loss(name, base, final, labels, validity, opts, lam=1.0)
        torch.testing.assert_close(at_one, compute_loss(name, base, labels, validity, opts)[0])  # the backbone alone
    at_zero, diag = domino_loss("auf", base, final, labels, validity, opts, lam=0.0, auf_support="base")
    torch.testing.assert_close(at_zero, compute_loss("decay", final, labels, validity, opts)[0])  # B-AUF+D: decayed final
    torch.testing.assert_close(diag["token_accuracy"], compute_loss("full", final, labels, validity)[1]["token_accuracy"])
    both, _ = domino_loss("auf", base, final, labels, validity, opts, lam=0.5, auf_support="final")
    auf_final = compute_loss("auf", final, labels, validity, opts)[0]
    from specauf.train.losses import auf_support, per_position_ce, weighted_mean
    support = auf_support(final, labels, validity).float()
    torch.testing.assert_close(both, 0.5 * auf_final + 0.5 * weighted_mean(per_position_ce(base, labels), support))


def test_a_domino_run_trains_saves_its_head_and_resumes_exactly(tiny_model, data, tmp_path):  # noqa: F811
    domino = {"gru_dim": 16, "emb_dim": 8}
    whole = train(tiny_model, data["offline"], tmp_path / "whole", domino=domino)
    w = weights(whole["out"])
    assert w["embed_proj.2.weight"].shape == (tiny_model[0].get_output_embeddings().weight.shape[0], 8)
    assert w["prefix_gru.weight_ih_l0"].shape == (3 * 16, tiny_model[0].config.hidden_size)
    config = DrafterConfig.from_pretrained(whole["out"])
    assert config.dflash_config["projector_type"] == "domino" and config.dflash_config["gru_hidden_dim"] == 16
    assert TrainParams(**{**BASE, "domino": domino}).domino.auf_support == "base"
    dflash = weights(train(tiny_model, data["offline"], tmp_path / "dflash")["out"])
    assert not any(k.startswith(("prefix_gru", "embed_proj")) for k in dflash)
    with pytest.MonkeyPatch.context() as mp:  # killed in step 10, after the checkpoint of step 8
        die_after(mp, train_mod, "domino_loss", 10)
        with pytest.raises(Killed, match="killed"):
            train(tiny_model, data["offline"], tmp_path / "resumed", domino=domino)
    resumed = train(tiny_model, data["offline"], tmp_path / "resumed", domino=domino)
    assert (resumed["out"] / "model.safetensors").read_bytes() == (whole["out"] / "model.safetensors").read_bytes()


def test_a_domino_drafter_decodes_exactly_and_samples_inside_its_head(tiny_model):
    from specauf.data.generation import encode_chat
    from specauf.evaluate.decode import DrafterProposer, speculative_generate
    from specauf.sampling import SamplingParams
    from tests.conftest import prompt_rows
    from tests.test_replay import drafter_for

    model, tok, manifest = tiny_model
    drafter = drafter_for(model, domino=True)
    stops = manifest["stop_token_ids"]
    for row in prompt_rows(3):
        ids = encode_chat(tok, row["turns"][:1])
        plain = speculative_generate(model, ids, block_size=1, max_new_tokens=20, stop_token_ids=stops)
        for b in (2, 4, 6):
            spec = speculative_generate(model, ids, proposer=DrafterProposer(drafter, model), block_size=b,
                                        max_new_tokens=20, stop_token_ids=stops)
            assert spec.token_ids == plain.token_ids, (row["prompt_id"], b)
    # sampled: each guess is drawn inside the head's loop and the GRU reads the token drawn, so the
    # distribution q_j handed to verification is the chained one, conditioned on the guesses before j
    sp, tokens, V = SamplingParams(temperature=0.9, top_k=20), torch.tensor(ids), model.config.vocab_size
    proposer, again = DrafterProposer(drafter, model), DrafterProposer(drafter, model)
    with torch.no_grad():
        out = model(tokens[None, :-1], output_hidden_states=True)  # the context: every position before the anchor
        for p in (proposer, again):
            p.reset(tokens)
            p.add_context(out.hidden_states)
        guesses, q = proposer.draft(tokens, 5, sp, torch.Generator().manual_seed(3))
        drawn = iter(guesses[:, None])
        slots = again._slots(tokens, 5)  # the same context: the same backbone output
        _, final = chained_guesses(drafter, slots, drafter.draft_logits(slots, proposer.head), tokens[-1:],
                                   proposer.embed, proposer.d2t, pick=lambda logits: next(drawn))
        other = chained_guesses(drafter, slots, drafter.draft_logits(slots, proposer.head), tokens[-1:],
                                proposer.embed, proposer.d2t, pick=lambda logits: (guesses[:1] + 1) % V)[1]
    assert q.shape == (5, V) and torch.allclose(q.sum(-1), torch.ones(5))
    assert torch.allclose(q, sp.probs(drafter.to_target_vocab(final[0], V)))
    assert all(q[j, guesses[j]] > 0 for j in range(5))
    assert not torch.allclose(final[0, 1:], other[0, 1:])  # a different earlier token, other later logits
    sampled = [speculative_generate(model, ids, proposer=DrafterProposer(drafter, model), block_size=4, max_new_tokens=12,
                                    temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(5), stop_token_ids=stops)
               for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids and len(sampled[0].token_ids) > 0  # seeded: reproducible


def test_the_export_carries_the_head_and_says_who_runs_it(tmp_path):
    """SpecForge's names and keys; a Domino drafter rebuilt from the export alone computes the
    drafted logits of the trained one; no engine here is claimed to run its head."""
    import json

    from safetensors.torch import load_file

    from specauf.serve.export import domino_export, export_drafter
    from tests.test_export import save_drafter

    config = DrafterConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, block_size=4, num_target_layers=6,
                           dflash_config={"mask_token_id": 5, "target_layer_ids": [1, 2, 4],
                                          **domino_config(32, gru_dim=16, emb_dim=8)})
    drafter = save_drafter(tmp_path / "drafter", config)
    manifest = export_drafter(tmp_path / "drafter", tmp_path / "out")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["dflash_config"] == {"mask_token_id": 5, "target_layer_ids": [1, 2, 4], "projector_type": "domino",
                                    "gru_hidden_dim": 16, "emb_dim": 8, "pure_draft_prefix_len": 1, "shift_label": False}
    tensors = load_file(str(tmp_path / "out/model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(("prefix_gru", "embed_proj"))} == {
        "prefix_gru.weight_ih_l0": (48, 32), "prefix_gru.weight_hh_l0": (48, 16),
        "embed_proj.0.weight": (8, 48), "embed_proj.2.weight": (97, 8)}
    assert manifest["projector"] == "domino" and not any(e["exact"] for e in manifest["engines"].values())
    assert "no Domino head" in manifest["engines"]["vllm"]["reason"]
    assert "not served" in domino_export(tmp_path / "out")
    rebuilt = BlockDrafter(DrafterConfig(**{k: v for k, v in cfg.items() if k in DrafterConfig().to_dict()
                                            and k not in ("architectures", "model_type", "dtype", "torch_dtype")}))
    rebuilt.load_state_dict(tensors, strict=True)
    g = torch.Generator().manual_seed(0)
    hidden, base, anchors = torch.randn(3, 3, 32, generator=g), torch.randn(3, 3, 97, generator=g), torch.tensor([1, 2, 3])
    embed = torch.nn.Embedding(97, 32)
    with torch.no_grad():
        a = chained_guesses(drafter.eval(), hidden, base, anchors, embed, None)
        b = chained_guesses(rebuilt.eval(), hidden, base, anchors, embed, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_params_take_a_sampled_eval_of_a_domino_drafter():
    from specauf.config import Params, section_dict

    assert Params.model_validate({"train": {"domino": {}}, "eval": {"temperature": 0.7}}).eval.temperature == 0.7

    # unset, it is no provenance: a DFlash run's params hash is what it was before the key existed
    assert Params().train.domino is None and "domino" not in section_dict(Params(), "train")["train"]
    assert section_dict(Params.model_validate({"train": {"domino": {}}}), "train")["train"]["domino"]["auf_support"] == "base"


def test_domino_runs_the_smoke_dag_and_is_not_served(built_smoke, tmp_path):
    """train.domino in the smoke workspace: the drafters retrain as Domino, eval replays them (replay
    equal to decoding, checked by the stage), export writes the head, the serve stage records why
    it skips, and the report builds."""
    import json

    import yaml

    from tests.conftest import copy_workspace, dvc
    from tests.test_dvc_pipeline import ran

    ws = copy_workspace(built_smoke, tmp_path / "ws")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["domino"] = {"gru_dim": 16, "emb_dim": 8}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ran(dvc(ws, "repro").stdout)
    assert {"train@auf-0", "eval@auf-0", "export@auf-0", "serve@auf-0", "report"} <= set(stages)
    assert not {"rollouts", "labels", "target"} & set(stages)
    export = json.loads((ws / "data/export/auf-0/manifest.json").read_text())
    assert export["projector"] == "domino" and not (ws / "data/export/auf-0/drafter.gguf").exists()
    served = json.loads((ws / "metrics/serve/auf-0.json").read_text())
    assert served["engine"] == "none" and "Domino" in served["reason"]
    assert json.loads((ws / "metrics/eval/auf-0.json").read_text())["overall"]
    assert "| this run (Domino): overall, inference B=2 |" in (ws / "reports/report.md").read_text()
