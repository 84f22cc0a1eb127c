"""model.py: every encoder combination in a tiny random-init config, the set head, padding invariance."""
import copy
import os

import pytest
import torch

from config import load_config
from model import ModelError, build_model, load_word_vectors, move_to

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "<mask>"] + [f"w{i}" for i in range(27)]
K, D = 3, 32

IMAGE_CONFIGS = {
    "cnn": {"type": "cnn", "arch": "resnet18", "stop_after": "layer2", "weights": None, "finetune": True},
    "vit": {"type": "vit", "vit_config": {"image_size": 32, "patch_size": 8, "num_layers": 1,
                                         "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}},
    "precomputed": {"type": "precomputed", "feature_dim": 24},
}
TEXT_CONFIGS = {
    "gru": {"type": "gru", "word_dim": 16},
    "bert": {"type": "bert", "bert_config": {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 64,
                                             "max_position_embeddings": 64}},
}


def tiny_config(image="cnn", text="gru", **set_head):
    """config.yaml's model section with a tiny encoder pair."""
    defaults = load_config()["model"]
    return {
        "data": {"image_size": 32},
        "model": {"embed_dim": D, "num_embeds": K, "dropout": 0.1,
                  "image": {**defaults["image"], **copy.deepcopy(IMAGE_CONFIGS[image])},
                  "text": {**defaults["text"], **copy.deepcopy(TEXT_CONFIGS[text])},
                  "set_head": {"type": "slots", "depth": 2, "heads": 4, "share_weights": True, **set_head}},
    }


def tiny_batch(lengths=(5, 3), num_regions=(6, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_length = len(lengths), max(lengths)
    tokens = torch.randint(5, 32, (batch_size, max_length), generator=generator)
    lengths = torch.tensor(lengths)
    tokens[torch.arange(max_length)[None, :] >= lengths[:, None]] = 0
    regions = torch.randn(len(num_regions), max(num_regions), 24, generator=generator)
    return {"images": torch.randn(len(num_regions), 3, 32, 32, generator=generator),
            "regions": regions, "region_lengths": torch.tensor(num_regions),
            "tokens": tokens, "lengths": lengths}


@pytest.mark.parametrize("image", sorted(IMAGE_CONFIGS))
@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
def test_every_encoder_combination_gives_unit_norm_sets_and_trains_every_group(image, text):
    torch.manual_seed(0)
    model = build_model(tiny_config(image, text), vocab=VOCAB)
    batch = tiny_batch()
    image_out, text_out = model(batch)
    for out, n in ((image_out, 2), (text_out, 2)):
        assert out.sets.shape == (n, K, D) and out.residuals.shape == (n, K, D)
        assert out.global_.shape == (n, D)
        torch.testing.assert_close(out.sets.norm(dim=-1), torch.ones(n, K))
        torch.testing.assert_close(out.global_.norm(dim=-1), torch.ones(n))
    loss = sum((o.sets.sum() * 0.5 + o.residuals.pow(2).mean() + o.global_.sum()) for o in (image_out, text_out))
    loss = loss + (image_out.sets[:, :, None] * text_out.sets[:, None]).sum()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    groups = model.parameter_groups()
    expected = {"heads", "text_backbone"} | ({"image_backbone"} if image != "precomputed" else set())
    assert {g for g, params in groups.items() if params} == expected
    for name, params in groups.items():
        if params:
            assert sum(p.grad.abs().sum() for p in params) > 0, name


def test_parameter_groups_cover_each_trainable_parameter_once_and_respect_finetune():
    cfg = tiny_config("cnn", "gru")
    cfg["model"]["image"]["finetune"] = False
    model = build_model(cfg, vocab=VOCAB)
    groups = model.parameter_groups()
    assert groups["image_backbone"] == []
    grouped = [id(p) for params in groups.values() for p in params]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(set(grouped)) == len(grouped)


@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
def test_caption_set_does_not_depend_on_padding_or_batch_company(text):
    torch.manual_seed(0)
    model = build_model(tiny_config("precomputed", text), vocab=VOCAB).eval()
    batch = tiny_batch(lengths=(4, 9, 7))
    alone = {"tokens": batch["tokens"][:1, :4], "lengths": batch["lengths"][:1]}
    with torch.no_grad():
        in_batch = model.encode_captions(batch)
        single = model.encode_captions(alone)
    torch.testing.assert_close(in_batch.sets[:1], single.sets, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch.global_[:1], single.global_, atol=1e-5, rtol=0)


def test_region_set_does_not_depend_on_padding_or_batch_company():
    torch.manual_seed(0)
    model = build_model(tiny_config("precomputed", "gru"), vocab=VOCAB).eval()
    batch = tiny_batch(num_regions=(3, 8, 6))
    alone = {"regions": batch["regions"][:1, :3], "region_lengths": batch["region_lengths"][:1]}
    batch["regions"][0, 3:] = 1e3    # garbage in the padding must not matter either
    with torch.no_grad():
        in_batch = model.encode_images(batch)
        single = model.encode_images(alone)
    torch.testing.assert_close(in_batch.sets[:1], single.sets, atol=1e-5, rtol=0)


def test_unshared_set_head_has_one_block_per_iteration():
    shared = build_model(tiny_config(share_weights=True), vocab=VOCAB)
    unshared = build_model(tiny_config(share_weights=False), vocab=VOCAB)
    assert len(shared.text_head.blocks) == 1 and len(unshared.text_head.blocks) == 2
    assert unshared.text_head.slots.shape == (K, D)


def test_different_captions_give_different_sets():
    """The head reads its input: two different captions must not collapse to the same set."""
    torch.manual_seed(0)
    model = build_model(tiny_config("precomputed", "gru"), vocab=VOCAB).eval()
    with torch.no_grad():
        out = model.encode_captions(tiny_batch(lengths=(5, 5)))
    assert (out.sets[0] - out.sets[1]).abs().max() > 1e-3


def test_word_vectors_initialise_known_words_and_reject_wrong_width(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("w3 1 2 3 4\nnotinvocab 9 9 9 9\nw5 -1 0 0.5 2\n")
    vectors, found = load_word_vectors(str(path), VOCAB, 4)
    assert found == 2
    torch.testing.assert_close(vectors[VOCAB.index("w3")], torch.tensor([1.0, 2, 3, 4]))
    assert vectors[VOCAB.index("w4")].abs().sum() == 0
    cfg = tiny_config("precomputed", "gru")
    cfg["model"]["text"].update(word_dim=4, word_vectors=str(path))
    model = build_model(cfg, vocab=VOCAB)
    weight = model.text_encoder.backbone["embedding"].weight
    torch.testing.assert_close(weight[VOCAB.index("w5")].detach(), torch.tensor([-1.0, 0, 0.5, 2]))
    with pytest.raises(ModelError, match="word_dim=3"):
        load_word_vectors(str(path), VOCAB, 3)


def test_local_torchvision_weights_file_is_loaded(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = tiny_config("cnn", "gru")
    cfg["model"]["image"]["weights"] = str(path)
    model = build_model(cfg, vocab=VOCAB)
    torch.testing.assert_close(model.image_encoder.backbone[0].weight, reference.conv1.weight)


@pytest.mark.parametrize("section, key, value, message", [
    ("image", "type", "rnn", "model.image.type"),
    ("image", "arch", "vgg16", "model.image.arch"),
    ("image", "stop_after", "layer9", "model.image.stop_after"),
    ("image", "weights", "/no/such/resnet.pth", "does not exist"),
    ("text", "type", "lstm", "model.text.type"),
])
def test_bad_model_config_names_the_key(section, key, value, message):
    cfg = tiny_config("cnn", "gru")
    cfg["model"][section][key] = value
    with pytest.raises(ModelError, match=message):
        build_model(cfg, vocab=VOCAB)


def test_unreachable_hub_name_fails_fast_with_how_to_fix():
    cfg = tiny_config("cnn", "bert")
    cfg["model"]["text"].update(bert_config=None, bert="no-such-org/no-such-bert-model")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelError, match="set model.text.bert to that folder"):
        build_model(cfg)


def test_missing_bert_folder_is_named(tmp_path):
    cfg = tiny_config("cnn", "bert")
    cfg["model"]["text"].update(bert_config=None, bert=str(tmp_path / "missing_folder"))
    with pytest.raises(ModelError, match="missing_folder"):
        build_model(cfg)


@pytest.mark.parametrize("image", sorted(IMAGE_CONFIGS))
@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
def test_training_forward_and_backward_read_no_value_on_the_host(image, text):
    """On the meta device any .item(), .cpu() or boolean index raises: the encoders never make a GPU
    wait (the GRU packs with the host copy of the lengths that move_to keeps)."""
    model = build_model(tiny_config(image, text), VOCAB).to("meta").train()
    image_set, caption_set = model(move_to(tiny_batch(), "meta"))
    (image_set.sets.sum() + caption_set.sets.sum()).backward()
    assert image_set.sets.shape == (2, K, D) and caption_set.sets.shape == (2, K, D)


def test_gru_packed_with_the_collated_caption_order_matches_unsorted_packing():
    """The GRU packs with caption_order from the collate step (nothing uploaded) and returns its
    outputs in the input order, exactly as torch's own sorting (enforce_sorted=False) does."""
    from data import collate_batch
    torch.manual_seed(0)
    model = build_model(tiny_config("precomputed", "gru"), VOCAB).eval()
    captions = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20, 21], [22]]
    items = [{"regions": torch.randn(3, 24), "index": i, "captions": captions[i:i + 1]} for i in range(5)]
    batch = collate_batch(items, pad_id=0)
    assert batch["caption_order"].tolist() == [1, 3, 0, 2, 4]
    with torch.no_grad():
        ordered = model.text_encoder(batch["tokens"], batch["lengths"], caption_order=batch["caption_order"])
        unsorted = model.text_encoder(batch["tokens"], batch["lengths"])
    for got, expected in zip(ordered, unsorted):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    first_alone = model.text_encoder(batch["tokens"][:1, :3], batch["lengths"][:1])[2]
    torch.testing.assert_close(ordered[2][:1], first_alone, rtol=0, atol=1e-6)      # row 0 is caption 0


def one_training_step(batchnorm, finetune):
    """A tiny CNN model prepared as train.py prepares it in one process (synchronise_batchnorm
    included), after one SGD step: (model, backbone state before, after, its BatchNorm layers)."""
    from distributed import DistributedContext
    from train import synchronise_batchnorm
    cfg = tiny_config("cnn", "gru")
    cfg["model"]["image"].update(batchnorm=batchnorm, finetune=finetune)
    torch.manual_seed(0)
    model = synchronise_batchnorm(build_model(cfg, VOCAB), cfg, DistributedContext(0, 1, torch.device("cpu"))).train()
    layers = [m for m in model.image_encoder.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = copy.deepcopy(model.image_encoder.backbone.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image_set, caption_set = model(tiny_batch())
    (image_set.sets.sum() - caption_set.sets.sum()).backward()
    optimizer.step()
    return model, before, model.image_encoder.backbone.state_dict(), layers


@pytest.mark.parametrize("batchnorm, finetune, updated", [("batch", True, True), ("frozen", True, False),
                                                          ("batch", False, False), ("sync", True, True)])
def test_batchnorm_running_statistics_change_only_in_batch_mode_with_a_trained_backbone(batchnorm, finetune, updated):
    """frozen, or finetune: false, keeps every BatchNorm layer on its running statistics through a
    training step; frozen still trains the affine weights."""
    model, before, after, layers = one_training_step(batchnorm, finetune)
    statistics = [key for key in before if key.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * len(layers) > 0
    assert all(layer.training == updated for layer in layers)
    assert all(not torch.equal(before[key], after[key]) for key in statistics) == updated
    assert all(torch.equal(before[key], after[key]) for key in statistics) == (not updated)
    affine_gradients = [layer.weight.grad for layer in layers]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in affine_gradients) == finetune
    assert all(grad is None for grad in affine_gradients) == (not finetune)


def test_sync_batchnorm_in_one_process_stays_plain_batchnorm_and_trains_like_batch():
    """train.synchronise_batchnorm leaves one process's model alone: no SyncBatchNorm (which cannot
    run on the CPU), and the step gives bit-identical weights and statistics to batch mode."""
    model, _, synced, layers = one_training_step("sync", True)
    assert layers and all(type(layer) is torch.nn.BatchNorm2d for layer in layers)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    _, _, batch, _ = one_training_step("batch", True)
    assert synced.keys() == batch.keys()
    assert all(torch.equal(synced[key], batch[key]) for key in synced)


def test_unknown_batchnorm_mode_is_named():
    cfg = tiny_config("cnn", "gru")
    cfg["model"]["image"]["batchnorm"] = "group"
    with pytest.raises(ModelError, match="model.image.batchnorm='group'.*batch, frozen, sync"):
        build_model(cfg, VOCAB)
