"""Model adapters. Model-specific knowledge lives here and nowhere else."""
