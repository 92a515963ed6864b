"""Evaluation: datasets, the (dataset, attack) grid runner, Tables 1-2 and the Fig. 5 simulation."""
