"""Figures of the sets a checkpoint makes, for `evaluate.py --figures DIR` (METHOD.md §5).

    python evaluate.py --ckpt runs/NAME/best.pt --figures DIR [--figures-count N]

For a seeded sample of N split images (`run.seed`; default N = 8) `write_figures` draws:

- image_attention.png      each image beside one map per set element: where that element attends
                           (ResNet grid cells, ViT patches, or one bar per precomputed region),
                           with the element's cosine to the global feature;
- caption_attention_NN.png the image's captions, words shaded by each caption element's attention;
- matching_NN.png          the image and its first caption: their K x K cosine matrix with the exact
                           max-pair assignment, the smooth-Chamfer-favoured and the greedy matching,
                           and the three scores;
- retrieval_t2i.png / retrieval_i2t.png   top-5 images for some captions and top-5 captions for some
                           images, ground truth marked, scored exactly by the evaluation similarity;
                           where the split's complete relation is known (the built-in data,
                           evaluate.complete_relation), the items that fit the query without being
                           its written ground truth (what R@K counts a miss) marked apart (FITS);
- intra_set_cosines.png    histograms of the intra-set cosines of the whole split, with the collapse
                           numbers of the evaluation in the title;
- curve_*.png              when the run's log.jsonl lies beside the checkpoint (train.py writes it
                           there): one line chart per quantity it holds: every loss term, the
                           gradient norm and the learning rate per logged step, validation RSUM and
                           each collapse measure (image and caption sets) per epoch;
- index.html               every PNG with a short caption, the curves in their own section, and one
                           line for each figure not drawn (and for unmarked retrieval figures) saying why.

A figure without meaning for the model is not drawn: the attention figures with
model.set_head.type=none (nothing attends) or at K = 1 (the slot softmax then gives one slot weight
1 everywhere: a uniform map); the matchings and the intra-set histogram at K = 1 (one pair, no pair
within a set); a collapse curve the log holds only as null (evaluate.collapse_note).

Attention comes from the set head's documented `return_attention=True` (the last iteration's
weights, mean over heads, summing to 1 over the real positions). Drawing uses Pillow and torch
only, with Pillow's built-in bitmap font and no metadata, so the same checkpoint and seed give
byte-identical files. Imported by evaluate.py, and by search.py for the look of its --html pages.
"""
import functools
import html
import json
import math
import os
import tempfile

import torch
from PIL import Image, ImageDraw, ImageFont

from data import IMAGENET_MEAN, IMAGENET_STD
from model import move_to
from similarity import METHOD_OPTIONS, greedy_assignment, max_pair_assignment, pairwise_similarity, score_matrix

# Layout in pixels. The bitmap font is 6 px per character and 11 px high.
MARGIN, GAP, LINE, CHAR = 10, 8, 12, 6
TILE = 128                 # image and attention-map tiles
SMALL_TILE = 96            # retrieved images
MIN_WIDTH = 480            # every figure is at least this wide, so its title fits
HEADER_LINES = 3           # title lines of the image-attention figure (the legend bar follows)
LEGEND_HEIGHT = 10
CELL = 40                  # one cosine-matrix cell
CAPTION_WIDTH = 960        # caption-attention figure
RETRIEVAL_QUERIES = 4      # queries shown in each retrieval figure
TOP = 5                    # retrieved items per query

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (205, 205, 205)
MARK = (0, 170, 0)         # ground truth and chosen matching cells
FITS = (160, 40, 200)      # fits the query (complete relation) but is not its written ground truth
MARK_COLOURS = {"own": MARK, "fits": FITS, "other": LIGHT}     # retrieval frames and swatches by kind
TEXT_COLOURS = {"own": MARK, "fits": FITS, "other": BLACK}     # retrieval labels by kind
IMAGE_COLOUR, CAPTION_COLOUR = (50, 90, 200), (230, 120, 20)
# "inferno"-like ramp for attention maps (dark = 0, yellow = the map's peak)
HEAT_RAMP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))
WORD_RAMP = ((255, 255, 255), (255, 200, 90), (230, 70, 20))      # word shading (white = 0)
COSINE_RAMP = ((59, 76, 192), (245, 245, 245), (180, 4, 38))        # cosine -1 .. 0 .. 1
PAGE_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:auto}"      # index.html (and search.py pages)
              "figure{margin:24px 0}img{max-width:100%;image-rendering:pixelated}")


class FiguresError(Exception):
    """A --figures argument the user has to fix (unwritable folder, count <= 0)."""


