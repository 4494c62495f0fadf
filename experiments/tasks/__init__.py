"""Tasks: datasets and the small models the experiments train."""
