"""The set-up every command shares: model + dataset + prompts + cached text embeddings -> classifier."""

from __future__ import annotations

from dataclasses import dataclass

from clipguard.errors import ClipguardError


@dataclass
class Prepared:
    clip: object  # LoadedClip
    data: object  # ImageSet
    prompts: object  # PromptSet
    text: object  # TextEmbeddings
    classifier: object  # ZeroShotClassifier


# Config field -> prepare() argument, for configs that carry the shared options (eval, attack, uap, finetune).
_SHARED = {"split": "split", "limit": "limit", "seed": "seed", "prompts": "prompts_file", "templates": "templates",
           "device": "device", "precision": "precision", "image_column": "image_column",
           "label_column": "label_column", "adapter": "adapter"}


def prepare_for(cfg, **overrides) -> Prepared:
    """:func:`prepare` from a command's config: every shared field it has is passed on, ``overrides`` win."""
    kw = {arg: getattr(cfg, field) for field, arg in _SHARED.items() if hasattr(cfg, field)}
    return prepare(cfg.model, cfg.dataset, **{**kw, **overrides})


def prepare(model: str, dataset: str, *, split: str = "test", limit: int | None = None, seed: int = 0,
            prompts_file: str | None = None, templates: str = "seed", device: str = "auto",
            precision: str = "auto", image_column: str | None = None, label_column: str | None = None,
            adapter: str | None = None) -> Prepared:
    """Load everything a zero-shot run needs; errors are ClipguardErrors naming the bad option."""
    from clipguard.data.registry import check_limit, load_dataset
    from clipguard.models.classifier import ZeroShotClassifier
    from clipguard.models.loader import load_clip
    from clipguard.prompts import load_prompts
    from clipguard.specs import parse_dataset_spec, parse_model_spec
    from clipguard.text_store import get_text_embeddings

    mspec = parse_model_spec(model)  # parse both specs before any slow loading: fail fast
    dspec = parse_dataset_spec(dataset, image_column=image_column, label_column=label_column)
    check_limit(limit)
    clip = load_clip(mspec, device=device, precision=precision)
    data = load_dataset(dspec, split=split, limit=limit, seed=seed)
    prompts = load_prompts(data.name, prompts_file=prompts_file, templates=templates,
                           fallback_classnames=data.classnames)
    n_classes = len(data.classnames) if data.classnames else int(data.labels.max()) + 1
    if len(prompts.classnames) != n_classes:
        raise ClipguardError(
            f"prompts {prompts.source} name {len(prompts.classnames)} classes but {data.spec} has {n_classes}: "
            "pass a matching --prompts FILE"
        )
    visual = clip.model.visual
    if adapter:
        from clipguard.models.adapters import load_adapter

        visual = load_adapter(adapter, clip)
    text = get_text_embeddings(clip, prompts.classnames, prompts.templates)
    classifier = ZeroShotClassifier.from_clip(clip, text.embeddings, visual=visual).eval()
    return Prepared(clip, data, prompts, text, classifier)
