"""Ray Train + DeepSpeed training: one loop that QAT and distillation share."""
