r"""The MaxMatch encoders: every image and caption becomes a SET of K unit-norm embeddings.

METHOD.md §1. Each modality is a backbone that yields local features (B, N, D) and a global
feature (B, D), followed by a set head (DivE, CVPR 2023, with our padding fix):

    x_0 = slots (K, D)                                   learned, N(0, 1)
    x   = x + SlotCompetitionAttention(LN(x), LN(local))  \  `depth` times, one shared block
    x   = x + FF(LN(x))                                   /
    r_k = LN_last(x_k)                                    residual, (B, K, D)
    S_k = normalize(LN_res(g) + r_k)                      set element, (B, K, D)

Slot competition: the attention softmax runs over the SLOT axis, then padded keys are zeroed and
the weights renormalised over the keys, so an input's set never depends on padding or on the other
inputs of its batch (DivE masks before the slot softmax and fails this).
`return_attention=True` (SetHead, MaxMatchModel.encode_images / encode_captions / forward) also
returns a SetAttention: where each element looked in the last iteration (drawn by figures.py).

Image backbones: torchvision ResNet grid (`cnn`), torchvision ViT patch tokens (`vit`), or
precomputed region features (`precomputed`). Text backbones: BiGRU over a word vocabulary (`gru`)
or any BERT-family model through transformers (`bert`). Everything is built from the config dict
by `build_model(cfg, vocab)`.
"""
import contextlib
import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(Exception):
    """A model configuration or weight file the user has to fix; the message says how."""


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names it and says why."""


class SetEmbedding(NamedTuple):
    sets: torch.Tensor        # (B, K, D) unit-norm set elements S_k
    residuals: torch.Tensor   # (B, K, D) r_k before the global feature is added
    global_: torch.Tensor     # (B, D) normalised LN_res(g)


class SetAttention(NamedTuple):
    """Where each set element looked: see SetHead.forward(..., return_attention=True)."""
    weights: torch.Tensor     # (B, K, N) last iteration's attention, mean over heads; rows sum to 1 over real keys
    mask: torch.Tensor        # (B, N) bool, True at real (unpadded) positions; weights are 0 elsewhere


def build_model(cfg, vocab=None):
    """The full two-tower model from the config dict; `vocab` (list of words) for the GRU text encoder."""
    model_cfg = cfg["model"]
    embed_dim = model_cfg["embed_dim"]
    dropout = model_cfg["dropout"]
    image_encoder = build_image_encoder(model_cfg["image"], embed_dim, dropout, cfg["data"])
    text_encoder = build_text_encoder(model_cfg["text"], embed_dim, dropout, vocab)
    head_cfg = model_cfg["set_head"]
    if head_cfg["type"] == "none":       # the single-vector baseline: the global feature alone (K = 1)
        if model_cfg["num_embeds"] != 1:
            raise ModelError(f"model.set_head.type=none is one vector per item: set model.num_embeds=1 "
                             f"(it is {model_cfg['num_embeds']})")
        return MaxMatchModel(image_encoder, text_encoder, image_head=GlobalHead(dim=embed_dim),
                             text_head=GlobalHead(dim=embed_dim))
    if head_cfg["type"] != "slots":
        raise ModelError(f"model.set_head.type={head_cfg['type']!r} is unknown; use slots or none")
    head_kwargs = dict(dim=embed_dim, num_slots=model_cfg["num_embeds"], depth=head_cfg["depth"],
                       heads=head_cfg["heads"], share_weights=head_cfg["share_weights"],
                       dropout=dropout)
    return MaxMatchModel(image_encoder, text_encoder,
                         image_head=SetHead(**head_kwargs, use_position=False),
                         text_head=SetHead(**head_kwargs, use_position=True))


class MaxMatchModel(nn.Module):
    """Image and caption set encoders; `encode_images(batch)` / `encode_captions(batch)`."""

    def __init__(self, image_encoder, text_encoder, image_head, text_head):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_head = image_head
        self.text_head = text_head

    def encode_images(self, batch, return_attention=False):
        """SetEmbedding of every image; with return_attention=True, (SetEmbedding, SetAttention)."""
        local, mask, global_feature = self.image_encoder(batch)
        return self.image_head(local, mask, global_feature, return_attention=return_attention)

    def encode_captions(self, batch, return_attention=False):
        """SetEmbedding of every caption; with return_attention=True, (SetEmbedding, SetAttention)."""
        local, mask, global_feature = self.text_encoder(batch["tokens"], batch["lengths"],
                                                        host_lengths=batch.get("host_lengths"),
                                                        caption_order=batch.get("caption_order"))
        return self.text_head(local, mask, global_feature, return_attention=return_attention)

    def forward(self, batch, return_attention=False):
        """(image sets, caption sets); with return_attention=True each is a (SetEmbedding, SetAttention) pair."""
        return (self.encode_images(batch, return_attention=return_attention),
                self.encode_captions(batch, return_attention=return_attention))

    def parameter_groups(self):
        """Trainable parameters by learning-rate group: image_backbone, text_backbone, heads."""
        groups = {"image_backbone": [], "text_backbone": [], "heads": []}
        backbones = {"image_encoder.backbone.": "image_backbone", "text_encoder.backbone.": "text_backbone"}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            group = next((g for prefix, g in backbones.items() if name.startswith(prefix)), "heads")
            groups[group].append(param)
        return groups


# ----------------------------------------------------------------------------- set head

class SetHead(nn.Module):
    """K slots attend over local features; returns the set, its residuals and the global feature."""

    def __init__(self, *, dim, num_slots, depth=4, heads=4, share_weights=True, dropout=0.1,
                 use_position=False):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(num_slots, dim))
        num_blocks = 1 if share_weights else depth
        self.blocks = nn.ModuleList(SetHeadBlock(dim=dim, heads=heads, dropout=dropout)
                                    for _ in range(num_blocks))
        self.depth = depth
        self.use_position = use_position
        self.norm_last = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)

    def forward(self, local, mask, global_feature, return_attention=False):
        """local (B, N, D), mask (B, N) bool (True = real token), global_feature (B, D) -> SetEmbedding.

        return_attention=True also returns a SetAttention: the attention weights of the LAST
        iteration (the one that produced the set), averaged over heads, (B, K, N). Each head's
        weights are renormalised exactly over the real keys (the model itself divides by their sum
        + 1e-7, a relative difference of at most 1e-7 / that sum), so every element's weights sum
        to 1 over the real positions and are 0 at padding. The set is the same either way.
        """
        if return_attention and self.depth < 1:
            raise ModelError("return_attention=True needs model.set_head.depth >= 1")
        position = normalised_position_encoding(mask, local.shape[-1]) if self.use_position else None
        # keys and values depend only on the input: once per distinct block, not per iteration
        memories = [block.keys_values(local, position) for block in self.blocks]
        x = self.slots.unsqueeze(0).expand(local.shape[0], -1, -1)   # (B, K, D)
        for i in range(self.depth):
            block, memory = self.blocks[i % len(self.blocks)], memories[i % len(self.blocks)]
            if return_attention and i == self.depth - 1:
                x, head_weights = block(x, memory, mask, return_weights=True)    # head_weights (B, H, K, N)
            else:
                x = block(x, memory, mask)
        residuals = self.norm_last(x)                                # (B, K, D)
        global_normed = self.norm_global(global_feature)             # (B, D)
        sets = F.normalize(global_normed.unsqueeze(1) + residuals, dim=-1)
        embedding = SetEmbedding(sets, residuals, F.normalize(global_normed, dim=-1))
        if not return_attention:
            return embedding
        totals = head_weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(head_weights.dtype).tiny)
        return embedding, SetAttention((head_weights / totals).mean(dim=1), mask)   # (B, K, N)


class GlobalHead(nn.Module):
    """No set head (model.set_head.type=none): the item is its global feature alone, a set of one.

    S_1 = normalize(LN_res(g)), the VSE-style single vector DivE's sets are built on; the residual
    is 0 (there is none), so `sets` (B, 1, D) and `global_` hold the same unit vector.
    """

    def __init__(self, *, dim):
        super().__init__()
        self.norm_global = nn.LayerNorm(dim)

    def forward(self, local, mask, global_feature, return_attention=False):
        if return_attention:
            raise ModelError("model.set_head.type=none has no set elements that attend: no attention to return")
        global_normed = F.normalize(self.norm_global(global_feature), dim=-1)    # (B, D)
        return SetEmbedding(global_normed.unsqueeze(1), torch.zeros_like(global_normed).unsqueeze(1),
                            global_normed)


class SetHeadBlock(nn.Module):
    """Pre-norm block: x = x + Attn(LN(x), LN(local)); x = x + FF(LN(x))."""

    def __init__(self, *, dim, heads, dropout):
        super().__init__()
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_local = nn.LayerNorm(dim)
        self.attention = SlotCompetitionAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def keys_values(self, local, position=None):
        return self.attention.keys_values(self.norm_local(local), position)

    def forward(self, x, keys_values, mask, return_weights=False):
        """x (B, K, D) -> (B, K, D); with return_weights=True also the attention weights (B, H, K, N)."""
        update = self.attention(self.norm_slots(x), keys_values, mask, return_weights=return_weights)
        if return_weights:
            update, weights = update
        x = x + update
        x = x + self.feed_forward(self.norm_ff(x))
        return (x, weights) if return_weights else x


class SlotCompetitionAttention(nn.Module):
    """Multi-head attention whose softmax runs over the slots, then renormalises over real keys."""

    def __init__(self, *, dim, heads, dropout):
        super().__init__()
        if dim % heads:
            raise ModelError(f"model.embed_dim={dim} must be divisible by model.set_head.heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def keys_values(self, local, position=None):
        """local (B, N, D), position (B, N, D) or None -> keys, values (B, H, N, D/H)."""
        keys_in = local if position is None else local + position
        return split_heads(self.to_k(keys_in), self.heads), split_heads(self.to_v(local), self.heads)

    def forward(self, slots, keys_values, mask, return_weights=False):
        # slots (B, K, D), keys_values from keys_values(), mask (B, N) bool
        k, v = keys_values
        q = split_heads(self.to_q(slots), self.heads)                          # (B, H, K, d)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])              # (B, H, K, N)
        weights = logits.softmax(dim=-2) * mask[:, None, None, :].to(logits.dtype)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-7)
        out = self.to_out((weights @ v).transpose(1, 2).flatten(2))            # (B, K, D)
        return (out, weights) if return_weights else out


def split_heads(x, heads):
    """(B, L, D) -> (B, heads, L, D // heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def normalised_position_encoding(mask, dim):
    """Sine/cosine encoding of each token's position divided by its sequence's TRUE length.

    mask (B, N) bool -> (B, N, dim); zero at padding. Position t of a length-L caption is t / L in
    [0, 1), scaled to a virtual length of 100 before the usual transformer frequencies.
    """
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)            # (B, 1)
    position = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32) / lengths
    frequencies = torch.exp(torch.arange(0, dim, 2, device=mask.device, dtype=torch.float32)
                            * (-math.log(10000.0) / dim))                            # (dim/2,)
    angles = 100.0 * position.unsqueeze(-1) * frequencies                             # (B, N, dim/2)
    encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(2)[..., :dim]
    return encoding * mask.unsqueeze(-1)


