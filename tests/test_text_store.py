import torch

from clipguard.models import text_embeddings as text_store


def test_store_hits_second_time_and_is_atomic(toy_clip, fresh_cache):
    names, tpl = ["red circle", "blue square"], ["a photo of a {c}."]
    first = text_store.get_text_embeddings(toy_clip, names, tpl)
    second = text_store.get_text_embeddings(toy_clip, names, tpl)
    assert (first.cache, second.cache) == ("miss", "hit") and first.key == second.key
    assert torch.equal(first.embeddings, second.embeddings)
    assert torch.allclose(first.embeddings.norm(dim=-1), torch.ones(2))
    files = sorted(p.name for p in (fresh_cache / "text").iterdir())
    assert files == [f"{first.key}.json", f"{first.key}.safetensors"]  # no temp files left behind


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
