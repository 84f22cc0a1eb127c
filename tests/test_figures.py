"""figures.py through `evaluate.py --figures`: valid PNGs of the expected sizes, attention that sums
to 1 over real positions, the drawn assignment is the brute-force maximal matching, byte-identical reruns,
unchanged metrics, one-line errors; every image encoder and both text encoders."""
import copy
import html
import io
import itertools
import json
import math
import os

import pytest
import torch
from PIL import Image

import evaluate
import figures
from config import load_config
from data import build_vocabulary, prepare_data, training_captions
from evaluate import build_eval_context, collapse_diagnostics, encode_split, evaluate_model
from model import build_model, load_checkpoint, normalised_position_encoding
from shapes import shapes_relation
from test_model import tiny_batch, tiny_config
from test_presets import write_bert_tokenizer
from test_train import run_cli as run_script, write_precomputed
import train
from train import make_vocabulary

K = 3
TINY = ["run.num_threads=1", "model.embed_dim=32", f"model.num_embeds={K}", "model.set_head.depth=2",
        "model.text.word_dim=16", "eval.batch_size=8", "data.shapes.num_train=24", "data.shapes.num_val=8",
        "data.shapes.num_test=12", "data.shapes.image_size=32", "data.image_size=32", "model.image.stop_after=layer1",
        "data.shapes.num_shapes=3", "data.shapes.num_colours=2"]   # few kinds: captions that fit other images
PNG_NAMES = ["image_attention.png", "retrieval_t2i.png", "retrieval_i2t.png", "intra_set_cosines.png"]


def with_encoders(shapes_cfg, tmp_path, image, text):
    """(config, vocabulary) of a tiny shapes config with another image encoder (vit | precomputed:
    region features written into tmp_path) and text encoder (gru | bert: a word-level tokenizer
    folder written into tmp_path); the vocabulary is None for BERT."""
    cfg = copy.deepcopy(shapes_cfg)
    if image == "vit":
        cfg["model"]["image"] = {**tiny_config("vit")["model"]["image"], "finetune": True}
    else:
        write_precomputed(tmp_path / "precomp", num_images=6, regions=5, feature_dim=12)
        cfg["data"].update(dataset="precomputed", root=str(tmp_path / "precomp"))
        cfg["model"]["image"].update(type="precomputed", feature_dim=12)
    vocab = build_vocabulary(training_captions(cfg["data"]), 1)
    if text == "bert":
        words = vocab[5:]
        cfg["model"]["text"] = {**tiny_config("cnn", "bert")["model"]["text"], "finetune": True, "global_pool": "cls",
                                "tokenizer": write_bert_tokenizer(str(tmp_path / "tokenizer"), words)}
        cfg["model"]["text"]["bert_config"]["vocab_size"] = len(words) + 5
        vocab = None
    return cfg, vocab


