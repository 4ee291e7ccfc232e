"""The model as an artifact that travels: :mod:`~dens.artifact.model` (the architectures, their weights download,
the checkpoint and its reading; torch), :mod:`~dens.artifact.metadata` (what an exported ONNX file carries about
itself; torch-free) and :mod:`~dens.artifact.modelcard` (how its model card reads, and the caveats a scoring stage
says before it calls anything).
"""
