from megacoca.losses.caption import caption_loss
from megacoca.losses.coca import CoCaLoss
from megacoca.losses.contrastive import contrastive_loss

__all__ = ["CoCaLoss", "caption_loss", "contrastive_loss"]
