"""cleanclip_jax: CLIP training, data-poisoning backdoors and the CleanCLIP defense in JAX/Flax."""
