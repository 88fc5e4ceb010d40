"""The training stage: the one training loop, the tasks it trains on (classification, language modelling)
and the fine-tune recipe."""
from .finetune import FinetuneConfig, train_classifier
from .loop import LoopHooks, Optim, Precision, frozen_embeddings, train_loop, warmup_decay
from .tasks import ClassifyTask, LMTask, epoch_order, lm_blocks

__all__ = ["ClassifyTask", "FinetuneConfig", "LMTask", "LoopHooks", "Optim", "Precision", "epoch_order",
           "frozen_embeddings", "lm_blocks", "train_classifier", "train_loop", "warmup_decay"]
