"""The figures of a labelled set's predictions, one code path for dens-train's test section and dens-eval:
:mod:`metrics` (one set of predictions, calibration), :mod:`evaluation` (image, breast and exam levels,
patient-bootstrap intervals, per site and manufacturer) and :mod:`plots` (the PNGs)."""
