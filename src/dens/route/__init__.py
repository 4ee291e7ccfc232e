"""The route from a file to the model's input, and nothing else: ``dens.route.preprocess.load(path, cfg)``.

:mod:`~dens.route.dicomio` reads a file's bytes (the header, where the pixel data lies), :mod:`~dens.route.dicom`
decides whether it is a usable presentation mammogram and how to decode it, :mod:`~dens.route.decode` decodes
(at reduced resolution where that is cheap), :mod:`~dens.route.greyscale` turns stored values into greys,
:mod:`~dens.route.geometry` finds the breast and places it on the canvas, :mod:`~dens.route.families` maps its greys
by its acquisition family's line, and :mod:`~dens.route.preprocess` runs these in order.
:mod:`~dens.route.config` holds the settings (``PreprocessConfig``) a model carries; :mod:`~dens.route.errors`
the reasons a file gives no image. numpy, OpenCV and pydicom only: never torch, so decode workers stay light.
The training cache's key hashes every module of this package (``dens.train.cache.route_version``).
"""