def check_figures_request(out_dir, count):
    """Create `out_dir` and make sure a file can be written there, before any evaluation runs."""
    if count is None or count <= 0:
        raise FiguresError(f"--figures-count must be 1 or more, got {count}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise FiguresError(f"--figures {out_dir!r} cannot be written ({error.strerror or error})") from None


def write_figures(out_dir, model, cfg, loader, device, encoded, results, options, count=8, title="", log=None,
                  positives=None):
    """Draw every figure of the module docstring into out_dir; return the written file names.

    loader: the evaluation loader (unshuffled, so image i of `encoded` is dataset item i);
    encoded: evaluate.encode_split's (image_sets, image_globals, caption_sets, caption_globals,
    caption_to_image) for that loader; results: evaluate_model's results (method, collapse, and
    'complete' or 'complete_note'); options: the options of results["method"] the evaluation scored
    with; log: the run's log.jsonl, whose curves are drawn when the file exists; positives:
    evaluate.complete_relation's (N_img, N_cap) bool matrix of every fitting pair, or None (then the
    retrieval figures mark the written ground truth only, and index.html says why).
    A figure without meaning for the model (attention without a set head or at K = 1, a matching
    or intra-set cosines at K = 1) is not drawn; index.html says why in one line.
    """
    check_figures_request(out_dir, count)
    dataset = loader.dataset
    image_sets, _, caption_sets, _, caption_to_image = (
        (tensor.float() if tensor.is_floating_point() else tensor).cpu() for tensor in encoded)
    if len(dataset) != image_sets.shape[0]:
        raise FiguresError(f"the loader has {len(dataset)} images but {image_sets.shape[0]} were encoded")
    if positives is not None and tuple(positives.shape) != (image_sets.shape[0], caption_sets.shape[0]):
        raise FiguresError(f"the relation has shape {tuple(positives.shape)} but {image_sets.shape[0]} images "
                           f"and {caption_sets.shape[0]} captions were encoded")
    indices = sample_images(len(dataset), count, cfg["run"]["seed"])
    pictures = {i: display_picture(dataset[i]) for i in indices}
    num_elements = image_sets.shape[1]
    written, notes = [], []
    attention_absent = attention_absence(cfg["model"]["set_head"]["type"] == "none", num_elements)
    if attention_absent:
        notes.append(("image_attention.png, caption_attention_NN.png", f"not drawn: {attention_absent}"))
    else:
        draw_attention_figures(out_dir, model, loader, device, indices, pictures, cfg["model"]["image"]["type"],
                               written)
    if num_elements == 1:
        notes.append(("matching_NN.png", "not drawn: K = 1: one image element and one caption element, so every "
                                         "matching is that pair and every similarity is their cosine"))
    else:
        draw_matching_figures(out_dir, cfg, dataset, indices, pictures, image_sets, caption_sets, caption_to_image,
                              written)
    draw_retrieval_figures(out_dir, dataset, indices[:RETRIEVAL_QUERIES], pictures, image_sets, caption_sets,
                           caption_to_image, results, options, positives, written)
    if positives is None:
        notes.append(("retrieval_t2i.png, retrieval_i2t.png", "no \"fits, not its own\" marking, only the written "
                      "ground truth: " + results.get("complete_note", "no relation was given to write_figures")))
    if num_elements == 1:
        notes.append(("intra_set_cosines.png", "not drawn: K = 1: a set of one element has no pair of "
                                               "elements to take a cosine of"))
    else:
        save_png(draw_intra_set_histogram(intra_set_cosines(image_sets), intra_set_cosines(caption_sets),
                                          results["collapse"], num_elements),
                 out_dir, "intra_set_cosines.png", written,
                 f"Intra-set cosines of all {image_sets.shape[0]} images and {caption_sets.shape[0]} captions: "
                 "near 1 = collapsed sets; the title holds the evaluation's collapse diagnostics.")
    curves, curve_notes = [], []
    if log is not None and os.path.isfile(log):
        write_curves(out_dir, log, curves, curve_notes)
    write_index(out_dir, written, title, curves, log, notes, curve_notes)
    return [name for name, _ in written + curves] + ["index.html"]


def attention_absence(single_vector, num_elements):
    """Why the attention figures mean nothing for this model, or None when they are drawn."""
    if single_vector:
        return ("model.set_head.type=none has no set head: nothing attends, every item is its global "
                "feature alone")
    if num_elements == 1:
        return ("K = 1: the set head's softmax runs over the slots, so the one slot takes weight 1 at every "
                "position and every map is uniform (1/N)")
    return None


def draw_attention_figures(out_dir, model, loader, device, indices, pictures, image_type, written):
    """image_attention.png and caption_attention_NN.png of the sampled images `indices`."""
    dataset, tokenizer = loader.dataset, loader.dataset.tokenizer
    batch = loader.collate_fn([dataset[i] for i in indices])
    (image_out, image_attention), (caption_out, caption_attention) = slot_attention(model, batch, device)
    captions_per_image = batch["tokens"].shape[0] // len(indices)
    rows = []
    for row, index in enumerate(indices):
        real = image_attention.mask[row]
        rows.append(dict(index=index, picture=pictures[index], weights=image_attention.weights[row][:, real],
                         global_cos=(image_out.sets[row] @ image_out.global_[row]).tolist()))
    save_png(draw_image_attention(rows, image_type), out_dir, "image_attention.png", written,
             f"Image set elements: where each of the K elements attends (last set-head iteration, mean over "
             f"heads), for {len(indices)} seeded {image_type} images; cosine of each element to the global feature.")
    for row, index in enumerate(indices):
        captions = []
        for j in range(row * captions_per_image, (row + 1) * captions_per_image):
            length = int(batch["lengths"][j])
            ids = batch["tokens"][j, :length].tolist()
            captions.append(dict(text=tokenizer.decode(ids), tokens=token_labels(tokenizer, ids),
                                 weights=caption_attention.weights[j][:, :length],
                                 global_cos=(caption_out.sets[j] @ caption_out.global_[j]).tolist()))
        save_png(draw_caption_attention(index, pictures[index], captions), out_dir,
                 f"caption_attention_{row:02d}.png", written,
                 f"Image #{index}'s captions: each caption set element's attention over the words, one row "
                 "per element (darker = more weight).")


def draw_matching_figures(out_dir, cfg, dataset, indices, pictures, image_sets, caption_sets, caption_to_image,
                          written):
    """matching_NN.png of each sampled image with its first caption."""
    for row, index in enumerate(indices):
        caption = first_caption(caption_to_image, index)
        cos = image_sets[index] @ caption_sets[caption].T                                 # (K_v, K_t)
        save_png(draw_matching(index, pictures[index], dataset_caption_text(dataset, dataset.tokenizer, index),
                               cos, matchings(cos, smooth_chamfer_alpha(cfg)),
                               matching_scores(image_sets[index], caption_sets[caption], cfg))[0],
                 out_dir, f"matching_{row:02d}.png", written,
                 f"Image #{index} and its first caption: K x K cosine matrix, the exact max-pair assignment, "
                 "the matching smooth-Chamfer's soft weights favour (not one-to-one) and the greedy one, "
                 "with the three scores.")


def draw_retrieval_figures(out_dir, dataset, queries, pictures, image_sets, caption_sets, caption_to_image, results,
                           options, positives, written):
    """retrieval_t2i.png and retrieval_i2t.png for the query images; with `positives`, the items
    that fit a query beyond its written ground truth marked apart, and the whole split's R@1 both ways."""
    method, tokenizer = results["method"], dataset.tokenizer
    marked = positives is not None
    fits = " Purple frame = an image the caption fits that is not its own: R@K counts it a miss." if marked else ""
    save_png(draw_text_to_image(dataset, tokenizer, queries, image_sets, caption_sets, caption_to_image, method,
                                options, positives, split_r1_line(results, "t2i") if marked else None)[0],
             out_dir, "retrieval_t2i.png", written,
             f"Text-to-image: the top {TOP} images for the first caption of {len(queries)} images "
             f"({method}, exact scores); green frame = the caption's image.{fits}")
    fits = (" Purple [fits] = a caption that fits the image but was written for another: R@K counts it a miss."
            if marked else "")
    save_png(draw_image_to_text(dataset, tokenizer, queries, pictures, image_sets, caption_sets, caption_to_image,
                                method, options, positives, split_r1_line(results, "i2t") if marked else None)[0],
             out_dir, "retrieval_i2t.png", written,
             f"Image-to-text: the top {TOP} captions for {len(queries)} images ({method}, exact scores); "
             f"green [GT] = a ground-truth caption.{fits}")


def split_r1_line(results, direction):
    """The whole split's R@1 against the written ground truth and against every fitting item, or None."""
    if "complete" not in results or "all" not in results:
        return None
    written_r1, complete_r1 = results["all"][f"{direction}_r1"], results["complete"][direction]["r1"]
    target = "image" if direction == "t2i" else "caption"
    return (f"Whole split: R@1 {written_r1:.1f} counting only the written ground truth, {complete_r1:.1f} "
            f"counting every {target} that fits (mAP@R {results['complete'][direction]['map_at_r']:.1f}).")


def sample_images(num_images, count, seed):
    """min(count, num_images) distinct image indices drawn with `seed`, in increasing order."""
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_images, generator=generator)[:count].tolist())


