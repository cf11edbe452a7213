"""The one trainer: setup, train, evaluate, save, cleanup, on the DeepSpeed engine loop.

Setup builds each thing in the order a failure is cheapest to find: the run plan (compute dtype, micro
batch, memory cap), the output folder and the checkpoint to resume, the tokenizer, the data (validated
and tokenized), and only then the model and the engine. Everything that can be known without weights
was checked before this by the preflight on rank 0 (qlora_dist/preflight.py, called by launch/job.py),
which hands the trainer what it resolved (run_plan.PreparedRun): the trainer derives none of it again.
"""
from __future__ import annotations

import math
import signal
import time

import torch

from qlora_dist import compat
from qlora_dist.config import Config
from qlora_dist.data.batches import BatchSchedule, collate
from qlora_dist.data.corpus import prepare as prepare_corpus
from qlora_dist.errors import ConfigError
from qlora_dist.evaluate import mmlu, validation
from qlora_dist.evaluate.exact_match import builtin_accuracy, format_report
from qlora_dist import dist
from qlora_dist.model.base import build_model, count_parameters, load_tokenizer, loads_layerwise
from qlora_dist.model.longseq import checkpoint_offload
from qlora_dist.paths import RunPaths
from qlora_dist.run_plan import PreparedRun, RunPlan
from qlora_dist.train.checkpoint import Checkpointer, Progress
from qlora_dist.model import loss as objective
from qlora_dist.train.guard import StepGuard
from qlora_dist.ds_files import zero_stage
from qlora_dist.train.engine import initialize
from qlora_dist.train.preempt import StopRequest, Stopped
from qlora_dist.train.runlog import RunLog
from qlora_dist.train.throughput import Throughput



