"""Examples of user code the trainer loads from the config (see each file's docstring)."""
