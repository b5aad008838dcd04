"""The records a run trains and evaluates on (JSONL, Parquet, HF datasets), and the order a step draws them in."""
