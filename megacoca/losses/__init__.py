from megacoca.losses.caption import StepTokens, caption_loss, caption_token_count
from megacoca.losses.coca import CoCaLoss
from megacoca.losses.contrastive import contrastive_loss

__all__ = ["CoCaLoss", "StepTokens", "caption_loss", "caption_token_count", "contrastive_loss"]