# ----------------------------------------------------------------------------- projection

class Projection(nn.Module):
    """DivE / VSE-infinity "1x1" projection: h = Dropout(fc(x) + MLP(fc(x))).

    MLP: D -> D/2 -> D with a LayerNorm and ReLU (VSE-infinity uses BatchNorm; LayerNorm keeps an
    input's embedding independent of its batch company).
    """

    def __init__(self, in_dim, dim, dropout):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim // 2), nn.LayerNorm(dim // 2), nn.ReLU(),
                                 nn.Linear(dim // 2, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.fc(x)
        return self.dropout(h + self.mlp(h))


def masked_max_pool(features, mask):
    """Max over the real tokens: features (B, N, D), mask (B, N) bool -> (B, D)."""
    return features.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def lengths_to_mask(lengths, max_length):
    """lengths (B,) -> (B, max_length) bool, True at real positions."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


# ----------------------------------------------------------------------------- image encoders

def build_image_encoder(image_cfg, embed_dim, dropout, data_cfg):
    kind = image_cfg["type"]
    if kind == "cnn":
        return CNNImageEncoder(image_cfg, embed_dim, dropout)
    if kind == "vit":
        return ViTImageEncoder(image_cfg, embed_dim, dropout)
    if kind == "precomputed":
        return RegionImageEncoder(image_cfg["feature_dim"], embed_dim, dropout)
    raise ModelError(f"model.image.type={kind!r} is unknown; use one of cnn, vit, precomputed")


BATCHNORM_MODES = ("batch", "frozen", "sync")


class CNNImageEncoder(nn.Module):
    """A torchvision ResNet cut after `stop_after`; local features = its grid, (B, h*w, C).

    `batchnorm` (METHOD.md §4): "batch" normalises with each process's batch statistics; "frozen"
    keeps every BatchNorm layer in eval mode (running statistics used, never updated; affine weights
    train when `finetune`); "sync" is "batch" here, and train.py turns the layers into SyncBatchNorm
    across processes. `finetune: false` also keeps BatchNorm in eval mode.
    """

    def __init__(self, image_cfg, embed_dim, dropout):
        super().__init__()
        arch, stop_after = image_cfg["arch"], image_cfg["stop_after"] or "layer4"
        stages = ["layer1", "layer2", "layer3", "layer4"]
        if stop_after not in stages:
            raise ModelError(f"model.image.stop_after={stop_after!r}; use one of {', '.join(stages)}")
        if not str(arch).startswith("resnet"):
            raise ModelError(f"model.image.arch={arch!r}: the cnn encoder takes a torchvision ResNet "
                             "(resnet18 ... resnet152)")
        net = load_torchvision_model(arch, image_cfg["weights"])
        kept = ["conv1", "bn1", "relu", "maxpool"] + stages[:stages.index(stop_after) + 1]
        self.backbone = nn.Sequential(*(getattr(net, name) for name in kept))
        last_block = getattr(net, stop_after)[-1]
        channels = (last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2).num_features
        self.projection = Projection(channels, embed_dim, dropout)
        set_finetune(self.backbone, image_cfg["finetune"])
        batchnorm = image_cfg["batchnorm"]
        if batchnorm not in BATCHNORM_MODES:
            raise ModelError(f"model.image.batchnorm={batchnorm!r}; use one of {', '.join(BATCHNORM_MODES)}")
        self.freeze_batchnorm = batchnorm == "frozen" or not image_cfg["finetune"]

    def train(self, mode=True):
        """Like nn.Module.train, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, batch):
        grid = self.backbone(batch["images"])                        # (B, C, h, w)
        local = self.projection(grid.flatten(2).transpose(1, 2))     # (B, h*w, D)
        mask = torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)
        return local, mask, masked_max_pool(local, mask)


