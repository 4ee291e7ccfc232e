"""What dens takes from a PACS: the storage SOP classes of a mammogram it reads and the transfer syntaxes its
decoders read (:mod:`dens.route.dicom`). dens-serve accepts these in C-STOREs; a pull fetches instances of these
classes only, and its storage SCP (C-MOVE, C-GET) accepts them in these syntaxes, so every file arrives as the
PACS stores it.

UIDs as text, the standard library only: dens-infer's main process imports this and never pydicom unless it
pulls.
"""

from __future__ import annotations

VERIFICATION = "1.2.840.10008.1.1"
MAMMOGRAPHY_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
)
# The transfer syntaxes dens.route.dicom decodes.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