@torch.no_grad()
def slot_attention(model, batch, device):
    """Run the model on a collated batch with return_attention=True, in eval mode, on the CPU side.

    Returns ((image SetEmbedding, image SetAttention), (caption SetEmbedding, caption SetAttention)),
    float32 on the CPU. Each SetAttention.weights row sums to 1 over its mask's real positions.
    """
    model.eval()
    outputs = model(move_to(batch, device), return_attention=True)
    as_cpu = lambda t: (t.float() if t.is_floating_point() else t).cpu()  # noqa: E731 - masks stay bool
    return tuple(tuple(type(part)(*(as_cpu(t) for t in part)) for part in pair) for pair in outputs)


def matchings(cos, alpha):
    """The three matchings drawn for one K_v x K_t cosine block (K_v <= K_t), each (K_v,) long:

    max_pair:       similarity.max_pair_assignment (exact maximal one-to-one matching);
    smooth_chamfer: for each row, the column with the largest soft weight softmax(alpha * C) of its
                    row: what smooth-Chamfer's image->caption term favours; NOT one-to-one;
    greedy:         similarity.greedy_assignment.
    """
    return {"max_pair": max_pair_assignment(cos),
            "smooth_chamfer": (alpha * cos).softmax(dim=1).argmax(dim=1),
            "greedy": greedy_assignment(cos)}


def matching_scores(image_set, caption_set, cfg):
    """{max_pair, smooth_chamfer, greedy: score} of one image set (K_v, D) and caption set (K_t, D)."""
    return {method: pairwise_similarity(image_set[None], caption_set[None], method,
                                        **method_options(cfg, method)).item()
            for method in ("max_pair", "smooth_chamfer", "greedy")}


def intra_set_cosines(sets):
    """Cosines of every unordered pair of elements within each set: (N, K, D) -> (N * K(K-1)/2,).

    Their mean is evaluate.collapse_diagnostics' intra_set_cos.
    """
    rows, cols = torch.triu_indices(sets.shape[1], sets.shape[1], offset=1)
    return (sets @ sets.transpose(1, 2))[:, rows, cols].flatten()


def method_options(cfg, method):
    """A similarity's options as training used them: the config's for the trained method, else defaults."""
    options = (cfg["loss"]["similarity_options"] or {}) if method == cfg["loss"]["similarity"] else {}
    return {**METHOD_OPTIONS[method], **{k: v for k, v in options.items() if v is not None}}


def smooth_chamfer_alpha(cfg):
    return float(method_options(cfg, "smooth_chamfer")["alpha"])


