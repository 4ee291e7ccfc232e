"""The review page (``preds.report.html``): one self-contained HTML page on which a radiologist reviews a run's
calls, exam by exam, and records a verdict per exam.

:mod:`dens.review.display` makes what a reviewer sees of one image (the display image as PACS hangs it, its
Grad-CAM overlay, thumbnails), :mod:`dens.review.views` writes each view's pictures (the overlays on the page's
scale and on each map's own), :mod:`dens.review.study` reads the study date and the woman's age from a header,
:mod:`dens.review.report` writes the page, and :mod:`dens.review.page` holds the page's template, its script and
the columns of the verdicts it exports.

The page is shared by two commands, so it lives at the root and has no command of its own: dens-gradcam
(:mod:`dens.gradcam`, and dens-infer --gradcam through it) writes it, and dens-verdicts (:mod:`dens.verdicts`)
reads the verdicts it exports. A stage never imports a sibling stage; both import this package.
"""
