"""strata: single-pass continual training of adapters on frozen pretrained backbones, on Ray."""

__version__ = "0.1.0"
