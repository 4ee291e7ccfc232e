"""The DICOM node: ``dens-serve STATE --model model.onnx --allow-aet PACS --send-to PACS@host:104``.

A PACS or a modality sends mammograms by C-STORE; each instance is written durably to the state folder's
spool before it is acknowledged; the instances of a study are scored once the study has been quiet for
``--stable-seconds`` (the decode engine feeding one ONNX Runtime session, as dens-infer does); the rows go to
an append-only preds.csv; the study's density SR (:mod:`dens.sr`) goes to each destination through an outbox
that retries with backoff until it is delivered.

The shape of every stage: :mod:`dens.serve.cli` (click) -> :class:`ServeConfig` (:mod:`dens.serve.config`) ->
:func:`dens.serve.node.run`. Nothing heavy is imported here: a spawned decode worker imports the console
script's module before it starts.
"""

from __future__ import annotations

from dens.serve.config import Allowed, Destination, ServeConfig

__all__ = ["Allowed", "Destination", "ServeConfig"]
