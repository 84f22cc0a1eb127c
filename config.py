"""Configuration of MaxMatch: one nested dict, read from config.yaml (METHOD.md §4).

    cfg = load_config("configs/X.yaml", ["train.epochs=3", "model.num_embeds=2"])

config.yaml holds every key the code reads and its default, each with a comment. A --config YAML is
deep-merged over it and then each `key.sub=value` override is applied (the value parsed as YAML);
both are checked: an unknown key or a value of another type than config.yaml's raises ConfigError.
`validate_config` then catches impossible combinations before anything runs. A checkpoint keeps the
config it was trained with; `checkpoint_config` merges it over today's config.yaml.

Imports no training code: only the similarity and loss functions, to try their options.
"""
import copy
import os

import torch
import yaml

from losses import maxmatch_loss
from similarity import METHODS, pairwise_similarity

SET_ELEMENT_TERMS = ("div", "gd", "isd")    # loss terms on a set's elements apart from the global feature
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


class ConfigError(Exception):
    """An unknown config key, a value of the wrong type, or an impossible combination."""


def load_config(path=None, overrides=()):
    """config.yaml defaults, deep-merged with the YAML at `path`, then dotted overrides."""
    cfg = read_yaml(DEFAULT_CONFIG)
    if path is not None:
        cfg = merge_config(cfg, read_yaml(path), source=path)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg, overrides):
    """A copy of cfg with each 'a.b.c=value' applied (value parsed as YAML); unknown keys fail."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        *parents, leaf = key.split(".")
        node = cfg
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config key {key!r} ({'.'.join(parents[:depth + 1])} is not a section)")
            node = node[part]
        value = yaml.safe_load(text) if text else None
        node[leaf] = checked_value(key, node, leaf, value)
    return cfg


def merge_config(base, update, source, prefix=""):
    """Deep merge of a YAML dict over the defaults with the same key and type checks as overrides."""
    if not isinstance(update, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(update).__name__}")
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and merged[key]:
            merged[key] = merge_config(merged[key], value, source, f"{prefix}{key}.")
        else:
            merged[key] = checked_value(f"{prefix}{key}", merged, key, value, source)
    return merged


def checkpoint_config(checkpoint, path):
    """The checkpoint's config over today's defaults, so keys added since it was written get them."""
    return merge_config(read_yaml(DEFAULT_CONFIG), checkpoint["config"], source=path)


def validate_config(cfg, world_size):
    """Combinations the key/type checks cannot see."""
    if cfg["loss"]["similarity"] not in METHODS:
        raise ConfigError(f"loss.similarity={cfg['loss']['similarity']!r} is unknown; use one of {', '.join(METHODS)}")
    sets = torch.nn.functional.normalize(torch.randn(2, cfg["model"]["num_embeds"], 4), dim=-1)
    try:    # the similarity and every loss term on a tiny batch: bad options fail here, not at step 1
        scores = pairwise_similarity(sets, sets, method=cfg["loss"]["similarity"],
                                     **cfg["loss"]["similarity_options"])
        maxmatch_loss(cfg["loss"], scores, torch.eye(2, dtype=torch.bool), sets, sets, sets, sets,
                      sets[:, 0], sets[:, 0])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"loss section: {error}") from None
    check_single_vector(cfg)
    method = cfg["eval"]["method"]
    if method is not None and method not in METHODS:
        raise ConfigError(f"eval.method={method!r} is unknown; use one of {', '.join(METHODS)} or null")
    if cfg["train"]["batch_size"] % world_size:
        raise ConfigError(f"train.batch_size={cfg['train']['batch_size']} is the GLOBAL batch and must be "
                          f"divisible by the number of processes ({world_size})")
    if cfg["train"]["optimizer"] not in ("adamw", "sgd"):
        raise ConfigError(f"train.optimizer={cfg['train']['optimizer']!r}; use adamw or sgd")
    if cfg["train"]["amp"] not in ("bf16", "fp16", "off"):
        raise ConfigError(f"train.amp={cfg['train']['amp']!r}; use bf16, fp16 or off")
    if (cfg["train"]["checkpoint_every"] or 0) < 0:
        raise ConfigError(f"train.checkpoint_every={cfg['train']['checkpoint_every']}; use 0 (epoch ends only) "
                          "or a number of steps")
    if not cfg["run"]["dist_timeout_s"] or cfg["run"]["dist_timeout_s"] <= 0:
        raise ConfigError(f"run.dist_timeout_s={cfg['run']['dist_timeout_s']!r}; use a number of seconds above 0")


def check_single_vector(cfg):
    """model.set_head.type=none is one vector per item (METHOD.md §1): K must be 1, and the terms that
    act on set elements apart from the global feature (Div, GD, ISD) have nothing to act on."""
    head_type = cfg["model"]["set_head"]["type"]
    if head_type not in ("slots", "none"):
        raise ConfigError(f"model.set_head.type={head_type!r} is unknown; use slots or none")
    if head_type != "none":
        return
    if cfg["model"]["num_embeds"] != 1:
        raise ConfigError(f"model.set_head.type=none is one vector per item: set model.num_embeds=1 "
                          f"(it is {cfg['model']['num_embeds']})")
    weighted = [term for term in SET_ELEMENT_TERMS if cfg["loss"][term]["weight"]]
    if weighted:
        raise ConfigError("model.set_head.type=none leaves " + ", ".join(f"loss.{t}" for t in weighted)
                          + " nothing to act on (its element is the global feature): set "
                          + " ".join(f"loss.{t}.weight=0" for t in weighted)
                          + ", or use configs/shapes_single_vector.yaml")


# ----------------------------------------------------------------------------- helpers

def read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as handle:
            return yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(error).splitlines()[0]}") from None


def checked_value(key, node, leaf, value, source="command line"):
    """The value to store at node[leaf], or a ConfigError naming the key."""
    free_form = isinstance(node, dict) and len(node) == 0 or node is None
    if free_form:
        return value
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r} in {source}; known keys here: {', '.join(node)}")
    default = node[leaf]
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(default, int) and isinstance(value, int):
        return value
    elif isinstance(default, (dict, list, str)) and isinstance(value, type(default)):
        return value
    raise ConfigError(f"config key {key!r} ({source}) expects {type(default).__name__}, got {value!r}")
