"""Würstchen's diffusion formulation: the cosine schedule, training targets and loss weights
(`schedule`), and the samplers (`samplers`): dome272/Wuerstchen `diffuzz.py` and diffusers
`src/diffusers/schedulers/scheduling_ddpm_wuerstchen.py`, with Stability-AI/StableCascade `gdf/`.
PixArt-α's: improved DDPM's schedule, hybrid loss and ancestral sampler (`iddpm`, PixArt-alpha/PixArt-alpha
`diffusion/`) and DPM-Solver++(2M) as diffusers' DPMSolverMultistepScheduler (`dpm_solver`)."""
