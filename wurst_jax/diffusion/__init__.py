"""Würstchen's diffusion formulation: the cosine schedule, training targets and loss weights
(`schedule`), and the samplers (`samplers`). wuerstchen.md §8-9."""
