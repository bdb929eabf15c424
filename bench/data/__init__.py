"""Datasets: loader plugins of datasets/ (loading), and `prepare`, which writes a dataset once as
memory-mappable arrays (sources, prepare, prepared)."""
