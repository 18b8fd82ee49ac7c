"""Input checks, in one place: an experiment loaded against the registries, and a plan checked before any run.

:func:`load_experiment` is the configuration as commands and the library load it: the YAML
(``rcnn_lab.config.loader``, pure) with the built-in components and plugins registered, every
component spec checked against its factory and every variant's model built on the meta device.
:func:`preflight` checks what only the data and the machine can tell (the device, every
dataset, ``model.num_classes`` against the datasets' categories) for a whole plan, before any
run is created, and hands each run what it checked (:class:`RunInputs`: the device and the
datasets), so the trainer builds nothing twice. This module imports torch only when a check
needs it, so that errors found in the YAML itself answer at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from rcnn_lab.config import loader
from rcnn_lab.config.schema import AUTO, RunConfig
from rcnn_lab.errors import ConfigError, Problem


def load_experiment(path: str | Path, overrides: list[str] = (), check_models: bool = True,
                    flags: dict[str, tuple[str, Any]] | None = None,
                    on_model: Callable[[RunConfig, Any], None] | None = None) -> loader.Experiment:
    """Load, expand and validate an experiment; raise ``ConfigError`` listing every problem.

    ``overrides`` are ``--set`` texts; ``flags`` maps a command-line flag to the (dotted key, value)
    it sets (errors about that key name the flag). ``check_models`` builds each variant's model on
    the meta device (no memory, no downloads) to find problems only the parts can see, and hands it to
    ``on_model(config, model)`` (``validate`` counts its parameters rather than building it again).
    """
    from rcnn_lab.components import builtin_families

    families = builtin_families()

    def plugins(file: Path, extra: list[str], base: Path) -> list[str]:
        from rcnn_lab.plugins import load_plugins

        families("backbone")  # the built-ins first, so a plugin reusing a built-in name is reported
        return load_plugins(extra, base)

    return loader.load_experiment(path, list(overrides), flags, families=families, load_plugins=plugins,
                                  check=partial(_check_model, on_model=on_model) if check_models else None,
                                  metrics=logged_metrics)


# what a finished run logs besides the evaluation (``final/<name>``): ``runner.artifacts.cost_metrics`` and the
# trainer's training time (tests/search/test_config.py holds the two to this list)
COST_METRICS = ("params", "gflops", "peak_memory_mb", "images_per_s", "train_time_s")


def logged_metrics(config: RunConfig) -> list[str]:
    """Every final metric a run of ``config`` logs: COCO evaluation (``engine.evaluate.metric_names``), then cost."""
    from rcnn_lab.engine.evaluate import metric_names

    return [*metric_names(config.eval.iou_types, config.eval.class_agnostic), *COST_METRICS]


def load_names(path: str | Path) -> loader.Experiment:
    """An experiment's names, variants and ``tracking:`` settings, its components taken as written
    (no registry, no plugins, no torch): for commands that only look its runs up (``report``, ``ui``)."""
    from rcnn_lab.config.types import AsWritten

    return loader.load_experiment(path, families=AsWritten)


def _check_model(config: RunConfig, on_model: Callable[[RunConfig, Any], None] | None = None) -> list[Problem]:
    """The model built on the meta device, and ``model.weights`` against it when they can be checked without a
    download or the tracking store (``engine.weights.check_fits``: a file is memory-mapped)."""
    from rcnn_lab.models.builder import meta_model

    model, problems = meta_model(config.model, path="model")
    if not problems and config.model.weights is not None:
        problems = _fit_problems(config, model)
    if not problems and on_model is not None:
        on_model(config, model)
    return problems


def _fit_problems(config: RunConfig, model=None) -> list[Problem]:
    """``model.weights`` that the variant's model (``model``, else built here on the meta device) cannot take:
    fewer than half of its tensors by name and shape."""
    from rcnn_lab.engine import weights as w
    from rcnn_lab.models.builder import meta_model

    if model is None:
        model, problems = meta_model(config.model, path="model")
        if problems:
            return problems
    try:
        w.check_fits(model, config.model.weights)
    except ConfigError as exc:
        return exc.problems
    return []


BATCH_OVER_DATA = 100  # data.batch_size above this many times the training images is refused (docs/configuration.md)


def check_num_classes(num_classes: int, train_set, val_set) -> None:
    """``model.num_classes`` must cover 1 + the categories of ``data.train``; val must share them.

    Labels are contiguous (``i + 1`` is ``categories[i]``): fewer classes make the loss fail on
    labels >= num_classes. More are allowed (``base.yaml`` keeps torchvision's 91): the spare
    classes never see a positive, and evaluation ignores detections with no category.
    """
    cats = getattr(train_set, "categories", None)
    if cats is None:
        return
    problems = []
    names = ", ".join(str(c.get("name", c.get("id"))) for c in cats[:8]) + (", ..." if len(cats) > 8 else "")
    if num_classes < len(cats) + 1:
        problems.append(Problem("model.num_classes", f"is {num_classes} but data.train has {len(cats)} categories "
                                f"({names}); set model.num_classes to {len(cats) + 1} (1 + {len(cats)} categories)"))
    val_cats = getattr(val_set, "categories", None)
    pairs = [[(c["id"], c.get("name")) for c in cs] for cs in (cats, val_cats or cats)]
    if pairs[0] != pairs[1]:
        i = next((i for i, (a, b) in enumerate(zip(*pairs)) if a != b), min(map(len, pairs)))
        val, train = (str(ps[i]) if i < len(ps) else "none" for ps in (pairs[1], pairs[0]))
        problems.append(Problem("data.val", f"categories differ from data.train's (label {i + 1} is {val} "
                                f"in data.val, {train} in data.train); give both splits the same categories"))
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class RunInputs:
    """What one run trains on, checked: its device and its datasets (built once per run)."""

    device: Any  # torch.device
    train_set: Any
    val_set: Any
    # model.weights as the trainer loads it: a torchvision weights name or a local file (a run:<id> until
    # runner.weights resolves it to the run's last checkpoint); None: no detector weights
    weights: str | None = None
    num_classes: int | None = None  # model.num_classes: auto, resolved from the data (1 + its categories)

    def resolve(self, config: RunConfig) -> RunConfig:
        """``config`` with ``model.num_classes: auto`` replaced by the number the data gave (else unchanged)."""
        if config.model.num_classes != AUTO or self.num_classes is None:
            return config
        return replace(config, model=replace(config.model, num_classes=self.num_classes))


def auto_num_classes(train_set, key: str = "data.train") -> int:
    """``model.num_classes: auto``: 1 (background) + the categories of ``train_set`` (``key`` names it in errors)."""
    cats = getattr(train_set, "categories", None)
    if not cats:
        raise ConfigError([Problem("model.num_classes", f"is auto but {key} ({type(train_set).__name__}) lists no "
                                   "categories to count; set model.num_classes to 1 + its number of classes")])
    return len(cats) + 1


def prepare(config: RunConfig, built: dict | None = None) -> RunInputs:
    """Resolve the device, build both datasets and check them against the model: one run's input checks.

    ``built`` caches datasets by spec across runs. Raises ``ConfigError`` listing every problem.
    """
    inputs, problems = _prepare(config, {} if built is None else built)
    if problems:
        raise ConfigError(problems)
    return inputs


def _prepare(config: RunConfig, built: dict, splits: tuple[str, ...] = ("train", "val"),
             weights_files: bool = True) -> tuple[RunInputs | None, list[Problem]]:
    """One run's checks (``splits``: the datasets to build; ``weights_files``: read the backbone's and the
    detector's weights too, as training does)."""
    from rcnn_lab.components import register_builtins
    from rcnn_lab.engine.device import resolve_device
    from rcnn_lab.registry import BACKBONES, DATASETS

    register_builtins()
    problems: list[Problem] = []
    device = None
    try:
        device = resolve_device(config.train.device)
    except ConfigError as exc:
        problems += exc.problems
    backbone = config.model.backbone
    ident = ("backbone", backbone.type, repr(sorted(backbone.kwargs.items())))
    if weights_files and backbone.kwargs.get("weights") is not None and ident not in built:
        built[ident] = True
        try:  # pretrained weights: downloaded (imagenet) or read (a file) now, not once a run exists
            BACKBONES.build(backbone, "model.backbone")
        except ConfigError as exc:
            problems += exc.problems
    weights = config.model.weights
    if weights_files and weights is not None and ("weights", weights) not in built:
        built[("weights", weights)] = True
        problems += _weights_problems(config)
    sets = []
    for key in splits:
        spec = getattr(config.data, key)
        ident = (spec.type, repr(sorted(spec.kwargs.items())))
        if ident not in built:
            try:
                built[ident] = DATASETS.build(spec, f"data.{key}")
            except ConfigError as exc:
                built[ident] = None
                problems += exc.problems
        sets.append(built[ident])
    named = dict(zip(splits, sets))
    train = named.get("train", named.get("val"))  # data.val alone (an evaluation): the classes are checked against it
    num_classes = None  # model.num_classes: auto, counted from the data
    if train is not None and named.get("val") is not None:
        try:
            if config.model.num_classes == AUTO:
                num_classes = auto_num_classes(train, "data.train" if "train" in named else "data.val")
            check_num_classes(num_classes or config.model.num_classes, train, named["val"])
        except ConfigError as exc:
            problems += exc.problems
    size = len(named["train"]) if named.get("train") is not None and hasattr(named["train"], "__len__") else None
    if size is not None and config.data.batch_size > BATCH_OVER_DATA * size:  # each step repeats every image 100+ times
        problems.append(Problem("data.batch_size", f"is {config.data.batch_size:,} but data.train has {size:,} images; "
                                f"a batch repeats each image {config.data.batch_size // size}x: use at most {size:,}"))
    inputs = RunInputs(device, named.get("train"), named.get("val"), weights=weights, num_classes=num_classes)
    return (inputs if not problems else None), problems


def _weights_problems(config: RunConfig) -> list[Problem]:
    """``model.weights`` before any run exists: a weights name is downloaded to torch's hub cache now
    (offline and not cached: one line saying where to put the file), a file must exist, and either must fit
    the model. A ``run:<id>`` needs the tracking store: ``runner.weights`` checks it."""
    from rcnn_lab.engine import weights as w
    from rcnn_lab.engine.hub_weights import fetch, is_hub_name

    spec = config.model.weights
    if w.is_run(spec):
        return []
    try:
        if not is_hub_name(spec):
            w.identity_of(spec)
            return []  # a file: its fit was checked when the experiment was loaded
        fetch(spec, with_masks=config.model.roi_heads.mask_head is not None)
    except ConfigError as exc:
        return exc.problems
    return _fit_problems(config)  # a name just downloaded could not be checked at load


def prepare_eval(plan) -> dict[str, RunInputs]:
    """The input checks of ``rcnn-lab eval`` for every planned evaluation, before any run exists:
    ``{run.hash: RunInputs}`` with the device and ``data.val`` (``train_set`` None: ``data.train`` is not
    built, an evaluation needs no training data) and ``model.num_classes`` against data.val's categories.
    Neither ``model.weights`` nor the backbone's weights are read: the evaluated weights replace every tensor
    (``models.builder.build_for_weights``)."""
    built: dict = {}
    inputs: dict[str, RunInputs] = {}
    problems: list[Problem] = []
    for run in plan:
        prepared, found = _prepare(run.config, built, splits=("val",), weights_files=False)
        problems += [p if p.file else Problem(p.path, p.message, run.variant.source_of(p.path)) for p in found]
        if prepared is not None:
            inputs[run.hash] = replace(prepared, weights=None)
    unique = list({str(p): p for p in problems}.values())
    if unique:
        raise ConfigError(unique)
    return inputs


def preflight(plan) -> dict[str, RunInputs]:
    """Every run's input checks, before any run is created: ``{run.hash: RunInputs}``.

    Each distinct dataset spec is built once for the whole plan; problems of every run are raised
    together (``ConfigError``), each naming the file that set its key.
    """
    built: dict = {}
    inputs: dict[str, RunInputs] = {}
    problems: list[Problem] = []
    for run in plan:
        prepared, found = _prepare(run.config, built)
        problems += [p if p.file else Problem(p.path, p.message, run.variant.source_of(p.path)) for p in found]
        if prepared is not None:
            inputs[run.hash] = prepared
    unique = list({str(p): p for p in problems}.values())
    if unique:
        raise ConfigError(unique)
    return inputs
