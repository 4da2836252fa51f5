"""Training: loss goes down, resume equals an uninterrupted run, torchrun (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
        return json.dumps([{k: v for k, v in h.items() if k != "seconds"} for h in history])

    assert _no_time(a["state"]["history"]) == _no_time(b["state"]["history"])
    assert json.dumps(full["report"]["levels"]) == json.dumps(resumed["report"]["levels"])
    # and it really trained: weights moved from the initialisation
    from train.loop import build_model

    init = build_model(TrainConfig.from_dict(a["config"])).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a["model"].items())


def test_early_stopping_stops(tmp_path) -> None:
    samples = list(generate(SyntheticConfig(n_exams=3, seed=1, shape=(96, 48))))
    tok = make_tokenizer(64)
    ds = SampleDataset(samples, (64, 32), tok)
    cfg = TrainConfig(model_overrides=TINY, epochs=5, batch_size=4, max_steps_per_epoch=1,
                      patience=1, lr=0.0, progress=False)  # lr 0: validation never improves
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
