"""Training routines, each a plain accelerate loop: diffusion, guidance, adapt."""
