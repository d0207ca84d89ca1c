"""The set-up every command shares: RunOptions -> model + dataset + prompts + cached text embeddings -> classifier."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clipguard.data.base import ImageSet
from clipguard.data.prompts import PromptSet, load_prompts
from clipguard.data.registry import load_dataset
from clipguard.defenses.registry import build_defense
from clipguard.errors import ClipguardError
from clipguard.models import loader  # called as loader.load_clip: tests swap it to prove nothing loads too early
from clipguard.models.adapters import load_adapter, read_manifest
from clipguard.models.classifier import ZeroShotClassifier, compile_classifier
from clipguard.models.inference import check_resolution
from clipguard.models.prompt_tuning import file_digest as adapter_digest
from clipguard.models.prompt_tuning import load_prompt_embeddings
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
    undefended: ZeroShotClassifier | None = None  # --defense: the classifier behind it (``classifier`` is the defense)
    adapters: dict | None = None  # what --adapter / --base-adapter held when loaded (:func:`adapter_provenance`)

    def timings(self, timings: dict) -> dict:
        """A record's ``timings`` plus ``compile_s`` when --compile compiled the classifier in :func:`prepare`
        (apart from, and outside, every img/s figure)."""
        return timings if self.compile_s is None else {**timings, "compile_s": self.compile_s}


def adapted(run: RunOptions, clip, classnames: list[str], *, prompt_base: bool = False):
    """(image tower, class embeddings or None) under ``--base-adapter`` (an image-tower adapter) and ``--adapter`` (an
    image-tower adapter, or a prompt adapter: APT's context, trained on the base tower or on --base-adapter's).

    ``prompt_base``: the tower a prompt is about to be trained on (finetune --method prompt), where --base-adapter
    stands alone. Anywhere else it goes under a prompt --adapter: alone it would evaluate the adapted tower while
    the record names no adapter, and the report would label it the bare model."""
    if run.base_adapter and not run.adapter and not prompt_base:
        raise ClipguardError(f"--base-adapter {run.base_adapter!r} goes under a prompt --adapter; to evaluate that "
                             f"image-tower adapter itself, pass it as --adapter {run.base_adapter}")
    visual = load_adapter(run.base_adapter, clip) if run.base_adapter else clip.model.visual
    if run.base_adapter and read_manifest(run.base_adapter)["method"] == "prompt":
        raise ClipguardError(f"--base-adapter {run.base_adapter!r} is a prompt adapter: pass it as --adapter "
                             "(--base-adapter takes an image-tower adapter: lora, vpt or full)")
    if not run.adapter:
        return visual, None
    if read_manifest(run.adapter)["method"] != "prompt":
        if run.base_adapter:
            raise ClipguardError(f"--adapter {run.adapter!r} is an image-tower adapter too: --base-adapter goes "
                                 "under a prompt --adapter only (pass one image-tower adapter)")
        return load_adapter(run.adapter, clip), None
    load_adapter(run.adapter, clip)  # the same base-model check as every adapter's
    return visual, load_prompt_embeddings(run.adapter, clip, classnames, base_adapter=run.base_adapter)


def prepare(run: RunOptions, *, resolution: str = "model", attack_precision: str | None = None,
            defense=None, prompt_base: bool = False, **overrides) -> Prepared:
    """Load everything a zero-shot run needs; ``overrides`` replace fields of ``run`` (e.g. ``precision="fp32"``).

    ``resolution`` is the one preprocessing protocol (DESIGN contract 2), applied once at load: ``model`` puts
    every image through the model's own open_clip eval transform for its input size (``clip.geometry``: shorter
    side + centre crop or squash, bicubic or bilinear; ``data.images.eval_geometry``), ``native`` keeps the
    dataset's own size (one size for the whole set, or a ClipguardError).

    ``defense`` (a ``tasks.configs.DefenseOptions`` naming one, e.g. ``--defense ttc``) wraps the classifier last:
    ``Prepared.classifier`` is then the defense and ``Prepared.undefended`` the classifier behind it.

    With ``run.compile`` the classifier's forward is compiled here and warmed up on one dummy batch (clean
    forward; forward + backward too when ``attack_precision`` says an attack follows, in that precision), so
    the run's own img/s exclude compiling; the seconds it took are ``Prepared.compile_s``.

    Errors are ClipguardErrors naming the bad option; both specs are parsed before any slow loading.
    """
    check_resolution(resolution)
    run = replace(run, **overrides)  # checked on construction
    mspec = parse_model_spec(run.model)
    dspec = parse_dataset_spec(run.dataset, image_column=run.image_column, label_column=run.label_column)
    clip = loader.load_clip(mspec, device=run.device, precision=run.precision,
                            trust_remote_code=run.trust_remote_code)
    size = clip.input_size if resolution == "model" else None
    data = load_dataset(dspec, split=run.split, limit=run.limit, seed=run.seed, size=size, mode=run.data_mode,
                        workers=run.workers, streaming=run.streaming, decode=run.decode, decode_device=clip.device,
                        preprocess=run.preprocess, geometry=clip.geometry)
    prompts = load_prompts(data.name, prompts_file=run.prompts, templates=run.templates,
                           fallback_classnames=data.classnames, fallback_templates=data.templates)
    n_classes = len(data.classnames) if data.classnames else int(data.labels.max()) + 1
    if len(prompts.classnames) != n_classes:
        raise ClipguardError(
            f"prompts {prompts.source} name {len(prompts.classnames)} classes but {data.spec} has {n_classes}: "
            "pass a matching --prompts FILE"
        )
    visual, text = adapted(run, clip, prompts.classnames, prompt_base=prompt_base)
    if text is None:  # no prompt adapter: the templates' embeddings, from the store
        text = get_text_embeddings(clip, prompts.classnames, prompts.templates)
    classifier = ZeroShotClassifier.from_clip(clip, text.embeddings, visual=visual).eval()
    compile_s = None
    if run.compile:
        compile_s = compile_classifier(classifier, tuple(data.images.shape[1:]), precision=clip.precision,
                                       attack_precision=attack_precision, mode=run.compile_mode)
    adapters = adapter_provenance(run)
    if defense is not None and defense.defense:  # a DefenseOptions naming one: the classifier becomes the defense
        return Prepared(clip, data, prompts, text, build_defense(defense.defense, classifier, defense, seed=run.seed),
                        compile_s, undefended=classifier, adapters=adapters)
    return Prepared(clip, data, prompts, text, classifier, compile_s, adapters=adapters)


def adapter_provenance(run: RunOptions) -> dict | None:
    """For the record: each adapter a run used, by path and by what it held: the sha256 over its weight files, its
    method and the config hash of the fine-tune that made it. A path alone cannot tell an adapter from one trained
    again into the same folder. None without adapters."""
    out = {}
    for option, path in (("adapter", run.adapter), ("base_adapter", run.base_adapter)):
        if path:
            m = read_manifest(path)
            out[option] = {"path": str(path), "weights_digest": adapter_digest(path), "method": m.get("method"),
                           "config_hash": m.get("config_hash")}
    return out or None
