"""Load experiment files: YAML (``safe_load``), ``base:`` inheritance, variants, grids, seeds, ``--set``.

Merging rules: mappings merge key by key; lists and scalars replace; a component spec whose
``type`` changes is replaced whole (the old type's arguments do not leak into the new one).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from rcnn_lab.config import guards
from rcnn_lab.config.schema import EXPERIMENT_KEYS, RunConfig, TrackingConfig
from rcnn_lab.config.schema import warnings as config_warnings
from rcnn_lab.config.search import SearchConfig, parse_search
from rcnn_lab.config.types import Families, convert_dataclass, to_plain
from rcnn_lab.config.yaml_io import MAX_DEPTH, read_yaml, safe_load, unreadable
from rcnn_lab.errors import ConfigError, Problem, did_you_mean, display_path, excerpt

OVERRIDE_SOURCE = "--set"


def merge(dst: dict, src: dict, prov: dict[str, str], source: str, prefix: str = "") -> dict:
    """Deep-merge ``src`` into ``dst`` in place, recording which source set each dotted key."""
    for key, val in src.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        cur = dst.get(key)
        same_type = not (isinstance(val, dict) and isinstance(cur, dict) and "type" in val and cur.get("type") != val["type"])
        if isinstance(val, dict) and isinstance(cur, dict) and same_type:
            merge(cur, val, prov, source, path)
        elif val is None and isinstance(cur, dict) and path in guards.SECTIONS:
            raise ConfigError([Problem(path, "is a whole section: null would reset every key a base file sets under "
                                       "it to its default; remove the line, or set the keys under it", source)])
        else:
            dst[key] = copy.deepcopy(val)
            for k in [k for k in prov if k == path or k.startswith(path + ".")]:
                del prov[k]
            prov[path] = source
    return dst


def set_dotted(data: dict, key: str, value: Any, prov: dict[str, str], source: str) -> None:
    """Set ``a.b.c`` in nested mappings (creating them), merging mapping values."""
    if not isinstance(key, str) or not key:
        raise ConfigError([Problem("", f"override key {excerpt(key)} must be a dotted.key", source)])
    parts = key.split(".")
    if len(parts) > MAX_DEPTH:
        raise ConfigError([Problem("", f"override key {excerpt(key)} has more than {MAX_DEPTH} parts", source)])
    indexed = re.match(r"(.*?)\[\d*\]", key)
    if indexed:
        raise ConfigError([Problem(key, f"list items cannot be set by index; set the whole list "
                                        f"({indexed.group(1)}: [...])", source)])
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    merge(node, {parts[-1]: value}, prov, source, ".".join(parts[:-1]))


def parse_override(text: str) -> tuple[str, Any]:
    """``model.rpn.nms_thresh=0.6`` -> (key, YAML-typed value)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError([Problem("", f"override {excerpt(text)} must look like dotted.key=value", OVERRIDE_SOURCE)])
    key, raw = text.split("=", 1)
    key = key.strip()
    if len(key) > 1000:
        raise ConfigError([Problem("", f"override key {excerpt(key)} is {len(key):,} characters long; "
                                   "no config key is longer than 100", OVERRIDE_SOURCE)])
    try:
        value = safe_load(raw, OVERRIDE_SOURCE, key) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


MAX_VARIANTS = 1000  # variants x grid points of one experiment
MAX_FILES = 64  # files read for one experiment (its base: files, counted as often as they are named)


