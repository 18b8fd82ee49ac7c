"""``model.weights``: initialise a whole detector from torchvision's weights or a file, by name and shape.

A spec is a torchvision weights name (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``, the Faster R-CNN
ones, or an alias: ``coco``, ``coco_v2``), or a local file: a torchvision-format state_dict or an
rcnn-lab checkpoint (``engine/checkpoint.py``). ``run:<id>`` (a finished run's last checkpoint)
needs the tracking store: ``runner/weights.py`` turns it into a file before this module reads it.
Names and torch's hub cache: ``engine/hub_weights.py``.

Loading follows detectron2's checkpointer: a tensor of the model is taken from the file when the
file holds one of the same name and shape; a shape change (the predictors when ``num_classes``
differs) keeps the model's fresh tensor and is listed, and so are names missing on either side.
A file of which fewer than half of the model's tensors load is another architecture: an error,
not a run with random weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcnn_lab.engine.hub_weights import ALIASES, KEY, fetch, hub_enum, hub_file, is_hub_name
from rcnn_lab.errors import ConfigError, Problem, display_path, excerpt
from rcnn_lab.models import state_file

RUN_PREFIX = "run:"  # run:<run_id>: resolved by runner/weights.py
MIN_FRACTION = 0.5  # fewer of the model's tensors loaded than this: the file is for another architecture

_IGNORED = ("num_batches_tracked",)  # BatchNorm counters: not weights; FrozenBatchNorm2d has none
# torchvision's builders set FrozenBatchNorm2d's eps to 0 after loading these (detection/_utils.py overwrite_eps:
# they were trained before pytorch/vision#2933); the same content under another file name gets the same
EPS_ZERO = ("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1")
EPS_KEY = "frozen_bn_eps"  # in an rcnn-lab checkpoint: the eps its model's FrozenBatchNorm2d layers used


class StateDict(dict):
    """A state_dict (name -> tensor) that knows the FrozenBatchNorm2d eps its model ran with, when its
    source says (torchvision's COCO_V1 files: 0.0; rcnn-lab checkpoints: recorded); else None."""

    frozen_bn_eps: float | None = None


def is_run(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(RUN_PREFIX)


def run_id_of(spec: str) -> str:
    return spec[len(RUN_PREFIX):].strip()


# --- identity ------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}  # a file's version (_version) -> sha256


def _version(path: Path) -> tuple[str, int, int]:
    """(real path, mtime_ns, size): what the caches of a file's digest and of its names and shapes are keyed on."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_mtime_ns, st.st_size


def _eps_zero_digests() -> tuple[str, ...]:
    """The sha256 prefixes torchvision puts in the file names of the :data:`EPS_ZERO` weights."""
    out = []
    for name in EPS_ZERO:
        stem = Path(hub_enum(name).url).stem
        out.append(stem.rsplit("-", 1)[-1])
    return tuple(out)


def frozen_bn_eps(model: torch.nn.Module) -> float | None:
    """The eps of ``model``'s FrozenBatchNorm2d layers (None without any)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    return next((float(m.eps) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)), None)


def set_frozen_bn_eps(model: torch.nn.Module, eps: float) -> None:
    """torchvision's ``overwrite_eps``: every FrozenBatchNorm2d of ``model`` uses ``eps``."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's content (cached while its path, mtime and size stay the same)."""
    cache_key = _version(path)
    if cache_key not in _DIGESTS:
        h = hashlib.sha256()
        with open(cache_key[0], "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[cache_key] = f"sha256:{h.hexdigest()}"
    return _DIGESTS[cache_key]


def identity_of(spec: str, *, key: str = KEY, file: str | None = None, with_masks: bool = True) -> str:
    """What ``spec`` loads, for the config hash: torchvision's weights name, or the digest of a file's content
    (the same file under another path has the same identity); ``run:<id>`` as written (the store is the runner's:
    ``runner.plan.weights_identity`` counts it by its last checkpoint's digest instead)."""
    if is_run(spec):
        return f"{RUN_PREFIX}{run_id_of(spec)}"
    if is_hub_name(spec):
        return str(hub_enum(spec, with_masks, key, file))
    path = _local(spec, key, file)
    return file_digest(path)


def _local(spec: str, key: str, file: str | None) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ConfigError([Problem(key, f"{excerpt(spec)} is a folder, not a weights file; name the .pth/.pt file in it "
                                        "(a run's checkpoints: checkpoints/iter_*.pt) or use run:<run_id>", file)])
    if not path.is_file():
        raise ConfigError([Problem(key, f"weights file {excerpt(spec)} not found; give an existing .pth/.pt file, "
                                        f"a torchvision weights name ({', '.join(ALIASES)}, "
                                        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1, ...) or run:<run_id>", file)])
    return path


# --- reading ---------------------------------------------------------------------------------------

def read_state(spec: str, *, key: str = KEY, file: str | None = None,
               with_masks: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, identity) of a weights name or a local file (torchvision state_dict or rcnn-lab checkpoint).

    ``key`` is the setting or flag that named ``spec`` and ``file`` the experiment file that set it:
    both are named in the one-line errors.
    """
    if is_run(spec):
        raise ConfigError([Problem(key, f"{excerpt(spec)} names a run of the tracking store; resolve it with "
                                        "rcnn_lab.runner.weights first (rcnn-lab run does)", file)])
    if is_hub_name(spec):
        path = fetch(spec, key=key, file=file, with_masks=with_masks)
        identity = str(hub_enum(spec, with_masks, key, file))
    else:
        path = _local(spec, key, file)
        identity = file_digest(path)
    state = _state_of(path, key, file)
    if identity in EPS_ZERO or identity.removeprefix("sha256:").startswith(_eps_zero_digests()):
        state.frozen_bn_eps = 0.0
    return state, identity


def _state_of(path: Path, key: str, file: str | None, mmap: bool = False) -> StateDict:
    from rcnn_lab.engine.checkpoint import load_failure

    where = display_path(path)
    try:
        payload = state_file.load(path, mmap=mmap)
    except Exception as exc:
        raise ConfigError([Problem(key, f"{where}: not a readable weights file ({load_failure(exc)}); "
                                        "give a torchvision state_dict or an rcnn-lab checkpoint", file)]) from None
    state = payload
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):  # rcnn-lab checkpoint (and detectron2's)
        state = payload["model"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):  # MMDetection / Lightning
        state = payload["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not tensors:
        raise ConfigError([Problem(key, f"{where}: holds no tensors by name (a {type(payload).__name__}); "
                                        "give a torchvision state_dict or an rcnn-lab checkpoint", file)])
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    out = StateDict(tensors)
    if isinstance(payload, dict) and isinstance(payload.get(EPS_KEY), float):
        out.frozen_bn_eps = payload[EPS_KEY]
    return out


# --- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_into` did, tensor by tensor."""

    loaded: list[str] = field(default_factory=list)
    fresh: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, model shape)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    source: str = ""
    identity: str = ""
    reordered: bool = False  # torchvision's COCO class rows put in the dataset's label order (engine.label_order)

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.fresh) + len(self.missing)

    def summary(self, limit: int = 4) -> str:
        """``loaded 392 of 396 tensors; kept fresh: roi_heads.box_predictor.cls_score.weight (91 -> 2 classes), ...``"""
        parts = [f"loaded {len(self.loaded)} of {self.total} tensors"]
        if self.fresh:
            shown = ", ".join(f"{n} ({_change(n, a, b)})" for n, a, b in self.fresh[:limit])
            parts.append(f"kept fresh: {shown}" + (f", +{len(self.fresh) - limit} more" if len(self.fresh) > limit else ""))
        if self.missing:
            parts.append(f"not in the file (fresh): {_names(self.missing, limit)}")
        if self.unexpected:
            parts.append(f"not in the model (ignored): {_names(self.unexpected, limit)}")
        return "; ".join(parts)

    def as_text(self) -> str:
        """The full list, one tensor a line (a run's artifact)."""
        lines = [f"source: {self.source}", f"identity: {self.identity}", self.summary(), ""]
        lines += [f"kept fresh (shape differs): {len(self.fresh)}"]
        lines += [f"  {n}  file {list(a)} -> model {list(b)}" for n, a, b in self.fresh]
        lines += [f"not in the file (fresh): {len(self.missing)}", *(f"  {n}" for n in self.missing)]
        lines += [f"not in the model (ignored): {len(self.unexpected)}", *(f"  {n}" for n in self.unexpected)]
        lines += [f"loaded: {len(self.loaded)}", *(f"  {n}" for n in self.loaded)]
        return "\n".join(lines) + "\n"


def _names(names: list[str], limit: int) -> str:
    more = f", +{len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _change(name: str, old: tuple, new: tuple) -> str:
    """How a predictor tensor changed, in classes where its first dimension counts them."""
    if old and new and old[1:] == new[1:]:
        per_class = 4 if name.rsplit(".", 2)[-2] == "bbox_pred" else 1
        if name.rsplit(".", 2)[-2] in ("cls_score", "bbox_pred", "mask_fcn_logits") and not old[0] % per_class:
            return f"{old[0] // per_class} -> {new[0] // per_class} classes"
    return f"{list(old)} -> {list(new)}"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, identity: str,
              key: str = KEY, file: str | None = None) -> LoadReport:
    """Copy into ``model`` every tensor of ``state`` with a name and shape of the model's; the rest of
    the model keeps its (seeded) initialisation. Raises a one-line ``ConfigError`` when fewer than
    half of the model's tensors load (weights for another architecture): :func:`match`."""
    report = match(model, state, source=source, identity=identity, key=key, file=file)
    with torch.no_grad():
        model.load_state_dict({n: state[n] for n in report.loaded}, strict=False)
    eps = getattr(state, "frozen_bn_eps", None)
    if eps is not None:  # the eps the weights were trained with (torchvision's COCO_V1: 0.0)
        set_frozen_bn_eps(model, eps)
    return report


def match(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, identity: str = "",
          key: str = KEY, file: str | None = None) -> LoadReport:
    """What :func:`load_into` would load, by name and shape (``model`` may be on the meta device); a one-line
    ``ConfigError`` when fewer than half of the model's tensors would."""
    own = model.state_dict()
    report = LoadReport(source=source, identity=identity)
    for name, tensor in own.items():
        if name not in state:
            if not name.endswith(_IGNORED):
                report.missing.append(name)
        elif tuple(state[name].shape) != tuple(tensor.shape):
            report.fresh.append((name, tuple(state[name].shape), tuple(tensor.shape)))
        else:
            report.loaded.append(name)
    report.unexpected = [k for k in state if k not in own and not k.endswith(_IGNORED)]
    counted = [n for n in own if not n.endswith(_IGNORED)]
    useful = [n for n in report.loaded if not n.endswith(_IGNORED)]
    if len(useful) < MIN_FRACTION * len(counted):
        example = (f"e.g. {report.fresh[0][0]} is {list(report.fresh[0][1])} in the file, {list(report.fresh[0][2])} "
                   "in the model" if report.fresh else f"e.g. {report.missing[0]} is not in the file" if report.missing else "")
        raise ConfigError([Problem(key, f"{source} does not fit this model: {len(useful)} of {len(counted)} tensors "
                                        f"match by name and shape ({example}); give weights of the same architecture "
                                        "(model.backbone depth, heads) or change the model", file)])
    return report


def check_fits(model: torch.nn.Module, spec: str, *, key: str = KEY, file: str | None = None) -> None:
    """Raise the one-line error :func:`load_into` would, before any run exists: ``spec`` a local file (memory-
    mapped: names and shapes, no tensor read) or a torchvision weights name already in torch's hub cache.
    A name not downloaded yet (``engine.preflight`` fetches it, then checks) and ``run:<id>`` (the store's:
    ``runner.weights``) are not checked here."""
    if is_run(spec):
        return
    with_masks = getattr(getattr(model, "roi_heads", None), "mask_head", None) is not None
    if is_hub_name(spec):
        enum = hub_enum(spec, with_masks, key, file)
        path, source = hub_file(enum), str(enum)
        if not path.is_file():
            return
    else:
        path, source = _local(spec, key, file), display_path(spec)
    match(model, _shapes(path, _version(path), key, file), source=source, key=key, file=file)


@functools.lru_cache(maxsize=4)
def _shapes(path: Path, version: tuple[str, int, int], key: str, file: str | None) -> dict[str, torch.Tensor]:
    """A weights file's tensor names and shapes (meta tensors), mapped once per ``version`` of the file
    (:func:`_version`): the variants of an experiment that share one file do not each map it again."""
    return {k: torch.empty_like(v, device="meta") for k, v in _state_of(path, key, file, mmap=True).items()}


def foreign_tensors(model: torch.nn.Module, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (tensors of a weights file that the model has no place for) that sit inside a part the
    model has: another architecture, such as a deeper ResNet's extra blocks beside a shallower one's (which all
    fit by name and shape). Tensors of a part the model leaves out (its attribute is None, e.g. a mask head
    under a Faster R-CNN) are not foreign: weights for a larger model of the same family."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        parts = name.split(".")[:-1]
        depth = max(k for k in range(len(parts) + 1) if ".".join(parts[:k]) in modules)
        parent = modules[".".join(parts[:depth])]
        if depth < len(parts) and depth > 0 and getattr(parent, parts[depth], 0) is None:
            continue
        out.append(name)
    return out


def whole(model: torch.nn.Module, report: LoadReport) -> bool:
    """Every tensor of ``model`` came from the weights, and none of the file is left over inside a part the model
    has: the rule for using weights as they are (``rcnn-lab eval`` and ``predict``), where fine-tuning keeps fresh
    what does not fit."""
    return not (report.fresh or report.missing or foreign_tensors(model, report.unexpected))


def load(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, identity: str,
         categories: list[dict] | None = None, key: str = KEY, file: str | None = None) -> LoadReport:
    """The one way weights go into a model for a dataset (the trainer, ``rcnn-lab eval`` and ``predict``):
    torchvision's COCO weights, whose class rows are COCO category ids, first get their predictor rows in
    the label order of ``categories`` (``engine.label_order.to_labels``: label ``i + 1`` is ``categories[i]``)
    when the model's predictors have their shape (else they stay fresh anyway); then :func:`load_into`."""
    from rcnn_lab.engine.label_order import PREDICTOR_ROWS, by_category_id, to_labels

    reordered = False
    if categories and by_category_id(identity):
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith(tuple(PREDICTOR_ROWS))}
        if any(n in state and tuple(state[n].shape) == s for n, s in shapes.items()):
            moved = to_labels(state, [int(c["id"]) for c in categories])
            if moved is not None:
                state, reordered = moved, True
                source = f"{source} (class rows reordered from COCO category ids to the dataset's labels)"
    report = load_into(model, state, source=source, identity=identity, key=key, file=file)
    report.reordered = reordered
    return report


def apply(model: torch.nn.Module, spec: str, *, categories: list[dict] | None = None, key: str = KEY,
          file: str | None = None, with_masks: bool | None = None) -> LoadReport:
    """:func:`read_state` + :func:`load`: initialise ``model`` from ``spec`` (a name or a local file) for a
    dataset of ``categories`` (its label order)."""
    if with_masks is None:
        with_masks = getattr(getattr(model, "roi_heads", None), "mask_head", None) is not None
    state, identity = read_state(spec, key=key, file=file, with_masks=with_masks)
    source = str(hub_enum(spec, with_masks, key, file)) if is_hub_name(spec) else display_path(spec)
    return load(model, state, source=source, identity=identity, categories=categories, key=key, file=file)
