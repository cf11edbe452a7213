"""Ranks and launchers: the process group and rank-0 output (dist), submitit jobs (submit)."""
