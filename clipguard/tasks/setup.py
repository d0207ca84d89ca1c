"""The set-up every command shares: RunOptions -> model + dataset + prompts + cached text embeddings -> classifier."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clipguard.data.base import ImageSet
from clipguard.data.prompts import PromptSet, load_prompts
from clipguard.data.registry import load_dataset
from clipguard.errors import ClipguardError
from clipguard.models import loader  # called as loader.load_clip: tests swap it to prove nothing loads too early
from clipguard.models.adapters import load_adapter
from clipguard.models.classifier import ZeroShotClassifier, compile_classifier
from clipguard.models.inference import check_resolution
from clipguard.models.text_embeddings import TextEmbeddings, get_text_embeddings
from clipguard.run_options import RunOptions
from clipguard.specs import parse_dataset_spec, parse_model_spec


@dataclass
class Prepared:
    clip: loader.LoadedClip
    data: ImageSet
    prompts: PromptSet
    text: TextEmbeddings
    classifier: ZeroShotClassifier  # [0, 1] pixels -> logits, eval mode
    compile_s: float | None = None  # --compile: seconds compiling + warming up (timings["compile_s"]); None: eager

    def timings(self, timings: dict) -> dict:
        """A record's ``timings`` plus ``compile_s`` when --compile compiled the classifier in :func:`prepare`
        (apart from, and outside, every img/s figure)."""
        return timings if self.compile_s is None else {**timings, "compile_s": self.compile_s}


def prepare(run: RunOptions, *, resolution: str = "model", attack_precision: str | None = None,
            **overrides) -> Prepared:
    """Load everything a zero-shot run needs; ``overrides`` replace fields of ``run`` (e.g. ``precision="fp32"``).

    ``resolution`` is the one preprocessing protocol (DESIGN contract 2), applied once at load: ``model`` puts
    every image through open_clip's eval geometry for the model's input size (shorter side bicubic, centre
    crop), ``native`` keeps the dataset's own size (one size for the whole set, or a ClipguardError).

    With ``run.compile`` the classifier's forward is compiled here and warmed up on one dummy batch (clean
    forward; forward + backward too when ``attack_precision`` says an attack follows, in that precision), so
    the run's own img/s exclude compiling; the seconds it took are ``Prepared.compile_s``.

    Errors are ClipguardErrors naming the bad option; both specs are parsed before any slow loading.
    """
    check_resolution(resolution)
    run = replace(run, **overrides)  # checked on construction
    mspec = parse_model_spec(run.model)
    dspec = parse_dataset_spec(run.dataset, image_column=run.image_column, label_column=run.label_column)
    clip = loader.load_clip(mspec, device=run.device, precision=run.precision)
    size = clip.input_size if resolution == "model" else None
    data = load_dataset(dspec, split=run.split, limit=run.limit, seed=run.seed, size=size, mode=run.data_mode,
                        workers=run.workers, streaming=run.streaming, decode=run.decode, decode_device=clip.device,
                        preprocess=run.preprocess)
    prompts = load_prompts(data.name, prompts_file=run.prompts, templates=run.templates,
                           fallback_classnames=data.classnames, fallback_templates=data.templates)
    n_classes = len(data.classnames) if data.classnames else int(data.labels.max()) + 1
    if len(prompts.classnames) != n_classes:
        raise ClipguardError(
            f"prompts {prompts.source} name {len(prompts.classnames)} classes but {data.spec} has {n_classes}: "
            "pass a matching --prompts FILE"
        )
    visual = clip.model.visual
    if run.adapter:
        visual = load_adapter(run.adapter, clip)
    text = get_text_embeddings(clip, prompts.classnames, prompts.templates)
    classifier = ZeroShotClassifier.from_clip(clip, text.embeddings, visual=visual).eval()
    compile_s = None
    if run.compile:
        compile_s = compile_classifier(classifier, tuple(data.images.shape[1:]), precision=clip.precision,
                                       attack_precision=attack_precision, mode=run.compile_mode)
    return Prepared(clip, data, prompts, text, classifier, compile_s)
