"""config.yaml is the one source of every default: each key the code reads is in it with a comment,
and the defaults that losses.py, similarity.py and shapes.py repeat for standalone use equal it."""
import ast
import inspect
import os
import re

import pytest
import yaml

import config
import losses
import shapes
import similarity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_FILES = sorted([name for name in os.listdir(REPO) if name.endswith(".py")]
                    + [os.path.join("benchmarks", name) for name in os.listdir(os.path.join(REPO, "benchmarks"))
                       if name.endswith(".py")])
# The config section each variable name holds wherever the code uses it.
SECTION_OF = {"cfg": (), "model_cfg": ("model",), "image_cfg": ("model", "image"), "text_cfg": ("model", "text"),
              "head_cfg": ("model", "set_head"), "data_cfg": ("data",), "train_cfg": ("train",)}


def shipped():
    with open(config.DEFAULT_CONFIG, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_every_config_key_the_code_reads_is_in_config_yaml():
    defaults, missing = shipped(), []
    for path in CODE_FILES:
        for variable, keys, line in config_reads(path):
            node = defaults
            for depth, key in enumerate(SECTION_OF[variable] + keys):
                if not isinstance(node, dict) or (node == {} and depth > 0):
                    break           # a free-form value (e.g. similarity_options): any key
                if key not in node:
                    missing.append(f"{path}:{line}: {'.'.join(SECTION_OF[variable] + keys)}")
                    break
                node = node[key]
    assert not missing, "keys read by the code but absent from config.yaml:\n" + "\n".join(missing)


def test_the_key_scan_sees_the_reads_it_must_check():
    reads = {".".join(SECTION_OF[variable] + keys) for path in CODE_FILES for variable, keys, _ in config_reads(path)}
    assert {"model.text.max_length", "model.image.vit_config", "train.grad_clip", "data.token_drop",
            "run.seed", "model.set_head.depth"} <= reads


def test_every_config_variable_name_has_a_known_section():
    names = {node.id for path in CODE_FILES for node in ast.walk(parse(path))
             if isinstance(node, ast.Name) and re.fullmatch(r"[a-z_]*cfg", node.id)}
    assert names <= set(SECTION_OF), f"add {sorted(names - set(SECTION_OF))} to SECTION_OF"


def test_every_config_yaml_key_has_a_comment():
    with open(config.DEFAULT_CONFIG, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    uncommented = [line.strip() for line in lines
                   if re.match(r"\s*[a-z_0-9]+:\s*\S", line) and "#" not in line]
    assert not uncommented, "config.yaml keys without a comment:\n" + "\n".join(uncommented)


def test_loss_term_defaults_equal_config_yaml():
    loss = shipped()["loss"]
    assert {name: loss[name] for name in losses.LOSS_TERMS} == losses.LOSS_TERMS


def test_similarity_keyword_defaults_equal_config_yaml():
    defaults = shipped()
    for function in (similarity.pairwise_similarity, similarity.score_matrix):
        assert inspect.signature(function).parameters["method"].default == defaults["loss"]["similarity"]
    assert inspect.signature(similarity.score_matrix).parameters["chunk_size"].default == defaults["eval"]["chunk_size"]
    assert defaults["loss"]["similarity_options"] == {}, "options beyond METHOD_OPTIONS' defaults"


def test_shapes_generator_keyword_defaults_equal_config_yaml():
    defaults = {key: list(value) if isinstance(value, tuple) else value
                for key, value in shapes.shapes_defaults().items()}
    assert shipped()["data"]["shapes"] == defaults


@pytest.mark.parametrize("override", ["model.text.max_length=64", "model.image.vit_config={image_size: 32}"])
def test_keys_the_code_reads_can_be_overridden(override):
    key, value = override.split("=")
    section, sub, leaf = key.split(".")
    assert config.load_config(None, [override])[section][sub][leaf] == yaml.safe_load(value)


# ----------------------------------------------------------------------------- helpers

def parse(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        return ast.parse(handle.read())


def config_reads(path):
    """[(variable, (key, ...), line)] for every `var["a"]["b"]` and `var[...].get("c")` chain whose
    root is a config variable; a chain stops at the first key that is not a string literal."""
    reads = []
    for node in ast.walk(parse(path)):
        chain = outermost_chain(node)
        if chain:
            reads.append(chain)
    return [read for read in reads if read[1]]


def outermost_chain(node):
    keys = []
    while True:
        if isinstance(node, ast.Subscript):
            key = node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args):
            key, node = node.args[0], node.func
        else:
            break
        keys.append(key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in SECTION_OF or not keys:
        return None
    keys.reverse()
    known = tuple(keys[:keys.index(None)] if None in keys else keys)
    return node.id, known, getattr(node, "lineno", 0)
