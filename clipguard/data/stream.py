"""The streaming data path: images decoded on demand by DataLoader worker processes, memory bounded by a few
batches whatever the dataset size.

A source is a :class:`Reader` (item ``i`` -> one RGB image as uint8 (H, W, 3) at the requested size, through the
one preprocessing protocol of :mod:`clipguard.data.images`). :class:`ImageStream` puts a reader behind the
shape of a uint8 (N, 3, H, W) tensor: ``batches()`` walks it in order with ``workers`` processes decoding in
parallel (pinned memory for a GPU); indexing (a slice, an index tensor) decodes a few images in this process,
for the small reads (a check on the first 64 images, a picture). ``chunks(images, batch_size)`` walks an
in-memory tensor and a stream alike; both give the same bytes, so the same predictions.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from clipguard.data.device_decode import decode_batch, is_jpeg
from clipguard.data.images import DEFAULT_GEOMETRY, GEOMETRIES
from clipguard.distributed import local_world_size
from clipguard.errors import ClipguardError

# The in-memory path is chosen up to this many bytes of uint8 pixels (auto mode); above it, the set streams.
MEMORY_BYTES = 512 * 2**20
# Below this many images, worker processes cost more to start than they save: decode in this process.
SMALL_SET = 1024
# What reading a damaged file raises: PIL (OSError; SyntaxError from a broken PNG chunk; EOFError), pyarrow
# (ArrowInvalid is a ValueError, a short read an OSError), numpy (ValueError for a short .npy). Each becomes the
# source's one-line ClipguardError naming the file (``Reader.unreadable``), never a traceback.
UNREADABLE = (OSError, EOFError, SyntaxError, ValueError)


def error_line(err: BaseException) -> str:
    """An exception as one line: its first line without object reprs (PIL names a ``<_io.BytesIO object at 0x..>``),
    or its type when it has no text."""
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def default_workers() -> int:
    """Decode processes by default: the cores this process may use, shared with the other processes of a
    ``torchrun`` on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size())


class Reader:
    """Random access to a source's images. Subclasses give ``__len__`` and ``open(i)`` (a PIL image, any mode);
    ``read(i, size)`` applies the preprocessing protocol. Must pickle (it travels to the worker processes)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, i: int):
        raise NotImplementedError

    def read(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Item ``i`` as uint8 (H, W, 3) at ``size`` (the model's open_clip ``geometry``, or ``preprocess``'s)."""
        apply = GEOMETRIES[self.preprocess]
        return np.array(apply(self.open(i), size, self.geometry), dtype=np.uint8)  # writable: torch wraps it as is

    preprocess = "open_clip"  # the geometry read() applies (--preprocess); load_dataset sets it before any read
    geometry = DEFAULT_GEOMETRY  # the model's resize rule under open_clip (data.images.Geometry); set with preprocess
    holds_pixels = False  # True: the source holds preprocessed uint8 pixels (a prepared cache): no decode

    def raw(self, i: int) -> bytes | None:
        """Item ``i``'s encoded bytes when they are a JPEG file (``--decode device`` decodes them), else None."""
        return None

    def read_range(self, a: int, b: int, size) -> torch.Tensor:
        """uint8 (b - a, 3, H, W) for contiguous items of a source that ``holds_pixels``."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of the source's content (what a prepared cache is keyed by)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Provenance for records (paths, ids)."""
        return {}

    def unreadable(self, i: int, err: BaseException) -> str:
        """The one-line error for item ``i``, whose read raised ``err``: the file that holds it and what to do."""
        return f"cannot read an image (item {i}: {error_line(err)})"


@contextmanager
def naming_the_file(reader: Reader, i: int):
    """A damaged file met while reading item ``i`` becomes the reader's one-line error, naming the file."""
    try:
        yield
    except UNREADABLE as e:
        raise ClipguardError(reader.unreadable(i, e)) from None


class Unreadable(str):
    """An item a worker could not read: its one-line error, handed back as data, since a DataLoader re-raises a
    worker's exception with the worker's whole traceback as its message."""


