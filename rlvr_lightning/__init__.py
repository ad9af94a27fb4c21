"""rlvr_lightning."""
