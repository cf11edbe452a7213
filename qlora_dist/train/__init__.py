"""Stage 3, training: the trainer's phases (trainer), the DeepSpeed engine (engine), checkpoints and resume
(checkpoint, reshard), preemption (preempt), what a run shows and writes (runlog)."""
