"""Experiment trackers (train/trackers.py), validation loss and the held-out split (evaluate/validation.py),
checkpoint.keep_best (train/checkpoint.py): unit tests, then one 2-rank run killed with SIGKILL and resumed,
read back from TensorBoard's, wandb's and MLflow's own readers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, free_port, read_metrics

# ------------------------------------------------------------------------------------------ unit tests


def test_held_out_rows_are_drawn_by_the_seed_and_never_trained_on():
    from qlora_dist.config import load_config
    from qlora_dist.data.batches import BatchSchedule
    from qlora_dist.evaluate.validation import held_out

    class Rows:  # tokenized rows whose row i is i
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return i

        def lengths(self):
            return [10 + i for i in range(100)]

    cfg = load_config(overrides=["data.eval_size=12", "train.seed=3"])
    train, held = held_out(cfg, Rows(), prepare=None)
    held_rows = {held[i] for i in range(len(held))}
    assert len(held) == 12 and len(train) == 88 and held.lengths() == [10 + r for r in sorted(held_rows)]
    schedule = BatchSchedule(len(train), 8, 4, 0, 1, seed=3)
    trained = {train[i] for step in range(30) for i in schedule.global_indices(step)}  # ~2.7 epochs
    assert trained == set(range(100)) - held_rows  # every other row trained, no held-out one
    again = held_out(cfg, Rows(), prepare=None)[1]
    other = held_out(load_config(overrides=["data.eval_size=12", "train.seed=4"]), Rows(), prepare=None)[1]
    assert list(again.indices) == list(held.indices) != list(other.indices)
    # a slice of the held-out rows is a list of rows, as one of the rows themselves is
    assert held[:3] == [held[0], held[1], held[2]] and train[-2:] == [train[len(train) - 2], train[len(train) - 1]]


def test_validation_loss_is_the_same_on_one_and_two_ranks_and_normalised_like_training(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_dist.data.batches import IGNORE_INDEX, TokenizedExample, collate
    from qlora_dist.data.corpus import TokenizedRows
    from qlora_dist.evaluate.validation import loss_sums
    from qlora_dist.model.fastpath import weighted_cross_entropy
    from qlora_dist.model.loss import StepObjective

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rows = []
    for n in [5, 9, 14, 7, 20, 11, 6, 17, 9, 13, 8]:  # prompts masked out, answers of several lengths
        ids = torch.randint(3, vocab, (n,)).tolist()
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:], None))
    rows = TokenizedRows.from_rows(rows)  # as the trainer holds them (the cache's rows)
    for norm in ("sequence", "token"):
        one = loss_sums(model, rows, 3, 0, norm, 0, 1, "cpu")
        two = [loss_sums(model, rows, 3, 0, norm, r, 2, "cpu") for r in (0, 1)]
        v1, v2 = one[0] / one[1], sum(s for s, _ in two) / sum(w for _, w in two)
        assert abs(v1 - v2) < 1e-6, (norm, v1, v2)
        # the training objective of one global batch holding all these rows (model/loss.py)
        batch = collate(rows[:], 0)
        weights = StepObjective.of(norm, batch).weights(batch)
        with torch.no_grad():
            objective = float(weighted_cross_entropy(model(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]).logits,
                                                     batch["labels"], weights))
        assert abs(v1 - objective) < 1e-5, (norm, v1, objective)


def _save_fake_checkpoint(ckpt, step: int, eval_loss: float | None) -> None:
    """What Checkpointer.save leaves for pruning to read: config, progress (ranked), manifest."""
    from qlora_dist.train import manifest
    from qlora_dist.train.checkpoint import Progress

    folder = ckpt.paths.checkpoint(step)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(ckpt.cfg.to_yaml())
    progress = Progress(step=step, samples_seen=8 * step, epoch=0.0, seed=1, world_size=1, global_batch_size=8,
                        zero_stage=2, eval_loss=eval_loss)
    ckpt._rank_best(progress)
    (folder / "progress.json").write_text(json.dumps(asdict(progress)))
    manifest.write(folder)
    ckpt._prune()


def test_keep_best_keeps_the_lowest_validation_loss_beside_the_last_ones_across_a_resume(tmp_path):
    from qlora_dist.config import load_config
    from qlora_dist.paths import RunPaths
    from qlora_dist.train.checkpoint import Checkpointer

    def kept(keep_best: bool, out: Path, saves) -> list[list[int]]:
        cfg = load_config(overrides=["checkpoint.keep_last=2", f"checkpoint.keep_best={str(keep_best).lower()}",
                                     "data.eval_size=8", f"train.output_dir={out}"])
        after = []
        for step, loss in saves:  # a new Checkpointer each time, as after a resume: no state but the files
            ckpt = Checkpointer(RunPaths.of(cfg), cfg, {}, 0, 1)
            _save_fake_checkpoint(ckpt, step, loss)
            after.append([int(p.name.split("-")[1]) for p in ckpt.paths.checkpoints()])
        return after

    saves = [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7), (6, None), (7, 0.5), (8, 0.9), (9, 0.8)]
    best = kept(True, tmp_path / "best", saves)
    assert best == [[1], [1, 2], [2, 3], [2, 3, 4], [2, 4, 5], [2, 5, 6], [6, 7], [7, 8], [7, 8, 9]]
    assert kept(False, tmp_path / "last", saves)[-1] == [8, 9]


def test_tracking_and_validation_keys_are_checked():
    from qlora_dist.config import parse_config
    from qlora_dist.evaluate import validation
    from qlora_dist.train import trackers

    _, problems = parse_config(overrides=["train.report_to=[tensorboard,comet]", "checkpoint.keep_best=true"])
    assert any(p.startswith("train.report_to: unknown tracker 'comet'; choose from tensorboard, wandb, mlflow")
               for p in problems), problems
    assert any(p.startswith("checkpoint.keep_best: needs a validation split") for p in problems), problems
    _, problems = parse_config(overrides=["data.eval_size=4", "data.eval_dataset=x.jsonl"])
    assert any(p.startswith("data.eval_size: set it or data.eval_dataset") for p in problems), problems
    cfg, _ = parse_config(overrides=["data.eval_dataset=/no/such/file.jsonl"])
    assert validation.problems(cfg)[0].startswith("data.eval_dataset: '/no/such/file.jsonl' is neither a file")
    real = trackers.importlib.util.find_spec
    try:  # as on a machine without the extra
        trackers.importlib.util.find_spec = lambda name: None if name == "wandb" else real(name)
        assert trackers.problems(["tensorboard", "wandb"]) == [
            "train.report_to: wandb is not installed; pip install 'qlora-dist[wandb]'"]
    finally:
        trackers.importlib.util.find_spec = real


def test_records_become_tracker_metrics():
    from qlora_dist.train.trackers import metrics_of

    assert metrics_of({"event": "plan", "step": 0}) is None
    assert metrics_of({"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "rss_peak_gb": 0.7, "time": 9}) == (
        3, {"train/loss": 2.5, "train/lr": 1e-3, "train/rss_peak_gb": 0.7})
    assert metrics_of({"event": "validation", "step": 4, "when": "step 4", "eval_loss": 1.5, "eval_rows": 16}) == (
        4, {"eval/loss": 1.5, "eval/rows": 16.0})
    mmlu = {"accuracy": 0.5, "loss": 1.2, "subjects": {"anatomy": {"accuracy": 0.25, "n": 4}}, "predicted": ["A"]}
    assert metrics_of({"event": "mmlu", "step": 6, "mmlu": mmlu})[1] == {
        "mmlu/accuracy": 0.5, "mmlu/loss": 1.2, "mmlu/subjects/anatomy/accuracy": 0.25, "mmlu/subjects/anatomy/n": 4.0}
    assert metrics_of({"event": "eval", "step": 6, "builtin": {"add": {"accuracy": 0.75}}})[1] == {
        "heldout/add/accuracy": 0.75}


# ------------------------------------------------------------------------------- readers of the trackers


def _tensorboard(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()  # applies purge_step: events of earlier files from that step on are dropped
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    return acc, {k: v.string_value or v.number_value or v.bool_value for k, v in hparams.items()}


def _wandb_records(path: Path):
    """The records of a .wandb file (wandb's protobuf Records in LevelDB-log framing: 32 KiB blocks of
    [crc32 4][length 2][type 1] chunks after a 7-byte ':W&B' header; wandb 0.31 ships no Python reader).
    A chunk cut by a kill ends the scan."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # a block's tail too short for a chunk header is padding
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):
            return
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_folder(folder: Path) -> tuple[str, dict, dict[int, dict]]:
    """(run id, config, {step: metrics}) of one offline run folder; a step logged twice fails."""
    (file,) = folder.glob("run-*.wandb")
    run_id, config, steps = None, {}, {}
    for record in _wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            assert record.history.step.num not in steps, f"{folder.name}: step {record.history.step.num} twice"
            steps[record.history.step.num] = items
    return run_id, config, steps


