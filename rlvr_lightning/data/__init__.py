"""Prompts with verifiable answers: built-in arithmetic and data modules."""

from rlvr_lightning.data.datamodule import ArithmeticDataModule, PromptDataModule, StepBatches

__all__ = ["ArithmeticDataModule", "PromptDataModule", "StepBatches"]
