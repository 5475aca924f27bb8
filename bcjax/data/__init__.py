"""Data sources: task suites with deterministic splits and class names."""
