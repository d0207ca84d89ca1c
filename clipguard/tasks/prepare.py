"""``clipguard prepare``: decode and preprocess a dataset once into the prepared cache (``data.prepared``)."""

from __future__ import annotations

import time

from clipguard.config import flat
from clipguard.data.images import DEFAULT_GEOMETRY, as_size, protocol_name
from clipguard.data.prepared import cache_key, write_prepared
from clipguard.data.registry import SOURCES, from_source
from clipguard.models.inference import rate_fields
from clipguard.models.loader import model_preprocess
from clipguard.progress import progress_bar
from clipguard.records.schema import SCHEMA, environment
from clipguard.specs import parse_dataset_spec
from clipguard.tasks.configs import PrepareConfig


def run_prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict:
    """Write (or finish) the prepared cache of ``cfg``'s selection at the model's input size, through the model's own
    geometry (read from its config: ``models.loader.model_preprocess``; ``--size N``: OpenAI CLIP's at N); returns a
    record."""
    run = cfg.run
    spec = parse_dataset_spec(run.dataset, image_column=run.image_column, label_column=run.label_column)
    if spec.kind in ("toy", "prepared"):  # nothing to do is not an error: a script may prepare every set it uses
        return {"schema": SCHEMA, "task": "prepare", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "dataset": spec.text, "prepared": None, "config": flat(cfg), "environment": environment(),
                "note": f"--dataset {spec.text!r} is generated in memory or already prepared: nothing to prepare"}
    if cfg.size is None:
        pp = model_preprocess(run.model)
        size, geometry = pp.input_size, pp.geometry
    else:
        size, geometry = as_size(cfg.size), DEFAULT_GEOMETRY
    src = SOURCES.get(spec.kind)(spec, run.split)
    ds = from_source(src, spec, run.split, run.limit, run.seed, size, "stream", run.workers, use_prepared=False,
                     preprocess=run.preprocess, geometry=geometry)
    stream, labels = ds.images, ds.labels.numpy()  # the selection, undecoded: positions in the source
    protocol = protocol_name(size, preprocess=run.preprocess, geometry=geometry)
    key = cache_key(src.reader, stream.indices, labels, protocol)
    meta = {"spec": spec.text, "name": ds.name, "split": run.split, "limit": run.limit, "seed": run.seed,
            "preprocess": protocol, "model": run.model if cfg.size is None else None,  # rewrite()'s --model
            "classnames": ds.classnames, "templates": ds.templates,
            "source": ds.info}
    t0 = time.perf_counter()
    with progress_bar(len(stream), f"prepare {spec.text} {size[0]}x{size[1]}", enabled=progress) as advance:
        path, written = write_prepared(stream, labels, key, meta, batch_size=run.batch_size,
                                       progress=lambda n: advance(n, **rate_fields(stream, time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    return {"schema": SCHEMA, "task": "prepare", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset": ds.name, "data": ds.to_record(), "prepared": {"path": str(path), "key": key,
            "shards_written": written, "bytes": sum(f.stat().st_size for f in path.iterdir())},
            "timings": {"wall_s": round(wall, 3), **stream.stats.rates(wall)},
            "config": flat(cfg), "environment": environment()}
