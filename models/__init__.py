"""Torch modules and their loaders: StyleGAN2, e4e, CLIP, Delta Mapper, the toy domain, and the zoo registry."""
