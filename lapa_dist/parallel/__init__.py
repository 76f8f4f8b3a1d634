"""Process groups and the parallel layout; the one place that knows ranks."""
