"""Training scripts for the models the project ships (never installed with the engine)."""
