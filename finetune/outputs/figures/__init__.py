"""Reports: figures (confusion matrices, training curves)."""
