"""StableSynthNet: adapt an on-device multimodal model in milliseconds with a cloud hypernetwork."""

__version__ = "0.1.0"
