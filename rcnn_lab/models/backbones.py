"""Backbones: torchvision ResNet / MobileNetV3 bodies with a feature pyramid network."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rcnn_lab.errors import ConfigError, Problem
from rcnn_lab.models import state_file
from rcnn_lab.models.norms import BodyNorm, FreshNorm, norm_layer
from rcnn_lab.registry import BACKBONES

MAX_BLOCKS = 64  # residual blocks per stage (ResNet-152: 36 in layer3); docs/configuration.md, "Limits"
# torchvision's blocks per stage (layer1..layer4) and block type for each depth
_BLOCKS = {18: ([2, 2, 2, 2], tvm.resnet.BasicBlock), 34: ([3, 4, 6, 3], tvm.resnet.BasicBlock),
           50: ([3, 4, 6, 3], tvm.resnet.Bottleneck), 101: ([3, 4, 23, 3], tvm.resnet.Bottleneck)}


def load_body_weights(body: nn.Module, weights: str, arch: str) -> None:
    """Load ``weights`` into a classification body: ``imagenet`` (torchvision's ``IMAGENET1K_V1``, as its
    detection references use; downloaded once to torch's hub cache) or a local file.

    A body on the meta device (the load-time check, ``models.builder.check_model``) is only checked: nothing is
    downloaded (torchvision's ImageNet weights fit its own architecture), and a file is memory-mapped, so that its
    names and shapes are compared without reading its tensors."""
    on_meta = any(p.is_meta for p in body.parameters())
    if weights == "imagenet" and on_meta:
        return
    if weights == "imagenet":
        enum = tvm.get_model_weights(arch).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # offline: URLError, socket errors, ...
            name = Path(enum.url).name
            raise ConfigError([Problem(
                "weights",
                f"could not download torchvision's ImageNet weights for {arch} ({type(exc).__name__}: {str(exc)[:80]}); "
                f"offline, fetch {enum.url} elsewhere and set weights: /path/to/{name} (or put {name} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'})",
            )]) from None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError([Problem("weights", f"weights file {weights!r} not found; use null, imagenet or an existing .pth path")])
        try:
            state = state_file.load(path, mmap=on_meta)
        except Exception as exc:
            raise ConfigError([Problem("weights", f"{weights}: not a loadable state_dict ({type(exc).__name__}: {str(exc)[:100]})")]) from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ConfigError([Problem("weights", f"{weights}: expected a state_dict mapping, got {type(state).__name__}")])
        for prefix in ("backbone.body.", "body.", "module."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = {k: v for k, v in body.state_dict().items() if not k.startswith(("fc.", "classifier."))}
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.startswith("classifier.")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch {wrong[:3]}"
        raise ConfigError([Problem("weights", f"{weights}: does not fit {arch} ({detail}); check depth/arch")])
    if not on_meta:
        body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


@BACKBONES.register("resnet_fpn", checks_weights_on_meta=True)
def resnet_fpn(
    depth: Literal[18, 34, 50, 101] = 50,
    weights: str | None = None,
    trainable_layers: int | None = None,
    norm: BodyNorm | None = None,
    returned_layers: list[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    extra_block: Literal["maxpool", "none"] = "maxpool",
    fpn_norm: FreshNorm = "none",
    blocks: list[int] | None = None,
) -> nn.Module:
    """ResNet body + FPN (torchvision's Mask R-CNN backbone); weights: null | imagenet | PATH.

    Defaults follow torchvision: without weights all 5 stages train with BatchNorm; with
    weights, 3 stages train and BatchNorm is frozen. ``fpn_norm`` normalises the FPN's lateral
    and output convolutions too (torchvision's ``norm_layer``; the heads' ``norm`` vocabulary).
    ``blocks``: residual blocks per stage (layer1..layer4) in place of the depth's, built by
    torchvision's ``ResNet`` with the depth's block type: ``depth: 18, blocks: [1, 1, 1, 1]`` is a
    ResNet-10, half of ResNet-18's convolutions per stage. Trained from scratch only.
    """
    trained = weights is not None
    trainable_layers = (3 if trained else 5) if trainable_layers is None else trainable_layers
    if not 0 <= trainable_layers <= 5:
        raise ConfigError([Problem("trainable_layers", f"must be in 0..5, got {trainable_layers}")])
    if not returned_layers or any(layer not in (1, 2, 3, 4) for layer in returned_layers):
        raise ConfigError([Problem("returned_layers", f"must be a non-empty subset of [1, 2, 3, 4], got {list(returned_layers)}")])
    if blocks is not None and (len(blocks) != 4 or any(not 1 <= b <= MAX_BLOCKS for b in blocks)):
        raise ConfigError([Problem("blocks", f"must be 4 block counts in 1..{MAX_BLOCKS} (layer1..layer4), got {list(blocks)}")])
    if blocks is not None and trained and list(blocks) != _BLOCKS[depth][0]:
        raise ConfigError([Problem("blocks", f"{list(blocks)} does not fit resnet{depth}'s weights ({_BLOCKS[depth][0]}); "
                                             "drop blocks or set weights: null")])
    norm = norm or ("frozen_batchnorm" if trained else "batchnorm")
    arch, (default_blocks, block) = f"resnet{depth}", _BLOCKS[depth]  # what torchvision's resnet18() ... resnet101() build
    body = tvm.resnet.ResNet(block, list(blocks or default_blocks), norm_layer=norm_layer(norm))
    if weights is not None:
        load_body_weights(body, weights, arch)
    extra = LastLevelMaxPool() if extra_block == "maxpool" else None
    # torchvision's _resnet_fpn_extractor with the FPN width exposed
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    stage2 = body.inplanes // 8
    in_channels = [stage2 * 2 ** (i - 1) for i in returned_layers]
    model = BackboneWithFPN(body, return_layers, in_channels, out_channels, extra_blocks=extra,
                            norm_layer=norm_layer(fpn_norm, [out_channels], "out_channels"))
    model.featmap_names = [str(i) for i in range(len(returned_layers))] + (["pool"] if extra else [])
    return model


@BACKBONES.register("mobilenet_v3_fpn", checks_weights_on_meta=True)
def mobilenet_v3_fpn(
    weights: str | None = None,
    trainable_layers: int | None = None,
    norm: Literal["batchnorm", "frozen_batchnorm"] | None = None,  # its widths (16, 24, ...) rule out groupnorm
    size: Literal["large", "small"] = "large",
) -> nn.Module:
    """MobileNetV3 body + FPN on its last two stages (torchvision's fasterrcnn_mobilenet_v3 backbone)."""
    trained = weights is not None
    trainable_layers = (3 if trained else 6) if trainable_layers is None else trainable_layers
    if not 0 <= trainable_layers <= 6:
        raise ConfigError([Problem("trainable_layers", f"must be in 0..6, got {trainable_layers}")])
    norm = norm or ("frozen_batchnorm" if trained else "batchnorm")
    arch = f"mobilenet_v3_{size}"
    body = getattr(tvm, arch)(weights=None, norm_layer=norm_layer(norm))
    if weights is not None:
        load_body_weights(body, weights, arch)
    model = _mobilenet_extractor(body, True, trainable_layers)
    model.featmap_names = ["0", "1", "pool"]
    return model