def write_checkpoint(path, cfg, vocab, seed=0):
    """A randomly initialised model of `cfg` saved as train.py saves best.pt."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab)
    torch.save({"model": model.state_dict(), "config": cfg, "vocab": vocab, "epoch": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory):
    """12 test images of 32 px, a random ResNet-grid + BiGRU model with K = 3."""
    folder = tmp_path_factory.mktemp("figures")
    cfg = load_config(None, TINY + [f"data.root={folder / 'shapes'}"])
    prepare_data(cfg["data"])
    return write_checkpoint(folder / "best.pt", cfg, make_vocabulary(cfg)), cfg


def run_evaluate(capsys, *args):
    code = evaluate.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def figure_files(count):
    return sorted(PNG_NAMES + [f"{kind}_{n:02d}.png" for kind in ("caption_attention", "matching")
                               for n in range(count)] + ["index.html"])


# ----------------------------------------------------------------------------- files

def test_every_figure_is_a_png_of_the_expected_size(shapes_checkpoint, tmp_path, capsys):
    checkpoint, cfg = shapes_checkpoint
    code, out, err = run_evaluate(capsys, "--ckpt", checkpoint, "--figures", str(tmp_path / "figs"),
                                  "--figures-count", "3")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "figs")) == figure_files(3)
    sizes = {}
    for name in [n for n in figure_files(3) if n.endswith(".png")]:
        with Image.open(tmp_path / "figs" / name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            image.verify()
            sizes[name] = image.size
    f = figures
    # image attention: the image + K maps per row, one row per sampled image, under the title and legend
    row = f.LINE + f.TILE + 2 * f.LINE + f.GAP
    header = f.HEADER_LINES * f.LINE + f.LEGEND_HEIGHT + f.GAP
    assert sizes["image_attention.png"] == (max(f.MIN_WIDTH, 2 * f.MARGIN + (K + 1) * f.TILE + K * f.GAP),
                                            2 * f.MARGIN + header + 3 * row)
    # text-to-image: 3 query rows (count < RETRIEVAL_QUERIES), TOP framed tiles each, under 3 header lines
    # (title, legend, the whole split's R@1 both ways: the shapes data has a complete relation)
    tile = f.SMALL_TILE + 8
    query_row = max(6 * f.LINE, tile) + 2 * f.LINE + f.GAP
    assert sizes["retrieval_t2i.png"] == (2 * f.MARGIN + 40 * f.CHAR + f.TOP * (tile + f.GAP),
                                          2 * f.MARGIN + 3 * f.LINE + f.GAP + 3 * query_row)
    assert sizes["retrieval_i2t.png"][0] == f.CAPTION_WIDTH
    for n in range(3):
        width, height = sizes[f"caption_attention_{n:02d}.png"]
        # 5 captions, each a title line and K rows of word boxes
        assert width == f.CAPTION_WIDTH and height >= 2 * f.MARGIN + 5 * (f.LINE + K * (f.LINE + 6))
        width, height = sizes[f"matching_{n:02d}.png"]
        assert width == max(f.MIN_WIDTH, 2 * f.MARGIN + 3 * max(K * f.CELL + 4 * f.CHAR + f.GAP, 220) + 2 * f.GAP)
        assert height >= K * f.CELL
    page = (tmp_path / "figs" / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in sizes)


def test_same_checkpoint_twice_gives_byte_identical_files(shapes_checkpoint, tmp_path, capsys):
    checkpoint, _ = shapes_checkpoint
    for folder in ("first", "second"):
        code, _, err = run_evaluate(capsys, "--ckpt", checkpoint, "--figures", str(tmp_path / folder),
                                    "--figures-count", "2")
        assert code == 0, err
    names = figure_files(2)
    assert sorted(os.listdir(tmp_path / "first")) == names
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_another_seed_draws_other_images(shapes_checkpoint):
    assert figures.sample_images(1000, 8, seed=0) == figures.sample_images(1000, 8, seed=0)
    assert figures.sample_images(1000, 8, seed=0) != figures.sample_images(1000, 8, seed=1)
    assert figures.sample_images(5, 8, seed=0) == [0, 1, 2, 3, 4]


def test_figures_leave_the_printed_and_written_metrics_unchanged(shapes_checkpoint, tmp_path, capsys):
    checkpoint, _ = shapes_checkpoint
    code, plain_out, err = run_evaluate(capsys, "--ckpt", checkpoint, "--out", str(tmp_path / "plain.json"))
    assert code == 0, err
    code, figures_out, err = run_evaluate(capsys, "--ckpt", checkpoint, "--out", str(tmp_path / "figs.json"),
                                          "--figures", str(tmp_path / "figs"), "--figures-count", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "plain.json").read_text()) == json.loads((tmp_path / "figs.json").read_text())
    assert plain_out == figures_out


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{ckpt}", "--figures", "{dir}", "--figures-count", "0"], "--figures-count must be 1 or more"),
    (["--ckpt", "{ckpt}", "--figures", "{dir}", "--figures-count", "-3"], "--figures-count must be 1 or more"),
    (["--ckpt", "{ckpt}", "--figures", "{file}/figs"], "cannot be written"),
    (["--ckpt", "{ckpt}", "{ckpt}", "--figures", "{dir}"], "--figures draws one checkpoint"),
], ids=["zero", "negative", "unwritable", "ensemble"])
def test_bad_figure_requests_give_one_line_and_exit_2(shapes_checkpoint, tmp_path, capsys, args, message):
    checkpoint, _ = shapes_checkpoint
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    places = {"{ckpt}": checkpoint, "{dir}": str(tmp_path / "figs"), "{file}": str(blocker)}
    args = [places.get(arg, arg).replace("{file}", str(blocker)) for arg in args]
    code, out, err = run_evaluate(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- training curves

STEP_TERMS = ["lr", "loss", "triplet", "con", "mmd", "div", "isd", "grad_norm"]      # the run below: no GD
COLLAPSE_MEASURES = ["intra_set_cos", "global_cos", "log_set_variance", "log_circular_variance"]


@pytest.fixture(scope="module")
def trained_run(shapes_checkpoint, tmp_path_factory):
    """A 2-epoch train.py run of the tiny config with the GD weight at 0 (so that term is not logged)."""
    _, cfg = shapes_checkpoint
    runs = tmp_path_factory.mktemp("curves")
    assert train.main(TINY + [f"data.root={cfg['data']['root']}", f"run.out_dir={runs}", "run.name=run",
                              "train.epochs=2", "train.batch_size=8", "train.log_every=1", "loss.gd.weight=0"]) == 0
    return runs / "run"


def test_curves_are_one_png_per_quantity_in_the_log_byte_identical_and_in_the_index(trained_run, tmp_path, capsys):
    lines = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    logged = {key for line in lines if "global_step" in line for key in line} - {"epoch", "step", "global_step"}
    assert logged == set(STEP_TERMS)                          # gd has weight 0: not computed, not logged
    expected = sorted([f"curve_step_{key}.png" for key in STEP_TERMS] + ["curve_epoch_val_rsum.png"]
                      + [f"curve_epoch_{key}.png" for key in COLLAPSE_MEASURES])
    for folder in ("first", "second"):
        code, _, err = run_evaluate(capsys, "--ckpt", str(trained_run / "best.pt"), "--figures",
                                    str(tmp_path / folder), "--figures-count", "1")
        assert code == 0, err
        assert sorted(os.listdir(tmp_path / folder)) == sorted(figure_files(1) + expected)
    f = figures
    for name in expected:
        first = (tmp_path / "first" / name).read_bytes()
        assert first == (tmp_path / "second" / name).read_bytes(), name
        with Image.open(tmp_path / "first" / name) as image:
            assert image.format == "PNG" and image.mode == "RGB" and not image.info     # no metadata
            image.verify()
        with Image.open(tmp_path / "first" / name) as image:
            assert image.size == (2 * f.MARGIN + f.CURVE_AXIS + f.CURVE_WIDTH + 2 * f.GAP,
                                  2 * f.MARGIN + 2 * f.LINE + f.GAP + f.CURVE_HEIGHT + 2 * f.LINE + 4)
            assert len(image.getcolors(maxcolors=1 << 16)) > 2                        # something is drawn
    page = (tmp_path / "first" / "index.html").read_text()
    figures_part, curves_part = page.split("Training curves</h2>")
    assert str(trained_run / "log.jsonl") in curves_part
    assert all(f'src="{name}"' in curves_part and name not in figures_part for name in expected)
    assert all(f'src="{name}"' in figures_part for name in figure_files(1) if name.endswith(".png"))


def test_no_curves_section_without_a_log_beside_the_checkpoint(shapes_checkpoint, tmp_path, capsys):
    checkpoint, _ = shapes_checkpoint
    assert not os.path.exists(os.path.join(os.path.dirname(checkpoint), "log.jsonl"))
    code, _, err = run_evaluate(capsys, "--ckpt", checkpoint, "--figures", str(tmp_path), "--figures-count", "1")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == figure_files(1)
    assert "Training curves" not in (tmp_path / "index.html").read_text()


def test_curves_take_a_resumed_runs_later_lines_and_skip_a_half_written_one(tmp_path):
    step = lambda epoch, s, g, loss: {"epoch": epoch, "step": s, "global_step": g, "lr": 0.1, "loss": loss}  # noqa: E731
    collapse = {side: {"intra_set_cos": 0.5, "log_circular_variance": -1.0} for side in ("image", "caption")}
    lines = [step(0, 1, 1, 5.0), step(0, 2, 2, 4.0), {"epoch": 1, "train": {"loss": 4.5}, "val": {"rsum": 100.0},
             "collapse": collapse}, step(1, 1, 3, 9.0),
             step(1, 1, 3, 3.0), step(1, 2, 4, float("nan")),           # resumed at global step 2: logged again
             {"epoch": 2, "train": {"loss": 3.0}, "val": {"rsum": 150.0}, "collapse": collapse}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 2, "st')
    curves = {curve["name"]: curve for curve in figures.training_curves(str(log))}
    assert sorted(curves) == ["curve_epoch_intra_set_cos.png", "curve_epoch_log_circular_variance.png",
                              "curve_epoch_val_rsum.png", "curve_step_loss.png", "curve_step_lr.png"]
    loss = curves["curve_step_loss.png"]
    assert loss["series"]["loss"][:3] == [(1, 5.0), (2, 4.0), (3, 3.0)] and math.isnan(loss["series"]["loss"][3][1])
    assert loss["boundaries"] == [2] and "1 unreadable line(s)" in loss["caption"]
    assert curves["curve_epoch_val_rsum.png"]["series"] == {"rsum": [(1, 100.0), (2, 150.0)]}
    assert set(curves["curve_epoch_intra_set_cos.png"]["series"]) == {"image", "caption"}
    written = []
    figures.write_curves(str(tmp_path), str(log), written)
    assert [name for name, _ in written] == list(curves)
    for name in curves:
        Image.open(tmp_path / name).verify()


def test_a_curve_spans_the_plot_from_its_first_to_its_last_point():
    f = figures
    picture = f.draw_curve("t", "global step", {"loss": [(0, 0.0), (5, 0.5), (10, 1.0)]})
    left, top = f.MARGIN + f.CURVE_AXIS, f.MARGIN + 2 * f.LINE + f.GAP
    right, bottom = left + f.CURVE_WIDTH - 1, top + f.CURVE_HEIGHT - 1      # ticks 0..10 and 0..1: no padding
    assert picture.getpixel((left + 1, bottom - 1)) == f.CURVE_COLOUR        # the first point's marker
    assert picture.getpixel((right - 1, top + 1)) == f.CURVE_COLOUR          # the last point's marker
    assert picture.getpixel(((left + right) // 2, (top + bottom) // 2)) == f.CURVE_COLOUR    # the middle one
    assert picture.getpixel((right - 1, bottom - 1)) != f.CURVE_COLOUR


@pytest.mark.parametrize("low, high, integer", [(0.0, 1.0, False), (3.2, 3.2, False), (-5.4, -5.3, False),
                                                 (1, 3, True), (1, 500, True), (0.0013, 0.002, False)])
def test_curve_ticks_are_round_evenly_spaced_and_cover_the_values(low, high, integer):
    ticks = figures.round_ticks(low, high, integer=integer)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    mantissa = steps.pop() / 10 ** math.floor(math.log10(ticks[1] - ticks[0]))
    assert round(mantissa, 6) in (1, 2, 2.5, 5) and (not integer or all(t == int(t) for t in ticks))


# ----------------------------------------------------------------------------- what is drawn

@pytest.mark.parametrize("image, text", [("cnn", "gru"), ("vit", "bert"), ("precomputed", "gru")])
def test_drawn_attention_sums_to_one_over_real_positions(image, text):
    torch.manual_seed(0)
    model = build_model(tiny_config(image, text), vocab=[f"w{i}" for i in range(32)]).eval()
    batch = tiny_batch(lengths=(5, 3), num_regions=(6, 4))          # padded captions and regions
    (image_out, image_attention), (caption_out, caption_attention) = figures.slot_attention(model, batch, "cpu")
    with torch.no_grad():
        plain_image, plain_caption = model(batch)
    for attention, out, plain in ((image_attention, image_out, plain_image),
                                  (caption_attention, caption_out, plain_caption)):
        assert attention.weights.shape[:2] == (2, 3) and attention.weights.shape[2] == attention.mask.shape[1]
        real = attention.mask[:, None, :].expand_as(attention.weights)
        torch.testing.assert_close(attention.weights.sum(dim=-1), torch.ones(2, 3), atol=1e-6, rtol=0)
        assert (attention.weights[~real] == 0).all() and (attention.weights[real] >= 0).all()
        torch.testing.assert_close(out.sets, plain.sets, atol=0, rtol=0)   # asking for attention changes nothing
    assert not caption_attention.mask.all()                               # the padded case is exercised
    if image == "precomputed":
        assert not image_attention.mask.all()


def test_attention_is_the_last_iteration_of_the_set_head():
    """Recompute the last block's attention by hand from the slots after depth - 1 iterations."""
    torch.manual_seed(1)
    model = build_model(tiny_config("cnn", "gru", share_weights=False), vocab=[f"w{i}" for i in range(32)]).eval()
    batch = tiny_batch(lengths=(5, 3))
    head = model.text_head
    with torch.no_grad():
        local, mask, global_feature = model.text_encoder(batch["tokens"], batch["lengths"])
        _, attention = head(local, mask, global_feature, return_attention=True)
        position = normalised_position_encoding(mask, local.shape[-1])
        x = head.slots.unsqueeze(0).expand(local.shape[0], -1, -1)
        for block in head.blocks[:-1]:
            x = block(x, block.keys_values(local, position), mask)
        last = head.blocks[-1]
        k, _ = last.keys_values(local, position)
        q = last.attention.to_q(last.norm_slots(x)).unflatten(-1, (last.attention.heads, -1)).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-2) * mask[:, None, None, :]
        expected = (weights / weights.sum(dim=-1, keepdim=True)).mean(dim=1)
    torch.testing.assert_close(attention.weights, expected, atol=1e-6, rtol=0)


