import json
import os

import pytest
import torch

from clipguard import fsutil
from clipguard.models import text_embeddings as text_store


def test_store_hits_second_time_and_is_atomic(toy_clip, fresh_cache):
    names, tpl = ["red circle", "blue square"], ["a photo of a {c}."]
    first = text_store.get_text_embeddings(toy_clip, names, tpl)
    second = text_store.get_text_embeddings(toy_clip, names, tpl)
    assert (first.cache, second.cache) == ("miss", "hit") and first.key == second.key
    assert torch.equal(first.embeddings, second.embeddings)
    assert torch.allclose(first.embeddings.norm(dim=-1), torch.ones(2))
    files = sorted(p.name for p in (fresh_cache / "text").iterdir())
    assert files == [f"{first.key}.safetensors"]  # one file per entry, no temp files left behind
    (entry,) = text_store.list_entries()
    assert entry["key"] == first.key and entry["model"] == "toy" and entry["n_classes"] == 2
    assert entry["templates"] == tpl and entry["bytes"] == (fresh_cache / "text" / files[0]).stat().st_size
    assert entry["created"] and entry["fingerprint"] == toy_clip.fingerprint


def test_key_depends_on_classes_templates_and_model(toy_clip):
    k = text_store.text_key(toy_clip.fingerprint, ["a"], ["{c}"])
    assert k != text_store.text_key(toy_clip.fingerprint, ["b"], ["{c}"])
    assert k != text_store.text_key(toy_clip.fingerprint, ["a"], ["x {c}"])
    assert k != text_store.text_key("other-model", ["a"], ["{c}"])


def test_damaged_entry_is_rebuilt(toy_clip, fresh_cache):
    e = text_store.get_text_embeddings(toy_clip, ["red circle"], ["a photo of a {c}."])
    (fresh_cache / "text" / f"{e.key}.safetensors").write_bytes(b"garbage")
    again = text_store.get_text_embeddings(toy_clip, ["red circle"], ["a photo of a {c}."])
    assert again.cache == "miss" and torch.equal(again.embeddings, e.embeddings)


def test_ensemble_matches_clip_benchmark_formula(toy_clip):
    names, tpl = ["red circle", "cyan star"], ["a photo of a {c}.", "an image of a {c}."]
    emb = text_store.compute_text_embeddings(toy_clip, names, tpl)
    with torch.no_grad():
        for i, c in enumerate(names):
            f = torch.nn.functional.normalize(toy_clip.model.encode_text(toy_clip.tokenizer(
                [t.format(c=c) for t in tpl])), dim=-1).mean(0)
            assert torch.allclose(emb[i], f / f.norm(), atol=1e-6)


def _crash_on_replace(monkeypatch, n: int):
    """os.replace raises on its n-th call: the process dies between two writes."""
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    return calls


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_mid_write_leaves_no_partial_entry(toy_clip, fresh_cache, monkeypatch, crash_at):
    """The old store moved the tensor and then the manifest into place: a crash between the two left a tensor
    without a manifest, invisible to `cache ls` and yet served as a hit. Now an entry lands in one step."""
    names, tpl = ["red circle", "blue square"], ["a photo of a {c}."]
    with monkeypatch.context() as m:
        _crash_on_replace(m, crash_at)
        try:
            text_store.get_text_embeddings(toy_clip, names, tpl)
            crashed = False
        except OSError:
            crashed = True
    listed = text_store.list_entries()
    files = sorted(p.name for p in (fresh_cache / "text").iterdir())
    assert files == [f"{e['key']}.safetensors" for e in listed]  # every file on disk is a whole, listed entry
    again = text_store.get_text_embeddings(toy_clip, names, tpl)
    assert again.cache == ("miss" if crashed else "hit")
    assert [e["key"] for e in text_store.list_entries()] == [again.key]


def test_a_crash_inside_the_tensor_write_is_not_an_entry(toy_clip, fresh_cache, monkeypatch):
    from safetensors import torch as st

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("simulated crash")

    with monkeypatch.context() as m, pytest.raises(OSError):
        m.setattr(st, "save_file", half_written)
        text_store.get_text_embeddings(toy_clip, ["red circle"], ["{c}"])
    assert list((fresh_cache / "text").iterdir()) == [] and text_store.list_entries() == []
    assert text_store.get_text_embeddings(toy_clip, ["red circle"], ["{c}"]).cache == "miss"


def test_old_two_file_entries_are_listed_rebuilt_and_removed(toy_clip, fresh_cache):
    from safetensors.torch import save_file

    names, tpl = ["red circle"], ["{c}"]
    key = text_store.text_key(toy_clip.fingerprint, names, tpl)
    d = fresh_cache / "text"
    d.mkdir(parents=True)
    save_file({"embeddings": torch.zeros(1, 8)}, str(d / f"{key}.safetensors"))  # no manifest inside
    (d / f"{key}.json").write_text(json.dumps({"key": key, "model": "toy", "n_classes": 1, "templates": tpl,
                                               "created": "2024-01-01T00:00:00Z"}))
    (entry,) = text_store.list_entries()
    assert entry["key"] == key and entry["legacy"] is True
    e = text_store.get_text_embeddings(toy_clip, names, tpl)
    assert e.cache == "miss" and e.embeddings.abs().sum() > 0  # rebuilt, not served from the old layout
    assert sorted(p.name for p in d.iterdir()) == [f"{key}.safetensors"]
    assert "legacy" not in text_store.list_entries()[0]
    (d / "0ld.json").write_text("{}")  # a stray manifest of the old layout, whose tensor is gone
    assert text_store.remove_entries(None) == 2 and list(d.iterdir()) == []