class Trainer:
    def __init__(self, cfg: Config, prepared: PreparedRun | None):
        """`prepared`: what rank 0's preflight resolved (launch/job.py); None on the other ranks, which
        receive rank 0's in setup, so that every rank builds from the same plan."""
        self.user_cfg = cfg  # as given (`auto` kept): what checkpoints save and resume compares
        self.prepared = prepared
        self.paths = RunPaths.of(cfg)
        self.step = 0
        self.validated: tuple[int | None, float | None] = (None, None)  # (step, validation loss) of the latest

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.stop = StopRequest()  # first: a signal during any later phase ends the run cleanly
        self.info = dist.init(self.user_cfg.dist.backend, self.user_cfg.dist.timeout_s)
        self.prepared = dist.broadcast_object(self.prepared if self.info.is_main else None)
        self.lock = self._setup_lock()
        self.device = dist.device_for(self.info)
        self.plan = self._setup_plan()
        self.checkpointer = Checkpointer(self.paths, self.user_cfg, self.plan.to_json(), self.info.rank,
                                         self.info.world_size)
        self.checkpointer.export_model = self.export_model
        resume_from = self.checkpointer.recover()
        self.completed = self.checkpointer.completed()
        if self.completed:
            return
        self.log = RunLog(self.paths, self.checkpointer.start_step, self.cfg.train.max_steps,
                          self.cfg.train.report_to, self.cfg.to_dict())
        self.groups = dist.SequenceGroups(self.cfg.dist.sequence_parallel, self.info.rank, self.info.world_size)
        self.log.throughput = Throughput(0, self.info.world_size, groups=self.groups.data_world)  # peak read now: a bad one fails early
        self.log.write({"event": "plan", "step": self.checkpointer.start_step, **self.plan.to_json(),
                        "resume_from": str(resume_from) if resume_from else None})
        self.tokenizer = self._setup_tokenizer()
        self.rows, self.held_out, self.schedule = self._setup_data()
        self.mmlu_questions = self._setup_mmlu()
        self.model = self._setup_model()
        self.engine = self._setup_engine()
        # model.gradient_checkpointing=offload: one context for the run (its pinned buffers are reused)
        self.offload = checkpoint_offload(self.cfg.model.gradient_checkpointing)
        self.gradient_divisor = compat.gradient_divisor(self.engine, self.info.world_size, self.groups.size)
        restored = self.checkpointer.restore(self.engine)
        self.step = self.saved_step = restored.step if restored else 0
        self.guard = StepGuard(self.cfg, self.log, self.info.world_size, self.checkpointer.newest_good,
                               skipped=restored.nonfinite_steps if restored else 0)
        self.stop.immediate = False  # from here on signals wait for a point all ranks agree on

    def _setup_lock(self):
        """Rank 0 holds the output folder's writer lock for the whole run (one writer per folder)."""
        if not self.info.is_main:
            return None
        from qlora_dist.writer_lock import WriterLock

        lock = WriterLock(self.paths, log=dist.log)
        lock.acquire()
        return lock

    def _setup_plan(self) -> RunPlan:
        """The preflight's plan (`auto` resolved: compute dtype, micro batch, checkpointing; a plan over
        train.max_memory_per_gpu was refused there): cap each rank's CUDA allocator at it. The resolved copy
        of the config (self.cfg) is what the rest is built from."""
        plan = self.prepared.plan
        if plan.world_size != self.info.world_size:  # a caller's mistake, not the user's
            raise RuntimeError(f"the run was planned for {plan.world_size} rank(s) but runs on {self.info.world_size}")
        self.user_cfg = self.prepared.config  # lora.* keys not set took the starting adapter's values
        self.cfg = plan.apply(self.user_cfg)
        self.ds = self.prepared.ds
        self.zero_stage = zero_stage(self.ds)
        dist.log(f"run plan: {plan.describe()}")
        if plan.cap_gb and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, plan.cap_gb * 1e9 / total), self.device)
        return plan

    def _setup_tokenizer(self):
        return load_tokenizer(self.cfg.model.path)  # a folder, a built-in name or random:<size>

    def _setup_data(self):
        """Training rows (validated, tokenized, cached by rank 0), held-out items and the batch schedule:
        all before the model, so a data problem costs seconds, not a model load."""
        cfg = self.cfg
        self.stop.at("data")  # immediate mode: nothing to lose, a signal ends the tokenizing at once
        rows, held_out, report = prepare_corpus(cfg, self.tokenizer, self.info, self.paths.data_cache)
        # the same rows as the checkpoint's (by content), hashed once on rank 0
        self.checkpointer.check_data(dist.broadcast_object(rows.content_sha256() if self.info.is_main else None))
        if report:
            self.log.write({"event": "data", **report})
            dist.log(f"{report['summary']}; {report['rows']:,} training rows (cache {report['cache']})")
            for warning in report["warnings"]:  # a cause that skipped many rows (corpus.SKIP_WARN_SHARE)
                dist.log(f"warning: {warning}")
        # held out by index after the hash above: the split is a function of (rows, seed, data.eval_size)
        rows, self.validation_rows = validation.held_out(
            cfg, rows, lambda other: prepare_corpus(other, self.tokenizer, self.info, self.paths.data_cache)[0])
        if len(rows) < cfg.train.global_batch_size:
            raise ConfigError([f"data.dataset: {len(rows)} training rows, fewer than one global batch "
                               f"(train.global_batch_size={cfg.train.global_batch_size})"])
        lengths = rows.lengths() if cfg.data.group_by_length else None
        # the ranks of a sequence-parallel group share their rows: the schedule deals them to the groups
        schedule = BatchSchedule(len(rows), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                 self.groups.data_rank, self.groups.data_world, cfg.train.seed, lengths)
        return rows, held_out, schedule

    def _setup_mmlu(self) -> list:
        e = self.cfg.eval
        return mmlu.read_questions(e.mmlu_data, e.mmlu_shots, e.mmlu_split, e.mmlu_max_questions) if e.mmlu_data else []

    def _setup_model(self):
        start = time.perf_counter()
        dist.log(f"loading {self.cfg.model.path} in {self.cfg.quantization.bits} bit ({self.cfg.train.method})"
                 + (", partitioned layer by layer (ZeRO-3)" if self.zero_stage == 3 else "") + " ...")
        model = self._load_model()
        trainable, total = count_parameters(model)
        self.log.throughput.parameters = total  # MFU counts every weight (train/throughput.py)
        what = "trainable parameters (full fine-tuning)" if self.cfg.train.method == "full" else "trainable LoRA parameters"
        dist.log(f"model {self.cfg.model.path} loaded in {time.perf_counter() - start:.1f} s: {trainable:,} {what} of {total:,}; "
                 f"{self.cfg.quantization.bits}-bit base; ZeRO stage {self.zero_stage}; world size "
                 f"{self.info.world_size}; micro batch {self.ds['train_micro_batch_size_per_gpu']} x accumulation "
                 f"{self.ds['gradient_accumulation_steps']} x {self._data_parallel_words()} = global batch "
                 f"{self.ds['train_batch_size']}")
        return model

    def _data_parallel_words(self) -> str:
        g = self.groups
        return "ranks" if g.size == 1 else f"{g.data_world} group(s) of {g.size} ranks sharing each row"

    def _load_model(self):
        """The layer-wise loader stops at the first layer all ranks agree on after a signal;
        from_pretrained is one library call, which a signal ends at once (nothing is lost yet)."""
        if loads_layerwise(self.cfg, self.zero_stage):
            with self.stop.deferred():
                return build_model(self.cfg, self.device, self.ds, on_piece=lambda _: self.stop.point("loading"))
        self.stop.at("loading")
        return build_model(self.cfg, self.device, self.ds)

    def _setup_engine(self):
        self.stop.at("engine")
        if "paged" in self.cfg.optim.name and (note := compat.paged_optimizer_note()):
            dist.log(note)
        return initialize(self.cfg, self.model, self.ds)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg
        if self.completed:
            dist.log(f"{self.paths.root} already completed {cfg.train.max_steps} steps; nothing to do "
                     "(raise train.max_steps to train further)")
            return
        self.guard.start(self.engine)
        if self.step == 0 and cfg.eval.at_start:
            self.evaluate("before training")
        if self.step == 0 and cfg.eval.at_start and self.validation_rows is not None:
            self.validate("before training")
        while self.step < cfg.train.max_steps:
            self._train_step()
            if self._validation_due():
                self.validate(f"step {self.step}")  # before the save: the checkpoint records it (keep_best)
            self._save_or_stop()
            if cfg.eval.steps and self.step % cfg.eval.steps == 0 and self.step < cfg.train.max_steps:
                self.evaluate(f"step {self.step}")
            if cfg.eval.mmlu_steps and self.step % cfg.eval.mmlu_steps == 0 and self.step < cfg.train.max_steps:
                self.evaluate_mmlu(f"step {self.step}")
        self._finish()
        dist.barrier()  # leave together: rank 0 was still writing the final adapter (see dist.barrier)

    def _save_or_stop(self) -> None:
        """Checkpoint on schedule; then the step's stop point: a preemption or time-limit signal, agreed by
        all ranks so that every rank stops at this same step, raises Stopped (see `stopped`)."""
        if self.step % self.cfg.train.save_steps == 0 or self.step == self.cfg.train.max_steps:
            self.save()
        self.stop.point("train")

    def stopped(self, stop: Stopped) -> None:
        """Every rank, at the same agreed point: a checkpoint if steps since the last one would be lost
        (never one mid-setup: the engine is there only once restored), the stop record, the hand-over."""
        owed = self.step > getattr(self, "saved_step", self.step)
        if owed:
            self.save()
        received = self.stop.received_at  # this rank's: None where only another rank got the signal
        self.log.write({"event": "stop", "signal": signal.Signals(stop.signum).name, "phase": stop.phase,
                        "passes": stop.passes, "received_in": received and {"phase": received[0], "passes": received[1]},
                        "step": self.step, "saved": owed})
        self.log.close()
        self.stop.finish(stop.signum, "checkpoint saved" if owed else
                         f"no steps since checkpoint-{self.step}" if self.step else "nothing to save yet")

    def _train_step(self) -> None:
        """One optimizer step: the engine accumulates over this rank's micro-batches, then steps. Each
        micro-batch backs its share of the step's objective, weighted by the global batch (model/loss.py),
        so the update and the logged loss are the same whatever the micro batch, accumulation and ranks."""
        start, losses, tokens, pad = time.perf_counter(), [], 0, self.tokenizer.pad_token_id
        global_rows = [self.rows[i] for i in self.schedule.global_indices(self.step)]
        step_objective = objective.StepObjective.of(self.cfg.train.loss_normalization, collate(global_rows, pad))
        for micro in self.schedule.micro_batches(self.step):
            rows = [self.rows[i] for i in micro]
            batch, weights = self._micro_batch(rows, step_objective)
            with self.offload:  # layer inputs offloaded in forward come back in backward: both inside
                share = objective.micro_loss(self.engine, batch, weights)
                losses.append(objective.backward(self.engine, share, self.gradient_divisor))
            self.engine.step()
            # real tokens, padding excluded; a group's ranks share their rows: each counts its 1/N
            tokens += sum(len(r.input_ids) for r in rows) / self.groups.size
        self.step += 1
        finite = [v for v in losses if math.isfinite(v)]
        loss_sum, token_sum, bad_losses, weight_sq = dist.all_reduce_sum(
            [sum(finite), tokens, len(losses) - len(finite), self.guard.weight_sq_share(self.engine)])
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        nonfinite = self.guard.nonfinite(self.engine, bad_losses)
        if not nonfinite:
            self.last_loss = loss_sum
            self.guard.watch(self.step, math.sqrt(weight_sq))
        self.log.step(self.step, math.nan if nonfinite else loss_sum, self.engine.get_lr()[0], token_sum,
                      time.perf_counter() - start, grad_norm,
                      log_this_step=not nonfinite and self.step % self.cfg.train.logging_steps == 0)
        if nonfinite:
            self.guard.skip(self.engine, self.step, int(bad_losses), grad_norm, self.zero_stage)

    def _micro_batch(self, rows, step_objective) -> tuple[dict, torch.Tensor]:
        """A micro-batch on this rank's device and its loss weights: whole rows, or under
        dist.sequence_parallel this rank's slice of them (weights and shifted labels from the whole rows)."""
        n = self.groups.size
        whole = collate(rows, self.tokenizer.pad_token_id, multiple_of=n)
        weights = step_objective.weights(whole)
        if n > 1:
            whole, weights = objective.shard_for_group(whole, weights, n, self.groups.sequence_rank)
        return {k: v.to(self.device) for k, v in whole.items()}, weights.to(self.device)

    # --------------------------------------------------------------------------------------- evaluate
    def evaluate(self, when: str) -> dict | None:
        if not self.held_out:
            return None
        self.engine.eval()
        report = builtin_accuracy(self.engine.module, self.tokenizer, self.held_out, self.cfg.eval.batch_size,
                                  self.cfg.eval.max_new_tokens, self.info.rank, self.info.world_size,
                                  synced_gpus=self.zero_stage == 3, check_stop=lambda: self.stop.point("evaluate"))
        compat.engine_train_mode(self.engine)
        self.log.write({"event": "eval", "step": self.step, "when": when, "builtin": report})
        self.log.note(format_report(report, f"held-out exact match, {when} (step {self.step}):"))
        return report

    def evaluate_mmlu(self, when: str) -> dict | None:
        """MMLU accuracy into metrics.jsonl, as the original's MMLU callback does every eval.mmlu_steps."""
        if not self.mmlu_questions:
            return None
        self.engine.eval()
        report = mmlu.evaluate(self.engine.module, self.tokenizer, self.mmlu_questions, self.cfg.eval.mmlu_batch_size,
                               self.info.rank, self.info.world_size, check_stop=lambda: self.stop.point("mmlu"))
        compat.engine_train_mode(self.engine)
        self.log.write({"event": "mmlu", "step": self.step, "when": when, "mmlu": report})
        self.log.note(mmlu.format_report(report, f"MMLU, {when} (step {self.step}):", per_subject=False))
        return report

    def _validation_due(self) -> bool:
        """Every eval.steps, at the end, and at every save under checkpoint.keep_best (to rank them)."""
        s, t = self.step, self.cfg.train
        return self.validation_rows is not None and (
            s == t.max_steps or bool(self.cfg.eval.steps and s % self.cfg.eval.steps == 0)
            or (self.cfg.checkpoint.keep_best and s % t.save_steps == 0))

    def validate(self, when: str) -> float:
        """Validation loss on the held-out rows, each row once over the ranks (evaluate/validation.py)."""
        self.engine.eval()
        value = validation.validation_loss(self.engine.module, self.validation_rows, self.cfg.eval.batch_size,
                                           self.tokenizer.pad_token_id, self.cfg.train.loss_normalization,
                                           self.info.rank, self.info.world_size, self.device,
                                           check_stop=lambda: self.stop.point("validate"))
        compat.engine_train_mode(self.engine)
        self.validated = (self.step, value)
        rows = len(self.validation_rows)
        self.log.write({"event": "validation", "step": self.step, "when": when, "eval_loss": value, "eval_rows": rows})
        self.log.note(f"validation loss, {when}: {value:.4f} ({rows:,} held-out rows)")
        return value

    # ------------------------------------------------------------------------------------------- save
    def save(self):
        self.stop.at("save")  # a signal from here to the end of the save is only recorded
        progress = Progress(step=self.step, samples_seen=self.step * self.cfg.train.global_batch_size,
                            epoch=self.schedule.epoch_of(self.step), seed=self.cfg.train.seed,
                            world_size=self.info.world_size, global_batch_size=self.cfg.train.global_batch_size,
                            zero_stage=self.zero_stage, loss=getattr(self, "last_loss", None),
                            sequence_parallel=self.groups.size,
                            nonfinite_steps=self.guard.skipped,
                            eval_loss=self.validated[1] if self.validated[0] == self.step else None)
        path = self.checkpointer.save(self.engine, progress, self.zero_stage)
        self.saved_step = self.step
        self.log.note(f"saved {path}")
        return path

    def export_model(self, out) -> None:
        """train.method=full: the trained weights as a from_pretrained folder (collective: gathered piece by
        piece under ZeRO-3), at the end and, under checkpoint.keep_best, in every checkpoint."""
        from qlora_dist.train.model_export import export_model

        export_model(self.engine.module, self.tokenizer, out, self.zero_stage,
                     {"base_model": str(self.cfg.model.path), "compute_dtype": self.plan.compute_dtype,
                      "prompt_template": self.cfg.data.chat_template, "step": self.step})

    def _finish(self) -> None:
        final = self.paths.checkpoint(self.cfg.train.max_steps)
        if not (final / "progress.json").is_file():  # resumed past the end: save what we have
            final = self.save()
        if self.cfg.train.method == "full":
            self.export_model(self.paths.model)
        after = self.evaluate("after training") if self.cfg.eval.at_end else None
        mmlu_after = self.evaluate_mmlu("after training") if self.cfg.eval.mmlu_at_end else None
        if self.info.is_main:
            self.log.plot()
            mmlu_summary = mmlu_after and {k: mmlu_after[k] for k in ("accuracy", "loss", "n")}
            self.checkpointer.finalize(final, {"step": self.step, "after": after, "mmlu": mmlu_summary})
            self._summary()

    def _summary(self) -> None:
        evals = self.log.records("eval")
        first, last = (evals[0], evals[-1]) if evals else (None, None)
        if first and last and first is not last:
            lines = [f"  {t:<12} {100 * first['builtin'][t]['accuracy']:5.1f}% -> "
                     f"{100 * last['builtin'][t]['accuracy']:5.1f}%" for t in last["builtin"]]
            self.log.note("held-out exact match, before -> after:\n" + "\n".join(lines))
        if losses := self.log.records("validation"):
            best = min(losses, key=lambda r: r["eval_loss"])
            self.log.note(f"validation loss: {losses[0]['eval_loss']:.4f} (step {losses[0]['step']}) -> "
                          f"{losses[-1]['eval_loss']:.4f} (step {losses[-1]['step']}); lowest {best['eval_loss']:.4f} "
                          f"at step {best['step']}")
        result = self.paths.model if self.cfg.train.method == "full" else self.paths.adapter
        self.log.note(f"done: {'model' if result == self.paths.model else 'adapter'} in {result}, metrics in {self.paths.metrics}, "
                      f"curve in {self.paths.loss_png}")

    # ---------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if getattr(self, "stop", None):
            self.stop.restore()
        if getattr(self, "log", None):
            self.log.close()
        if getattr(self, "lock", None):
            self.lock.release()
        dist.shutdown()


def run(cfg: Config, prepared: PreparedRun | None) -> None:
    trainer = Trainer(cfg, prepared)
    try:
        trainer.setup()
        trainer.train()
    except Stopped as stop:
        trainer.stopped(stop)  # exits: 128 + the signal number
    finally:
        trainer.cleanup()