def brute_force_best_sum(cos):
    k_v, k_t = cos.shape
    return max(sum(cos[r, c].item() for r, c in enumerate(columns))
               for columns in itertools.permutations(range(k_t), k_v))


@pytest.mark.parametrize("k_v, k_t, seed", [(3, 3, 0), (4, 4, 1), (3, 5, 2)])
def test_drawn_assignment_is_the_brute_force_maximal_matching(k_v, k_t, seed):
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(k_v, k_t, generator=generator) * 2 - 1
    chosen = figures.matchings(cos, alpha=16.0)
    assert sorted(set(chosen["max_pair"].tolist())) == sorted(chosen["max_pair"].tolist())    # one-to-one
    assert sum(cos[r, c].item() for r, c in enumerate(chosen["max_pair"].tolist())) == pytest.approx(
        brute_force_best_sum(cos), abs=1e-6)
    assert torch.equal(chosen["smooth_chamfer"], cos.argmax(dim=1))      # the softmax keeps each row's order
    scores = {"max_pair": 0.5, "smooth_chamfer": 0.6, "greedy": 0.4}
    canvas, cells = figures.draw_matching(7, None, "a red star", cos, chosen, scores)
    pixels = canvas.load()
    for method, assignment in chosen.items():
        for (row, column), (x0, y0, x1, y1) in cells[method].items():
            framed = all(pixels[x, y] == figures.MARK for x, y in ((x0 + 1, y0 + 1), (x1 - 1, y1 - 1)))
            assert framed == (assignment[row].item() == column), (method, row, column)


