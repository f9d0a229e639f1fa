"""Reading the packaged recipe YAMLs (``hf_fg2u/recipes/NAME.yaml``) and YAML config files, below the trainer and
the CLI so that both read them one way: YAML 1.2 booleans, a key given twice refused, aliases that expand past
``MAX_YAML_VALUES`` values refused."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_BOOL_TAG = "tag:yaml.org,2002:bool"
PACKAGED_CONFIGS = Path(__file__).parent / "recipes"  # every packaged YAML is a recipe of that name


class Yaml12Loader(yaml.SafeLoader):
    """A safe loader whose booleans are YAML 1.2's (``yes``/``no``/``on``/``off`` stay strings) and which refuses a
    key given twice in one mapping (plain YAML keeps the last silently: a typo'd override wins unseen)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # merge keys (<<: *base) first: their tag has no constructor of its own
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        size = expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases (*name) expand to {size} values, more than the {MAX_YAML_VALUES} a config "
                "may hold (a 'billion laughs' file); write the values out, or use fewer aliases", node.start_mark,
            )  # fmt: skip
        return self.construct_document(node)


MAX_YAML_VALUES = 100_000  # a config holds tens of values; an alias bomb expands to billions


def expanded_size(node: yaml.Node, sizes: dict) -> int:
    """How many values ``node`` holds with every alias expanded, counted once per distinct node (``sizes``: by
    node id), so that a bomb is measured without being built."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node inside itself (a recursive alias) counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def packaged_recipes() -> list[str]:
    """The names of the packaged recipe YAMLs."""
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """``path`` when it is a file, else the packaged YAML of that name (``--config noisy_reweighting_real``,
    ``--config noisy_reweighting.yaml``, ``--config hf_fg2u/recipes/noisy_reweighting.yaml`` from any directory)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"Config {path} is a folder; pass a YAML file (e.g. {path / 'config.yaml'}).")
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"Config file {path} does not exist, and no packaged config has that name ({packaged_recipes()})."
    )


def load_yaml_config(path: str | Path) -> dict:
    """The mapping in a YAML file (or a packaged one, by name); a missing file, bad YAML or a non-mapping is an
    error naming the file."""
    path = find_config(path)
    try:
        values = yaml.load(path.read_text(), Loader=Yaml12Loader) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8.") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(values).__name__}.")
    return values


def recipe_values(name: str) -> dict:
    """The values of packaged recipe ``name``; a ValueError naming the packaged recipes for another name."""
    if name not in packaged_recipes():
        raise ValueError(f"recipe={name!r} is not a packaged recipe; use one of {packaged_recipes()}.")
    return load_yaml_config(PACKAGED_CONFIGS / f"{name}.yaml")
