"""``dens-merge SHARDS --out preds.csv``: the outputs of ``dens-infer --shard i/N`` runs joined into one, through
:mod:`dens.preds.merge` (the preds.csv contract's own merge)."""
