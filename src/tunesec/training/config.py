"""Configuration of the one fine-tuning engine (:func:`tunesec.training.train`).

Defaults suit a CPU and small models: float32, no gradient checkpointing, no mixed precision (TRL's
``SFTConfig`` turns bf16 and gradient checkpointing on, which makes a CPU step many times slower), LoRA with
r=8/alpha=16 on every linear projection of attention and MLP (as QLoRA, Dettmers et al. 2023, recommends
targeting all linear layers), padding-free packing of each batch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunesec.config import Config

Method = Literal["lora", "full"]
Batching = Literal["padding-free", "group-by-length", "random"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"]
Optimizer = Literal["adamw", "adamw-fused", "sgd"]


class TrainConfig(Config):
    """Hyperparameters of a supervised fine-tuning run (loss on assistant tokens only).

    ``max_steps`` wins over ``num_epochs`` when set. The effective batch is
    ``per_device_batch_size * gradient_accumulation_steps`` examples per optimizer step.
    """

    method: Method = Field("lora", description="'lora' trains a LoRA adapter; 'full' trains every weight.")
    lora_r: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 = none).")
    lora_target_modules: list[str] | None = Field(
        None,
        description="Names of the linear modules that get LoRA (e.g. q_proj, v_proj); default: every linear "
        "projection of attention and MLP that the model has. A name the model lacks is an error.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~1e-5 for full).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides num_epochs when set.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the dataset (when max_steps is not set).")
    per_device_batch_size: int = Field(8, ge=1, description="Examples per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches summed per optimizer step.")
    max_seq_len: int = Field(1024, ge=8, description="Examples are truncated to this many tokens.")
    batching: Batching = Field(
        "padding-free",
        description="'padding-free': each micro-batch is one packed row with per-example position ids (no "
        "pad compute, no cross-example attention); 'group-by-length': padded batches of similar lengths; "
        "'random': padded batches in random order.",
    )
    seed: int = Field(42, description="Seed of LoRA initialisation, data order and dropout.")
    save_steps: int = Field(
        100, ge=0, description="Write a resumable checkpoint every N optimizer steps (0 = only the final model)."
    )
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep at most this many checkpoints (oldest deleted); None keeps all."
    )
    logging_steps: int = Field(10, ge=1, description="Log the mean loss every N optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) weight decay.")
    warmup_steps: float = Field(
        0.0, ge=0, description="Linear warmup: a number of steps (>= 1) or a fraction of all steps (< 1)."
    )
    lr_scheduler: Scheduler = Field("linear", description="Learning-rate schedule after warmup.")
    optimizer: Optimizer = Field(
        "adamw-fused",
        description="'adamw-fused' (torch's fused AdamW; falls back to 'adamw' where torch "
        "lacks it), 'adamw' or 'sgd'.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU); off on CPU, where it is slower.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (saves memory, costs ~30% time)."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU (default: torch's choice, the physical cores)."
    )
    check_memory: bool = Field(True, description="Refuse to start when the estimated memory need exceeds what is free.")
    fsdp: bool = Field(
        False,
        exclude_if=lambda v: not v,  # left out of run specs when off, so earlier runs resume unchanged
        description="Shard weights, gradients and optimizer state over the processes with FSDP (CUDA, several "
        "processes, no hooks) instead of replicating the model with DDP.",
    )

    @model_validator(mode="after")
    def _check_lora_fields(self) -> TrainConfig:
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules: give at least one module name, or leave it unset")
        return self

    def total_batch_size(self) -> int:
        """Examples per optimizer step on one device."""
        return self.per_device_batch_size * self.gradient_accumulation_steps