def display_picture(item):
    """The image a dataset item shows the model, as a PIL RGB image; None for region features."""
    if "image" not in item:
        return None
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = ((item["image"] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)       # (3, S, S)
    height, width = pixels.shape[1:]
    return Image.frombytes("RGB", (width, height), pixels.permute(1, 2, 0).contiguous().numpy().tobytes())


def token_labels(tokenizer, ids):
    """One printable label per token id (the attention runs over every token, specials included)."""
    if hasattr(tokenizer, "words"):
        return [tokenizer.words[i] for i in ids]
    return tokenizer.tokenizer.convert_ids_to_tokens(ids)


def dataset_caption_text(dataset, tokenizer, index, caption=0):
    """The text of caption `caption` of image `index` as the model saw it (decoded tokens)."""
    return tokenizer.decode(dataset[index]["captions"][caption])


def write_index(out_dir, written, title, curves=(), log=None, notes=(), curve_notes=()):
    """DIR/index.html: one line per note (subject, text): what is not drawn or not marked and why;
    then every figure with its caption, in the order written; then, when there are any, the
    training curves under their own heading, with their own notes."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>MaxMatch figures</title>",
             f"<style>{PAGE_STYLE}</style></head><body>",
             f"<h1>MaxMatch figures</h1><p>{html.escape(title)}</p>"]
    sections = [(None, notes, written)]
    if curves or curve_notes:
        sections.append((f"<h2 id=\"training-curves\">Training curves</h2><p>From {html.escape(str(log))}.</p>",
                         curve_notes, curves))
    for heading, section_notes, figures in sections:
        if heading:
            parts.append(heading)
        for subject, text in section_notes:
            parts.append(f"<p class=\"note\"><b>{html.escape(subject)}</b>: {html.escape(text)}</p>")
        for name, caption in figures:
            parts.append(f"<figure><img src=\"{html.escape(name)}\" alt=\"{html.escape(name)}\">"
                         f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts) + "\n")


def save_png(image, out_dir, name, written, caption):
    """PNG without metadata (no time stamp), so equal pictures give equal bytes."""
    try:
        image.save(os.path.join(out_dir, name), format="PNG")
    except OSError as error:
        raise FiguresError(f"cannot write {os.path.join(out_dir, name)!r} ({error.strerror or error})") from None
    written.append((name, caption))


# ----------------------------------------------------------------------------- the figures

def draw_image_attention(rows, image_type):
    """rows: dicts with index, picture (PIL or None), weights (K, N_real), global_cos (K,)."""
    num_elements = rows[0]["weights"].shape[0]
    width = image_attention_width(num_elements)
    row_height = LINE + TILE + 2 * LINE + GAP
    header = HEADER_LINES * LINE + LEGEND_HEIGHT + GAP
    canvas = Image.new("RGB", (width, 2 * MARGIN + header + len(rows) * row_height), WHITE)
    draw = ImageDraw.Draw(canvas)
    kind = {"cnn": "ResNet grid cells", "vit": "ViT patches", "precomputed": "regions (one bar each)"}
    num_positions = rows[0]["weights"].shape[1]
    lines = ["Image set elements: where each one attends",
             f"over {kind.get(image_type, 'local features')} (last set-head iteration, mean over heads).",
             f"Each map is scaled to its own peak; weights sum to 1 (uniform: 1/{num_positions} = "
             f"{1 / num_positions:.3f})."]
    for n, text in enumerate(lines):
        put_text(draw, (MARGIN, MARGIN + n * LINE), text)
    legend_y = MARGIN + HEADER_LINES * LINE
    put_text(draw, (MARGIN, legend_y - 1), "0")
    draw_ramp(draw, (MARGIN + 2 * CHAR, legend_y, MARGIN + 2 * CHAR + 120, legend_y + LEGEND_HEIGHT), HEAT_RAMP)
    put_text(draw, (MARGIN + 3 * CHAR + 120, legend_y - 1), "peak of the map")
    for r, row in enumerate(rows):
        top = MARGIN + header + r * row_height
        put_text(draw, (MARGIN, top), f"image #{row['index']}")
        tile_top = top + LINE
        picture = row["picture"]
        if picture is not None:
            canvas.paste(fit_tile(picture, TILE), (MARGIN, tile_top))
        else:
            draw.rectangle((MARGIN, tile_top, MARGIN + TILE - 1, tile_top + TILE - 1), outline=GREY)
            put_text(draw, (MARGIN + 4, tile_top + TILE // 2 - LINE), "region features")
            put_text(draw, (MARGIN + 4, tile_top + TILE // 2), f"{row['weights'].shape[1]} regions")
        for k in range(num_elements):
            left = MARGIN + (k + 1) * (TILE + GAP)
            weights = row["weights"][k]
            grid = square_grid(weights.shape[0]) if image_type != "precomputed" else None
            if grid is not None:
                canvas.paste(heat_tile(weights.view(grid, grid), picture), (left, tile_top))
            else:
                draw_bars(draw, (left, tile_top, left + TILE, tile_top + TILE), weights)
            put_text(draw, (left, tile_top + TILE + 2), f"element {k + 1}  peak {weights.max().item():.3f}")
            put_text(draw, (left, tile_top + TILE + 2 + LINE), f"cos to global {row['global_cos'][k]:+.2f}")
    return canvas


def image_attention_width(num_elements):
    return max(MIN_WIDTH, 2 * MARGIN + (num_elements + 1) * TILE + num_elements * GAP)


def draw_caption_attention(index, picture, captions):
    """captions: dicts with text, tokens (labels), weights (K, L), global_cos (K,)."""
    label_width = 28 * CHAR + GAP
    words_left = MARGIN + label_width
    box_height = LINE + 4
    layouts = [word_layout(c["tokens"], CAPTION_WIDTH - MARGIN - words_left) for c in captions]
    num_elements = captions[0]["weights"].shape[0]
    thumb = TILE // 2 if picture is not None else 0
    header = max(thumb, 3 * LINE) + GAP
    text_chars = (CAPTION_WIDTH - 2 * MARGIN - thumb - GAP) // CHAR
    blocks = []
    for caption, (positions, lines) in zip(captions, layouts):
        title = wrap(f"caption: {caption['text']}", text_chars)
        blocks.append(len(title) * LINE + num_elements * lines * (box_height + 2) + GAP)
    canvas = Image.new("RGB", (CAPTION_WIDTH, 2 * MARGIN + header + sum(blocks)), WHITE)
    draw = ImageDraw.Draw(canvas)
    if picture is not None:
        canvas.paste(fit_tile(picture, thumb), (MARGIN, MARGIN))
    text_left = MARGIN + thumb + (GAP if thumb else 0)
    put_text(draw, (text_left, MARGIN), f"Captions of image #{index}: where each caption set element attends.")
    put_text(draw, (text_left, MARGIN + LINE), "One row per element; a word's shade is its weight / the row's "
                                               "peak (a row sums to 1);")
    put_text(draw, (text_left + 126 + 24 * CHAR, MARGIN + 2 * LINE),
             "cos(g): the element's cosine to the global feature.")
    draw_ramp(draw, (text_left, MARGIN + 2 * LINE + 1, text_left + 120, MARGIN + 2 * LINE + 10), WORD_RAMP)
    put_text(draw, (text_left + 126, MARGIN + 2 * LINE), "0 .. peak of the row")
    top = MARGIN + header
    for caption, (positions, lines), block in zip(captions, layouts, blocks):
        title = wrap(f"caption: {caption['text']}", text_chars)
        for n, text in enumerate(title):
            put_text(draw, (MARGIN, top + n * LINE), text)
        y = top + len(title) * LINE
        for k in range(num_elements):
            weights = caption["weights"][k]
            peak = weights.max().item()
            put_text(draw, (MARGIN, y + 2), f"el {k + 1} peak {peak:.2f} cos(g) {caption['global_cos'][k]:+.2f}")
            for token, weight, (x, line) in zip(caption["tokens"], weights.tolist(), positions):
                box_top = y + line * (box_height + 2)
                box = (words_left + x, box_top, words_left + x + token_width(token) - 2, box_top + box_height - 1)
                draw.rectangle(box, fill=ramp_colour(WORD_RAMP, weight / peak if peak > 0 else 0.0), outline=LIGHT)
                put_text(draw, (box[0] + 2, box_top + 2), token)
            y += lines * (box_height + 2)
        top += block
    return canvas


def word_layout(tokens, width):
    """(x, line) of every word box when boxes wrap at `width`, and the number of lines."""
    positions, x, line = [], 0, 0
    for token in tokens:
        size = token_width(token)
        if x and x + size > width:
            x, line = 0, line + 1
        positions.append((x, line))
        x += size
    return positions, line + 1


def token_width(token):
    return CHAR * len(printable(token)) + 6


def draw_matching(index, picture, caption_text, cos, chosen, scores):
    """The K_v x K_t cosine block three times, each panel framing the cells one matching chooses.

    Returns the image and {method: {(row, column): pixel box of that cell}}.
    """
    k_v, k_t = cos.shape
    label = 4 * CHAR
    panel = max(k_t * CELL + label + GAP, 220)
    width = max(MIN_WIDTH, 2 * MARGIN + 3 * panel + 2 * GAP)
    thumb = TILE // 2 if picture is not None else 0
    text_chars = (width - 2 * MARGIN - thumb - GAP) // CHAR
    intro = wrap(f"Image #{index} and its first caption: \"{caption_text}\"", text_chars)
    intro += ["Rows: image set elements i1..iK; columns: caption set elements c1..cK; cell = their cosine",
              "(blue -1, white 0, red +1). Green frames: the pairs each matching chooses."]
    header = max(thumb, len(intro) * LINE) + GAP
    titles = matching_titles(chosen, panel)
    title_height = max(len(t) for t in titles.values()) * LINE + 2
    grid_top = MARGIN + header + title_height + LINE
    height = grid_top + k_v * CELL + 3 * LINE + MARGIN
    cells = {}
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    if picture is not None:
        canvas.paste(fit_tile(picture, thumb), (MARGIN, MARGIN))
    for n, text in enumerate(intro):
        put_text(draw, (MARGIN + thumb + (GAP if thumb else 0), MARGIN + n * LINE), text)
    for p, (method, assignment) in enumerate(chosen.items()):
        left = MARGIN + p * (panel + GAP)
        for n, text in enumerate(titles[method]):
            put_text(draw, (left, MARGIN + header + n * LINE), text)
        for column in range(k_t):
            put_text(draw, (left + label + column * CELL + CELL // 2 - 6, grid_top - LINE), f"c{column + 1}")
        cells[method] = {}
        for row in range(k_v):
            put_text(draw, (left, grid_top + row * CELL + CELL // 2 - 5), f"i{row + 1}")
            for column in range(k_t):
                box = cells[method][row, column] = matching_cell(left + label, grid_top, row, column)
                value = cos[row, column].item()
                draw.rectangle(box, fill=ramp_colour(COSINE_RAMP, (value + 1) / 2), outline=LIGHT)
                put_text(draw, (box[0] + 5, box[1] + CELL // 2 - 5), f"{value:+.2f}")
        for row, column in enumerate(assignment.tolist()):
            x0, y0, x1, y1 = matching_cell(left + label, grid_top, row, column)
            draw.rectangle((x0, y0, x1, y1), outline=MARK, width=3)
        lines = [f"{method} score {scores[method]:.3f}"]
        lines += repeated_columns(assignment) if method == "smooth_chamfer" else ["one-to-one"]
        for n, text in enumerate(lines):
            put_text(draw, (left, grid_top + k_v * CELL + 4 + n * LINE), text)
    return canvas, cells


def matching_cell(left, top, row, column):
    """Pixel box (x0, y0, x1, y1) of a cosine-matrix cell of a panel whose grid starts at (left, top)."""
    x0, y0 = left + column * CELL, top + row * CELL
    return (x0, y0, x0 + CELL - 2, y0 + CELL - 2)


def matching_titles(chosen, panel):
    alpha_text = "softmax(alpha C)"
    texts = {"max_pair": "max_pair: the exact maximal one-to-one matching (max_pair_assignment)",
             "smooth_chamfer": f"smooth-Chamfer favours, per row, the largest soft weight of {alpha_text}: "
                               "not one-to-one",
             "greedy": "greedy: largest remaining cosine first, then strike its row and column"}
    return {method: wrap(texts[method], panel // CHAR - 1) for method in chosen}


def repeated_columns(assignment):
    """'not one-to-one: c2 taken 2x' style notes for a row -> column map."""
    counts = torch.bincount(assignment)
    repeated = [f"c{c + 1} taken {n}x" for c, n in enumerate(counts.tolist()) if n > 1]
    return ["not one-to-one: " + ", ".join(repeated)] if repeated else ["one-to-one here by chance"]


def draw_text_to_image(dataset, tokenizer, queries, image_sets, caption_sets, caption_to_image, method, options,
                       positives=None, split_line=None):
    """For the first caption of each query image: the top images, exact scores, ground truth framed;
    with `positives` (N_img, N_cap) bool, the images the caption fits that are not its own framed
    apart (FITS). `split_line`: a third header line (the whole split's R@1 both ways).

    Returns the image and the marks: [{"query", "item", "kind", "box"}], one per drawn image, kind
    "own" | "fits" | "other", box the pixel box of its frame.
    """
    query_width = 40 * CHAR
    tile = SMALL_TILE + 8
    width = max(MIN_WIDTH, 2 * MARGIN + query_width + TOP * (tile + GAP))
    row_height = max(6 * LINE, tile) + 2 * LINE + GAP
    title = (f"Text-to-image: the top {TOP} images for a caption, scored by {method} (exact, this caption against "
             "every image).")
    if positives is None:
        header_lines = [title, "Green frame: the caption's own image. Below each: rank, image, score."]
    else:
        header_lines = [title, [(MARK, "its own image"), (FITS, "fits, not its own image"),
                                (LIGHT, "does not fit"), (None, "Below each: rank, image, score.")]]
    canvas, draw, header = retrieval_canvas(width, len(queries) * row_height,
                                            header_lines + ([split_line] if split_line else []))
    marks = []
    for r, index in enumerate(queries):
        top = MARGIN + header + r * row_height
        caption = first_caption(caption_to_image, index)
        scores = score_matrix(image_sets, caption_sets[caption:caption + 1], method=method, **options)[:, 0]
        order = ranking(scores, [index])
        rank = order.index(index) + 1
        lines = wrap(f"\"{dataset_caption_text(dataset, tokenizer, index)}\"", 40)[:5]
        lines.append(f"(of image #{index}; its rank {rank})")
        fitting = set() if positives is None else set(positives[:, caption].nonzero()[:, 0].tolist())
        if positives is not None:
            lines.append(fit_summary("image", scores, fitting, {index}))
        for n, text in enumerate(lines):
            put_text(draw, (MARGIN, top + n * LINE), text)
        for place, image in enumerate(order[:TOP]):
            left = MARGIN + query_width + place * (tile + GAP)
            kind = "own" if image == index else "fits" if image in fitting else "other"
            box = (left, top, left + tile - 1, top + tile - 1)
            draw.rectangle(box, fill=MARK_COLOURS[kind])
            marks.append({"query": index, "item": image, "kind": kind, "box": box})
            picture = display_picture(dataset[image])
            if picture is not None:
                canvas.paste(fit_tile(picture, SMALL_TILE), (left + 4, top + 4))
            else:      # region features: the image's first caption stands in for it
                draw.rectangle((left + 4, top + 4, left + tile - 5, top + tile - 5), fill=WHITE)
                lines = wrap(dataset_caption_text(dataset, tokenizer, image), (SMALL_TILE - 4) // CHAR)
                for n, text in enumerate(lines[:(SMALL_TILE - 4) // LINE]):
                    put_text(draw, (left + 6, top + 6 + n * LINE), text)
            tag = f"  {kind}" if positives is not None and kind != "other" else ""
            put_text(draw, (left, top + tile + 2), f"{place + 1}. #{image}{tag}",
                     fill=TEXT_COLOURS[kind] if positives is not None else BLACK)
            put_text(draw, (left, top + tile + 2 + LINE), f"score {scores[image].item():.3f}")
    return canvas, marks


def draw_image_to_text(dataset, tokenizer, queries, pictures, image_sets, caption_sets, caption_to_image,
                       method, options, positives=None, split_line=None):
    """For each query image: its top captions, exact scores, ground-truth captions in green; with
    `positives` (N_img, N_cap) bool, the captions that fit the image but were written for another
    in FITS, each line led by a swatch of its kind. `split_line`: a third header line.

    Returns the image and the marks: [{"query", "item", "kind", "box"}], one per drawn caption, kind
    "own" | "fits" | "other", box the pixel box of its swatch (None without `positives`).
    """
    swatch = 0 if positives is None else LINE
    text_left = MARGIN + SMALL_TILE + GAP + swatch
    width = CAPTION_WIDTH
    text_chars = (width - text_left - MARGIN) // CHAR
    row_height = max(SMALL_TILE, (TOP + 2) * LINE) + LINE + GAP
    title = (f"Image-to-text: the top {TOP} captions for an image, scored by {method} (exact, this image against "
             "every caption).")
    if positives is None:
        header_lines = [title, "Green [GT]: one of the image's own captions."]
    else:
        header_lines = [title, [(MARK, "[GT] one of its own captions"),
                                (FITS, "[fits] fits the image, written for another"), (LIGHT, "does not fit")]]
    canvas, draw, header = retrieval_canvas(width, len(queries) * row_height,
                                            header_lines + ([split_line] if split_line else []))
    captions_of, marks = {}, []
    for r, index in enumerate(queries):
        top = MARGIN + header + r * row_height
        if pictures[index] is not None:
            canvas.paste(fit_tile(pictures[index], SMALL_TILE), (MARGIN, top))
        else:
            draw.rectangle((MARGIN, top, MARGIN + SMALL_TILE - 1, top + SMALL_TILE - 1), outline=GREY)
            put_text(draw, (MARGIN + 4, top + SMALL_TILE // 2 - 5), "regions")
        put_text(draw, (MARGIN, top + SMALL_TILE + 2), f"image #{index}")
        scores = score_matrix(image_sets[index:index + 1], caption_sets, method=method, **options)[0]
        own = set((caption_to_image == index).nonzero()[:, 0].tolist())
        fitting = set() if positives is None else set(positives[index].nonzero()[:, 0].tolist())
        order = ranking(scores, own)
        for place, caption in enumerate(order[:TOP]):
            owner = int(caption_to_image[caption])
            if owner not in captions_of:
                captions_of[owner] = dataset[owner]["captions"]
            ids = captions_of[owner][caption - first_caption(caption_to_image, owner)]
            kind = "own" if caption in own else "fits" if caption in fitting else "other"
            mark = {"own": "[GT] ", "fits": "[fits] ", "other": ""}[kind]
            text = f"{place + 1}. {scores[caption].item():.3f} {mark}(image #{owner}) {tokenizer.decode(ids)}"
            y = top + place * LINE
            box = None
            if positives is not None:
                box = (text_left - swatch, y + 1, text_left - swatch + 8, y + 9)
                draw.rectangle(box, fill=MARK_COLOURS[kind])
            marks.append({"query": index, "item": caption, "kind": kind, "box": box})
            put_text(draw, (text_left, y), clip(text, text_chars), fill=TEXT_COLOURS[kind])
        ranks = sorted(order.index(c) + 1 for c in own)
        put_text(draw, (text_left, top + (TOP + 1) * LINE),
                 f"its {len(own)} captions are at ranks {', '.join(map(str, ranks))}")
        if positives is not None:
            put_text(draw, (text_left, top + (TOP + 2) * LINE),
                     fit_summary("caption", scores, fitting, own))
    return canvas, marks


def fit_summary(item, scores, fitting, written):
    """The line under a query: how many items fit it beyond its written ground truth `written`, and
    the rank of the first of them when ties count against every fitting item (as the complete-positive
    metrics rank them; the drawn order counts ties against the written ground truth only)."""
    others = fitting - written
    if not others:
        return f"no other {item} fits"
    order = ranking(scores, fitting)
    first = min(order.index(i) for i in others) + 1
    return f"{len(others)} other {item}{'s' * (len(others) > 1)} fit{'s' * (len(others) == 1)}, first at rank {first}"


def retrieval_canvas(width, rows_height, header_lines):
    """A white canvas with a header above `rows_height` pixels of rows. A header line is a text or a
    legend: [(colour, text)], each a swatch of `colour` (None: none) and its text. Returns (canvas,
    draw, header height)."""
    header = len(header_lines) * LINE + GAP
    canvas = Image.new("RGB", (width, 2 * MARGIN + header + rows_height), WHITE)
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(header_lines):
        y = MARGIN + n * LINE
        if isinstance(line, str):
            put_text(draw, (MARGIN, y), line)
            continue
        x = MARGIN
        for colour, text in line:
            if colour is not None:
                draw.rectangle((x, y + 1, x + 8, y + 9), fill=colour)
                x += 12
            put_text(draw, (x, y), text)
            x += (len(text) + 3) * CHAR
    return canvas, draw, header


def ranking(scores, ground_truth):
    """Indices by decreasing score. Ties count against the ground truth, as in
    evaluate.retrieval_metrics: on a tied score the other items come first (then index order), so
    the shown rank of the first ground-truth item is the evaluation's (a collapsed model's constant
    scores put it last, not first)."""
    is_truth = torch.zeros(len(scores), dtype=torch.uint8)
    is_truth[list(ground_truth)] = 1
    truth_last = torch.sort(is_truth, stable=True).indices                      # the secondary key first
    return truth_last[torch.sort(scores[truth_last], descending=True, stable=True).indices].tolist()


def first_caption(caption_to_image, image):
    return int((caption_to_image == image).nonzero()[0])


def draw_intra_set_histogram(image_cosines, caption_cosines, collapse, num_elements, bins=40):
    """Two histograms of intra-set cosines on [-1, 1], the collapse numbers in the title."""
    plot_width, plot_height, axis = 360, 200, 7 * CHAR
    panel = axis + plot_width + 4 * GAP
    width = max(MIN_WIDTH, 2 * MARGIN + 2 * panel)
    title = [f"Intra-set cosines: every pair of the K = {num_elements} elements of a set, whole split "
             "(1 = collapsed set).",
             "Diagnostics (image | caption):  intra-set cos {:.3f} | {:.3f}   cos to global {:.3f} | {:.3f}"
             "   log set variance {:.2f} | {:.2f}".format(
                 collapse["image"]["intra_set_cos"], collapse["caption"]["intra_set_cos"],
                 collapse["image"]["global_cos"], collapse["caption"]["global_cos"],
                 collapse["image"]["log_set_variance"], collapse["caption"]["log_set_variance"])]
    width = max(width, 2 * MARGIN + max(len(t) for t in title) * CHAR)
    header = len(title) * LINE + GAP + LINE
    canvas = Image.new("RGB", (width, 2 * MARGIN + header + plot_height + 3 * LINE), WHITE)
    draw = ImageDraw.Draw(canvas)
    for n, text in enumerate(title):
        put_text(draw, (MARGIN, MARGIN + n * LINE), text)
    for p, (name, values, colour) in enumerate((("image sets", image_cosines, IMAGE_COLOUR),
                                                ("caption sets", caption_cosines, CAPTION_COLOUR))):
        left = MARGIN + p * panel + axis
        top = MARGIN + header
        counts = torch.histc(values.clamp(-1, 1), bins=bins, min=-1, max=1)
        fractions = counts / max(values.numel(), 1)
        peak = max(fractions.max().item(), 1e-9)
        put_text(draw, (left, top - LINE), f"{name}: {values.numel()} pairs, mean {values.mean().item():+.3f}")
        bar = plot_width / bins
        for b, fraction in enumerate(fractions.tolist()):
            x0 = left + round(b * bar)
            x1 = left + round((b + 1) * bar) - 1
            y0 = top + plot_height - round(plot_height * fraction / peak)
            if fraction > 0:
                draw.rectangle((x0, min(y0, top + plot_height - 1), x1, top + plot_height - 1), fill=colour)
        mean_x = left + round((values.mean().item() + 1) / 2 * plot_width)
        for y in range(top, top + plot_height, 6):
            draw.line((mean_x, y, mean_x, y + 2), fill=BLACK)
        draw.line((left, top, left, top + plot_height), fill=BLACK)
        draw.line((left, top + plot_height, left + plot_width, top + plot_height), fill=BLACK)
        for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
            x = left + round((tick + 1) / 2 * plot_width)
            draw.line((x, top + plot_height, x, top + plot_height + 3), fill=BLACK)
            put_text(draw, (x - 2 * CHAR, top + plot_height + 4), f"{tick:+.1f}")
        put_text(draw, (left - axis, top - 2), f"{peak:.2f}")
        put_text(draw, (left - axis, top + plot_height - 10), "0")
        put_text(draw, (left, top + plot_height + 4 + LINE), "cosine; y: share of pairs; dashes: mean")
    return canvas


# ----------------------------------------------------------------------------- training curves

CURVE_WIDTH, CURVE_HEIGHT = 560, 180       # plot area of a curve
CURVE_AXIS = 10 * CHAR                     # room for the y tick labels
LOG_POSITIONS = ("epoch", "step", "global_step")    # keys of a step line that say where, not what
CURVE_COLOUR = (40, 40, 40)
STEP_QUANTITIES = {"loss": "total loss", "triplet": "triplet loss", "con": "contrastive (InfoNCE) loss",
                   "mmd": "MMD loss", "div": "Div loss", "gd": "Global Discriminative loss",
                   "isd": "Intra-Set Divergence loss", "grad_norm": "gradient norm before clipping",
                   "lr": "learning rate (first parameter group)"}
COLLAPSE_QUANTITIES = {"intra_set_cos": "intra-set cosine (1 = collapsed)",
                       "global_cos": "cosine of a set element to its global feature",
                       "log_set_variance": "log set variance", "log_circular_variance": "log circular variance"}


def write_curves(out_dir, log_path, written, notes=None):
    """Draw every curve of `training_curves(log_path)` into out_dir (curve_*.png), appending
    (file name, caption) to `written`, and (file name, why not drawn) to `notes` for a quantity the
    log holds without a value (a collapse measure absent at K = 1)."""
    for curve in training_curves(log_path):
        if "absent" in curve:
            if notes is not None:
                notes.append((curve["name"], f"not drawn: {curve['absent']}"))
            continue
        save_png(draw_curve(curve["title"], curve["x_label"], curve["series"], curve["boundaries"]),
                 out_dir, curve["name"], written, curve["caption"])


def training_curves(log_path):
    """One curve per quantity in a train.py log.jsonl, as dicts (name, title, x_label, series
    {label: [(x, y), ...]}, boundaries, caption): every numeric key of the per-step lines (loss terms,
    grad_norm, lr) against the global step, with the epoch starts as boundaries; validation RSUM and
    each collapse measure (image and caption sets, two series) against the epoch. A collapse measure
    the log holds only as null (absent at K = 1, evaluate.collapse_note) is a dict (name, absent:
    why, from the log's collapse note) instead; its null epochs are left out of a drawn one."""
    steps, epochs, skipped = read_training_log(log_path)
    note = f" {skipped} unreadable line(s) of the log skipped." if skipped else ""
    curves = []
    keys = [key for line in steps for key, value in line.items()
            if key not in LOG_POSITIONS and isinstance(value, (int, float))]
    boundaries = sorted({line["global_step"] - line["step"] for line in steps if line["epoch"] > 0})
    for key in dict.fromkeys(keys):       # in the order the log first has them
        points = [(line["global_step"], float(line[key])) for line in steps if key in line]
        description = STEP_QUANTITIES.get(key, key)
        curves.append({"name": f"curve_step_{key}.png", "title": f"{description} ({key})", "x_label": "global step",
                       "series": {key: points}, "boundaries": boundaries,
                       "caption": f"{description}, mean over the steps since the previous log line "
                                  f"(train.log_every), per logged step; dotted: epoch starts.{note}"})
    rsum = [(line["epoch"], float(line["val"]["rsum"])) for line in epochs if "rsum" in line.get("val", {})]
    if rsum:
        curves.append({"name": "curve_epoch_val_rsum.png", "title": "validation RSUM", "x_label": "epoch",
                       "series": {"rsum": rsum}, "boundaries": [],
                       "caption": f"Validation RSUM after each epoch (best.pt is the epoch with the highest).{note}"})
    collapse_notes = [line["collapse"]["note"] for line in epochs if line.get("collapse", {}).get("note")]
    for key, description in COLLAPSE_QUANTITIES.items():
        logged = {side: [(line["epoch"], line["collapse"][side][key]) for line in epochs
                         if key in line.get("collapse", {}).get(side, {})] for side in ("image", "caption")}
        series = {side: [(x, float(y)) for x, y in points if y is not None] for side, points in logged.items()}
        series = {side: points for side, points in series.items() if points}
        name = f"curve_epoch_{key}.png"
        if series:
            curves.append({"name": name, "title": f"validation {description}",
                           "x_label": "epoch", "series": series, "boundaries": [],
                           "caption": f"Validation {description} ({key}) of the image and caption sets after "
                                      f"each epoch (METHOD.md §5).{note}"})
        elif any(logged.values()):          # logged as absent (None): no meaning for this model
            why = collapse_notes[-1] if collapse_notes else "the log holds no value of it"
            curves.append({"name": name, "absent": f"{key} is null at every epoch of the log ({why})"})
    return curves


def read_training_log(path):
    """(step lines, epoch lines, skipped): the per-step lines (with global_step) by global step and
    the per-epoch summaries (with val or collapse) by epoch. A later line for the same step or epoch
    replaces an earlier one (train.py drops the lines past the checkpoint it continues, but a log
    written before it did, or edited by hand, can hold a step twice); a line that is not a JSON
    object (a run killed while writing it) is skipped and counted."""
    steps, epochs, skipped = {}, {}, 0
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(line, dict):
                skipped += 1
            elif "global_step" in line and "step" in line and "epoch" in line:
                steps[line["global_step"]] = line
            elif "epoch" in line and ("val" in line or "collapse" in line):
                epochs[line["epoch"]] = line
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)], skipped


