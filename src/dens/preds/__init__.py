"""preds.csv, the contract between the stages: its columns and rows (:mod:`~dens.preds.columns`), the text of its
cells (:mod:`~dens.preds.cells`), the crash-safe writer and the reader (:mod:`~dens.preds.writer`), the one-run
lock (:mod:`~dens.preds.lock`), the breast and exam CSVs beside it (:mod:`~dens.preds.aggregate`) and the join of
shards (:mod:`~dens.preds.merge`, dens-merge). Every stage reads and writes it through these modules only.
"""
