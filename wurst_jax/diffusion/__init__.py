"""Würstchen's diffusion formulation: the cosine schedule, training targets and loss weights
(`schedule`), and the samplers (`samplers`): dome272/Wuerstchen `diffuzz.py` and diffusers
`src/diffusers/schedulers/scheduling_ddpm_wuerstchen.py`, with Stability-AI/StableCascade `gdf/`."""
