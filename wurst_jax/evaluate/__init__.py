"""Offline evaluation: FID, CLIP score and CMMD from local weights (`job.py`, `python -m
wurst_jax.evaluate`), and text-image alignment on the built-in `shapes` dataset."""
