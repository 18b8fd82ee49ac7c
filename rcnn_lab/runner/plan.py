"""The plan of an invocation: every variant x seed, with its stable config hash."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from rcnn_lab.config.loader import Experiment, Variant, config_hash
from rcnn_lab.config.schema import RunConfig
from rcnn_lab.errors import ConfigError, Problem, did_you_mean
from rcnn_lab.runner.names import file_part, slug

__all__ = ["PlannedRun", "file_part", "make_plan", "output_dir", "parse_shard", "resolved", "slug", "weights_identity"]


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    seed: int
    config: RunConfig
    hash: str

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed={self.seed}"

    @property
    def slug(self) -> str:
        """Folder-safe name for outputs."""
        return slug(self.variant.name, self.seed, self.hash)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``I/N`` (0 <= I < N) -> (I, N)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError([Problem("--shard", f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")])
    return int(m.group(1)), int(m.group(2))


def weights_identity(variant: Variant, tracking_uri: str | None = None, known: dict | None = None) -> str | None:
    """The identity of a variant's ``model.weights`` for its config hash (None when unset): torchvision's
    name, or the sha256 of a file's content; ``run:<id>``: of its last checkpoint's content, looked up in the
    store at ``tracking_uri`` (``runner.weights.run_identity``), so that checkpoint given as a file is the same
    run. ``known`` caches identities by spec across the variants of a plan."""
    spec = variant.config.model.weights
    if spec is None:
        return None
    from rcnn_lab.engine.weights import identity_of, is_run

    known = {} if known is None else known
    if spec not in known:
        file = variant.source_of("model.weights")
        if is_run(spec):
            from rcnn_lab.runner.weights import run_identity

            known[spec] = run_identity(spec, tracking_uri, file=file)
        else:
            known[spec] = identity_of(spec, file=file, with_masks=variant.config.model.roi_heads.mask_head is not None)
    return known[spec]


def make_plan(exp: Experiment, only: list[str] | None = None, seeds: list[int] | None = None,
              shard: tuple[int, int] | None = None) -> list[PlannedRun]:
    """Deterministic plan: variants in file order, seeds in the given order; ``shard`` keeps every N-th."""
    names = [v.name for v in exp.variants]
    problems = [Problem("--only", f"no variant {n!r}{did_you_mean(n, names)} (variants: {', '.join(names)})")
                for n in (only or []) if n not in names]
    if problems:
        raise ConfigError(problems)
    chosen = [v for v in exp.variants if not only or v.name in only]
    runs, known = [], {}
    for v in chosen:
        identity = weights_identity(v, exp.tracking.uri, known)
        for s in seeds if seeds is not None else exp.seeds:
            cfg = v.with_seed(s)
            runs.append(PlannedRun(v, s, cfg, config_hash(cfg, identity)))
    if shard is not None:
        i, n = shard
        runs = runs[i::n]
    return runs


def resolved(plan: list[PlannedRun], inputs: dict) -> list[PlannedRun]:
    """``plan`` with each run's ``model.num_classes: auto`` resolved from the data its ``inputs`` (``engine.preflight``,
    by run hash) read; the hashes stay those of the configs as written."""
    return [replace(r, config=inputs[r.hash].resolve(r.config)) if r.hash in inputs else r for r in plan]


def output_dir(root: Path, exp: Experiment, run: PlannedRun) -> Path:
    """A run's output folder (its checkpoints): ``<root>/outputs/<experiment>/<run slug>``."""
    return Path(root) / "outputs" / exp.name / run.slug
