"""Bad input around pretrained backbones, command by command: missing weights, no internet, wrong-shape
weights, a missing class-names file, an unknown model, a missing library. Each is one line and exit code 2,
with no traceback and nothing written (a study stops before Ray starts)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from ltstudy.cli import main

from support.pretrained import TINY_CLIP_KWARGS, TINY_VIT_KWARGS, write_clip_weights, write_timm_weights

VIT = ["model=timm:vit_tiny_patch16_224", "model_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 2, "
       "num_heads: 2}"]
CLIP = ["model=open_clip:ViT-B-16", "model_kwargs=" + str(TINY_CLIP_KWARGS).replace("'", "")]
DATA = ["--dataset", "synthetic", "image_size=8", "synthetic_classes=4", "epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_bad_input")
    write_timm_weights(root / "wide.safetensors", kwargs={**TINY_VIT_KWARGS, "embed_dim": 48})
    write_clip_weights(root / "clip.safetensors")
    (root / "lists").mkdir()
    for split in ("train", "val", "test"):
        (root / "lists" / f"{split}.txt").write_text("a.jpg 0\nb.jpg 1\n")
    return root


TUNE = ["tune", "--tracking-uri", "sqlite:///{root}/mlflow.db", "--storage", "{root}/storage"]
LISTS = ["--dataset", "filelist", "--data-root", "{root}", "train_list={root}/lists/train.txt",
         "val_list={root}/lists/val.txt", "test_list={root}/lists/test.txt"]
CASES = {
    "train missing weights": (["train", "--method", "ce", *DATA, *VIT, "pretrained={root}/none.safetensors"],
                              "weights file {root}/none.safetensors not found"),
    "train wrong-shape weights": (["train", "--method", "lift", *DATA, *VIT, "pretrained={root}/wide.safetensors"],
                                  "does not fit timm:vit_tiny_patch16_224"),
    "train no internet": (["train", "--method", "ce", *DATA, *VIT, "pretrained=augreg_in21k",
                           "weights_cache={root}/weights"], "cannot fetch the weights of"),
    "train unknown timm model": (["train", "--method", "ce", *DATA, "model=timm:vit_no_such"], "timm has no model"),
    "train weights for a resnet": (["train", "--method", "ce", *DATA, "pretrained={root}/clip.safetensors"],
                                   "apply to timm: and open_clip: models"),
    "train lift without class names": (["train", "--method", "lift", *LISTS, *CLIP], "class_names=FILE"),
    "train lift missing class names": (["train", "--method", "lift", *LISTS, *CLIP, "class_names={root}/no.txt"],
                                       "class-names file {root}/no.txt not found"),
    "train lift on a resnet": (["train", "--method", "lift", *DATA, "model=resnet32"], "pretrained vision transformer"),
    "extract missing weights": (["features", "extract", "--backbone", "timm:vit_tiny_patch16_224", "--storage",
                                 "{root}/storage", *DATA[:2], *VIT[1:], "pretrained={root}/none.safetensors"],
                                "not found"),
    "extract not a pretrained name": (["features", "extract", "--backbone", "resnet32", "--storage", "{root}/storage"],
                                      "--backbone takes timm:NAME"),
    "tune missing weights": ([*TUNE, "--method", "lift", *DATA, *CLIP, "pretrained={root}/none.safetensors"],
                             "not found"),
    "tune wrong-shape weights": ([*TUNE, "--method", "lift", *DATA, *VIT, "pretrained={root}/wide.safetensors"],
                                 "does not fit"),
    "tune lift without class names": ([*TUNE, "--method", "lift", *LISTS, *CLIP], "class_names=FILE"),
}


def _digest(path: Path) -> dict[str, str]:
    """Every file's sha256 and every folder (an empty one left behind counts as written)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_pretrained_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request leaves this machine
    argv, message = CASES[case]
    argv = [a.replace("{root}", str(files)) for a in argv]
    message = message.replace("{root}", str(files))
    before = _digest(files)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    assert info.value.code == 2, (out.out[-2000:], out.err[-2000:])
    err = out.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert "Traceback" not in out.out + out.err
    assert _digest(files) == before
    assert not (Path.cwd() / "mlflow.db").exists() and not (Path.cwd() / "ltstudy_results").exists()
    assert "ray" not in sys.modules or not _ray_started()


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


def test_a_missing_library_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(SystemExit) as info:
        main(["train", "--method", "lift", *DATA, *CLIP, "lora=true"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err == "error: peft is not installed: pip install peft (or pip install " \
                                            "'ltstudy[pretrained]')"
