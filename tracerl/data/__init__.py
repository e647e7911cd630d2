"""Task sources (reasoning-gym, HumanEval, JSONL, local datasets), JSONL I/O, prompt templates."""
