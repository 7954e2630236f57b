"""The trainer end to end on real processes: run folder, resume equivalence, 2 ranks, exit codes."""

import json

import pytest
import torch
from conftest import rerun_from_checkpoint, run_vlp, tiny_config

from vlp.train.weights import consolidate

pytestmark = pytest.mark.slow


def final_weights(run_dir, tag):
    return consolidate(run_dir / "checkpoints", tag)


def test_run_folder_contents(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir)
    proc = run_vlp("train", config)
    run_dir = tmp_path / "runs" / "tiny"
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["run_dir"] == str(run_dir)
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss/total" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    first = next(r for r in records if "loss/total" in r)
    for key in ("loss/clip", "lr", "samples_per_s", "samples_seen", "clip/logit_scale"):
        assert key in first, key
    assert first["samples_seen"] == 8
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6 and 0.0 <= results["zeroshot_top1"] <= 1.0
    assert results["zeroshot_samples"] == 359  # every held-out digit scored once
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000

    # A second fresh run into the same folder would take the first run's step_6 checkpoint for its
    # own and append to its metrics: refused in one line, nothing touched; --overwrite replaces it.
    before = (run_dir / "metrics.jsonl").read_bytes()
    again = run_vlp("train", config, check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(f"vlp: error: {run_dir} already holds a run")
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    run_vlp("train", config, "train.steps=4", "--overwrite")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run_dir / "checkpoints" / "step_00000006").exists()


@pytest.mark.parametrize("heads", [{"clip": {}}, {"meru": {"temperature_init": 0.07}}], ids=["clip", "meru"])
def test_resume_ends_with_the_same_weights(tmp_path, digits_dir, heads):
    """Interrupt after step 3 (drop the later checkpoint), resume in a new process: the final
    weights equal the uninterrupted run's bit for bit (model, optimizer, schedule, data
    position mid-epoch and RNG all restored; for MERU the learned curvature too)."""
    config = tiny_config(tmp_path, digits_dir, train={"checkpoint_every": 3, "keep_checkpoints": 3, "lr": 5e-3})
    import yaml

    tree = yaml.safe_load(config.read_text())
    tree["model"]["heads"] = heads
    config.write_text(yaml.safe_dump(tree))
    run_vlp("train", config)
    run_dir = tmp_path / "runs" / "tiny"
    reference = final_weights(run_dir, "step_00000006")

    ckpts = rerun_from_checkpoint(config, tmp_path / "runs", "tiny", "step_00000006", "step_00000003")
    resumed_runs = ckpts.parents[1]
    resumed = final_weights(resumed_runs / "tiny", "step_00000006")
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
    if "meru" in heads:  # the curvature did learn, and came back from the checkpoint exactly
        assert reference["objective.heads.meru.log_curv"].abs().item() > 0
    # A resume must also keep one metrics line per step.
    steps = [json.loads(l)["step"] for l in (resumed_runs / "tiny" / "metrics.jsonl").read_text().splitlines()
             if "loss/total" in l]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 2, "checkpoint_every": 0, "warmup_steps": 1})
    run_vlp("train", config, "--resume", "latest")
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_two_ranks_zero2_on_gloo(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 4, "checkpoint_every": 4}, deepspeed={"zero_stage": 2})
    run_vlp("train", config, "--nproc", "2")
    run_dir = tmp_path / "runs" / "tiny"
    tag_dir = run_dir / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in tag_dir.glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ] or len(list(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))) == 2
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss/total" in l]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["samples_seen"] == 16  # global batch = 2 ranks x 8
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records)
    weights = final_weights(run_dir, "step_00000004")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["zeroshot_samples"] == 359  # each rank scored its share, reduced to the whole set