def _mlflow(out: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    return client, json.loads((out / "trackers.json").read_text())["mlflow"]


# ------------------------------------------------------------------- the one 2-rank run: kill -9, resume

RUN = [*TINY, "train.max_steps=6", "train.save_steps=2", "data.eval_size=16", "eval.steps=2",
       "train.report_to=[tensorboard,wandb,mlflow]", "checkpoint.keep_best=true", "checkpoint.keep_last=1"]


def _torchrun(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "qlora_dist", "train", *RUN, f"train.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_TRACKING_URI"))}
    return subprocess.Popen(cmd, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _last_step(out: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(out) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> Path:
    """Killed (SIGKILL to every process of the job, as a node failure) after step 3, one step past
    checkpoint-2; then the same command to the end."""
    out = tmp_path_factory.mktemp("tracked")
    proc = _torchrun(out)
    deadline = time.time() + 120
    while _last_step(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    import psutil

    job = psutil.Process(proc.pid)
    for p in [job, *job.children(recursive=True)]:  # torchrun starts each rank in a session of its own
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == [2] and _last_step(out) == 3, (saved, _last_step(out), proc.stderr.read()[-3000:])
    again = _torchrun(out)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-4000:]
    assert f"resuming from {out / 'checkpoint-2'}" in err
    return out


@pytest.mark.slow
def test_trackers_hold_config_and_every_step_once_after_kill_and_resume(killed_and_resumed):
    out = killed_and_resumed
    records = read_metrics(out)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    validation = {r["step"]: r["eval_loss"] for r in records if r.get("event") == "validation"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(validation) == [2, 4, 6]

    acc, hparams = _tensorboard(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per start
    for tag, expected in (("train/loss", losses), ("eval/loss", validation)):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == sorted(expected), tag  # each step once: 3 was purged and redone
        assert all(e.value == pytest.approx(expected[e.step], rel=1e-6) for e in events)
    assert hparams["train.report_to"] == '["tensorboard", "wandb", "mlflow"]' and hparams["data.eval_size"] == 16
    assert {e.step for e in acc.Scalars("heldout/add/accuracy")} == {2, 4}

    folders = sorted((out / "wandb").glob("offline-run-*"))
    runs = [_wandb_folder(f) for f in folders]
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    # the killed start's .wandb file may hold nothing at all: wandb-core writes it every 15 s (trackers.py)
    assert len(runs) == 2 and runs[1][0] == run_id and runs[0][0] in (None, run_id), [r[0] for r in runs]
    assert all(f.name.endswith(f"-{run_id}") for f in folders), folders  # both starts: the same run
    # each folder holds each step at most once (_wandb_folder); per step the newest folder wins: the newest
    # one holds every step (replayed up to checkpoint-2 from metrics.jsonl, then steps 3..6 again)
    union = {step: m for _, _, steps in runs for step, m in steps.items()}
    assert sorted(runs[1][2]) == sorted(union) and set(runs[0][2]) <= {1, 2, 3, 4}
    assert {s: m["train/loss"] for s, m in union.items() if "train/loss" in m} == losses
    assert {s: m["eval/loss"] for s, m in union.items() if "eval/loss" in m} == validation
    assert runs[1][1]["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]

    client, run_id = _mlflow(out)
    for key, expected in (("train/loss", losses), ("eval/loss", validation)):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == sorted(expected), key  # no step twice
        assert all(m.value == pytest.approx(expected[m.step], rel=1e-6) for m in history)
    run = client.get_run(run_id)
    assert run.data.params["data.eval_size"] == "16" and run.info.run_name == out.name

    progress = json.loads((out / "checkpoint-6" / "progress.json").read_text())
    best = min(validation, key=validation.get)
    assert progress["best_step"] == best and (out / f"checkpoint-{best}").is_dir()  # keep_best beside keep_last=1
