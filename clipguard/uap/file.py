"""UAP files: ``uap.safetensors`` holding one tensor ``uap`` (float32, (1, 3, H, W), [0, 1] pixel units)
and a JSON manifest (schema ``clipguard.uap/1``) in the safetensors metadata: source model spec and
fingerprint, fitting dataset, eps (both forms), norm, method, resolution, target class, fitting fooling
rate and the sha256 of the tensor's bytes, checked on load so a reload is bit-identical or an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as safetensors_torch  # called through the module, as tests can make it fail

from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write, writing_output
from clipguard.specs import Norm
from clipguard.uap.core import NORM_SLACK, norm_of

SCHEMA = "clipguard.uap/1"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (CPU, contiguous), as ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class UAPFile:
    """A fitted universal perturbation with its provenance (AutoAttack-style state: to_disk / from_disk)."""

    delta: torch.Tensor  # float32 (1, 3, H, W) on the CPU, [0, 1] pixel units
    manifest: dict  # JSON-able provenance; "attack" holds eps, norm, method, resolution, target class

    @property
    def eps(self) -> float:
        return float(self.manifest["attack"]["eps"]["value"])

    @property
    def norm(self) -> Norm:
        return Norm(self.manifest["attack"]["norm"])

    @property
    def resolution(self) -> str:
        return self.manifest["attack"].get("resolution", "model")

    @property
    def target_name(self) -> str | None:
        return self.manifest["attack"].get("target_class_name")

    def to_disk(self, path: str | Path) -> Path:
        """Write atomically (temp file + ``os.replace``); the manifest gains schema, shape and sha256."""
        delta = self.delta.detach().float().cpu().contiguous()
        self.manifest = {"schema": SCHEMA, **self.manifest, "shape": list(delta.shape),
                         "sha256": tensor_digest(delta)}
        meta = {"manifest": json.dumps(self.manifest)}
        with writing_output(path, "the UAP"):  # not held: `uap fit` reads the file back for its record
            return atomic_write(path, lambda tmp: safetensors_torch.save_file({"uap": delta}, tmp, metadata=meta))

    @classmethod
    def from_disk(cls, path: str | Path, *, option: str = "--uap") -> UAPFile:
        """Load and check a UAP file; every problem is a one-line ClipguardError naming the file."""
        name = f"{option} {str(path)!r}"
        if not Path(path).is_file():
            raise ClipguardError(f"{name}: no such file (make one with `clipguard uap fit --uap FILE`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                manifest = json.loads((f.metadata() or {}).get("manifest", "{}"))
                if "uap" not in f.keys():
                    raise ClipguardError(f"{name} holds no 'uap' tensor: not a clipguard UAP file")
                delta = f.get_tensor("uap")
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
            raise ClipguardError(f"{name} cannot be read ({e})") from None
        if manifest.get("schema") != SCHEMA:
            raise ClipguardError(f"{name} is not a clipguard UAP file (no {SCHEMA} manifest)")
        if delta.ndim != 4 or tuple(delta.shape[:2]) != (1, 3) or delta.dtype != torch.float32:
            raise ClipguardError(f"{name} holds a {tuple(delta.shape)} {str(delta.dtype).split('.')[-1]} tensor; "
                                 "a UAP is float32 of shape (1, 3, H, W)")
        if manifest.get("sha256") != tensor_digest(delta):
            raise ClipguardError(f"{name}: the tensor does not match the sha256 in its manifest (corrupted?)")
        out = cls(delta, manifest)
        size = norm_of(delta, out.norm)
        if not math.isfinite(size) or size > out.eps + NORM_SLACK:
            raise ClipguardError(f"{name}: ||v||_{out.norm.value} = {size:.6g} exceeds its eps {out.eps:.6g}")
        return out
