"""Evaluation: tasks, scorers and the harness that runs every method at equal memory."""
