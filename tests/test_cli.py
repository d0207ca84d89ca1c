import json
import subprocess
import sys

import pytest


def test_help_does_not_import_torch():
    code = "import sys, clipguard.cli.app; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "clipguard.cli.app", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout and "pixel units" in out.stdout


@pytest.fixture(scope="module")
def truncated_weights(tmp_path_factory):
    from clipguard.models.toy import toy_weights_path

    p = tmp_path_factory.mktemp("w") / "broken.safetensors"
    data = toy_weights_path().read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return p


@pytest.mark.parametrize("args,needle", [
    (["--model", "ViT-B-33:openai"], "ViT-B-32"),
    (["--dataset", "imagefolder:/no/such/dir"], "/no/such/dir"),
    (["--limit", "-1"], "--limit -1"),
    (["--dataset", "nosuchset"], "nosuchset"),
    (["--templates", "nosuch"], "nosuch"),
    (["--device", "cuda:7"], "cuda:7"),
])
def test_bad_input_is_one_line_exit_2(cli, args, needle):
    code, out, err = cli("eval", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]
    assert "Traceback" not in err


def test_truncated_weights_file_is_one_line(cli, truncated_weights):
    code, _, err = cli("eval", "--model", f"clipguard-toy:{truncated_weights}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "truncated" in err and str(truncated_weights) in err


def _count_text_tower(monkeypatch):
    import open_clip.model as om

    calls = {"n": 0}
    for cls in (om.CLIP, om.CustomTextCLIP):
        orig = cls.encode_text

        def counted(self, *a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "encode_text", counted)
    return calls


def test_eval_toy_record_and_cache_hit(cli, tmp_path, fresh_cache, monkeypatch):
    calls = _count_text_tower(monkeypatch)
    out = tmp_path / "r.json"
    code, stdout, err = cli("eval", "--model", "toy", "--dataset", "toy", "--out", out, "--device", "cpu")
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["schema"] == "clipguard.result/1" and rec["task"] == "zeroshot_classification"
    assert rec["metrics"]["acc1"] >= 0.90 and rec["data"]["n"] >= 1000
    assert rec["text_embeddings"]["cache"] == "miss" and calls["n"] > 0
    assert "acc1" in stdout and f"{rec['metrics']['acc1']:.4f}" in stdout
    for key in ("dataset", "model", "pretrained", "weights_digest", "timings", "environment", "prompts"):
        assert key in rec
    assert rec["timings"]["images_per_s"] > 0 and rec["environment"]["device"] == "cpu"

    calls["n"] = 0
    code, stdout, _ = cli("eval", "--model", "toy", "--dataset", "toy", "--json", "--device", "cpu")
    again = json.loads(stdout)
    assert code == 0 and again["text_embeddings"] == {"key": rec["text_embeddings"]["key"], "cache": "hit"}
    assert calls["n"] == 0, "the text tower must not run when the store has the key"
    assert again["metrics"] == rec["metrics"]


def test_cache_ls_and_rm(cli, fresh_cache, toy_clip):
    from clipguard.models.text_embeddings import get_text_embeddings

    e = get_text_embeddings(toy_clip, ["red circle"], ["a photo of a {c}."])
    code, out, _ = cli("cache", "ls", "--json")
    assert code == 0 and [x["key"] for x in json.loads(out)] == [e.key]
    code, _, err = cli("cache", "rm")
    assert code == 2 and "--all" in err
    for short in ("", " ", e.key[:3]):  # "" (an unset $KEY) prefixes every key: refused, nothing removed
        code, _, err = cli("cache", "rm", short)
        assert code == 2 and "shorter than 4" in err and len(json.loads(cli("cache", "ls", "--json")[1])) == 1
    code, out, _ = cli("cache", "rm", e.key[:8])
    assert code == 0 and "removed 1 entry" in out
    assert json.loads(cli("cache", "ls", "--json")[1]) == []
