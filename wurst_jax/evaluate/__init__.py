"""Offline evaluation: alignment on the built-in dataset; FID / CLIP score later."""
