"""The prepared cache: a source decoded and preprocessed once into model-resolution uint8 shards.

``<cache>/prepared/<key>/`` holds ``shard-00000.npy`` ... (uint8 (S, 3, H, W), :data:`SHARD` images each, the last
one shorter), ``labels.npy`` and ``manifest.json``. The key is content-based: the source's fingerprint (file paths,
sizes and mtimes; an HF dataset's fingerprint; the shards'), the selection (``--limit``/``--seed``) and the
preprocessing protocol (``--preprocess`` and the model's own geometry included: ``data.images.protocol_name``), so a
changed source, model size or geometry is a different cache. Each shard is written atomically and the manifest
last: a killed ``clipguard prepare`` resumes at the first missing shard, and only a cache with a manifest is ever
read. Reads are memory-mapped: every later command reads pixels at memory speed, with no decode. A file of a
finished cache that is missing (checked when opened) or damaged (when first mapped) is a one-line error with the
``clipguard prepare`` command that writes it again.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import torch

from clipguard.data.images import TECOA_NAME, protocol_name
from clipguard.data.stream import UNREADABLE, ImageStream, Reader, error_line
from clipguard.errors import ClipguardError
from clipguard.fsutil import atomic_write, atomic_write_json, cache_root

SHARD = 1024  # images per shard file
FORMAT = "clipguard.prepared/1"


def prepared_root() -> Path:
    return cache_root() / "prepared"


def cache_key(reader: Reader, indices: np.ndarray, labels: np.ndarray, protocol: str) -> str:
    """sha256 over what decides the pixels: source content, selected items, labels and the protocol."""
    h = hashlib.sha256(json.dumps([FORMAT, protocol, reader.fingerprint()]).encode())
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _cache_dir(key: str, root: Path | None = None) -> Path:
    return (root or prepared_root()) / key[:32]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
            np.save(f, arr)

    atomic_write(path, write)


def _shard_path(d: Path, s: int) -> Path:
    return d / f"shard-{s:05d}.npy"


class PreparedReader(Reader):
    """A finished cache, memory-mapped shard by shard (opened lazily in each process)."""

    holds_pixels = True

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            what = "no manifest.json" if isinstance(e, FileNotFoundError) else f"manifest.json: {e}"
            raise ClipguardError(f"prepared cache {str(self.path)!r} is not complete ({what}): rerun "
                                 "`clipguard prepare` with the same options to finish it") from None
        if self.manifest.get("format") != FORMAT:
            raise ClipguardError(f"prepared cache {str(self.path)!r} has format {self.manifest.get('format')!r}, "
                                 f"not {FORMAT}: prepare it again")
        self.n, self.size = int(self.manifest["n"]), tuple(self.manifest["size"])
        self.shard = int(self.manifest.get("shard", SHARD))  # images per shard file, as written
        self._maps: dict[int, np.ndarray] = {}
        files = ["labels.npy", *(_shard_path(self.path, s).name for s in range(-(-self.n // self.shard)))]
        missing = next((f for f in files if not (self.path / f).is_file()), None)  # a stat each: cheap
        if missing is not None:
            raise ClipguardError(f"prepared cache {str(self.path)!r} lacks {missing}: {self.rewrite()}")

    def rewrite(self, first: str = "") -> str:
        """What to do about a missing or damaged file: ``first`` (e.g. delete it), then ``clipguard prepare`` with
        the options that made the cache (the same key, so this folder: it writes only the files that are missing)."""
        m = self.manifest
        opts = ["--dataset", str(m.get("spec")), "--split", str(m.get("split"))]
        opts += ["--limit", str(m["limit"]), "--seed", str(m.get("seed", 0))] if m.get("limit") else []
        bare = self.size[0] == self.size[1] and m.get("preprocess") in (None, protocol_name(self.size),
                                                                        protocol_name(self.size, preprocess="tecoa"))
        opts += ["--size", str(self.size[0])] if bare else ["--model", str(m.get("model") or "MODEL")]
        opts += ["--preprocess", "tecoa"] if str(m.get("preprocess") or "").startswith(TECOA_NAME) else []  # its key
        return f"{first}write it again with the options that made it: `clipguard prepare {shlex.join(opts)}`"

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return self.n

    def labels(self) -> np.ndarray:
        path = self.path / "labels.npy"
        try:
            labels = np.load(path)
        except UNREADABLE as e:
            raise ClipguardError(f"prepared cache file {str(path)!r} is damaged ({error_line(e)}): "
                                 f"{self.rewrite('delete it and ')}") from None
        if labels.shape != (self.n,):
            raise ClipguardError(f"prepared cache file {str(path)!r} holds {labels.shape} labels, not ({self.n},): "
                                 f"{self.rewrite('delete it and ')}")
        return labels

    def _shard(self, s: int) -> np.ndarray:
        """Shard ``s``, memory-mapped once per process and checked against the manifest."""
        if s not in self._maps:
            path = _shard_path(self.path, s)
            rows = min(self.shard, self.n - s * self.shard)
            try:
                shard = np.load(path, mmap_mode="r")  # numpy refuses a file shorter than its header says
            except UNREADABLE as e:
                shard, why = None, error_line(e)
            if shard is not None and (shard.dtype != np.uint8 or shard.shape != (rows, 3, *self.size)):
                shard, why = None, f"{shard.dtype} {tuple(shard.shape)}, not uint8 {(rows, 3, *self.size)}"
            if shard is None:
                raise ClipguardError(f"prepared cache shard {str(path)!r} is damaged ({why}): "
                                     f"{self.rewrite('delete it and ')}")
            self._maps[s] = shard
        return self._maps[s]

    def _check(self, size) -> None:
        if tuple(size) != self.size:
            raise ClipguardError(f"prepared cache {str(self.path)!r} holds {self.size[0]}x{self.size[1]} images, "
                                 f"this model takes {size[0]}x{size[1]}: prepare it for this model")

    def read(self, i: int, size) -> np.ndarray:
        self._check(size)
        return np.ascontiguousarray(self._shard(i // self.shard)[i % self.shard].transpose(1, 2, 0))

    def read_range(self, a: int, b: int, size) -> torch.Tensor:
        self._check(size)
        parts = []
        while a < b:
            s, lo = divmod(a, self.shard)
            hi = min(self.shard, lo + b - a)
            parts.append(self._shard(s)[lo:hi])
            a += hi - lo
        out = np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])
        return torch.from_numpy(out)

    def fingerprint(self) -> str:
        return self.manifest["key"]


def write_prepared(stream: ImageStream, labels: np.ndarray, key: str, meta: dict, *, batch_size: int = 256,
                   progress=None, root: Path | None = None) -> tuple[Path, int]:
    """Decode ``stream`` into the cache folder of ``key``, skipping shards already written; returns (folder,
    shards written now). ``meta`` goes into the manifest (spec, split, class names, templates...)."""
    d = _cache_dir(key, root)
    d.mkdir(parents=True, exist_ok=True)
    n = len(stream)
    written = 0
    for s in range(-(-n // SHARD)):
        path = _shard_path(d, s)
        a, b = s * SHARD, min((s + 1) * SHARD, n)
        if path.is_file():
            if progress:
                progress(b - a)
            continue
        shard = np.empty((b - a, 3, *stream.size), dtype=np.uint8)
        for pos, x in stream.batches(batch_size, start=a, stop=b):
            shard[pos - a:pos - a + len(x)] = x.numpy()
            if progress:
                progress(len(x))
        _save_npy(path, shard)
        written += 1
    _save_npy(d / "labels.npy", np.asarray(labels, dtype=np.int64))
    atomic_write_json(d / "manifest.json", {"format": FORMAT, "key": key, "n": n, "size": list(stream.size),
                                            "shard": SHARD, **meta})
    return d, written


def find_prepared(key: str) -> Path | None:
    """The finished cache for ``key``, if one exists."""
    d = _cache_dir(key)
    return d if (d / "manifest.json").is_file() else None

