"""The run machinery behind the paper's pieces: flags, --out and its lock, checkpoints and resume, signals,
memory estimates, torchrun, model loading and LoRA, the raw-data readers, eval's method table (README.md)."""
