"""One training run: resolved once (resolve), its random draws (batches), checkpoints, run folder,
and the loop every method shares (loop)."""
