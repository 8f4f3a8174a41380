"""Environments: presets (gymnasium, Atari, MinAtar) and per-rank vector envs with their seeding."""
