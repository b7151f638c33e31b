"""The demo's ``vision`` model: a JPEG or PNG in, the top-5 ImageNet classes of ResNet-18 out.

Copied as ``vision/1/model.py`` into the demo repository, beside ``resnet18.pt`` (its weights);
it is also the example of a Python model (docs/models.md). ``preprocess`` decodes and
resizes each image with Pillow on the step threads (Pillow lets go of the GIL while it decodes and
resamples), so that the model's batches never wait for a decoder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from torchwire.repository.demo import ResNet18

SIZE = 224
MAX_PIXELS = 40_000_000
"""Larger images are refused before they are decoded (a small file can claim a huge one)."""
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def decode(data: bytes) -> np.ndarray[Any, Any]:
    """One encoded image as a normalised FP32[3, 224, 224]: ImageNet's evaluation transform (the
    shorter side resized to 256, the centre 224 cropped) in one resampling."""
    image: Image.Image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels, more than {MAX_PIXELS}")
    image.draft("RGB", (256, 256))  # JPEG: decode at a reduced scale when that is enough
    image = image.convert("RGB")
    # The centre 224x224 of the image scaled so that its shorter side is 256, resampled straight
    # from the source: a long thin image never becomes a huge intermediate one.
    side = SIZE * min(image.size) / 256
    left, top = (image.width - side) / 2, (image.height - side) / 2
    image = image.resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - MEAN) / STD


def example_image(kind: str = "JPEG") -> bytes:
    """A 320x240 colour gradient, encoded: the warm-up request, and a test image."""
    x = np.linspace(0, 255, 320, dtype=np.float32)
    y = np.linspace(0, 255, 240, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (240, 320)), np.broadcast_to(y, (240, 320)), (x + y) / 2])
    image = Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format=kind)
    return out.getvalue()


class Model:
    def setup(self, device: torch.device) -> None:
        self.net = ResNet18().eval()
        weights = torch.load(Path(__file__).parent / "resnet18.pt", weights_only=True)
        self.net.load_state_dict(weights)
        self.net.to(device)

    def example(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"image": np.array([[example_image()]], dtype=object)}

    def preprocess(self, request: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        images = []
        for index, data in enumerate(request["image"][:, 0]):
            try:
                images.append(decode(data))
            except UnidentifiedImageError:
                raise ValueError(
                    f"input 'image' item {index}: not an image Pillow reads (JPEG, PNG, ...): "
                    f"{len(data)} bytes starting {data[:8]!r}"
                ) from None
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"input 'image' item {index}: cannot decode it: {exc}") from None
        return {"image": np.stack(images)}

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probabilities = torch.softmax(self.net(inputs["image"]), dim=1)
        scores, classes = torch.topk(probabilities, 5, dim=1)
        return {"classes": classes, "scores": scores}
