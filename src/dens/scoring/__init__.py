"""Scoring: the one way from files to preds.csv rows, shared by dens-infer (local and Ray), dens-serve and dens-qc.

:mod:`dens.scoring.model` finds, reads and checks the exported model once; :mod:`dens.scoring.runtime` opens it
in ONNX Runtime on the right device; :mod:`dens.scoring.scorer` puts the decode pool, the session and the rows
together. Nothing heavy is imported here.
"""

# Where a model runs: ONNX Runtime's devices (dens-infer, dens-serve; auto: the best present), and PyTorch's
# (dens-train, dens-eval on a checkpoint, Grad-CAM).
DEVICES = ("auto", "tensorrt", "cuda", "cpu")
TORCH_DEVICES = ("auto", "cuda", "cpu")
