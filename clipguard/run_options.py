"""``RunOptions``: the options every command shares (what model, which images, which prompts, where to run).

Each task config nests one (``cfg.run``); :func:`clipguard.tasks.setup.prepare` turns it into a loaded
model, data, prompts, text embeddings and classifier; the CLI declares each of these options once
(:mod:`clipguard.cli.options`). No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DATA_MODES = ("auto", "memory", "stream")  # how a dataset is held: data.stream.choose_mode
DECODES = ("pil", "device")  # how files are decoded: data.device_decode
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)


@dataclass
class RunOptions:
    model: str = "toy"  # model spec: ARCH:TAG, ARCH:/path/weights.safetensors, ARCH:none, hf-hub:ORG/NAME, toy
    dataset: str = "toy"  # dataset spec: toy, a catalogue name, hf:ORG/NAME, imagefolder:PATH, wds:PATH, prepared:PATH
    split: str = "test"  # dataset split
    limit: int | None = None  # images kept (seeded, stratified by class); None = all
    seed: int = 0  # seeds --limit selection and everything random downstream (attacks, training)
    prompts: str | None = None  # prompts JSON overriding prompts/<dataset>.json
    templates: str = "seed"  # template set within the prompts file
    image_column: str | None = None  # image column of an hf: dataset (None: the Image feature)
    label_column: str | None = None  # label column of an hf: dataset (None: the ClassLabel feature)
    adapter: str | None = None  # LoRA / VPT / full adapter directory made by `clipguard finetune`
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"  # clean passes: auto = bf16 on capable GPUs, else fp32
    batch_size: int = 256  # images per batch (halved automatically on GPU out-of-memory)
    workers: int | None = None  # decode processes; None = the machine's cores (0 below 1,024 images)
    data_mode: str = "auto"  # memory | stream | auto (memory up to 512 MiB of pixels): the same pixels either way
    streaming: bool = False  # hf: hub datasets: read the first --limit rows as a stream, download nothing else
    decode: str = "pil"  # pil (the protocol, CPU workers) | device (JPEGs decoded + resized on --device)
    compile: bool = False  # torch.compile the classifier's forward (compile time is reported apart from run time)
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune ...

    def check(self) -> RunOptions:
        """Cheap checks before anything loads: positive --limit / --batch-size, parseable specs."""
        from clipguard.errors import ClipguardError, check_positive
        from clipguard.specs import parse_dataset_spec, parse_model_spec

        check_positive("--limit", self.limit, "a positive number of images (or omitted for all)")
        check_positive("--batch-size", self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise ClipguardError(f"--workers {self.workers} must be >= 0 (0 decodes in the main process)")
        check_decode(self.decode)
        if self.compile_mode not in COMPILE_MODES:
            raise ClipguardError(f"--compile-mode {self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            raise ClipguardError(f"--compile-mode {self.compile_mode} chooses how --compile compiles: add --compile")
        if self.data_mode not in DATA_MODES:
            raise ClipguardError(f"--data-mode {self.data_mode!r}: use auto, memory or stream")
        parse_model_spec(self.model)
        parse_dataset_spec(self.dataset, image_column=self.image_column, label_column=self.label_column)
        return self


def check_decode(decode: str) -> str:
    if decode not in DECODES:
        from clipguard.errors import ClipguardError

        raise ClipguardError(f"--decode {decode!r}: use pil (the CPU protocol) or device (JPEG files decoded on the "
                             "run's device)")
    return decode


RUN_FIELDS = tuple(f.name for f in fields(RunOptions))

# Fields that change how fast a run goes, not what it measures (compiled kernels round differently, within float
# tolerance), with their defaults. ``flat`` leaves them out at their default, so no record or config hash of a run
# made before they existed changes; a hash that must ignore them when set too (a resumed fine-tuning run) lists
# them among its unhashed fields.
SPEED_ONLY = {"compile": False, "compile_mode": "default"}

# Fields that ``flat`` leaves out at their default, so records and config hashes made before the field existed stay
# valid: the speed-only ones, and ``decode`` (``device`` changes pixels slightly, so once set it is hashed).
OMIT_AT_DEFAULT = {**SPEED_ONLY, "decode": "pil"}


def split_run(opts: dict) -> tuple[dict, dict]:
    """A flat dict of options (a suite cell, keyword arguments) -> (RunOptions fields, the rest)."""
    run = {k: v for k, v in opts.items() if k in RUN_FIELDS}
    return run, {k: v for k, v in opts.items() if k not in RUN_FIELDS}


def flat(cfg) -> dict:
    """A task config as one flat dict (its ``run`` options inlined): what records and hashes store."""
    from dataclasses import asdict

    d = asdict(cfg)
    out = {**d.pop("run", {}), **d}
    return {k: v for k, v in out.items() if not (k in OMIT_AT_DEFAULT and v == OMIT_AT_DEFAULT[k])}
