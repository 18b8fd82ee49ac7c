"""Keys added with a default leave the config hash of configs that do not set them unchanged."""

from __future__ import annotations

import hashlib
import json

from rcnn_lab.config.loader import config_hash
from rcnn_lab.config.types import to_plain
from rcnn_lab.engine.preflight import load_experiment
from tests.conftest import EXPERIMENTS


def _hash_without(config, key: str) -> str:
    """The hash as computed before ``data.<key>`` existed (the same recipe, the key absent)."""
    plain = to_plain(config)
    for name in ("name", "description", "tracking"):
        plain.pop(name, None)
    if plain["model"].get("weights") is None:
        plain["model"].pop("weights", None)
    plain["data"].pop(key)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


def test_data_sampler_counts_only_when_per_process():
    def config(*overrides):
        return load_experiment(EXPERIMENTS / "quickstart.yaml", list(overrides)).variants[0].config

    default = config()
    assert config_hash(default) == _hash_without(default, "sampler")  # runs stored before the key keep their hash
    assert config_hash(config("data.sampler=global")) == config_hash(default)
    assert config_hash(config("data.sampler=per_process")) != config_hash(default)