@pytest.mark.parametrize("decimals", [None, 1], ids=["constant", "rounded"])
def test_drawn_ranks_count_ties_against_the_ground_truth_like_the_evaluation(decimals):
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = torch.zeros(12) if decimals is None else torch.rand(12, generator=generator).round(decimals=decimals)
        truth = set(torch.randperm(12, generator=generator)[:1 + trial % 3].tolist())
        order = figures.ranking(scores, truth)
        assert sorted(order) == list(range(12))
        assert all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))
        best = max(scores[t].item() for t in truth)
        others_at_least = sum(1 for i in range(12) if i not in truth and scores[i].item() >= best)
        assert min(order.index(t) for t in truth) + 1 == others_at_least + 1      # the evaluation's rank
    assert figures.ranking(torch.zeros(4), [0]) == [1, 2, 3, 0]    # collapsed: its ground truth is drawn last


def test_histogram_values_are_the_evaluated_intra_set_cosines():
    generator = torch.Generator().manual_seed(0)
    sets = torch.nn.functional.normalize(torch.randn(20, 4, 8, generator=generator), dim=-1)
    global_ = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=-1)
    values = figures.intra_set_cosines(sets)
    assert values.shape == (20 * 6,)
    assert values.mean().item() == pytest.approx(collapse_diagnostics(sets, global_)["intra_set_cos"], abs=1e-6)
    torch.testing.assert_close(values[:6], torch.stack([sets[0, a] @ sets[0, b] for a, b in
                                                        itertools.combinations(range(4), 2)]))


