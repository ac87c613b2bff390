"""The command line end to end: report files exist, HTML holds every token, PNGs have their size."""

import html

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from implicit_hooks import viz
from implicit_hooks.cli import main


def png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_demo_of_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained on 'markers'" in printed and "exact (≤ 1e-5)" in printed
    assert (out / "relevance.html").exists() and (out / "heatmaps.png").exists()


def test_demo_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(["demo", "--random", "--text", "a<b & c", "--layers", "2", "--out", str(out), "--no-progress"])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed and "exact (≤ 1e-5)" in printed
    for name in ("index.html", "heatmaps.png", "relevance.html", "exactness.html"):
        assert (out / name).exists(), name
    page = (out / "relevance.html").read_text()
    for token in "a<b & c":
        assert html.escape(viz.visible_token(token)) in page
    assert png_size(out / "heatmaps.png") == viz.grid_pixels(2, 3)
    assert "backbone.layers.1.mixer" in (out / "exactness.html").read_text()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_mamba")
    torch.manual_seed(0)
    MambaForCausalLM(
        MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2)
    ).save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<unk>", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


def test_explain_a_local_model_directory(model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(
            [
                "explain",
                str(model_dir),
                "--text",
                "the cat sat on the mat",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = (out / "relevance.html").read_text()
    for word in ("the", "cat", "sat", "mat"):
        assert f">{word}<" in page
    out2 = tmp_path / "ids"
    assert (
        main(
            [
                "explain",
                str(model_dir),
                "--ids",
                "3,1,4,1,5",
                "--query",
                "2",
                "--out",
                str(out2),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out2 / "heatmaps.png").exists()


def test_clear_errors(model_dir, tmp_path, capsys):
    assert main(["explain", str(tmp_path / "missing"), "--ids", "1,2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    assert main(["explain", str(weights), "--ids", "1,2"]) == 2
    assert "not an rwkv checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert main(["explain", str(broken), "--ids", "1,2"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert main(["explain", str(tmp_path), "--ids", "1,2"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["explain", str(model_dir), "--ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(gpt2)
    assert main(["explain", str(gpt2), "--ids", "1,2,3", "--out", str(tmp_path / "g")]) == 2
    assert "contains no block that implicit_hooks supports" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["4", "6", "7"])
def test_explain_an_rwkv_package_checkpoint(tmp_path, capsys, version):
    from implicit_hooks.families.rwkv_pkg import tiny_checkpoint

    checkpoint = tiny_checkpoint(version, tmp_path / f"tiny-v{version}.pth")
    out = tmp_path / "r"
    assert main(["explain", str(checkpoint), "--ids", "3,1,4,1,5,9", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(
        out / "index.html"
    )  # v7 prints a banner first
    page = (out / "relevance.html").read_text()
    assert "rollout (full)" in page and "raw (S6 only)" in page
    exactness = (out / "exactness.html").read_text()
    assert "blocks.0.att" in exactness and "e-0" in exactness


def test_a_missing_optional_dependency_names_its_extra(tmp_path, capsys, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["demo", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "pip install 'implicit_hooks[viz]'" in capsys.readouterr().err