class ViTImageEncoder(nn.Module):
    """torchvision ViT patch tokens as local features; the projected CLS token is the global one.

    `vit_config` (a dict of torchvision VisionTransformer arguments) builds a small random ViT for
    tests; otherwise `arch` (vit_b_16) with `weights`.
    """

    def __init__(self, image_cfg, embed_dim, dropout):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer
        vit_config = image_cfg["vit_config"]
        if vit_config:
            net = VisionTransformer(**vit_config)
        else:
            net = load_torchvision_model(image_cfg["arch"] or "vit_b_16", image_cfg["weights"])
        net.heads = nn.Identity()
        self.backbone = net
        self.projection = Projection(net.hidden_dim, embed_dim, dropout)
        set_finetune(self.backbone, image_cfg["finetune"])

    def forward(self, batch):
        net = self.backbone
        tokens = net._process_input(batch["images"])                             # (B, N, C)
        cls = net.class_token.expand(tokens.shape[0], -1, -1)
        hidden = self.projection(net.encoder(torch.cat([cls, tokens], dim=1)))   # (B, 1+N, D)
        local = hidden[:, 1:]
        mask = torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)
        return local, mask, hidden[:, 0]


class RegionImageEncoder(nn.Module):
    """Precomputed region features (B, N, F) with lengths; global = masked max-pool."""

    def __init__(self, feature_dim, embed_dim, dropout):
        super().__init__()
        self.projection = Projection(feature_dim, embed_dim, dropout)

    def forward(self, batch):
        regions, lengths = batch["regions"], batch["region_lengths"]
        mask = lengths_to_mask(lengths, regions.shape[1])
        local = self.projection(regions)                             # (B, N, D)
        return local, mask, masked_max_pool(local, mask)


