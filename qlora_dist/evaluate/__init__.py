"""Stage 4, evaluation and inference: held-out exact match (exact_match), MMLU (mmlu), generation (generate)."""
