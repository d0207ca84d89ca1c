import pytest

from clipguard.errors import ClipguardError
from clipguard.specs import parse_dataset_spec, parse_eps, parse_eps_list, parse_model_spec


@pytest.mark.parametrize("text,value,canon", [("8/255", 8 / 255, "8/255"), ("0.0314", 0.0314, "0.0314"),
                                               ("0", 0.0, "0"), ("1/255", 1 / 255, "1/255"), ("1", 1.0, "1")])
def test_eps_forms(text, value, canon):
    e = parse_eps(text)
    assert e.value == pytest.approx(value, abs=1e-12) and e.text == canon


@pytest.mark.parametrize("bad,fragment", [("2", "above 1"), ("abc", "not a number"), ("-1/255", ">= 0"),
                                          ("8/0", "divides by zero")])
def test_eps_errors_name_the_value(bad, fragment):
    with pytest.raises(ClipguardError, match=fragment) as exc:
        parse_eps(bad)
    assert repr(bad) in str(exc.value)


def test_eps_list():
    assert [e.text for e in parse_eps_list("0,1/255, 2/255,8/255")] == ["0", "1/255", "2/255", "8/255"]


def test_model_specs():
    assert parse_model_spec("ViT-B-32:openai").kind == "pretrained"
    f = parse_model_spec("ViT-B-32:/tmp/w.safetensors")
    assert (f.kind, f.arch, f.path) == ("file", "ViT-B-32", "/tmp/w.safetensors")
    assert parse_model_spec("hf-hub:laion/CLIP-ViT-B-32").repo == "laion/CLIP-ViT-B-32"
    assert parse_model_spec("toy@seed1").variant == "seed1"
    assert parse_model_spec("ViT-B-32:none").kind == "random"
    with pytest.raises(ClipguardError, match="ARCH:TAG"):
        parse_model_spec("ViT-B-32")


def test_dataset_specs(tmp_path):
    c10 = parse_dataset_spec("cifar10")
    assert (c10.hf_path, c10.image_column, c10.label_column) == ("uoft-cs/cifar10", "img", "label")
    assert parse_dataset_spec("cifar100").label_column == "fine_label"
    assert parse_dataset_spec(f"imagefolder:{tmp_path}").path == str(tmp_path.resolve())
    with pytest.raises(ClipguardError, match="/no/such/dir"):
        parse_dataset_spec("imagefolder:/no/such/dir")
    with pytest.raises(ClipguardError, match="did you mean cifar10"):
        parse_dataset_spec("cifar1O")
