"""The toy models: a tiny open_clip CLIP config, its committed weights, and a small CNN surrogate.

The CLIP architecture lives in configs/clipguard-toy.json and is registered with open_clip's own
config registry, so `open_clip.create_model("clipguard-toy")` works like any built-in name. Weights
for two training seeds and for the CNN are committed under clipguard/assets/ and reproduced by
`python benchmarks/toy_train.py --out clipguard/assets`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from clipguard.data.toy import TOY_CLASSNAMES

TOY_MODEL_NAME = "clipguard-toy"
TOY_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / f"{TOY_MODEL_NAME}.json"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

# The toy CLIP was trained on (x - TOY_MEAN) / TOY_STD with x in [0, 1]: open_clip's OpenAI constants,
# which are also what `open_clip.create_model` puts on `model.visual.image_mean/std` for this config.
TOY_MEAN = (0.48145466, 0.4578275, 0.40821073)
TOY_STD = (0.26862954, 0.26130258, 0.27577711)

TOY_VARIANTS: dict[str, int] = {"seed0": 0, "seed1": 1}  # variant name -> training seed


def register_toy_config() -> None:
    """Add the toy CLIP config to open_clip's registry; calling it again does nothing.

    Example:
        >>> register_toy_config()
        >>> model = open_clip.create_model(TOY_MODEL_NAME, pretrained=None)
    """
    # Lazy: option checks import this module (through attacks.surrogates) and load no model; open_clip adds ~2 s.
    import open_clip

    if TOY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(TOY_CONFIG_PATH)


def toy_weights_path(variant: str = "seed0") -> Path:
    """Path of the committed toy CLIP weights (fp16 safetensors) for one training seed.

    Raises:
        ValueError: unknown variant; the message lists the valid ones.
    """
    if variant not in TOY_VARIANTS:
        raise ValueError(f"unknown toy CLIP variant {variant!r}; valid variants: {', '.join(TOY_VARIANTS)}")
    return ASSETS_DIR / f"toy_clip_{variant}.safetensors"


class ToyCNN(nn.Module):
    """Small CNN over the 10 toy classes; a transfer-attack surrogate.

    Takes [0, 1] pixels and normalises inside (mean/std are buffers), so attacks need no special case.

    Shape:
        x: float (N, 3, 32, 32) in [0, 1] -> logits (N, len(TOY_CLASSNAMES)).
    """

    def __init__(self, num_classes: int = len(TOY_CLASSNAMES)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(TOY_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(TOY_STD).view(1, 3, 1, 1))

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2),  # 16x16
            block(32, 64), nn.MaxPool2d(2),  # 8x8
            block(64, 128), nn.AdaptiveAvgPool2d(1),  # global pool: shapes appear anywhere
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.head(self.features(x).flatten(1))


def toy_cnn_path() -> Path:
    """Path of the committed ToyCNN weights (fp32 safetensors)."""
    return ASSETS_DIR / "toy_cnn.safetensors"


def load_toy_cnn(device: str | torch.device = "cpu") -> ToyCNN:
    """The committed ToyCNN, in eval mode with frozen parameters.

    Raises:
        FileNotFoundError: the weights file is missing (rebuild: python benchmarks/toy_train.py).
    """
    path = toy_cnn_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"toy CNN weights not found at {path}; rebuild them with "
            "`python benchmarks/toy_train.py --out clipguard/assets --only cnn`"
        )
    model = ToyCNN()
    model.load_state_dict(load_file(str(path)), strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)
