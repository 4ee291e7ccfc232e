"""dens-train: fine-tune a density classifier on a patient-grouped split and report every figure.

``cli`` (options) -> ``config.TrainConfig`` -> ``loop.run(cfg)``. ``inputs`` prepares the data (manifest,
split, the decoded ``cache`` filled by the decode engine, datasets from ``data``), ``step`` is one AMP
training step, ``distributed`` the DDP plumbing, ``metrics`` the figures and temperature scaling, ``plots``
the PNGs.
"""
