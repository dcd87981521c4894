"""The device half of StableSynthNet, without PyTorch.

``stablesynth_device`` runs on the device: it reads a bundle exported by the full package
(``stablesynth device export``), encodes frames and a question with ONNX Runtime, uploads one
192-float frame feature, decodes the reply (:mod:`stablesynth_device.wire`) and predicts. It
imports numpy, onnxruntime, tokenizers, Pillow, httpx and the standard library, never torch
or the training code (an import-linter contract in the full package's ``pyproject.toml``).
"""

__version__ = "0.1.0"