def load_torchvision_model(arch, weights):
    """A torchvision model by name with weights None, a torchvision weights name, or a local file."""
    import torchvision
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ModelError(f"model.image.arch={arch!r} is not a torchvision model") from None
    if weights is None:
        return builder(weights=None)
    if looks_like_path(weights):
        if not os.path.isfile(weights):
            raise ModelError(f"model.image.weights: file {weights!r} does not exist")
        net = builder(weights=None)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            net.load_state_dict(state)
        except Exception as error:  # noqa: BLE001 - any unreadable/mismatched file gets one message
            raise ModelError(f"model.image.weights: could not load {weights!r} into {arch}: "
                             f"{str(error).splitlines()[0]}") from None
        return net
    try:
        return builder(weights=weights)
    except Exception as error:  # noqa: BLE001 - unknown name or no internet
        raise ModelError(
            f"model.image.weights={weights!r}: could not get these {arch} weights "
            f"({str(error).splitlines()[0][:200]}). Without internet, download the .pth file on "
            "another machine and set model.image.weights to its local path") from None


def looks_like_path(name):
    """Torchvision weights names (IMAGENET1K_V1) have no slash and no file extension."""
    return os.sep in str(name) or str(name).endswith((".pth", ".pt", ".bin", ".safetensors"))


