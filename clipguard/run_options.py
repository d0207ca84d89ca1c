"""``RunOptions``: the options every command shares (what model, which images, which prompts, where to run).

Each command config inlines one (``cfg.run``); :func:`clipguard.tasks.setup.prepare` turns it into a loaded model,
data, prompts, text embeddings and classifier. Each field declares its option once (:mod:`clipguard.config`).
No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipguard import specs
from clipguard.config import MODEL_DATA, OUTPUT, PERF, Config, choice, in_range, non_negative, option, positive
from clipguard.errors import ClipguardError
from clipguard.specs import parse_dataset_spec

DATA_MODES = ("auto", "memory", "stream")  # how a dataset is held: data.stream.choose_mode
DECODES = ("pil", "device")  # how files are decoded: data.device_decode
PREPROCESSES = ("open_clip", "tecoa")  # the geometry at --resolution model: data.images.GEOMETRIES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _spec(parse_name: str):
    def parse(value, name: str) -> str:
        getattr(specs, parse_name)(str(value))  # a one-line error for a malformed spec, before anything loads
        return str(value)

    return parse


@dataclass(frozen=True)
class RunOptions(Config):
    model: str = option("toy", short="-m", metavar="SPEC", panel=MODEL_DATA, parse=_spec("parse_model_spec"),
                        help="Model spec: ViT-B-32:openai, ARCH:/path/weights.safetensors, ARCH:none (random init), "
                             "hf-hub:ORG/NAME, transformers:ORG/NAME[@REV] or transformers:DIR (a transformers "
                             "CLIPModel / SiglipModel), or toy.")
    dataset: str = option("toy", short="-d", metavar="SPEC", panel=MODEL_DATA,
                          help="Dataset spec: toy, a catalogue name (cifar10, imagenet1k, ...: clipguard datasets), "
                               "hf:ORG/NAME or hf:SAVED_DIR, imagefolder:PATH (ImageNet's layout too), wds:PATH "
                               "(CLIP_benchmark shards) or prepared:PATH.")
    split: str = option("test", panel=MODEL_DATA, help="Dataset split.")
    limit: int | None = option(None, panel=MODEL_DATA, parse=positive, metavar="N",
                               help="Keep N images, stratified by class and seeded by --seed.")
    seed: int = option(0, panel=MODEL_DATA, help="Seed for --limit selection, attacks and training.")
    confidence: float = option(0.95, panel=OUTPUT, metavar="LEVEL", omit_at_default=True, trains=False,
                               parse=in_range(0, 1, "in (0, 1), e.g. 0.95", lo_open=True),
                               help="Level of every accuracy's exact (Clopper-Pearson) interval in the record "
                                    "(<metric>_ci); the record names it.")
    prompts: str | None = option(None, panel=MODEL_DATA, metavar="FILE",
                                 help="Prompts JSON overriding prompts/<dataset>.json.")
    templates: str = option("seed", panel=MODEL_DATA, help="Template set in the prompts file: seed or openai.")
    image_column: str | None = option(None, panel=MODEL_DATA, help="Image column of an hf: dataset.")
    label_column: str | None = option(None, panel=MODEL_DATA, help="Label column of an hf: dataset.")
    adapter: str | None = option(None, panel=MODEL_DATA, metavar="DIR",
                                 help="Adapter directory (LoRA, VPT, full or prompt) made by finetune.")
    base_adapter: str | None = option(None, panel=MODEL_DATA, metavar="DIR", omit_at_default=True,
                                      help="Image-tower adapter (e.g. a TeCoA/FARE LoRA) under a prompt --adapter; "
                                           "finetune --method prompt trains on top of it.")
    trust_remote_code: bool = option(False, panel=MODEL_DATA, omit_at_default=True,
                                     help="Let code from a model repository run: a transformers: checkpoint's own "
                                          "model code, a hub:OWNER/REPO:ENTRY surrogate's torch.hub code.")
    device: str = option("auto", panel=PERF, trains=False, help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    precision: str = option("auto", panel=PERF, parse=choice(*PRECISIONS),
                            help="Clean passes: auto (bf16 on capable GPUs, else fp32), fp32, bf16, fp16.")
    batch_size: int = option(256, panel=PERF, parse=positive,
                             help="Images per batch, per process under torchrun (halved automatically on GPU "
                                  "out-of-memory).")
    workers: int | None = option(None, panel=PERF, parse=non_negative, trains=False,
                                 help="Decode processes (default: the machine's cores; 0: decode in the main process).")
    data_mode: str = option("auto", panel=PERF, parse=choice(*DATA_MODES), trains=False,
                            help="memory (decode once, hold the set), stream (decode batch by batch, memory bounded) "
                                 "or auto (memory up to 512 MiB of pixels).")
    streaming: bool = option(False, panel=MODEL_DATA, omit_at_default=True,
                             help="hf: hub datasets: read the first --limit rows as a stream instead of downloading "
                                  "the whole set (not stratified).")
    preprocess: str = option("open_clip", panel=MODEL_DATA, parse=choice(*PREPROCESSES), omit_at_default=True,
                             help="Geometry that brings images to the model's input size: open_clip (the protocol: "
                                  "the model's own open_clip eval transform: its resize mode, e.g. shorter side + "
                                  "centre crop or SigLIP's squash, and interpolation) or tecoa (TeCoA's "
                                  "test code: torchvision Resize(256) bilinear + CenterCrop(224)); named in the "
                                  "record.")
    decode: str = option("pil", panel=PERF, parse=choice(*DECODES), omit_at_default=True,
                         help="pil (the protocol: PIL on the decode workers) or device (JPEG files decoded by "
                              "torchvision on --device, nvJPEG on a GPU, and resized there; within the README's "
                              "tolerance of pil, named in the record).")
    compile: bool = option(False, panel=PERF, speed_only=True,
                           help="torch.compile the classifier's forward (inductor; compile time is reported apart "
                                "from run time).")
    compile_mode: str = option("default", panel=PERF, parse=choice(*COMPILE_MODES), speed_only=True,
                               help="torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: replays "
                                    "each batch shape's kernels without launch overhead), max-autotune or "
                                    "max-autotune-no-cudagraphs.")

    def check(self) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise ClipguardError(f"--compile-mode {self.compile_mode} chooses how --compile compiles: add --compile")
        parse_dataset_spec(self.dataset, image_column=self.image_column, label_column=self.label_column)


def check_decode(decode: str) -> str:
    """``decode`` if it is one of DECODES, else the one-line error (for callers below the configs)."""
    return choice(*DECODES)(decode, "--decode")
