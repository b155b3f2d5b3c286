"""Blocks: anchors, labels/validity, and the one-forward-many-blocks attention mask."""
import torch

from specauf.train.blocks import block_attention_mask, build_blocks, collate_blocks, sample_anchors
from specauf.train.drafter import BlockDrafter, DrafterConfig

MASK = 3


def test_sample_anchors_range_sorted_seeded():
    g = torch.Generator().manual_seed(0)
    a = sample_anchors(response_start=10, seq_len=40, block_size=4, num_anchors=8, generator=g)
    assert len(a) == 8 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 8
    assert a.min() >= 9 and a.max() <= 38
    again = sample_anchors(10, 40, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(a, again)
    other = sample_anchors(10, 40, 4, 8, torch.Generator().manual_seed(1))
    assert not torch.equal(a, other)
    # fewer candidates than asked: all of them (a+1 in the response, a < seq_len-1)
    assert sample_anchors(10, 14, 4, 100, g).tolist() == [9, 10, 11, 12]
    assert sample_anchors(10, 10, 4, 100, g).numel() == 0


def test_build_blocks_inputs_labels_validity_positions():
    ids = torch.arange(100, 112)  # seq_len 10 plus two padding tokens
    out = build_blocks(ids, response_start=4, seq_len=10, anchors=torch.tensor([3, 6, 8]),
                       block_size=4, mask_token_id=MASK)
    assert out["block_input_ids"].tolist() == [[103, 3, 3, 3], [106, 3, 3, 3], [108, 3, 3, 3]]
    assert out["block_position_ids"].tolist() == [[3, 4, 5, 6], [6, 7, 8, 9], [8, 9, 10, 11]]
    assert out["labels"].tolist() == [[104, 105, 106], [107, 108, 109], [109, 0, 0]]
    assert out["validity"].tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    # custom acceptance labels, and validity is monotone even if the anchor's label is in the prompt
    label_ids = ids + 1000
    out = build_blocks(ids, 5, 10, torch.tensor([3]), 4, MASK, label_ids=label_ids)
    assert out["labels"].tolist() == [[1104, 1105, 1106]]
    assert out["validity"].tolist() == [[False, False, False]]


def test_block_attention_mask_layout():
    m = block_attention_mask(torch.tensor([2, 5]), block_size=3, context_len=6)
    assert m.shape == (6, 12)
    ctx, blk = m[:, :6], m[:, 6:]
    assert ctx[:3].tolist() == [[True, True, False, False, False, False]] * 3  # strictly before anchor 2
    assert ctx[3:].tolist() == [[True] * 5 + [False]] * 3
    assert torch.equal(blk, torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool())


def tiny_drafter(layers=2, seed=0):
    cfg = DrafterConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, block_size=4, num_target_layers=6,
                        dflash_config={"mask_token_id": MASK, "target_layer_ids": [1, 3]})
    torch.manual_seed(seed)
    model = BlockDrafter(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong layout would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def run_alone(model, feats, embeds, anchor):
    """One block with exactly the context it has at inference: features of positions < anchor."""
    B = embeds.shape[0]
    return model(embeds[None], feats[None, :anchor], torch.arange(anchor, anchor + B)[None],
                 torch.arange(anchor)[None])[0]


def test_batched_blocks_equal_each_block_alone():
    model, B, S = tiny_drafter(), 4, 20
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(S, 64, generator=g) * 3
    anchors = torch.tensor([1, 5, 6, 12, 18])
    embeds = torch.randn(len(anchors), B, 32, generator=g)
    pos = (anchors[:, None] + torch.arange(B)).view(1, -1)
    mask = block_attention_mask(anchors, B, S)[None, None]
    with torch.no_grad():
        batched = model(embeds.view(1, -1, 32), feats[None], pos, torch.arange(S)[None], mask)
        batched = batched.view(len(anchors), B, 32)
        for i, a in enumerate(anchors.tolist()):
            assert torch.allclose(batched[i], run_alone(model, feats, embeds[i], a), atol=1e-5)
        # the mask matters: without it block 0 would see the future
        unmasked = model(embeds.view(1, -1, 32), feats[None], pos, torch.arange(S)[None])
        assert not torch.allclose(unmasked.view(len(anchors), B, 32)[0], batched[0], atol=1e-3)


def test_collate_pads_sequences_and_matches_separate_runs():
    model, B = tiny_drafter(), 4
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(50, 32, generator=g)
    items = []
    for seq_len, anchors in [(12, [3, 7, 10]), (20, [9, 15])]:
        ids = torch.randint(4, 50, (seq_len,), generator=g)
        it = build_blocks(ids, 2, seq_len, torch.tensor(anchors), B, MASK)
        it.update(anchors=torch.tensor(anchors), context_len=seq_len,
                  context_features=torch.randn(seq_len, 64, generator=g))
        items.append(it)
    batch = collate_blocks(items, B, MASK)
    assert batch["attention_mask"].shape == (2, 1, 12, 20 + 12)
    assert batch["validity"][5].sum() == 0  # the padding block: sequence 1 has 2 anchors, sequence 0 has 3
    assert batch["validity"].shape == batch["labels"].shape == (6, 3)
    with torch.no_grad():
        out = model(embed[batch["block_input_ids"]], batch["context_features"],
                    batch["block_position_ids"], batch["context_position_ids"], batch["attention_mask"])
        assert torch.isfinite(out).all()
        out = out.view(2, 3, B, 32)
        for n, it in enumerate(items):
            for i, a in enumerate(it["anchors"].tolist()):
                alone = run_alone(model, it["context_features"], embed[it["block_input_ids"][i]], a)
                assert torch.allclose(out[n, i], alone, atol=1e-5)


def test_a_block_cut_to_a_width_is_exactly_the_narrower_block():
    """The replay lays blocks of several widths side by side in B slots: block i with width w
    attends like a w-token block (its slots past w hidden as keys), the rest as in training."""
    import torch

    from specauf.train.blocks import block_attention_mask

    anchors, B, C = torch.tensor([3, 5]), 4, 6
    cut = block_attention_mask(anchors, B, C, widths=torch.tensor([4, 2]))
    full = block_attention_mask(anchors, B, C)
    assert torch.equal(cut[:, :C], full[:, :C])  # the context part is unchanged
    own = cut[:, C:].view(2, B, 2, B)
    assert own[0, :, 0].all() and not own[0, :, 1].any()  # block 0: all 4 of its keys, none of block 1's
    assert own[1, :, 1, :2].all() and not own[1, :, 1, 2:].any()  # block 1: its first 2 keys only
    narrow = block_attention_mask(anchors[1:], 2, C)
    assert torch.equal(cut[B:B + 2, C + B:C + B + 2], narrow[:, C:])
