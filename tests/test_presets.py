"""configs/*.yaml: every paper preset loads, builds its model and runs one training step on tiny fake
data of the right shapes (random weights, nothing downloaded)."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

import config
import train
from model import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072}
WORDS = ["a", "man", "dog", "red", "car", "on", "the", "street", "with", "two", "people", "sitting"]


def write_bert_tokenizer(folder, words=WORDS):
    """A minimal BERT WordPiece tokenizer folder (what a local bert-base-uncased copy also holds)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, handle)
    return folder


def write_karpathy(root, name, image_size, num_images=4):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images = []
    for i, split in enumerate(["train", "train", "val", "test"][:num_images]):
        filename = f"im{i}.jpg"
        pixels = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", filename))
        sentences = [{"raw": " ".join(rng.choice(WORDS, 6))} for _ in range(5)]
        images.append({"filename": filename, "filepath": "", "split": split, "sentences": sentences})
    with open(os.path.join(root, f"dataset_{name}.json"), "w") as handle:
        json.dump({"images": images}, handle)


def write_precomputed(root, splits):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for split in splits:
        np.save(os.path.join(root, f"{split}_ims.npy"), rng.standard_normal((2, 36, 2048)).astype(np.float32))
        with open(os.path.join(root, f"{split}_caps.txt"), "w") as handle:
            handle.write("\n".join(" ".join(rng.choice(WORDS, 7)) for _ in range(10)) + "\n")


def test_every_paper_row_has_a_preset():
    names = {os.path.basename(p) for p in PRESETS}
    for dataset in ("coco", "f30k"):
        assert {f"{dataset}_resnet152_bigru.yaml", f"{dataset}_butd_bert.yaml"} <= names
    assert "coco_vit_bert.yaml" in names


@pytest.mark.parametrize("preset", [p for p in PRESETS if "shapes" not in os.path.basename(p)],
                         ids=os.path.basename)
def test_paper_presets_keep_the_spec_loss_weights_not_the_ones_tuned_on_shapes(preset):
    loss = config.load_config(preset)["loss"]
    assert loss["con"]["weight"] == 0
    assert loss["gd"] == {"weight": 0.01, "scale": 10.0, "delta": 0.5}
    assert loss["isd"] == {"weight": 0.01, "scale": 10.0, "delta": 0.3}
    assert loss["mmd"]["weight"] == loss["div"]["weight"] == 0.01


@pytest.mark.parametrize("preset", [p for p in PRESETS if "shapes" not in os.path.basename(p)],
                         ids=lambda p: os.path.basename(p))
def test_preset_builds_and_trains_one_step_on_fake_data_of_the_right_shapes(preset, tmp_path):
    cfg = config.load_config(preset)
    assert cfg["train"]["batch_size"] == 200 and cfg["train"]["epochs"] == 80
    assert cfg["model"]["embed_dim"] == 1024 and cfg["model"]["num_embeds"] == 4
    overrides = [f"run.out_dir={tmp_path / 'runs'}", "run.num_threads=2", "data.num_workers=0",
                 "train.batch_size=2", "train.stop_after_steps=1", "eval.batch_size=2",
                 f"data.root={tmp_path / 'data'}"]
    if cfg["data"]["dataset"] == "precomputed":
        write_precomputed(tmp_path / "data", ["train", "dev", "test", "testall"])
    else:
        name = {"coco": "coco", "f30k": "flickr30k"}[cfg["data"]["dataset"]]
        write_karpathy(tmp_path / "data", name, cfg["data"]["image_size"])
    if cfg["model"]["image"]["type"] != "precomputed":
        overrides.append("model.image.weights=null")        # the preset names ImageNet weights
    # A Flickr30K preset has the model of its COCO twin, whose test builds it at full size: here it
    # is cut down (ResNet-18 on 64 px images, BERT to one small layer) so that the test is about the
    # preset's data path and training settings and saves building the same large model twice.
    full_size = cfg["data"]["dataset"] == "coco"
    if cfg["model"]["text"]["type"] == "bert":
        bert = BERT_BASE if full_size else {**BERT_BASE, "hidden_size": 32, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "intermediate_size": 64}
        overrides += ["model.text.bert=null", f"model.text.bert_config={json.dumps(bert)}",
                      f"model.text.tokenizer={write_bert_tokenizer(str(tmp_path / 'tokenizer'))}"]
    if cfg["model"]["image"]["type"] == "cnn" and not full_size:
        overrides += ["model.image.arch=resnet18", "data.image_size=64"]
    assert train.main(["--config", preset, *overrides]) == 0
    checkpoint = load_checkpoint(str(tmp_path / "runs" / cfg["run"]["name"] / "last.pt"))
    assert checkpoint["state"]["global_step"] == 1
    image_width = {"cnn": 2048 if full_size else 512, "precomputed": 2048, "vit": 768}[cfg["model"]["image"]["type"]]
    text_width = {"gru": 300, "bert": 768 if full_size else 32}[cfg["model"]["text"]["type"]]
    assert checkpoint["model"]["image_encoder.projection.fc.weight"].shape == (1024, image_width)
    assert checkpoint["model"]["text_encoder.projection.fc.weight"].shape == (1024, text_width)


def test_crowded_shapes_preset_generates_4_to_6_objects_captioned_1_or_2_at_a_time_in_its_own_folder(tmp_path):
    from data import shapes_params
    from shapes import generate_shapes
    preset = os.path.join(REPO, "configs", "shapes_crowded.yaml")
    cfg = config.load_config(preset)
    default = config.load_config()
    assert cfg["data"]["root"] != default["data"]["root"] and cfg["run"]["name"] != default["run"]["name"]
    assert {k: v for k, v in cfg.items() if k not in ("data", "run")} == \
        {k: v for k, v in default.items() if k not in ("data", "run")}        # model, loss, training: config.yaml's
    params = {**shapes_params(cfg["data"]), "num_train": 40, "num_val": 10, "num_test": 10, "image_size": 16}
    content = json.loads(generate_shapes(tmp_path / "crowded", **params).read_text())
    assert {len(image["objects"]) for image in content["images"]} == {4, 5, 6}
    named = [len(sentence["objects"]) for image in content["images"] for sentence in image["sentences"]]
    assert set(named) == {1, 2}
