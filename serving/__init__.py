"""What a scoring worker loads: the model contract (``metadata``), the shared image loaders
(``preprocessing``), the runtimes that execute an exported model (``runtimes``), mirrored
scoring on any of them (``tta``) and the reference images that prove a runtime reproduces the
export (``reference``).

Nothing here trains or converts a model, and nothing here imports TensorFlow at import time: a
worker image with LiteRT (or Keras on JAX) alone scores through this package.
"""
