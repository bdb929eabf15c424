"""One training run: resolved once (resolve), what it holds (state), its random draws (batches),
checkpoints, run folder, and the loop every method shares (loop)."""