# ----------------------------------------------------------------------------- every fitting item

def drawn_marks(shapes_checkpoint, queries=None):
    """(t2i marks, i2t marks, the two PNGs' bytes, relation, caption_to_image) of the shapes fixture's
    retrieval figures for `queries` (default: every test image), drawn with complete_relation's positives."""
    checkpoint, cfg = shapes_checkpoint
    model, loader, device = build_eval_context(cfg, load_checkpoint(checkpoint), "test")
    image_sets, _, caption_sets, _, caption_to_image = encode_split(model, loader, device)
    positives, _ = evaluate.complete_relation(cfg, "test", loader.dataset)
    queries = list(range(len(loader.dataset))) if queries is None else queries
    method, options = evaluate.similarity_settings(cfg)
    dataset, tokenizer = loader.dataset, loader.dataset.tokenizer
    pictures = {i: figures.display_picture(dataset[i]) for i in queries}
    t2i, t2i_marks = figures.draw_text_to_image(dataset, tokenizer, queries, image_sets, caption_sets,
                                                caption_to_image, method, options, positives, "split line")
    i2t, i2t_marks = figures.draw_image_to_text(dataset, tokenizer, queries, pictures, image_sets, caption_sets,
                                                caption_to_image, method, options, positives, "split line")
    pngs = []
    for picture in (t2i, i2t):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    relation = shapes_relation(os.path.join(cfg["data"]["root"], "dataset_shapes.json"), "test",
                               cfg["data"]["captions_per_image"])
    return (t2i, t2i_marks), (i2t, i2t_marks), pngs, relation, caption_to_image