def draw_curve(title, x_label, series, boundaries=()):
    """A line chart of series {label: [(x, y), ...]} (one colour each; NaN and inf left out and
    counted), y grid lines at round values, dotted vertical lines at `boundaries`."""
    colours = [CURVE_COLOUR] if len(series) == 1 else [IMAGE_COLOUR, CAPTION_COLOUR, MARK, GREY]
    finite = {label: [(x, y) for x, y in points if math.isfinite(y)] for label, points in series.items()}
    left_out = sum(len(points) for points in series.values()) - sum(len(points) for points in finite.values())
    every = [point for points in finite.values() for point in points]
    x_ticks = round_ticks(min((x for x, _ in every), default=0), max((x for x, _ in every), default=1), integer=True)
    y_ticks = round_ticks(min((y for _, y in every), default=0.0), max((y for _, y in every), default=1.0))
    width = 2 * MARGIN + CURVE_AXIS + CURVE_WIDTH + 2 * GAP
    header = 2 * LINE + GAP
    canvas = Image.new("RGB", (width, 2 * MARGIN + header + CURVE_HEIGHT + 2 * LINE + 4), WHITE)
    draw = ImageDraw.Draw(canvas)
    put_text(draw, (MARGIN, MARGIN), title)
    legend_x = MARGIN
    for (label, points), colour in zip(finite.items(), colours):
        last = f"last {points[-1][1]:.4g} at {x_label} {points[-1][0]}" if points else "no finite value"
        text = f"{label}: {last}" if len(series) > 1 else last
        put_text(draw, (legend_x, MARGIN + LINE), text, fill=colour)
        legend_x += (len(text) + 3) * CHAR
    if left_out:
        put_text(draw, (legend_x, MARGIN + LINE), f"({left_out} non-finite value(s) not drawn)", fill=GREY)
    left, top = MARGIN + CURVE_AXIS, MARGIN + header
    right, bottom = left + CURVE_WIDTH - 1, top + CURVE_HEIGHT - 1
    to_x = lambda x: left + round((x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (CURVE_WIDTH - 1))   # noqa: E731
    to_y = lambda y: bottom - round((y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (CURVE_HEIGHT - 1))  # noqa: E731
    for tick in y_ticks:
        y = to_y(tick)
        draw.line((left, y, right, y), fill=(235, 235, 235))
        put_text(draw, (MARGIN, y - 5), f"{tick:.4g}")
    for boundary in boundaries:
        x = to_x(boundary)
        for y in range(top, bottom, 6):
            draw.line((x, y, x, y + 2), fill=LIGHT)
    draw.line((left, top, left, bottom), fill=BLACK)
    draw.line((left, bottom, right, bottom), fill=BLACK)
    for tick in x_ticks:
        x = to_x(tick)
        draw.line((x, bottom, x, bottom + 3), fill=BLACK)
        put_text(draw, (x - len(f"{tick:g}") * CHAR // 2, bottom + 5), f"{tick:g}")
    put_text(draw, (left + CURVE_WIDTH // 2 - len(x_label) * CHAR // 2, bottom + 5 + LINE), x_label)
    for (label, points), colour in zip(finite.items(), colours):
        pixels = [(to_x(x), to_y(y)) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if len(pixels) <= 40:
            for x, y in pixels:
                draw.rectangle((x - 2, y - 2, x + 2, y + 2), fill=colour)
    return canvas


def round_ticks(low, high, count=5, integer=False):
    """About `count` evenly spaced round values (steps of 1, 2, 2.5 or 5 times a power of ten) from
    at or below `low` to at or above `high`; whole steps of at least 1 when `integer`."""
    if high <= low:
        low, high = low - (abs(low) * 0.05 or 0.5), high + (abs(high) * 0.05 or 0.5)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, math.ceil(step))
    first, last = math.floor(low / step), math.ceil(high / step)
    return [round(n * step, 12) for n in range(first, last + 1)]


# ----------------------------------------------------------------------------- drawing helpers

@functools.cache
def bitmap_font():
    """Pillow's built-in bitmap font: no font files, the same pixels everywhere."""
    return ImageFont.load_default_imagefont()


def printable(text):
    """The bitmap font covers Latin-1; anything else becomes '?'."""
    return str(text).encode("latin-1", "replace").decode("latin-1")


def put_text(draw, position, text, fill=BLACK):
    draw.text(position, printable(text), fill=fill, font=bitmap_font())


def wrap(text, width):
    """Greedy word wrap to `width` characters; over-long words are cut."""
    lines, current = [], ""
    for word in str(text).split():
        while len(word) > width:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:width])
            word = word[width:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current or not lines:
        lines.append(current)
    return lines


def clip(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


def ramp_colour(ramp, value):
    """Linear interpolation along a list of RGB anchors; value in [0, 1]."""
    value = min(max(float(value), 0.0), 1.0) * (len(ramp) - 1)
    low = min(int(math.floor(value)), len(ramp) - 2)
    share = value - low
    return tuple(round(a + (b - a) * share) for a, b in zip(ramp[low], ramp[low + 1]))


def draw_ramp(draw, box, ramp):
    x0, y0, x1, y1 = box
    for x in range(x0, x1):
        draw.line((x, y0, x, y1), fill=ramp_colour(ramp, (x - x0) / max(x1 - x0 - 1, 1)))


def fit_tile(picture, size):
    """The picture scaled to size x size: nearest neighbour for whole-number enlargements (crisp
    pixels), bilinear otherwise."""
    if picture.size == (size, size):
        return picture
    exact = size % picture.size[0] == 0 and size % picture.size[1] == 0
    return picture.resize((size, size), Image.Resampling.NEAREST if exact else Image.Resampling.BILINEAR)


def square_grid(num_positions):
    """Side of a square grid of num_positions cells, or None (then the weights are drawn as bars)."""
    side = math.isqrt(num_positions)
    return side if side * side == num_positions else None


def heat_tile(grid_weights, picture):
    """A TILE x TILE map: grid cells coloured by weight / peak, over a dimmed copy of the picture."""
    peak = max(grid_weights.max().item(), 1e-12)
    side = grid_weights.shape[0]
    cells = Image.new("RGB", (side, side))
    cells.putdata([ramp_colour(HEAT_RAMP, w / peak) for w in grid_weights.flatten().tolist()])
    heat = cells.resize((TILE, TILE), Image.Resampling.NEAREST)
    if picture is None:
        return heat
    return Image.blend(fit_tile(picture, TILE).convert("L").convert("RGB"), heat, 0.75)


def draw_bars(draw, box, weights):
    """One vertical bar per region, height = weight / peak."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(245, 245, 245), outline=LIGHT)
    peak = max(weights.max().item(), 1e-12)
    step = (x1 - x0 - 2) / weights.shape[0]
    for n, weight in enumerate(weights.tolist()):
        left = x0 + 1 + round(n * step)
        right = max(left, x0 + round((n + 1) * step) - 1)
        height = round((y1 - y0 - 2) * weight / peak)
        if height > 0:
            colour = ramp_colour(HEAT_RAMP, 0.35 + 0.65 * weight / peak)
            draw.rectangle((left, y1 - 1 - height, right, y1 - 2), fill=colour)
