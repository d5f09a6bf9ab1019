"""alignshift: preference alignment under distribution shift, in JAX/Flax."""
__version__ = "0.1.0"