def resolve_file(path: Path, prov: dict[str, str], stack: tuple[Path, ...] = (), reads: list | None = None) -> dict:
    """Read ``path`` with its ``base:`` chain (relative to the file) merged underneath."""
    try:
        path = path.resolve()
    except RuntimeError:  # Python < 3.13 on a symlink loop
        raise ConfigError([Problem("", unreadable(OSError(errno.ELOOP, "loop")), display_path(path))]) from None
    reads = [] if reads is None else reads
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise ConfigError([Problem("base", f"inheritance cycle: {chain}; remove one base", display_path(stack[-1]))])
    reads.append(path)
    if len(reads) > MAX_FILES:
        raise ConfigError([Problem("base", f"the base: files name more than {MAX_FILES} files in all; "
                                   "name each base once", display_path(stack[-1]))])
    data = read_yaml(path, display_path(path))
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([Problem("base", "must be a file path or a list of file paths", display_path(path))])
    out: dict = {}
    for b in bases:
        base_path = path.parent / b
        try:
            found = base_path.stat() is not None and base_path.is_file()
        except (FileNotFoundError, NotADirectoryError):
            found = False
        except OSError as exc:  # a symlink loop, no permission
            raise ConfigError([Problem("base", f"base file {excerpt(b)} {unreadable(exc)}", display_path(path))]) from None
        if not found:
            raise ConfigError([Problem("base", f"base file {excerpt(b)} not found next to this file; fix the path", display_path(path))])
        merge(out, resolve_file(base_path, prov, (*stack, path), reads), prov, display_path(base_path.resolve()))
    return merge(out, data, prov, display_path(path))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested plain config -> {dotted.key: leaf}. Component specs flatten too (``...box_head.type``)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


# schema keys added after runs were stored, with their defaults: left out of the hash at the default
ADDED_LATER = {("data", "sampler"): "global", ("model", "transform", "size_divisible"): 32}


def config_hash(config: RunConfig, weights: str | None = None) -> str:
    """Stable hash of everything that affects results (not names, descriptions or tracking).

    ``model.weights`` counts by ``weights``, its identity (``engine.weights.identity_of``: a weights
    name or the digest of the file's content, so the same file under another path is the same run;
    ``run:<id>``: the digest of that run's last checkpoint; ``runner.plan.weights_identity`` passes it), else as written. Unset, it is left out: configs without it keep the
    hash they had before the key existed.
    """
    plain = to_plain(config)
    for key in ("name", "description", "tracking"):
        plain.pop(key, None)
    model = plain.get("model", {})
    if model.get("weights") is None:
        model.pop("weights", None)
    elif weights is not None:
        model["weights"] = weights
    for *section, key in ADDED_LATER:  # at their default: configs keep the hash they had before the key
        where = plain
        for part in section:
            where = where.get(part, {})
        if key in where and where[key] == ADDED_LATER[(*section, key)]:
            where.pop(key)
    blob = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    """One named variant of an experiment with its validated config."""

    name: str
    config: RunConfig
    changed: dict[str, Any] = field(default_factory=dict)  # dotted keys that differ from the base
    baseline: bool = False
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # dotted key -> file or --set
    file: str = ""

    def source_of(self, path: str) -> str:
        """Where ``path`` (a dotted key) was set, for errors found after loading (e.g. by a dataset)."""
        return _source_of(path, self.sources, self.file)

    def with_seed(self, seed: int) -> RunConfig:
        return replace(self.config, train=replace(self.config.train, seed=seed))


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    variants: list[Variant]
    seeds: list[int]
    plugins: list[str] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # valid but probably unintended (printed by the CLI)
    plugin_files: list[str] = field(default_factory=list)  # plugin files and entry points loaded (printed by the CLI)
    search: SearchConfig | None = None  # ``search:``: a hyperparameter search over the baseline's keys

    def variant(self, name: str) -> Variant:
        names = [v.name for v in self.variants]
        if name not in names:
            raise ConfigError([Problem("--variant", f"no variant {excerpt(name)}{did_you_mean(name, names)} (variants: {', '.join(names)})", str(self.path))])
        return self.variants[names.index(name)]

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.baseline)

    @property
    def tracking(self) -> TrackingConfig:
        """Where the experiment's runs are tracked (the first variant's ``tracking:``)."""
        return self.variants[0].config.tracking

    @property
    def tracking_name(self) -> str:
        """The MLflow experiment of its runs: ``tracking.experiment``, else the experiment's ``name``."""
        return self.tracking.experiment or self.name


