"""ImageSet: a dataset held as uint8 tensors, plus the seeded stratified ``--limit`` selection."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, H, W), converted to [0, 1] late: at a model's input size (open_clip's eval geometry,
    applied once at load) or at the dataset's own size; ``info["preprocess"]`` names which (``data.images``).

    ``images`` is one tensor (the in-memory path) or a :class:`~clipguard.data.stream.ImageStream` of the same
    shape that decodes when read (walk either with ``data.stream.chunks``)."""

    images: torch.Tensor  # uint8 (N, 3, H, W), or an ImageStream
    labels: torch.Tensor  # int64 (N,)
    classnames: list[str] | None  # class names the source itself carries (ClassLabel / folder names)
    spec: str  # dataset spec as typed
    name: str  # canonical dataset name (finds prompts/<name>.json)
    split: str
    limit: int | None = None
    seed: int = 0
    indices: list[int] | None = None  # positions in the full split, when --limit selected a subset
    info: dict = field(default_factory=dict)  # provenance for records: "preprocess", "path", "hf_path", ...
    templates: list[str] | None = None  # templates the source carries (CLIP_benchmark's wds folders)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.images, torch.Tensor)

    def in_memory(self) -> torch.Tensor:
        """The images as one uint8 tensor (decoding a streamed set whole: for commands that need every image at
        once, e.g. fitting a UAP)."""
        return self.images.materialize() if self.streamed else self.images

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_record(self) -> dict:
        return {"spec": self.spec, "name": self.name, "split": self.split, "limit": self.limit,
                "seed": self.seed, "n": len(self), "resolution": list(self.images.shape[-2:]), **self.info}


def stratified_indices(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Pick ``limit`` indices so every class keeps its share (seeded); all indices when limit is None.

    Each item gets the key (rank within its class + u) / class count with its rank from a seeded
    shuffle; taking the smallest keys interleaves classes in proportion to their sizes.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    keys = np.empty(n)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = np.lexsort((rng.random(n), keys))
    return np.sort(order[:limit])