def test_marked_retrieval_items_are_the_relations_positives_beyond_the_written_ground_truth(shapes_checkpoint):
    (t2i, t2i_marks), (i2t, i2t_marks), pngs, relation, caption_to_image = drawn_marks(shapes_checkpoint)
    fits_caption = relation["caption_images"]                  # the generator's relation, not the figure's input
    own = caption_to_image.tolist()
    assert own == relation["caption_to_image"]
    assert len(t2i_marks) == len(i2t_marks) == 12 * figures.TOP
    for mark in t2i_marks:                                     # the first caption of each query image
        caption = own.index(mark["query"])
        expected = ("own" if mark["item"] == mark["query"] else
                    "fits" if mark["item"] in fits_caption[caption] else "other")
        assert mark["kind"] == expected, mark
        x0, y0, _, _ = mark["box"]
        assert t2i.getpixel((x0 + 1, y0 + 1)) == figures.MARK_COLOURS[expected]      # the frame's colour
    for mark in i2t_marks:
        expected = ("own" if own[mark["item"]] == mark["query"] else
                    "fits" if mark["query"] in fits_caption[mark["item"]] else "other")
        assert mark["kind"] == expected, mark
        x0, y0, x1, y1 = mark["box"]
        assert i2t.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == figures.MARK_COLOURS[expected]    # its swatch
    for marks in (t2i_marks, i2t_marks):                       # both directions show what R@K calls a miss
        assert {"own", "fits", "other"} <= {mark["kind"] for mark in marks}
    assert drawn_marks(shapes_checkpoint)[2] == pngs           # byte-identical when drawn again


def test_the_first_fitting_rank_under_a_query_counts_ties_against_the_fitting_items():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.7])
    assert figures.fit_summary("image", scores, {0, 2, 3}, {3}) == "2 other images fit, first at rank 3"
    tied = torch.tensor([0.5, 0.5, 0.1])        # a fitting item tied with one that does not fit ranks after it
    assert figures.fit_summary("caption", tied, {0, 2}, {2}) == "1 other caption fits, first at rank 2"
    assert figures.fit_summary("image", tied, {2}, {2}) == "no other image fits"


