"""Prompts with verifiable answers: built-in arithmetic and data modules."""

from rlvr_lightning.data.datamodule import ArithmeticDataModule, PromptDataModule, StepBatches
from rlvr_lightning.data.datasets import JsonlDataModule

__all__ = ["ArithmeticDataModule", "JsonlDataModule", "PromptDataModule", "StepBatches"]
