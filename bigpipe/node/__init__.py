"""One node's life: start-up, workers, the shared board, signals and reload."""
