"""dens-train: fine-tune a density classifier on a patient-grouped split and report every figure.

``cli`` (options) -> ``loop.run(TrainConfig)``; ``data`` (manifest, split, decoded cache, augmentation),
``metrics`` (figures, temperature scaling), ``plots`` (PNG).
"""