def set_finetune(module, finetune):
    for param in module.parameters():
        param.requires_grad_(bool(finetune))


# ----------------------------------------------------------------------------- text encoders

def build_text_encoder(text_cfg, embed_dim, dropout, vocab):
    kind = text_cfg["type"]
    if kind == "gru":
        if not vocab:
            raise ModelError("model.text.type=gru needs the word vocabulary (built from the "
                             "training captions or read from the checkpoint)")
        return GRUTextEncoder(vocab, text_cfg, embed_dim, dropout)
    if kind == "bert":
        return BertTextEncoder(text_cfg, embed_dim, dropout)
    raise ModelError(f"model.text.type={kind!r} is unknown; use gru or bert")


class GRUTextEncoder(nn.Module):
    """Word embeddings + BiGRU (directions averaged); local = projected word embeddings, global = final state."""

    def __init__(self, vocab, text_cfg, embed_dim, dropout):
        super().__init__()
        word_dim = text_cfg["word_dim"]
        embedding = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        if text_cfg["word_vectors"]:
            vectors, _ = load_word_vectors(text_cfg["word_vectors"], vocab, word_dim)
            found = vectors.abs().sum(dim=1) > 0
            embedding.weight.data[found] = vectors[found]
        self.backbone = nn.ModuleDict(dict(embedding=embedding, gru=nn.GRU(
            word_dim, embed_dim, batch_first=True, bidirectional=True)))
        self.projection = Projection(word_dim, embed_dim, dropout)
        set_finetune(self.backbone, text_cfg["finetune"])

    def forward(self, tokens, lengths, host_lengths=None, caption_order=None):
        # tokens (B, L) long, lengths (B,) long; host_lengths: the same on the CPU (saves a GPU sync);
        # caption_order (B,) long on the device: indices sorting the captions longest first (collate
        # computes it on the host, so packing uploads nothing). Outputs keep the input order.
        words = self.backbone["embedding"](tokens)                                # (B, L, W)
        if host_lengths is None:
            host_lengths = lengths.cpu()
        if caption_order is None:
            packed = nn.utils.rnn.pack_padded_sequence(words, host_lengths, batch_first=True,
                                                       enforce_sorted=False)     # uploads its sort order
        else:
            sorted_lengths = host_lengths.sort(descending=True).values            # host only
            packed = nn.utils.rnn.pack_padded_sequence(words.index_select(0, caption_order), sorted_lengths,
                                                       batch_first=True, enforce_sorted=True)
            # with sorted_indices set, the GRU returns its final state in the input order
            packed = nn.utils.rnn.PackedSequence(packed.data, packed.batch_sizes, caption_order)
        _, final = self.backbone["gru"](packed)                                   # (2, B, D)
        mask = lengths_to_mask(lengths, tokens.shape[1])
        return self.projection(words), mask, final.mean(dim=0)


