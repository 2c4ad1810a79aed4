"""Initialisation: training data, CEM, clustering, deep hashing, galleries, evaluation."""
