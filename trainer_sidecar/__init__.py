"""Training sidecar: SB3 training, checkpoints, evaluation gate, promotion."""
