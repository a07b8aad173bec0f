"""The CoCa model: single-device code that the parallel modules wrap afterwards."""

from megacoca.config.model import CoCaConfig
from megacoca.config.flavors import FLAVORS, get_flavor
from megacoca.models.coca.model import CoCa

__all__ = ["CoCa", "CoCaConfig", "FLAVORS", "get_flavor", "build_model"]


def build_model(flavor_or_config: "str | CoCaConfig", **overrides) -> CoCa:
    cfg = get_flavor(flavor_or_config) if isinstance(flavor_or_config, str) else flavor_or_config
    return CoCa(cfg.replace(**overrides) if overrides else cfg)
