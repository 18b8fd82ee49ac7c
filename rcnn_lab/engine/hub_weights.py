"""torchvision's detection weights by name: the aliases, the enum member a name stands for, where torch's hub cache
keeps its file, and the download (``engine/weights.py`` reads and loads what this finds).

Names: ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``, the Faster R-CNN ones, or an alias (``coco``, ``coco_v2``)
that stands for the Mask R-CNN or the Faster R-CNN file by the model's heads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rcnn_lab.errors import ConfigError, Problem, cut, excerpt

KEY = "model.weights"  # the setting that names weights; errors name it unless a flag (--weights) did

# short names -> torchvision's name, per model kind (mask: with a mask head; box: Faster R-CNN)
ALIASES = {
    "coco": {"mask": "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "box": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"},
    "coco_v2": {"mask": "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1", "box": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"},
}
_HUB_NAME = re.compile(r"(MaskRCNN|FasterRCNN)_\w+_Weights\.\w+")
def is_hub_name(spec: str) -> bool:
    """A torchvision weights name or alias (a file of that name in the working folder wins)."""
    return (spec in ALIASES or bool(_HUB_NAME.fullmatch(spec))) and not Path(spec).exists()


def hub_name(spec: str, with_masks: bool = True) -> str:
    """The torchvision name ``spec`` stands for (aliases resolved for a model with or without a mask head)."""
    return ALIASES[spec]["mask" if with_masks else "box"] if spec in ALIASES else spec


def hub_enum(spec: str, with_masks: bool = True, key: str = KEY, file: str | None = None):
    """torchvision's ``WeightsEnum`` member for a weights name; one-line error for an unknown one."""
    from torchvision.models import detection

    name = hub_name(spec, with_masks)
    enum_name, _, member = name.partition(".")
    enum = getattr(detection, enum_name, None)
    known = sorted(n for n in dir(detection) if _HUB_NAME.fullmatch(f"{n}.X"))
    if enum is None:
        raise ConfigError([Problem(key, f"unknown torchvision weights {excerpt(name)} (known: {', '.join(known)}, "
                                        f"aliases: {', '.join(ALIASES)}); or give a file path", file)])
    try:
        return enum[member]
    except KeyError:
        members = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        raise ConfigError([Problem(key, f"{enum_name} has no {excerpt(member)} (use {members} or DEFAULT)", file)]) from None


def hub_file(enum) -> Path:
    """Where torch's hub cache keeps ``enum``'s file (torchvision downloads it there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name


def fetch(spec: str, *, key: str = KEY, file: str | None = None, with_masks: bool = True) -> Path:
    """The local file of a weights name: torch's hub cache, downloaded there when missing.

    Offline: a one-line ``ConfigError`` with the URL, the cache folder and the file alternative.
    """
    enum = hub_enum(spec, with_masks, key, file)
    path = hub_file(enum)
    if path.is_file():
        return path
    try:  # as torch.hub.load_state_dict_from_url downloads (same file, hash checked), without reading it yet
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(enum.url, str(path), digest.group(1) if digest else None, progress=False)
    except Exception as exc:  # offline: URLError, socket errors, a hash mismatch ...
        reason = cut(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", 100)
        raise ConfigError([Problem(key, f"could not download {enum} ({reason}); offline, fetch {enum.url} "
                                        f"elsewhere and put it in {path.parent}, or set {key}: /path/to/{path.name}",
                                   file)]) from None
    return path
