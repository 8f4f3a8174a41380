"""Learners (data parallel, pipeline, device and overlap variants): optimizers, updates, gradient reduction."""
