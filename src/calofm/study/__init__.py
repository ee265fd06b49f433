"""Studies that chain training, generation and evaluation over many runs (fine-tuning)."""