def files_fingerprint(paths: Sequence[str]) -> str:
    """sha256 over each file's path, size and modification time: changes when any file does."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class _Decode(torch.utils.data.Dataset):
    """What a worker process runs: position -> (uint8 (3, H, W), seconds spent decoding). With ``raw`` (``--decode
    device``) a JPEG item is only read: (its bytes as uint8 (L,), seconds); other items are decoded as usual."""

    def __init__(self, reader: Reader, indices: np.ndarray, size: tuple[int, int], raw: bool = False):
        self.reader, self.indices, self.size, self.raw = reader, indices, size, raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        t0 = time.perf_counter()
        i = int(self.indices[k])
        try:
            with naming_the_file(self.reader, i):
                data = self.reader.raw(i) if self.raw else None
                if data is not None and is_jpeg(data):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), time.perf_counter() - t0, i
                a = self.reader.read(i, self.size)
        except ClipguardError as e:
            return Unreadable(e), 0.0, i
        return torch.from_numpy(a).permute(2, 0, 1).contiguous(), time.perf_counter() - t0, i


def _gather(items, stack: bool):
    """(batch, decode seconds, source positions); (Unreadable, 0, []) when an item could not be read (collate runs
    in the worker too: the error travels as data)."""
    bad = next((x for x, _, _ in items if isinstance(x, Unreadable)), None)
    if bad is not None:
        return bad, 0.0, []
    xs = [x for x, _, _ in items]
    return (torch.stack(xs) if stack else xs), sum(s for _, s, _ in items), [i for _, _, i in items]


def _collate(items):
    return _gather(items, stack=True)


def _collate_list(items):  # --decode device: encoded and decoded items side by side, decoded together afterwards
    return _gather(items, stack=False)


def _checked(x):
    """A batch from the loader, or the one-line error of the item that could not be read."""
    if isinstance(x, Unreadable):
        raise ClipguardError(str(x))
    return x


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode is PIL's; torch threads in every worker would only contend


class _Ranges(torch.utils.data.Sampler):
    """Consecutive position ranges [a, a + batch_size) from ``start`` to ``stop``: in-order batches."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.bs = start, stop, batch_size

    def __iter__(self):
        for a in range(self.start, self.stop, self.bs):
            yield list(range(a, min(a + self.bs, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.bs)


class DecodeStats:
    """Decode seconds (summed over workers) and model-side seconds, to show which one bounds a run. With
    ``--decode device`` the workers only read files, the device's decode counts as model-side time, and
    ``by_pil`` counts the images that went through PIL all the same (not JPEG, or refused by the decoder)."""

    def __init__(self, workers: int, on_device: bool = False):
        self.workers, self.images, self.decode_s, self.wait_s = max(1, workers), 0, 0.0, 0.0
        self.on_device, self.by_pil = on_device, 0

    def rates(self, elapsed: float) -> dict:
        """{"decode_img_s": what the workers can deliver, "model_img_s": what the consumer processes}."""
        decode = self.images * self.workers / self.decode_s if self.decode_s else None
        busy = elapsed - self.wait_s
        model = self.images / busy if busy > 0 else None
        out = {"decode_img_s": round(decode, 1) if decode else None,
               "model_img_s": round(model, 1) if model else None}
        if self.on_device:
            out["decoded_on_device"], out["decoded_by_pil"] = self.images - self.by_pil, self.by_pil
        return out


class ImageStream:
    """A uint8 (N, 3, H, W) image set that is decoded when read, never held whole.

    Args:
        reader: the source.
        indices: positions in the source that make the set (a ``--limit`` selection), in order.
        size: (H, W) every image is brought to (the model's input size).
        workers: decode processes for ``batches`` (0: decode in this process; None: the machine's cores, or 0
            for a set under :data:`SMALL_SET` images).
        decode_device: ``--decode device``: JPEG items are decoded and resized on this device
            (:mod:`clipguard.data.device_decode`) and batches come out there; None: the PIL protocol in the workers.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, reader: Reader, indices: Sequence[int], size: tuple[int, int], workers: int | None = None,
                 decode_device: torch.device | None = None):
        self.reader, self.indices, self.size = reader, np.asarray(indices, dtype=np.int64), tuple(size)
        if workers is None:
            workers = default_workers() if len(self.indices) >= SMALL_SET else 0
        self.workers = workers
        self.decode_device = None if reader.holds_pixels or decode_device is None else torch.device(decode_device)
        self.stats = self.new_stats()

    def new_stats(self) -> DecodeStats:
        return DecodeStats(self.workers, on_device=self.decode_device is not None)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), 3, *self.size))

    def __len__(self) -> int:
        return len(self.indices)

    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key) -> torch.Tensor:
        """A few images decoded here (a slice, an int, an index tensor / list): uint8 (k, 3, H, W)."""
        pos = np.arange(len(self))[key] if isinstance(key, slice | int) else np.asarray(key, dtype=np.int64)
        pos = np.atleast_1d(pos)
        if not len(pos):
            return torch.empty(0, 3, *self.size, dtype=torch.uint8)
        src = self.indices[pos]
        if self.reader.holds_pixels and np.all(np.diff(src) == 1):
            return self.reader.read_range(int(src[0]), int(src[-1]) + 1, self.size)
        if self.decode_device is not None:  # the same decode as the batches: the same pixels
            items = _Decode(self.reader, src, self.size, raw=True)
            return self._on_device([_checked(items[k][0]) for k in range(len(src))], src.tolist()).cpu()
        arrays = []
        for i in src.tolist():
            with naming_the_file(self.reader, i):
                arrays.append(self.reader.read(i, self.size))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _on_device(self, items: list[torch.Tensor], where: list[int]) -> torch.Tensor:
        """Decode one batch on the device; ``where``: the items' positions in the source (to name a broken one)."""
        try:
            x, by_pil = decode_batch(items, self.size, self.decode_device)
        except OSError as e:  # refused by the device's decoder and by PIL: a broken file, named without a traceback
            raise ClipguardError(self._unreadable_jpeg(items, where, e)) from None
        self.stats.by_pil += by_pil
        return x

    def _unreadable_jpeg(self, items: list[torch.Tensor], where: list[int], err: OSError) -> str:
        """The error of a batch that neither the device's decoder nor PIL read: the first JPEG PIL refuses, named by
        its reader (only on this error path: each JPEG of the batch is opened once more)."""
        for item, i in zip(items, where, strict=True):
            if item.ndim == 1:
                try:
                    with Image.open(io.BytesIO(item.numpy().tobytes())) as im:
                        im.load()
                except UNREADABLE as e:
                    return self.reader.unreadable(i, e)
        return f"cannot read an image ({error_line(err)})"

    def loader(self, batch_sampler, *, pin_memory: bool = False) -> torch.utils.data.DataLoader:
        """A DataLoader over positions: ``batch_sampler`` yields lists of positions; batches come in its order, as
        (uint8 batch, decode seconds, source positions), or with ``decode_device`` as (list of items, seconds,
        source positions): see :meth:`decoded`. An item that could not be read comes as (:class:`Unreadable`, 0,
        [])."""
        raw = self.decode_device is not None
        return torch.utils.data.DataLoader(
            _Decode(self.reader, self.indices, self.size, raw=raw), batch_sampler=batch_sampler,
            num_workers=self.workers, collate_fn=_collate_list if raw else _collate,
            pin_memory=pin_memory and not raw, worker_init_fn=_one_thread if self.workers else None,
            prefetch_factor=2 if self.workers else None,
            generator=torch.Generator().manual_seed(0))  # its worker seeds: never a draw from the global RNG

    def decoded(self, batch_sampler, *, pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """The uint8 batches of ``batch_sampler`` (lists of positions) in its order: decoded by the workers, or
        with ``decode_device`` read by them and decoded on the device (the batch is then on the device)."""
        for x, _, where in self.loader(batch_sampler, pin_memory=pin_memory):
            x = _checked(x)
            yield self._on_device(x, where) if self.decode_device is not None else x

    def batches(self, batch_size: int, *, start: int = 0, stop: int | None = None,
                pin_memory: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, uint8 batch) in order over [start, stop), decoded ``workers`` at a time (counted in
        ``stats``)."""
        stop = len(self) if stop is None else stop
        if self.reader.holds_pixels:  # a prepared cache: pixels at memory speed, no decode
            for a in range(start, stop, batch_size):
                self.stats.images += min(a + batch_size, stop) - a
                yield a, self[a:min(a + batch_size, stop)]
            return
        a = start
        it = iter(self.loader(_Ranges(start, stop, batch_size), pin_memory=pin_memory))
        while True:
            t0 = time.perf_counter()
            try:
                x, seconds, where = next(it)
            except StopIteration:
                return
            x = _checked(x)  # a file that does not decode: its one line, no traceback
            self.stats.wait_s += time.perf_counter() - t0
            if self.decode_device is not None:
                x = self._on_device(x, where)
            self.stats.decode_s += seconds
            self.stats.images += len(x)
            yield a, x
            a += len(x)

    def materialize(self, batch_size: int = 256) -> torch.Tensor:
        """The whole set as one uint8 tensor (the in-memory path), decoded by the workers."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        for a, x in self.batches(batch_size):
            out[a:a + len(x)] = x
        return out


def chunks(images, batch_size: int, *, pin_memory: bool = False, start: int = 0,
           stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(position, uint8 or float batch) in order over positions [start, stop): slices of an in-memory tensor, or a
    stream's decoded batches."""
    stop = images.shape[0] if stop is None else stop
    if isinstance(images, ImageStream):
        images.stats = images.new_stats()  # each pass counts its own rates
        threads = torch.get_num_threads()
        if images.workers:  # the workers have the other cores: OpenMP threads here would only wait on them
            torch.set_num_threads(max(1, min(threads, default_workers() - images.workers)))
        try:
            yield from images.batches(batch_size, start=start, stop=stop, pin_memory=pin_memory)
        finally:
            torch.set_num_threads(threads)
        return
    for a in range(start, stop, batch_size):
        yield a, images[a:min(a + batch_size, stop)]


def choose_mode(mode: str, nbytes: int) -> str:
    """``memory`` or ``stream`` for a set of ``nbytes`` uint8 pixels: ``auto`` holds it in memory up to
    :data:`MEMORY_BYTES` (faster for several passes), streams above."""
    if mode != "auto":
        return mode
    return "memory" if nbytes <= MEMORY_BYTES else "stream"


__all__ = ["ImageStream", "Reader", "choose_mode", "chunks", "default_workers", "error_line", "naming_the_file"]
