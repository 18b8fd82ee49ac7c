"""Keys added with a default leave the config hash of configs that do not set them unchanged."""

from __future__ import annotations

import hashlib
import json

import pytest

from rcnn_lab.config.loader import config_hash
from rcnn_lab.config.types import to_plain
from rcnn_lab.engine.preflight import load_experiment
from tests.conftest import EXPERIMENTS

# written out here, not read from the loader: the keys runs were stored without
ADDED = [("data", "sampler"), ("model", "transform", "size_divisible")]


def _hash_before(config) -> str:
    """The hash as computed before the added keys existed (the same recipe, the keys absent)."""
    plain = to_plain(config)
    for name in ("name", "description", "tracking"):
        plain.pop(name, None)
    if plain["model"].get("weights") is None:
        plain["model"].pop("weights", None)
    for *section, key in ADDED:
        where = plain
        for part in section:
            where = where[part]
        where.pop(key)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


def config(*overrides):
    return load_experiment(EXPERIMENTS / "quickstart_v1.yaml", list(overrides)).variants[0].config


def test_runs_stored_before_the_keys_keep_their_hash():
    default = config()
    assert config_hash(default) == _hash_before(default)


@pytest.mark.parametrize("key, default, other", [("data.sampler", "global", "per_process"),
                                                 ("model.transform.size_divisible", "32", "16")])
def test_an_added_key_counts_only_away_from_its_default(key, default, other):
    assert config_hash(config(f"{key}={default}")) == config_hash(config())
    assert config_hash(config(f"{key}={other}")) != config_hash(config())