def test_bad_config_exits_2_and_writes_nothing(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir)
    proc = run_vlp("train", config, "train.lrr=0.1", check=False)
    assert proc.returncode == 2
    assert 'train.lrr: unknown key. Did you mean "lr"?' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    missing = run_vlp("train", tmp_path / "absent.yaml", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_missing_shards_exit_2(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir, data={"train": [{"urls": str(tmp_path / "none-{000..001}.tar")}]})
    proc = run_vlp("train", config, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "none-000.tar" in proc.stderr.strip().splitlines()[-1]


def test_demo_with_reduced_budget(tmp_path):
    out = tmp_path / "demo"
    proc = run_vlp("demo", "--out", out, "--steps", "12", "train.checkpoint_every=0", "train.log_every=4")
    assert "zero-shot top-1" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["zeroshot_top1"] <= 1.0 and results["steps"] == 12
    export = out / "export" / "safetensors"
    card = json.loads((export / "model_card.json").read_text())
    assert set(card["files"]) == {"model.safetensors", "config.yaml"}
    assert card["eval_results"]["zeroshot_top1"] == results["zeroshot_top1"]


def _clipped_steps(rank, world_size, config_path):
    """Three optimizer steps (grad_accum 2, clipping active) through the trainer's engine path and
    through a plain torch loop from the same initial weights."""
    import copy
    import os

    from vlp.train.config import load_config
    from vlp.train.schedule import warmup_cosine
    from vlp.train.trainer import build_engine, build_model, clip_gradients

    os.environ.setdefault("LOCAL_RANK", "0")
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config)
    reference = copy.deepcopy(model)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    tokenizer = model.text.tokenizer()
    batches = [{"image": torch.randn(8, 3, 32, 32), "text": tokenizer([f"a handwritten {i % 10}" for i in range(8 * k, 8 * k + 8)])}
               for k in range(6)]
    engine = build_engine(config, model)
    norms = []
    for batch in batches:
        engine.backward(engine(batch)["loss"])
        norm = clip_gradients(engine, config)
        if norm is not None:
            norms.append(float(norm))
        engine.step()
    tr = config.train
    optimizer = torch.optim.AdamW(reference.param_groups(tr.weight_decay), lr=tr.lr, betas=tr.betas, eps=tr.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, tr.steps, tr.warmup_steps, tr.min_lr_ratio))
    reference_norms = []
    for k in range(0, len(batches), 2):
        for batch in batches[k:k + 2]:
            (reference(batch)["loss"] / 2).backward()
        reference_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), config.deepspeed.grad_clip)))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return {"ours": engine.module.state_dict(), "reference": reference.state_dict(), "norms": norms,
            "reference_norms": reference_norms, "ds_clip": engine.gradient_clipping(), "init": initial}


def test_trainer_clipping_equals_a_plain_torch_loop(tmp_path, digits_dir):
    """fp32 at ZeRO 0 the trainer clips with torch's foreach kernels and DeepSpeed's own clip is off:
    the weights after three accumulated steps match a plain AdamW + clip_grad_norm_ loop."""
    from dist_utils import run_ranks

    config = tiny_config(tmp_path, digits_dir, deepspeed={"grad_accum": 2, "grad_clip": 0.05},
                         train={"steps": 3, "warmup_steps": 1, "fused_adamw": False})
    (result,) = run_ranks(_clipped_steps, 1, str(config))
    assert result["ds_clip"] == 0.0
    assert len(result["norms"]) == 3 and all(n > 0.05 for n in result["norms"])  # clipping was active
    assert result["norms"] == pytest.approx(result["reference_norms"], rel=1e-5)
    for name, value in result["reference"].items():
        torch.testing.assert_close(result["ours"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("option", ["compile", "channels_last"])
def test_compile_and_channels_last_train_like_eager(tmp_path, digits_dir, option):
    """train.compile (towers through inductor) and train.channels_last give the eager loop's
    update: their distance to the plain loop's weights is a small fraction of the update itself."""
    from dist_utils import run_ranks

    config = tiny_config(tmp_path, digits_dir, deepspeed={"grad_accum": 2, "grad_clip": 0.05},
                         train={"steps": 3, "warmup_steps": 1, "fused_adamw": False, option: True})
    (result,) = run_ranks(_clipped_steps, 1, str(config), timeout=600)
    assert len(result["norms"]) == 3
    ours = torch.cat([v.flatten().float() for v in result["ours"].values()])
    reference = torch.cat([v.flatten().float() for v in result["reference"].values()])
    initial = torch.cat([v.flatten().float() for v in result["init"].values()])
    update = (reference - initial).norm()
    assert update > 0 and (ours - reference).norm() < 0.05 * update
