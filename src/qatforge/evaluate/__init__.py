"""Per-artifact evaluation: quality, speed, memory and parity against the run's reference.

``run`` holds the evaluation loop and its command line (``python -m qatforge.evaluate``);
``hf``, ``gguf`` and ``onnx`` open an artifact in its own runtime.
"""
