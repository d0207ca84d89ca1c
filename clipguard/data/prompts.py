"""Class names and prompt templates: ``prompts/<dataset>.json`` or a user's ``--prompts FILE``.

File format: ``{"classnames": [...], "templates": {"seed": ["a photo of a {c}."], "openai": [...]}}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from clipguard.catalogue import prompts_dir  # defined with the catalogue; still importable from here
from clipguard.errors import ClipguardError

DEFAULT_TEMPLATES = {"seed": ["a photo of a {c}."]}


@dataclass(frozen=True)
class PromptSet:
    classnames: list[str]
    templates: list[str]
    template_set: str  # name of the set within the file, e.g. "seed"
    source: str  # file the prompts came from, or "dataset" when class names came from the data

    def to_record(self) -> dict:
        digest = hashlib.sha256(json.dumps([self.classnames, self.templates]).encode()).hexdigest()[:16]
        return {"source": self.source, "templates": self.template_set, "n_templates": len(self.templates),
                "n_classes": len(self.classnames), "digest": digest}


def load_prompts(dataset: str, *, prompts_file: str | None = None, templates: str = "seed",
                 fallback_classnames: list[str] | None = None,
                 fallback_templates: list[str] | None = None) -> PromptSet:
    """Prompts for ``dataset``: ``prompts_file`` if given, else ``prompts/<dataset>.json``, else the
    dataset's own class names with the default template (``seed``) and, when the data carries templates
    (CLIP_benchmark's wds folders), those as ``openai``."""
    path = Path(prompts_file) if prompts_file else prompts_dir() / f"{dataset}.json"
    if prompts_file and not path.is_file():
        raise ClipguardError(f"--prompts {prompts_file!r}: no such file")
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            classnames, sets = list(data["classnames"]), dict(data["templates"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ClipguardError(
                f"prompts file {str(path)!r} is malformed ({e}); expected "
                '{"classnames": [...], "templates": {"seed": ["a photo of a {c}."]}}'
            ) from None
        source = str(path) if prompts_file else path.name
    elif fallback_classnames:
        classnames, sets, source = [c.replace("_", " ") for c in fallback_classnames], DEFAULT_TEMPLATES, "dataset"
        if fallback_templates:
            sets = {**sets, "openai": list(fallback_templates)}
    else:
        raise ClipguardError(
            f"no prompts for dataset {dataset!r} and the data names no classes: pass --prompts FILE"
        )
    if templates not in sets:
        raise ClipguardError(f"--templates {templates!r} is not in {source}: choose from {', '.join(sets)}")
    tpl = list(sets[templates])
    bad = [t for t in tpl if "{c}" not in t]
    if bad:
        raise ClipguardError(f"template {bad[0]!r} in {source} has no {{c}} placeholder for the class name")
    return PromptSet(classnames, tpl, templates, source)