def _variant_overrides(raw: dict, file: str) -> list[tuple[str, dict[str, Any]]]:
    """Expand ``variants:`` x ``grid:`` into (name, {dotted.key: value}) in file order."""
    variants = raw.get("variants") or {}
    grid = raw.get("grid") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ConfigError([Problem("variants", "must map variant names to {dotted.key: value} overrides", file)])
    if not isinstance(grid, dict) or not all(isinstance(k, str) and isinstance(v, list) and v for k, v in grid.items()):
        raise ConfigError([Problem("grid", "must map dotted keys to non-empty lists of values", file)])
    named = [(str(k), dict(v or {})) for k, v in variants.items()] or [("default", {})]
    for _name, over in named:
        for key, value in over.items():
            if isinstance(key, str):
                guards.check_override_key(key, value, file)
    for key, values in grid.items():
        guards.check_override_key(key, None if None in values else values, file)
    guards.check_variants(named, grid, file)
    if not grid:
        return named
    count = len(named) * math.prod(len(v) for v in grid.values())
    if count > MAX_VARIANTS:
        raise ConfigError([Problem("grid", f"expands to {count:,} variants; the limit is {MAX_VARIANTS:,} "
                                   "(split the sweep into several experiments)", file)])
    keys = list(grid)
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    out = []
    for name, over in named:
        for combo in itertools.product(*(grid[k] for k in keys)):
            label = ",".join(f"{lab}={json.dumps(v) if not isinstance(v, str) else v}" for lab, v in zip(labels, combo))
            full = label if name == "default" and not variants else f"{name}/{label}"
            out.append((full, {**over, **dict(zip(keys, combo))}))
    return out


