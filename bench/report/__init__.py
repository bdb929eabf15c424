"""Reports from logged files alone (no torch): speed-up statistics (curves, intervals, speedup),
the report's tables, statistics, noise, figures, text, and build_report."""
