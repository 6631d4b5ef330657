"""Workflows: train, evaluate, predict, k-fold, semi, tune, previews, the demo and the commands that drive them."""
