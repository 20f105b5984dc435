"""Scoring trained models: classification metrics, confusion matrices and their plots."""
