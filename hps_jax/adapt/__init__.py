"""Adapting Stable Diffusion with human preference: HPS labelling of generated images."""
