"""dens-eval: a model's figures on a labelled set, through the code that writes dens-train's test section."""