def load_experiment(path: str | Path, overrides: list[str] = (), flags: dict[str, tuple[str, Any]] | None = None, *,
                    families: Families, load_plugins: Callable[[Path, list[str], Path], Any] | None = None,
                    check: Callable[[RunConfig], list[Problem]] | None = None,
                    metrics: Callable[[RunConfig], list[str]] | None = None) -> Experiment:
    """Load, expand and validate an experiment; raise ``ConfigError`` listing every problem.

    ``overrides`` are ``--set`` texts; ``flags`` maps a command-line flag to the (dotted key, value)
    it sets, applied last, so that errors about that key name the flag the user typed.

    The layers above supply what this one cannot know: ``families`` checks component specs (see
    ``config.types``), ``load_plugins(file, plugins, base)`` (returning the files it loaded) is called with the experiment's
    ``plugins:`` list before any spec is checked, and ``check`` adds problems of each valid
    variant (e.g. its model); ``metrics(config)`` names the metrics a run logs (a ``search:`` objective
    must be one). Most callers want ``rcnn_lab.engine.preflight.load_experiment``.
    """
    path = Path(path)
    prov: dict[str, str] = {}
    raw = resolve_file(path, prov)
    file = display_path(path.resolve())
    parsed = [(*parse_override(o), OVERRIDE_SOURCE) for o in overrides]
    parsed += [(key, value, flag) for flag, (key, value) in (flags or {}).items()]
    for key, value, source in parsed:
        guards.check_override_key(key, value, source)
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError([Problem("plugins", "must be a list of plugin file paths", file)])

    warnings: list[Problem] = []
    seeds = guards.experiment_seeds(raw, parsed, prov.get("seeds", file), _source_of("train.seed", prov, file), warnings)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        seeds = list(dict.fromkeys(seeds))
        warnings.append(Problem("seeds", f"{', '.join(map(str, repeated))} listed more than once; each seed runs once",
                                prov.get("seeds", file)))
    expanded = _variant_overrides(raw, prov.get("variants", prov.get("grid", file)))
    names = [n for n, _ in expanded]
    baseline = raw.get("baseline", names[0])
    if baseline not in names:  # a variant's own name marks its first grid expansion
        expansions = [n for n in names if n.startswith(f"{baseline}/")]
        if not expansions:
            choices = sorted({n.split("/", 1)[0] for n in names} | set(names))
            raise ConfigError([Problem("baseline", f"no variant {excerpt(baseline)}{did_you_mean(str(baseline), choices)}", prov.get("baseline", file))])
        baseline = expansions[0]

    plugin_files: list[str] = []
    if load_plugins is not None:
        try:
            plugin_files = list(load_plugins(path, plugins, Path(prov.get("plugins", file)).parent) or [])
        except ConfigError as exc:
            source = prov.get("plugins", file)
            raise ConfigError([p if p.file else Problem(p.path, p.message, source) for p in exc.problems]) from None
    base_raw = {k: v for k, v in raw.items() if k not in EXPERIMENT_KEYS}
    problems: list[Problem] = []
    seen: set[str] = set()
    variants: list[Variant] = []
    base_flat = None
    baseline_data: dict = {}
    for name, over in expanded:
        vprov = dict(prov)
        data = copy.deepcopy(base_raw)
        for key, value in over.items():
            set_dotted(data, key, value, vprov, prov.get("variants", prov.get("grid", file)))
        for key, value, source in parsed:
            set_dotted(data, key, value, vprov, source)
        vproblems: list[Problem] = []
        if name == baseline:
            baseline_data = copy.deepcopy(data)
        cfg = convert_dataclass(data, RunConfig, "", vproblems, families)
        if cfg is not None and not vproblems and check is not None:
            vproblems.extend(check(cfg))
        for p in vproblems:
            p = Problem(p.path, p.message, p.file or _source_of(p.path, vprov, file))
            if str(p) not in seen:
                seen.add(str(p))
                problems.append(p)
        if vproblems or cfg is None:
            continue
        flat = flatten(to_plain(cfg))
        if base_flat is None:
            base_cfg = convert_dataclass(copy.deepcopy(base_raw), RunConfig, "", [], families)
            base_flat = flatten(to_plain(base_cfg)) if base_cfg is not None else flat
        changed = {k: v for k, v in flat.items() if base_flat.get(k, object()) != v and k != "name"}
        for key, message in config_warnings(cfg):
            w = Problem(key, message, _source_of(key, vprov, file))
            if str(w) not in seen:
                seen.add(str(w))
                warnings.append(w)
        variants.append(Variant(name, cfg, changed, baseline=(name == baseline), sources=vprov, file=file))
    if problems:
        raise ConfigError(problems)
    hashes = [(v.name, config_hash(v.with_seed(0))) for v in variants]
    for first, later in guards.same_configs(hashes):
        warnings.append(Problem("variants", f"{later!r} resolves to the same config as {first!r}; it runs once "
                                f"(as {first!r}); make them differ or remove one", prov.get("variants", prov.get("grid", file))))
    search = _search(raw, baseline_data, next(v.config for v in variants if v.baseline), prov.get("search", file),
                     families, check, metrics)
    name = variants[0].config.name
    return Experiment(name, path, variants, list(seeds), list(plugins), warnings, plugin_files, search)


def _search(raw: dict, baseline_data: dict, baseline: RunConfig, file: str, families: Families, check, metrics):
    """``search:`` checked against the baseline variant (``config.search``); None without one."""
    if raw.get("search") is None:
        return None
    setter = lambda d, k, v: set_dotted(d, k, v, {}, "search")  # noqa: E731  (variants' and --set's merge rules)
    search, problems = parse_search(raw["search"], baseline_data, setter, families, file, check, metrics, baseline)
    if problems:
        raise ConfigError(problems)
    return search


def _source_of(path: str, prov: dict[str, str], default: str) -> str:
    """File that holds ``path``: the last source that set it or a key under it (``prov`` keeps the
    order of setting), else the one that set its longest prefix. A ``path`` whose last part was cut
    for display (``kkk...``) matches the keys it starts."""
    if path.endswith("...") and path not in prov:
        cut_under = [k for k in prov if k.startswith(path[:-3])]
        if cut_under:
            return prov[cut_under[-1]]
    under = [k for k in prov if k == path or k.startswith((f"{path}.", f"{path}["))]
    if under:
        return prov[under[-1]]
    parts = path.replace("[", ".[").split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i]).replace(".[", "[")
        if key in prov:
            return prov[key]
    return default