def test_without_a_relation_nothing_is_marked_fits_and_the_page_says_why(shapes_checkpoint, tmp_path):
    checkpoint, cfg = shapes_checkpoint
    model, loader, device = build_eval_context(cfg, load_checkpoint(checkpoint), "test")
    encoded = encode_split(model, loader, device)
    results = evaluate_model(model, cfg, loader, device, encoded=encoded)          # no split named: no relation
    assert "complete" not in results
    options = evaluate.similarity_settings(cfg)[1]
    figures.write_figures(str(tmp_path), model, cfg, loader, device, encoded, results, options, count=4)
    for name in ("retrieval_t2i.png", "retrieval_i2t.png"):
        with Image.open(tmp_path / name) as picture:
            assert figures.FITS not in {colour for _, colour in picture.getcolors(maxcolors=1 << 16)}
    notes = [line for line in (tmp_path / "index.html").read_text().splitlines() if 'class="note"' in line]
    assert len(notes) == 1 and "retrieval_t2i.png, retrieval_i2t.png" in notes[0]
    assert "only the written ground truth" in notes[0] and html.escape(results["complete_note"]) in notes[0]


# ----------------------------------------------------------------------------- K = 1

@pytest.fixture(scope="module")
def single_element_runs(shapes_checkpoint, tmp_path_factory):
    """1-epoch train.py runs of the tiny config with one element per set: the single-vector model
    (model.set_head.type=none) and a slot set of one (model.num_embeds=1)."""
    _, cfg = shapes_checkpoint
    runs = tmp_path_factory.mktemp("single")
    settings = {"none": ["model.num_embeds=1", "model.set_head.type=none", "loss.div.weight=0", "loss.gd.weight=0",
                         "loss.isd.weight=0"],
                "k1": ["model.num_embeds=1"]}
    for name, overrides in settings.items():
        assert train.main(TINY + overrides + [f"data.root={cfg['data']['root']}", f"run.out_dir={runs}",
                                              f"run.name={name}", "train.epochs=1", "train.batch_size=8",
                                              "train.log_every=1"]) == 0
    return runs


@pytest.mark.parametrize("run, absent_curves", [
    ("none", ["intra_set_cos", "global_cos", "log_set_variance", "log_circular_variance"]),
    ("k1", ["intra_set_cos", "log_set_variance", "log_circular_variance"]),
], ids=["set_head_none", "num_embeds_1"])
def test_figures_of_one_element_sets_leave_out_what_has_no_meaning_and_say_why(single_element_runs, tmp_path,
                                                                               capsys, run, absent_curves):
    folder = single_element_runs / run
    code, _, err = run_evaluate(capsys, "--ckpt", str(folder / "best.pt"), "--figures", str(tmp_path),
                                "--figures-count", "2")
    assert code == 0, err
    lines = [json.loads(text) for text in (folder / "log.jsonl").read_text().splitlines()]
    logged = {key for line in lines if "global_step" in line for key in line} - {"epoch", "step", "global_step"}
    drawn_curves = ([f"curve_step_{key}.png" for key in logged] + ["curve_epoch_val_rsum.png"]
                    + [f"curve_epoch_{key}.png" for key in COLLAPSE_MEASURES if key not in absent_curves])
    assert sorted(os.listdir(tmp_path)) == sorted(["retrieval_t2i.png", "retrieval_i2t.png", "index.html"]
                                                  + drawn_curves)
    for name in os.listdir(tmp_path):
        if name.endswith(".png"):
            Image.open(tmp_path / name).verify()
    page = (tmp_path / "index.html").read_text()
    notes = {line.split("</b>")[0].split("<b>")[1]: line for line in page.splitlines() if 'class="note"' in line}
    assert sorted(notes) == sorted(["image_attention.png, caption_attention_NN.png", "matching_NN.png",
                                    "intra_set_cosines.png"] + [f"curve_epoch_{key}.png" for key in absent_curves])
    reason = "model.set_head.type=none" if run == "none" else "K = 1: the set head&#x27;s softmax runs over the slots"
    assert reason in notes["image_attention.png, caption_attention_NN.png"]
    assert "K = 1" in notes["matching_NN.png"] and "K = 1" in notes["intra_set_cosines.png"]
    assert all("not drawn: " in line for line in notes.values())
    assert 'src="retrieval_t2i.png"' in page and 'src="retrieval_i2t.png"' in page