def load_word_vectors(path, vocab, dim):
    """Rows of a plain-text word-vector file ("word v1 ... v_dim") for the vocabulary.

    Returns (vectors (V, dim) with zero rows for missing words, number of words found).
    """
    if not os.path.isfile(path):
        raise ModelError(f"model.text.word_vectors: file {path!r} does not exist")
    index = {word: i for i, word in enumerate(vocab)}
    vectors = torch.zeros(len(vocab), dim)
    found = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip().split(" ")
            if len(parts) == 2 and line_number == 1:      # word2vec-style "count dim" header
                continue
            if parts[0] not in index:
                continue
            if len(parts) != dim + 1:
                raise ModelError(f"model.text.word_vectors: {path}:{line_number} has "
                                 f"{len(parts) - 1} numbers, expected model.text.word_dim={dim}")
            vectors[index[parts[0]]] = torch.tensor([float(v) for v in parts[1:]])
            found += 1
    return vectors, found


class BertTextEncoder(nn.Module):
    """A transformers AutoModel; local = projected last hidden states, global = projected [CLS] or max."""

    def __init__(self, text_cfg, embed_dim, dropout):
        super().__init__()
        self.backbone = load_bert(text_cfg)
        self.takes_4d_mask = transformers_takes_4d_mask()
        self.projection = Projection(self.backbone.config.hidden_size, embed_dim, dropout)
        self.global_pool = text_cfg["global_pool"]
        if self.global_pool not in ("cls", "max"):
            raise ModelError(f"model.text.global_pool={self.global_pool!r}; use cls or max")
        set_finetune(self.backbone, text_cfg["finetune"])

    def forward(self, tokens, lengths, host_lengths=None, caption_order=None):
        mask = lengths_to_mask(lengths, tokens.shape[1])
        attention_mask = bert_attention_mask(mask, self.backbone, self.takes_4d_mask)
        hidden = self.backbone(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
        local = self.projection(hidden)                                           # (B, L, D)
        global_feature = local[:, 0] if self.global_pool == "cls" else masked_max_pool(local, mask)
        return local, mask, global_feature


def load_bert(text_cfg):
    """BERT-family AutoModel from `bert_config` (random init), a local folder, or a hub name."""
    from transformers import AutoConfig, AutoModel, BertConfig
    if text_cfg["bert_config"]:
        return without_pooler(AutoModel.from_config(BertConfig(**text_cfg["bert_config"])))
    name = text_cfg["bert"]
    if not name:
        raise ModelError("model.text.type=bert needs model.text.bert (a local model folder or a "
                         "hub name) or model.text.bert_config (a random-init config)")
    if str(name).startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelError(f"model.text.bert: folder {name!r} does not exist")
    name = os.path.expanduser(name)
    try:
        config = AutoConfig.from_pretrained(name)
        return without_pooler(AutoModel.from_pretrained(name, config=config))
    except Exception as error:  # noqa: BLE001 - offline, unknown name, broken folder
        raise ModelError(
            f"model.text.bert={name!r} is not a local model folder and could not be loaded ({str(error).splitlines()[0][:200]}). "
            "Without internet, copy the model folder (config.json, weights, tokenizer files) to "
            "this machine and set model.text.bert to that folder") from None


def bert_attention_mask(mask, bert, takes_4d_mask):
    """The attention_mask argument for a (B, L) bool padding mask that gives BERT no reason to sync.

    Given the (B, L) mask, BERT asks the GPU whether it is all ones (a host sync each call). So a
    BERT model gets the attention bias it would build from it, already made: transformers 4 builds
    it from a (B, 1, L) mask without that check (and refuses 4D masks); transformers 5 takes a 4D
    mask as it is (and misreads a 3D one). Both give the same bias, 0 for tokens and the dtype's
    minimum for padding, added to the attention logits. Other BERT-family models get the (B, L) mask.
    takes_4d_mask: transformers >= 5 (see transformers_takes_4d_mask)."""
    if bert.config.model_type != "bert":
        return mask.long()
    if not takes_4d_mask:
        return mask[:, None, :].long()                                            # (B, 1, L)
    dtype = bert.dtype
    return (~mask[:, None, None, :]).to(dtype) * torch.finfo(dtype).min           # (B, 1, 1, L)


def transformers_takes_4d_mask():
    """transformers 5 rewrote how its models read attention_mask (see bert_attention_mask)."""
    import transformers
    return int(transformers.__version__.split(".")[0]) >= 5


def without_pooler(bert):
    """Drop the unused pooler so that every trainable parameter gets a gradient (DDP-friendly)."""
    if getattr(bert, "pooler", None) is not None:
        bert.pooler = None
    return bert


# ----------------------------------------------------------------------------- running a model, checkpoints

def move_to(batch, device):
    """Tensors to the device (non-blocking from pinned memory). Caption lengths also stay on the host
    as `host_lengths`: a GRU packs its input with lengths on the host, and copying them back would sync."""
    moved = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
             for key, value in batch.items()}
    if torch.is_tensor(batch.get("lengths")):
        moved["host_lengths"] = batch["lengths"]
    return moved


def autocast(device, amp):
    """Mixed precision on CUDA only (amp = bf16 | fp16 | off)."""
    if not (torch.device(device).type == "cuda" and amp in ("bf16", "fp16")):
        return contextlib.nullcontext()      # also on devices autocast does not know (meta, in tests)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def load_checkpoint(path):
    """torch.load with weights_only=True and one clear error for missing or broken files, and for
    weights that are NaN or inf."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a torch file, foreign pickle
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({str(error).splitlines()[0][:120]}); "
                              "it is truncated or not a MaxMatch checkpoint") from None
    missing = [key for key in ("model", "config") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing or not isinstance(checkpoint["model"], dict):
        raise CheckpointError(f"checkpoint {path!r} has no {', '.join(missing) or 'model weights dict'}: "
                              "not a MaxMatch checkpoint")
    nonfinite_weight = next((name for name, tensor in checkpoint["model"].items() if torch.is_tensor(tensor)
                             and tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if nonfinite_weight is not None:    # a diverged run: every score would be NaN, so refuse it here, by name
        raise CheckpointError(f"checkpoint {path!r} has NaN or inf in weight {nonfinite_weight!r}: the run "
                              "diverged; use an earlier checkpoint")
    return checkpoint
