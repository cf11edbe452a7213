"""The one trainer: setup, train, evaluate, save, cleanup, on the DeepSpeed engine loop."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint, compat, dist, memory, mmlu
from .checkpoint import Progress
from .config import Config, ConfigError
from .corpus import prepare as prepare_corpus
from .data import BatchSchedule, collate
from .engine import build_ds_config, initialize, zero_stage
from .evaluate import builtin_accuracy, format_report
from .model import build_model, count_parameters
from .preempt import StopRequest
from .runlog import RunLog


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.step = 0

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.info = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
        self.stop = StopRequest()
        self.device = dist.device_for(self.info)
        self._setup_memory()
        self.resume_from = self._setup_output()
        self.completed = checkpoint.read_completed(self.out, cfg.train.max_steps, self.resume_from)
        if self.completed:
            return
        ds = build_ds_config(cfg, self.info.world_size)
        self.model, self.tokenizer = build_model(cfg, self.device, ds)
        self.rows, self.held_out, data_report = prepare_corpus(cfg, self.tokenizer, self.info)
        self.mmlu_questions = (mmlu.read_questions(cfg.eval.mmlu_data, cfg.eval.mmlu_shots, cfg.eval.mmlu_split,
                                                   cfg.eval.mmlu_max_questions) if cfg.eval.mmlu_data else [])
        self.engine = initialize(cfg, self.model, ds)
        self.zero_stage = zero_stage(ds)
        self.schedule = self._setup_schedule()
        self.step = self._restore()
        self.log = RunLog(self.out, self.step, cfg.train.max_steps)
        self._describe(ds, data_report)

    def _setup_memory(self) -> None:
        """With train.max_memory_per_gpu: pick an 'auto' micro batch, refuse a plan over the cap before
        anything is loaded, and cap each rank's CUDA allocator."""
        cfg = self.cfg
        if not cfg.train.max_memory_per_gpu:
            return
        cap, world = memory.parse_size(cfg.train.max_memory_per_gpu), self.info.world_size
        if cfg.train.micro_batch_size == "auto":
            chosen = memory.choose_micro_batch(cfg, world, cap)
            if chosen is None:
                cfg.train.micro_batch_size, cfg.model.gradient_checkpointing = 1, True  # the smallest plan, shown
            else:
                cfg.train.micro_batch_size, cfg.model.gradient_checkpointing = chosen.micro_batch, chosen.checkpointing
                dist.log(f"train.micro_batch_size=auto: micro batch {chosen.micro_batch}, activation "
                         f"checkpointing {'on' if chosen.checkpointing else 'off'} (the fastest that fits the cap)")
        plan = memory.make_plan(memory.setup_from_config(cfg, world), cap)
        if not plan.fits:
            fix = memory.suggest(plan.setup, cap)
            raise ConfigError([f"train.max_memory_per_gpu: {cfg.train.max_memory_per_gpu} cannot hold this run "
                               f"(planned {plan.total / memory.GB:.2f} GB per rank)", memory.format_plan(plan),
                               "to fit: " + ("; then ".join(fix) if fix else "no single change found; see `qlora-dist plan`")])
        dist.log(f"memory plan: {plan.total / memory.GB:.2f} GB per rank under the cap of {cap / memory.GB:.2f} GB")
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)

    def _setup_output(self) -> Path | None:
        """Checks the output folder before anything heavy is loaded; the checkpoint to resume, if any."""
        if self.info.is_main:
            checkpoint.remove_partial_saves(self.out)
        dist.barrier()
        return checkpoint.find_resume(self.out, self.cfg)

    def _setup_schedule(self) -> BatchSchedule:
        cfg = self.cfg
        if len(self.rows) < cfg.train.global_batch_size:
            raise ConfigError([f"data.dataset: {len(self.rows)} training rows, fewer than one global batch "
                               f"(train.global_batch_size={cfg.train.global_batch_size})"])
        lengths = self.rows.lengths() if cfg.data.group_by_length else None
        return BatchSchedule(len(self.rows), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                             self.info.rank, self.info.world_size, cfg.train.seed, lengths)

    def _restore(self) -> int:
        if self.resume_from is None:
            torch.manual_seed(self.cfg.train.seed + self.info.rank)  # each rank its own dropout stream
            return 0
        progress = checkpoint.load(self.engine, self.resume_from, self.info.rank, self.info.world_size)
        dist.log(f"resuming from {self.resume_from} (step {progress.step}, {progress.samples_seen} samples seen)")
        return progress.step

    def _describe(self, ds: dict, data_report: dict | None) -> None:
        if data_report:
            self.log.write({"event": "data", **data_report})
            dist.log(f"{data_report['summary']}; {data_report['rows']:,} training rows (cache {data_report['cache']})")
        trainable, total = count_parameters(self.model)
        note = compat.paged_optimizer_note() if "paged" in self.cfg.optim.name else None
        dist.log(f"model {self.cfg.model.path}: {trainable:,} trainable LoRA parameters of {total:,}; "
                 f"{self.cfg.quantization.bits}-bit base; ZeRO stage {self.zero_stage}; world size "
                 f"{self.info.world_size}; micro batch {ds['train_micro_batch_size_per_gpu']} x accumulation "
                 f"{ds['gradient_accumulation_steps']} x ranks = global batch {ds['train_batch_size']}")
        if note:
            dist.log(note)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg
        if self.completed:
            dist.log(f"{self.out} already completed {cfg.train.max_steps} steps; nothing to do "
                     "(raise train.max_steps to train further)")
            return
        if self.step == 0 and cfg.eval.at_start:
            self.evaluate("before training")
        while self.step < cfg.train.max_steps:
            self._train_step()
            self._save_or_stop()
            if cfg.eval.steps and self.step % cfg.eval.steps == 0 and self.step < cfg.train.max_steps:
                self.evaluate(f"step {self.step}")
            if cfg.eval.mmlu_steps and self.step % cfg.eval.mmlu_steps == 0 and self.step < cfg.train.max_steps:
                self.evaluate_mmlu(f"step {self.step}")
        self._finish()

    def _save_or_stop(self) -> None:
        """Checkpoint on schedule; on a preemption or time-limit signal (agreed by all ranks, so every
        rank stops at this same step) make sure of a checkpoint, then hand over to the requeue."""
        saved = self.step % self.cfg.train.save_steps == 0 or self.step == self.cfg.train.max_steps
        if saved:
            self.save()
        if signum := self.stop.agreed():
            if not saved:
                self.save()
            self.log.close()
            self.stop.finish(signum)

    def _train_step(self) -> None:
        """One optimizer step: the engine accumulates over this rank's micro-batches, then steps."""
        start, losses, tokens = time.perf_counter(), [], 0
        for micro in self.schedule.micro_batches(self.step):
            rows = [self.rows[i] for i in micro]
            batch = {k: v.to(self.device) for k, v in collate(rows, self.tokenizer.pad_token_id).items()}
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            tokens += sum(len(r.input_ids) for r in rows)  # real tokens, padding excluded
        self.step += 1
        loss_sum, token_sum = dist.all_reduce_sum([sum(losses) / len(losses), tokens])
        self.last_loss = loss_sum / self.info.world_size
        grad_norm = self.engine.get_global_grad_norm()
        self.log.step(self.step, self.last_loss, self.engine.get_lr()[0], token_sum, time.perf_counter() - start,
                      None if grad_norm is None else float(grad_norm),
                      log_this_step=self.step % self.cfg.train.logging_steps == 0)

    # --------------------------------------------------------------------------------------- evaluate
    def evaluate(self, when: str) -> dict | None:
        if not self.held_out:
            return None
        self.engine.eval()
        report = builtin_accuracy(self.engine.module, self.tokenizer, self.held_out, self.cfg.eval.batch_size,
                                  self.cfg.eval.max_new_tokens, self.info.rank, self.info.world_size,
                                  synced_gpus=self.zero_stage == 3)
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
                               self.info.rank, self.info.world_size)
        compat.engine_train_mode(self.engine)
        self.log.write({"event": "mmlu", "step": self.step, "when": when, "mmlu": report})
        self.log.note(mmlu.format_report(report, f"MMLU, {when} (step {self.step}):", per_subject=False))
        return report

    # ------------------------------------------------------------------------------------------- save
    def save(self) -> Path:
        progress = Progress(step=self.step, samples_seen=self.step * self.cfg.train.global_batch_size,
                            epoch=self.schedule.epoch_of(self.step), seed=self.cfg.train.seed,
                            world_size=self.info.world_size, global_batch_size=self.cfg.train.global_batch_size,
                            zero_stage=self.zero_stage, loss=getattr(self, "last_loss", None))
        path = checkpoint.save(self.engine, self.cfg, progress, self.out, self.info.rank, self.zero_stage)
        self.log.note(f"saved {path}")
        return path

    def _finish(self) -> None:
        final = self.out / f"checkpoint-{self.cfg.train.max_steps}"
        if not (final / "progress.json").is_file():  # resumed past the end: save what we have
            final = self.save()
        after = self.evaluate("after training") if self.cfg.eval.at_end else None
        mmlu_after = self.evaluate_mmlu("after training") if self.cfg.eval.mmlu_at_end else None
        if self.info.is_main:
            self.log.plot()
            mmlu_summary = mmlu_after and {k: mmlu_after[k] for k in ("accuracy", "loss", "n")}
            checkpoint.publish_final(self.out, final, {"step": self.step, "after": after, "mmlu": mmlu_summary})
            self._summary()

    def _summary(self) -> None:
        evals = self.log.records("eval")
        first, last = (evals[0], evals[-1]) if evals else (None, None)
        if first and last and first is not last:
            lines = [f"  {t:<12} {100 * first['builtin'][t]['accuracy']:5.1f}% -> "
                     f"{100 * last['builtin'][t]['accuracy']:5.1f}%" for t in last["builtin"]]
            self.log.note("held-out exact match, before -> after:\n" + "\n".join(lines))
        self.log.note(f"done: adapter in {self.out / 'adapter_model'}, metrics in {self.log.path}, curve in {self.log.png}")

    # ---------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if getattr(self, "stop", None):
            self.stop.restore()
        if getattr(self, "log", None):
            self.log.close()
        dist.shutdown()


def run(cfg: Config) -> None:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