def test_at_k_1_the_slot_attention_is_uniform_over_the_real_positions():
    """Why no attention map is drawn at K = 1: the softmax over one slot is 1 at every position."""
    cfg = tiny_config("cnn", "gru")
    cfg["model"]["num_embeds"] = 1
    torch.manual_seed(0)
    model = build_model(cfg, vocab=[f"w{i}" for i in range(32)]).eval()
    batch = tiny_batch(lengths=(5, 3))
    for attention in (part[1] for part in figures.slot_attention(model, batch, "cpu")):
        real = attention.mask.sum(dim=1, keepdim=True).float()                          # (B, 1)
        expected = attention.mask.float() / real                                        # 1 / N_real, 0 at padding
        torch.testing.assert_close(attention.weights[:, 0], expected, atol=1e-6, rtol=0)


def test_a_collapse_measure_logged_as_null_is_a_reason_not_a_curve(tmp_path):
    collapse = {side: {"intra_set_cos": None, "global_cos": 0.5} for side in ("image", "caption")}
    collapse["note"] = "K = 1: intra-set cosine needs two elements"
    lines = [{"epoch": 0, "step": 1, "global_step": 1, "loss": 2.0},
             {"epoch": 1, "val": {"rsum": 10.0}, "collapse": collapse}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = {curve["name"]: curve for curve in figures.training_curves(str(log))}
    assert curves["curve_epoch_intra_set_cos.png"] == {
        "name": "curve_epoch_intra_set_cos.png",
        "absent": "intra_set_cos is null at every epoch of the log (K = 1: intra-set cosine needs two elements)"}
    assert curves["curve_epoch_global_cos.png"]["series"] == {"image": [(1, 0.5)], "caption": [(1, 0.5)]}
    written, notes = [], []
    figures.write_curves(str(tmp_path), str(log), written, notes)
    assert [name for name, _ in notes] == ["curve_epoch_intra_set_cos.png"]
    assert "curve_epoch_intra_set_cos.png" not in os.listdir(tmp_path)


# ----------------------------------------------------------------------------- other encoders

@pytest.mark.parametrize("image, text", [("vit", "bert"), ("precomputed", "gru")])
def test_figures_for_vit_patches_bert_words_and_region_bars(shapes_checkpoint, tmp_path, image, text):
    _, shapes_cfg = shapes_checkpoint
    cfg, vocab = with_encoders(shapes_cfg, tmp_path, image, text)
    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "best.pt", cfg, vocab))
    model, loader, device = build_eval_context(cfg, checkpoint, "test")
    encoded = encode_split(model, loader, device)
    results = evaluate_model(model, cfg, loader, device, encoded=encoded)
    options = evaluate.similarity_settings(cfg)[1]
    written = figures.write_figures(str(tmp_path / "figs"), model, cfg, loader, device, encoded, results, options,
                                    count=2)
    assert sorted(written) == figure_files(2)
    for name in written[:-1]:
        with Image.open(tmp_path / "figs" / name) as picture:
            picture.verify()
    (_, image_attention), (_, caption_attention) = figures.slot_attention(
        model, loader.collate_fn([loader.dataset[i] for i in (0, 1)]), device)
    expected_positions = {"vit": (32 // 8) ** 2, "precomputed": 5}[image]
    assert image_attention.weights.shape == (2, K, expected_positions)
    if text == "bert":      # BERT word pieces with [CLS] / [SEP] are what the caption figure labels
        ids = loader.dataset[0]["captions"][0]
        labels = figures.token_labels(loader.dataset.tokenizer, ids)
        assert labels[0] == "[CLS]" and labels[-1] == "[SEP]" and len(labels) == len(ids) > 3


def test_cost_benchmark_prints_one_row_per_part(shapes_checkpoint):
    checkpoint, _ = shapes_checkpoint
    result = run_script(["benchmarks/figures_cost.py", "--ckpt", checkpoint, "--repeat", "1", "--count", "1", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| part", "| encode the split", "| score + metrics",
                                                     "| figures of 1 image(s)", "| figures of 2 image(s)"]
