"""Stage 1, the data: records read offline (records), the seed's schemas (formats), validation and the
per-job tokenized cache (corpus), built-in tasks and prompts, batches and the resumable schedule (batches)."""
