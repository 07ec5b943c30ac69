"""Evaluation: encode -> search -> metrics. Nothing here knows about optimisers."""
