"""chartx: deep character-level transformer language models in JAX."""
