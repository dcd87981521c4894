"""Public pretrained weights in the encoder's own layout: read safely, map, check, write.

``reading`` opens a checkpoint (safetensors directly; pickled ``.ckpt/.pth/.bin`` only through the
allow-list unpickler of ``unpickle``), ``layouts`` declares how each source layout's keys map onto
the encoder's (timm, Hugging Face ViT and DeiT, All-in-One), ``convert`` applies a layout for one
encoder preset and writes the result, ``references`` builds the source models the import is checked
against and ``equivalence`` measures it. ``commands`` is ``stablesynth weights``.
"""
