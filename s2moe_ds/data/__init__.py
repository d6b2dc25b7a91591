"""Data: ``prepare`` writes token files + meta.json; ``loader`` samples training windows from them."""
