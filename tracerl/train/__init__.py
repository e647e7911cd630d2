"""Training machinery shared by every recipe: the training run (models, optimizers, schedules,
checkpoints, exact resume), optimizer and schedule, LoRA, metrics, and the SFT pieces."""
